"""The device check: the CUDA path at COCO's real sizes, measured part by part in at most 6 minutes on one GPU.

    bash bench/gpu_device.sh                 # on the GPU machine: carried wheels, then this script (docs/gpu.md)
    python bench/gpu.py                      # the script alone, on a machine with a GPU
    python bench/gpu.py --device cpu --tiny  # the same code paths in well under a minute (the tests run this)
    python bench/gpu.py --prepare            # only copy photos into bench/gpu-photos/ (git-ignored, carried)

Parts, in order; each prints one JSON line when it ends (flushed, and appended to RESULTS/gpu.jsonl), so a
part that fails or runs past its time limit (`--limit PART=SECONDS`) leaves the others' results:

  jpegs     20,000 JPEGs of 640x480 at COCO's file size (~150 KB), made from the carried photos (random
            crop and flip, a grain that gives back the detail their downscaling took away); on a CPU too
            slow for its limit, as many as 80% of it makes (the note says how many)
  stage1    ResNet-152 (random weights: the same compute) over them: decoding alone (the DataLoader),
            the forward alone (one pinned batch), and the real extract() end to end (decode + forward + write);
            on a machine too slow for its limit, each pass over as many JPEGs as its share of the limit allows
  choices   stage 1's settings side by side: the forward alone at batch 64-512 and without channels_last,
            extract() end to end at batch 64 (the default) against 256, and with one worker fewer; decoding
            with torchvision.io.decode_jpeg on the device (nvJPEG) against the DataLoader's PIL workers; on a
            machine too slow for its limit, fewer JPEGs end to end, sized by stage1's rate
  train     the real train() on that cache, cross-entropy and SCST (one batch each): cuDNN's RNN backward
            in SCST, the EMA copy's "not one contiguous chunk" warning counted
  stage2    a synthetic full-COCO workload (123,287 images x 2,048 fp16 features, 616k captions, 10k words,
            token ids drawn directly) through the product's step, SCST epoch and validation: seconds per
            epoch projected from timed batches, 500-image beam-3 validation, the default recipe projected
  syncs     host syncs counted (`torch.cuda.set_sync_debug_mode("warn")`, each one a warning with its line)
            over cross-entropy steps, an SCST step and a beam-3 decode; the one copy of a decoding's results
            (readback.read_back: the SCST samples its rewards score, the beam's captions) counted apart
  profile   torch.profiler over cross-entropy steps, an SCST batch, a beam-3 decode and a stage 1 forward
            batch: ms per step, the GPU's busy share, the top kernels (a missed target names its cause)
  sweep     the real sweep CLI in a fresh process (the fork path a user's sweep takes), 4 runs (2 with
            --tiny), 2 jobs; failed runs counted
  torchrun  stage 1 under torchrun with 2 processes on the one GPU (gloo, each its share of the images)
            against a plain run: the same features
  caption   caption cold start: `python -m stage2_decoder.caption IMAGE` from process start to exit

RESULTS/gpu.json gathers them (shape in `summary`), rewritten after every part: a check stopped from outside
(the wrapper's time limit) still leaves it, with the parts it did not reach "not run". Exit status 1 when a
part fails or times out, a sweep run fails, the cross-entropy step, the SCST step or beam search syncs (besides
the results' read), or the torchrun features differ.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from harness import REPO, default_data, machine

PHOTOS = Path(__file__).resolve().parent / "gpu-photos"
PARTS = ("jpegs", "stage1", "choices", "train", "stage2", "syncs", "profile", "sweep", "torchrun", "caption")
# seconds per part on the device, at most: together 310 s (bench/gpu_device.sh allows 325 + 15 to kill, and ~20 s
# of set-up around it), so that a 3-minute machine start and two tries fit in a 15-minute device lease (jpegs,
# stage1 and choices size their work to their limit)
# (train tokenises the 100k captions once; the sweep's runs then read them from the token cache)
# (torchrun: two cold processes, each building ResNet-152 and running cudnn.benchmark, plus the launcher)
LIMITS = {"jpegs": 30, "stage1": 50, "choices": 30, "train": 40, "stage2": 60, "syncs": 10, "profile": 15,
          "sweep": 30, "torchrun": 30, "caption": 15}
COCO = {"images": 123_287, "captions": 616_767, "vocab": 10_000}  # COCO 2017 train + val; words seen >= 4 times
JPEG_SIZE, JPEG_QUALITY, GRAIN = (640, 480), 92, 14.0  # 14 levels of grain at quality 92: ~150 KB, COCO's mean
JPEGS_SHARE = 0.8  # of the jpegs part's limit spent making JPEGs; the rest writes their captions file
STAGE1_SHARES = (0.25, 0.35)  # of the stage1 part's limit: decoding alone, then extract() end to end; the rest
# builds the model twice and times the forward
CHOICES_SHARE = 0.5  # of the choices part's limit for its end-to-end runs; the rest times the forwards and nvJPEG
READ_BACK = "readback.py"  # stage2_decoder/decoding/readback.py: a decoding's one read of its results
CHUNK_WARNING = "contiguous chunk"  # cuDNN: "RNN module weights are not part of single contiguous chunk of memory"


class PartTimeout(Exception):
    """A part ran past its --limit."""


def _error_text(e: BaseException, limit: int) -> str:
    """An error as gpu.json records it: its type, then its message on one line, cut at `limit` characters."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"


def photo_dir(data: Path, n: int) -> Path:
    """A COCO-format folder (captions.json, images/) of n photos: bench/gpu-photos/, filled from `data` if
    it is at hand, else as an earlier run left it (the folder a GPU machine receives)."""
    src = data / "coco2017-mini"
    have = PHOTOS / "captions.json"
    if have.is_file() and len(json.loads(have.read_text())["images"]) >= n:
        return PHOTOS
    if not (src / "captions.json").is_file():
        raise SystemExit(f"error: no COCO photos: neither {src} nor {PHOTOS} (run --prepare where ../shared/data is)")
    doc = json.loads((src / "captions.json").read_text())
    images = sorted(doc["images"], key=lambda im: im["id"])[:n]
    ids = {im["id"] for im in images}
    (PHOTOS / "images").mkdir(parents=True, exist_ok=True)
    for im in images:
        shutil.copy2(src / "images" / im["file_name"], PHOTOS / "images" / im["file_name"])
    subset = {**doc, "images": images, "annotations": [a for a in doc["annotations"] if a["image_id"] in ids]}
    have.write_text(json.dumps(subset))
    return PHOTOS


class Clock:
    """Wall time of a block, the device's queue drained at both ends."""

    def __init__(self, device):
        self.device = device

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self.sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.s = time.perf_counter() - self.t0


# --- jpegs ------------------------------------------------------------------------------------------------

_GRAIN: np.ndarray | None = None  # one noise field per process, windows of it at random offsets


def _make_jpeg(job: tuple[str, str, int]) -> int:
    """One COCO-size JPEG from a carried photo: random crop (60-100% of each side), flip half the time,
    640x480, grain; returns its size in bytes."""
    from PIL import Image, ImageOps

    global _GRAIN
    src, dst, seed = job
    rng = np.random.default_rng(seed)
    if _GRAIN is None:
        _GRAIN = np.random.default_rng(0).normal(0, GRAIN, (JPEG_SIZE[1] + 64, JPEG_SIZE[0] + 64, 3)).astype(np.float32)
    with Image.open(src) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    w, h = im.size
    cw, ch = max(8, int(w * rng.uniform(0.6, 1.0))), max(8, int(h * rng.uniform(0.6, 1.0)))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize(JPEG_SIZE, Image.BILINEAR)
    if rng.random() < 0.5:
        im = ImageOps.mirror(im)
    dy, dx = int(rng.integers(0, 64)), int(rng.integers(0, 64))
    a = np.asarray(im, dtype=np.float32) + _GRAIN[dy:dy + JPEG_SIZE[1], dx:dx + JPEG_SIZE[0]]
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(dst, quality=JPEG_QUALITY)
    return os.path.getsize(dst)


def part_jpegs(ctx) -> dict:
    """ctx.jpegs: a folder of images/ and captions.csv (each JPEG with its source photo's captions; a CSV,
    so no pycocotools is needed to read it)."""
    import multiprocessing as mp

    doc = json.loads((ctx.photos / "captions.json").read_text())
    caps: dict[int, list[str]] = {}
    for a in doc["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"].strip())
    sources = [(ctx.photos / "images" / im["file_name"], caps.get(im["id"], [])) for im in doc["images"]]
    out = ctx.work / "jpegs"
    ctx.jpegs = out
    recipe = {"jpegs": ctx.args.jpegs, "photos": len(sources), "size": list(JPEG_SIZE), "quality": JPEG_QUALITY,
              "grain": GRAIN}
    made = out / "made.json"  # written last: the folder is whole; a second call on a warm machine reuses it
    try:
        stamp = json.loads(made.read_text())
        if stamp["recipe"] == recipe:
            return {**stamp["result"], "reused": True}
    except (OSError, ValueError, KeyError, TypeError):  # none, or not one this script wrote whole: made again
        pass
    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    jobs = [(str(sources[i % len(sources)][0]), str(out / "images" / f"{i:06d}.jpg"), i) for i in range(ctx.args.jpegs)]
    limit = ctx.limits.get("jpegs")
    # a slower CPU than planned makes fewer JPEGs, not none: every later part but three needs them
    stop_at = time.perf_counter() + JPEGS_SHARE * limit if limit else math.inf
    sizes: list[int] = []
    # forked after this process has started CUDA: safe while the workers use only PIL and numpy
    from common.device import usable_cores

    with mp.get_context("fork").Pool(usable_cores()) as pool:
        for size in pool.imap(_make_jpeg, jobs, chunksize=16):  # in order: the first len(sizes) are whole
            sizes.append(size)
            if time.perf_counter() > stop_at:
                break
    n = len(sizes)
    for path in (out / "images").iterdir():  # those the stopped workers were writing
        if int(path.stem) >= n:
            path.unlink()
    with open(out / "captions.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption"])
        for i in range(n):
            for c in sources[i % len(sources)][1]:
                w.writerow([f"{i:06d}.jpg", c])
    result = {"images": n, "jpeg_size": list(JPEG_SIZE), "mean_kb": round(sum(sizes) / n / 1024, 1),
              "quality": JPEG_QUALITY, "from_photos": len(sources)}
    if n < len(jobs):
        result["note"] = f"{n} of {len(jobs)} made in {JPEGS_SHARE:.0%} of the part's {limit:g} s"
    from common.atomic import atomic_write

    atomic_write(made, json.dumps({"recipe": recipe, "result": result}), what="JPEG folder stamp")
    return result


# --- stage 1 ----------------------------------------------------------------------------------------------

def _workers_that_fit(workers: int, batch: int, crop: int) -> tuple[int, str]:
    from common.backbones import check_shm, shm_need
    from stage1_extract.extract import PREFETCH

    try:
        check_shm(workers, batch, crop, PREFETCH)
        return workers, ""
    except ValueError:  # a small /dev/shm (Docker's 64 MB): as many workers as fit, and say so
        per_worker = shm_need(1, batch, crop, PREFETCH)
        return max(0, min(workers, shutil.disk_usage("/dev/shm").free // per_worker)), "as many as /dev/shm holds"


def _fresh_cache(out: Path) -> Path:
    """`out` with no cache and no unfinished parts left from an earlier run (stage 1 would resume them)."""
    from common.feature_cache import parts_dir

    out.unlink(missing_ok=True)
    shutil.rmtree(parts_dir(out), ignore_errors=True)
    return out


def _input_batch(bb, batch: int, device):
    """One uint8 batch as the DataLoader hands it to `Backbone.encode` (pinned on CUDA), with cudnn.benchmark on:
    every batch has this one shape."""
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    x = torch.randint(0, 256, (batch, 3, bb.preprocess.crop, bb.preprocess.crop), dtype=torch.uint8)
    return x.pin_memory() if device.type == "cuda" else x


def part_stage1(ctx) -> dict:
    from torch.utils.data import DataLoader

    from common.backbones import ImageRows, default_workers, load_backbone
    from common.datasets import load_dataset
    from stage1_extract.extract import PREFETCH, ExtractConfig, extract

    args, device = ctx.args, ctx.device
    bb = load_backbone(args.backbone, "none", device)
    crop = bb.preprocess.crop
    workers, note = _workers_that_fit(default_workers(), args.batch_size, crop)
    records = load_dataset("auto", str(ctx.jpegs / "captions.csv"), str(ctx.jpegs / "images"))
    # decoding alone: the DataLoader extract() builds, nothing on the device
    loader = DataLoader(ImageRows([(i, r.path) for i, r in enumerate(records)], bb.preprocess),
                        batch_size=args.batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=PREFETCH if workers else None)
    limit = ctx.limits.get("stage1")
    # on a machine slower than planned, fewer images in each pass rather than a part timed out: the train,
    # sweep and caption parts need its cache
    n, t0 = 0, time.perf_counter()
    for rows, _, _ in loader:
        n += len(rows)
        if limit and time.perf_counter() - t0 > STAGE1_SHARES[0] * limit:
            break
    decode_s = time.perf_counter() - t0
    # the forward alone, on one pinned batch
    x = _input_batch(bb, args.batch_size, device)
    if args.compile:
        bb.compile(args.batch_size)
    for _ in range(2):  # warm-up: cudnn.benchmark (and torch.compile) choose their kernels here
        bb.encode(x)
    reps = 2 if args.tiny else 20
    with Clock(device) as c:
        for _ in range(reps):
            bb.encode(x)
    forward = reps * args.batch_size / c.s
    del bb
    whole = len(records)
    if limit:  # end to end at the rate of decoding and the forward one after the other: overlapped, it is faster
        serial = 1 / (decode_s / n + 1 / forward)
        whole = min(whole, max(args.batch_size, int(serial * STAGE1_SHARES[1] * limit)))
    # end to end: the real extract(), decode + forward + copy-out + shard writes + assembly
    cache = _fresh_cache(ctx.work / "stage1.h5")
    cfg = ExtractConfig(images=str(ctx.jpegs / "images"), captions=str(ctx.jpegs / "captions.csv"), out=str(cache),
                        backbone=args.backbone, weights="none", batch_size=args.batch_size, device=str(device),
                        workers=workers, progress=False, compile=args.compile,
                        limit=whole if whole < len(records) else None)
    s = extract(cfg)
    ctx.cache, ctx.stage1_img_s = cache, s.images_per_s
    if n < len(records) or whole < len(records):
        note = "; ".join(filter(None, [note, f"of the {len(records)} JPEGs, {n} decoded alone and {whole} end to end "
                                             "within the part's limit"]))
    return {"images": n, "decode_only_img_s": round(n / decode_s, 1), "forward_img_s": round(forward, 1),
            "end_to_end_img_s": round(s.images_per_s, 1), "end_to_end_images": whole, "workers": workers,
            "batch": args.batch_size, "backbone": args.backbone,
            "precision": "bfloat16" if device.type == "cuda" else "float32",
            "compile": args.compile, **({"note": note} if note else {})}


def _torchvision_decode_rate(paths: list[Path], pp, device, batch: int) -> float:
    """img/s of the other way to decode: torchvision.io.decode_jpeg on `device` (nvJPEG on CUDA), batches of
    files, each resized and centre-cropped there as stage 1's preprocessing does, in this one process."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as F2

    def one_batch(files):
        images = decode_jpeg([read_file(str(f)) for f in files], mode=ImageReadMode.RGB, device=device)
        return torch.stack([F2.center_crop(F2.resize(x, [pp.resize], antialias=True), [pp.crop]) for x in images])

    one_batch(paths[:8])  # warm-up: the decoder's handles and buffers
    with Clock(device) as c:
        n = sum(len(one_batch(paths[i:i + batch])) for i in range(0, len(paths), batch))
    return n / c.s


def part_choices(ctx) -> dict:
    """Stage 1's settings side by side, to choose its defaults from: the forward alone at batch 64 to 512 and
    without channels_last, and extract() end to end over the first JPEGs at the default batch (64) against
    --batch-size, and with one worker fewer (as many as /dev/shm holds); decoding with torchvision on the device
    (nvJPEG) against the DataLoader's PIL workers."""
    from stage1 import bare_images_per_s  # bench/stage1.py

    from common.backbones import default_workers, load_backbone, preprocess_for
    from stage1_extract.extract import ExtractConfig, extract

    args, dev, tiny = ctx.args, ctx.device, ctx.args.tiny
    bb = load_backbone(args.backbone, "none", dev)
    crop = bb.preprocess.crop
    reps = 2 if tiny else 10
    forward = {str(b): round(bare_images_per_s(bb.model, b, reps, dev, warm_up=True), 1)
               for b in ((4, 8) if tiny else (64, 128, 256, 512))}
    contiguous = round(bare_images_per_s(bb.model, args.batch_size, reps, dev, channels_last=False, warm_up=True), 1)
    del bb
    made = sorted((ctx.jpegs / "images").iterdir())
    files = made[:16 if tiny else 4096]
    try:  # a torchvision built without nvJPEG loses this figure, not the part's others
        tv_decode = round(_torchvision_decode_rate(files, preprocess_for(args.backbone), dev, args.batch_size), 1)
    except (RuntimeError, ValueError) as e:
        tv_decode = _error_text(e, 200)
    n = min(len(made), 16 if tiny else 8000)
    workers, note = _workers_that_fit(default_workers(), max(64, args.batch_size), crop)
    fewer = workers - 1 if workers > 1 else workers  # 1 worker: no fewer (0 decodes in the main process)
    configs = dict.fromkeys([(64, workers), (args.batch_size, workers), (args.batch_size, fewer)])
    limit, rate = ctx.limits.get("choices"), ctx.stage1_img_s
    if limit and rate:  # a machine too slow for the part's limit: fewer JPEGs, at stage1's end-to-end rate
        n = min(n, max(64, int(rate * CHOICES_SHARE * limit / len(configs))))

    def end_to_end(batch: int, w: int) -> float:
        out = _fresh_cache(ctx.work / f"choice-{batch}-{w}.h5")
        s = extract(ExtractConfig(images=str(ctx.jpegs / "images"), captions=str(ctx.jpegs / "captions.csv"),
                                  out=str(out), backbone=args.backbone, weights="none", batch_size=batch,
                                  device=str(dev), workers=w, limit=n, progress=False))
        out.unlink(missing_ok=True)
        return round(s.images_per_s, 1)

    e2e = {f"batch {b}, workers {w}": end_to_end(b, w) for b, w in configs}  # each once
    return {"forward_img_s_by_batch": forward, "forward_img_s_contiguous": contiguous,
            "contiguous_batch": args.batch_size, "end_to_end_images": n,
            "end_to_end_img_s": e2e, "torchvision_decode_img_s": tv_decode, "torchvision_decode_images": len(files),
            **({"note": note} if note else {})}


# --- the real train() ------------------------------------------------------------------------------------

def part_train(ctx) -> dict:
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    run = ctx.work / "train"
    shutil.rmtree(run, ignore_errors=True)
    cfg = TrainConfig(features=str(ctx.cache), out=str(run), epochs=1, scst_epochs=1, device=str(ctx.device),
                      progress=False, dry_run=True, val_images=50, vocab_threshold=2 if ctx.args.tiny else 4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = train(cfg)
    ctx.run = run
    chunk = sum(CHUNK_WARNING in str(w.message) for w in seen)
    return {"epochs": [h.get("phase", "xe") for h in r.history], "val_cider": round(r.history[-1]["val_cider"], 4),
            "ema_chunk_warnings": chunk, "_failed": chunk > 0}


# --- stage 2 at full COCO size ----------------------------------------------------------------------------

def _synthetic(ctx):
    """Full-COCO-size training data on the device: features (N, D) fp16, caption pairs built through
    CaptionPairs from word lists drawn directly (no tokenising), a vocabulary of COCO's size."""
    import torch

    from common.records import ImageRecord
    from common.vocab import SPECIALS, Vocabulary
    from stage2_decoder.training.pairs import CaptionPairs

    tiny = ctx.args.tiny
    n, v, per = (400, 300, 5) if tiny else (COCO["images"], COCO["vocab"], 5)
    g = np.random.default_rng(0)
    vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(v - len(SPECIALS)))], tokenizer="whitespace")
    # COCO captions: ~10.5 words, most 8-15; word frequencies roughly Zipf
    lengths = np.clip(np.rint(g.normal(10.5, 2.4, n * per)), 5, 30).astype(int)
    ranks = np.minimum(g.zipf(1.2, lengths.sum()), v - len(SPECIALS)) - 1
    words = np.array(vocab.itos[len(SPECIALS):], dtype=object)[ranks]
    cuts = np.cumsum(lengths)[:-1]
    caps = [list(c) for c in np.split(words, cuts)]
    keys = [f"{i:06d}" for i in range(n)]
    tokens = {k: caps[i * per:(i + 1) * per] for i, k in enumerate(keys)}
    records = [ImageRecord(key=k, image_id=k, path=f"{k}.jpg", captions=[" ".join(c) for c in tokens[k]]) for k in keys]
    rows = {k: i for i, k in enumerate(keys)}
    n_train, n_val = int(0.9 * n), int(0.05 * n)
    dev = ctx.device
    train_set = CaptionPairs(records[:n_train], rows, vocab, 50, tokens).to(dev)
    val_set = CaptionPairs(records[n_train:n_train + n_val], rows, vocab, 50, tokens).to(dev)
    feats = torch.rand(n, 2048, generator=torch.Generator().manual_seed(0)).to(torch.float16).to(dev)
    return SimpleNamespace(vocab=vocab, records=records, tokens=tokens, rows=rows, train_set=train_set,
                           val_set=val_set, features=feats, n=n, n_train=n_train, n_val=n_val,
                           captions=int(lengths.size))


def _xe_steps(s, cfg, batches, model, opt, ema, device, g, per_epoch: int):
    """`_xe_epoch`'s loop body (stage2_decoder/training/epochs.py) over `batches`, some of an epoch of
    `per_epoch` batches: gather, step, average."""
    import torch

    from stage2_decoder.training.epochs import train_step

    tokens_per_batch = float(s.train_set.lengths.sum()) / max(per_epoch, 1)  # as the epoch weighs its batches
    loss_sum = torch.zeros((), device=device)
    for idx in batches:
        if len(idx) < 2:
            continue
        b = s.train_set.gather(idx, s.features, g)
        loss, n = train_step(model, opt, b, device, cfg.grad_clip, cfg.label_smoothing,
                             weight=float(b.lengths.sum()) / tokens_per_batch)
        ema.update(model)
        loss_sum += loss * n
    return loss_sum


def part_stage2(ctx) -> dict:
    import torch

    from stage2_decoder.model import CaptionDecoder
    from stage2_decoder.training.cider import CiderD
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.ema import EMA
    from stage2_decoder.training.epochs import evaluate_loss, validation_cider
    from stage2_decoder.training.scst import scst_epoch

    dev, tiny = ctx.device, ctx.args.tiny
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    s = _synthetic(ctx)
    build_s = time.perf_counter() - t0
    cfg = TrainConfig(features="synthetic", out="unused", device=str(dev), progress=False)
    torch.manual_seed(0)
    model = CaptionDecoder(cfg.decoder_config(2048, len(s.vocab))).to(dev).train()
    opt = cfg.optimizer(model.parameters())
    ema = EMA(model, cfg.ema_decay)
    g = torch.Generator().manual_seed(0)
    batches = s.train_set.batches(cfg.batch_size, g, cfg.length_buckets)
    warm, timed = (2, 4) if tiny else (20, 400)
    _xe_steps(s, cfg, batches[:warm], model, opt, ema, dev, g, len(batches))
    with Clock(dev) as c:
        _xe_steps(s, cfg, batches[warm:warm + timed], model, opt, ema, dev, g, len(batches))
    xe_epoch_s = c.s / timed * len(batches)
    # validation: the loss over the val captions, and CIDEr of 500 images decoded with beam 3
    with Clock(dev) as c:
        evaluate_loss(model, s.val_set, s.features, cfg.batch_size * 4, dev)
    val_loss_s = c.s
    val_keys = [r.key for r in s.records[s.n_train:s.n_train + min(500, s.n_val)]]
    refs = {k: [" ".join(w) for w in s.tokens[k]] for k in val_keys}
    validation_cider(model, s.vocab, s.features, s.rows, dict(list(refs.items())[:16]), beam_size=3)  # warm-up
    with Clock(dev) as c:
        validation_cider(model, s.vocab, s.features, s.rows, refs, beam_size=3)
    val_beam_s = c.s
    # SCST: the product's epoch over enough images for a few batches; the scorer's corpus is those images
    scst_batches = 1 if tiny else 12
    scst_keys = [r.key for r in s.records[:cfg.batch_size * (scst_batches + 1)]]
    scorer = CiderD({k: s.tokens[k] for k in scst_keys}, tokenizer="whitespace")
    scst_rows = {k: s.rows[k] for k in scst_keys}
    scst_epoch(model, opt, s.features, scst_rows, scorer, s.vocab.itos, cfg.batch_size, g, cfg.scst_samples,
               cfg.grad_clip, max_batches=1)  # warm-up
    with Clock(dev) as c:
        scst_epoch(model, opt, s.features, scst_rows, scorer, s.vocab.itos, cfg.batch_size, g, cfg.scst_samples,
                   cfg.grad_clip, max_batches=scst_batches)
    scst_epoch_s = c.s / scst_batches * math.ceil(s.n_train / cfg.batch_size)
    val_s = val_loss_s + val_beam_s
    recipe = cfg.epochs * (xe_epoch_s + val_s) + cfg.scst_epochs * (scst_epoch_s + val_s)
    ctx.s2 = SimpleNamespace(data=s, cfg=cfg, model=model, opt=opt, ema=ema, batches=batches, g=g, scorer=scorer,
                             scst_rows=scst_rows)
    peak = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
    return {"images": s.n, "captions": s.captions, "vocab": len(s.vocab), "xe_epoch_s": round(xe_epoch_s, 2),
            "scst_epoch_s": round(scst_epoch_s, 2), "val_500_beam3_s": round(val_beam_s, 3),
            "val_loss_s": round(val_loss_s, 3), "recipe_projected_s": round(recipe, 1),
            "peak_gpu_gb": None if peak is None else round(peak, 2), "xe_steps_timed": timed,
            "xe_steps_per_epoch": len(batches), "scst_batches_timed": scst_batches, "build_s": round(build_s, 1)}


# --- host syncs -------------------------------------------------------------------------------------------

@contextmanager
def _count_syncs(device, found: dict, name: str):
    """Every host sync in the block as a warning (set_sync_debug_mode "warn": "error" would stop at the
    first); found[name] = {"count", "where": the Python lines that synced}. Not counted off CUDA."""
    import torch

    if device.type != "cuda":
        yield
        found[name] = {"count": None, "where": []}
        return
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    results = [w for w in syncs if Path(w.filename).name == READ_BACK]
    found[name] = {"count": len(syncs) - len(results), "results_reads": len(results),
                   "where": sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs if w not in results})}


def part_syncs(ctx) -> dict:
    from stage2_decoder.decoding.beam import beam_search_nbest
    from stage2_decoder.decoding.config import DecodeConfig
    from stage2_decoder.training.scst import scst_epoch

    z, dev = ctx.s2, ctx.device
    s, found = z.data, {}
    steps = 3
    z.model.train()  # the stage2 part ended in SCST, which leaves BatchNorm and dropout in eval mode
    with _count_syncs(dev, found, "xe_step"):
        _xe_steps(s, z.cfg, z.batches[-steps:], z.model, z.opt, z.ema, dev, z.g, len(z.batches))
    with _count_syncs(dev, found, "scst_step"):
        scst_epoch(z.model, z.opt, s.features, z.scst_rows, z.scorer, s.vocab.itos, z.cfg.batch_size, z.g,
                   z.cfg.scst_samples, z.cfg.grad_clip, max_batches=1)
    z.model.eval()
    with _count_syncs(dev, found, "beam"):
        beam_search_nbest(z.model, s.features[:256].float(), DecodeConfig(3))
    per_step = None if found["xe_step"]["count"] is None else found["xe_step"]["count"] / steps
    counts = {"xe_step": per_step, "scst_step": found["scst_step"]["count"], "beam": found["beam"]["count"]}
    return {**counts, "results_reads": {k: v.get("results_reads") for k, v in found.items()},
            "where": {k: v["where"] for k, v in found.items()}, "checked": dev.type == "cuda",
            "_failed": any(counts.values())}


# --- where the time goes --------------------------------------------------------------------------------

def _profiled(device, fn, steps: int, top: int = 8) -> dict:
    """fn() run `steps` times under torch.profiler: wall ms per step, the share of it the GPU spent in kernels
    (1 - that share: its idle gaps, launches and host work it waited for), and the top kernels (CPU ops off CUDA)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    try:  # one section that fails (CUPTI refused, a step that errs) leaves the other sections' figures
        fn()  # warm: kernel choice and allocations are not what a step costs
        with profile(activities=acts) as prof, Clock(device) as c:
            for _ in range(steps):
                fn()
        events = prof.key_averages()
    except PartTimeout:
        raise
    except Exception as e:  # noqa: BLE001
        return {"error": _error_text(e, 200)}

    def dev_us(e) -> float:
        return float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0))

    if cuda:
        rows = [(e.key, dev_us(e), e.count) for e in events  # kernels and copies; annotations span them
                if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    else:
        rows = [(e.key, float(e.self_cpu_time_total), e.count) for e in events]
    rows.sort(key=lambda r: r[1], reverse=True)
    busy = sum(r[1] for r in rows) / 1e6 / c.s if cuda and rows else None  # no kernels seen: CUPTI gave nothing
    return {"wall_ms_per_step": round(c.s / steps * 1000, 2), "gpu_busy": None if busy is None else round(busy, 3),
            "top": [[name[:80], round(us / 1000 / steps, 3), n // steps] for name, us, n in rows[:top]]}


def part_profile(ctx) -> dict:
    """torch.profiler over the timed work, so a missed target names its kernels or its idle GPU in the same run:
    the cross-entropy step, an SCST batch, a beam-3 decode of 256 images and a stage 1 forward batch
    (per step: ms, GPU busy share, top kernels with ms and calls)."""
    import torch

    from common.backbones import load_backbone
    from stage2_decoder.decoding.beam import beam_search_nbest
    from stage2_decoder.decoding.config import DecodeConfig
    from stage2_decoder.training.scst import scst_epoch

    z, dev = ctx.s2, ctx.device
    s, batches = z.data, iter(z.batches[1:])
    z.model.train()
    out = {"xe_step": _profiled(dev, lambda: _xe_steps(s, z.cfg, [next(batches)], z.model, z.opt, z.ema, dev, z.g,
                                                       len(z.batches)), steps=2 if ctx.args.tiny else 10)}
    def scst_batch():
        scst_epoch(z.model, z.opt, s.features, z.scst_rows, z.scorer, s.vocab.itos, z.cfg.batch_size, z.g,
                   z.cfg.scst_samples, z.cfg.grad_clip, max_batches=1)

    out["scst_step"] = _profiled(dev, scst_batch, steps=1 if ctx.args.tiny else 2)
    z.model.eval()
    feats = s.features[:256].float()
    with torch.inference_mode():
        out["beam"] = _profiled(dev, lambda: beam_search_nbest(z.model, feats, DecodeConfig(3)),
                                steps=1 if ctx.args.tiny else 3)
    bb = load_backbone(ctx.args.backbone, "none", dev)
    x = _input_batch(bb, ctx.args.batch_size, dev)
    out["stage1_forward"] = _profiled(dev, lambda: bb.encode(x), steps=1 if ctx.args.tiny else 5)
    return out


# --- the sweep CLI, torchrun, caption cold start ----------------------------------------------------------

def _descendants(pid: int) -> list[int]:
    """The processes below `pid`, read from /proc (none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):  # a process that ended while being read
            continue
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _stop(p: subprocess.Popen) -> None:
    """SIGTERM to the launcher's process group and to every process below it (torchrun starts its workers in
    sessions of their own, out of the group's reach), then SIGKILL to all of them after 10 s."""
    below = _descendants(p.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for kill, target in [(os.killpg, p.pid), *((os.kill, pid) for pid in below)]:
            try:
                kill(target, sig)
            except (ProcessLookupError, PermissionError):  # gone already
                pass
        if sig == signal.SIGTERM:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
    p.wait()


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run in a process group of its own, stopped whole (`_stop`) when its timeout, the part's or a
    SIGTERM to this script ends the wait: subprocess.run kills only the launcher, leaving its workers (the
    sweep's runs, torchrun's ranks) on the GPU through the parts after it."""
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except BaseException:
            _stop(p)
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@contextmanager
def _exit_on_sigterm():
    """While in the block, SIGTERM (gpu_device.sh's time limit) ends the check through SystemExit, which no part
    catches, so a subprocess in flight is stopped whole on the way out; gpu.json already holds the parts done."""
    def on_sigterm(signum, frame):
        raise SystemExit(143)

    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def part_sweep(ctx) -> dict:
    out = ctx.work / "sweep"
    shutil.rmtree(out, ignore_errors=True)
    grid = ctx.work / "grid.json"
    # 4 runs (2 with --tiny: the same fork path, half the process starts on a small CPU)
    runs = {"lr": [1e-3, 2e-3], "dropout": [0.5] if ctx.args.tiny else [0.3, 0.5]}
    grid.write_text(json.dumps({**runs, "epochs": [1], "scst_epochs": [0], "vocab_threshold": [2],
                                "device": [str(ctx.device)]}))
    n_runs = math.prod(len(v) for v in runs.values())
    t0 = time.perf_counter()
    p = _run([sys.executable, "-m", "stage2_decoder.sweep", "--features", str(ctx.cache), "--out", str(out),
              "--grid", str(grid), "--n-jobs", "2", "--dry-run", "--no-progress"],
             timeout=ctx.limits.get("sweep") or 600)
    seconds = time.perf_counter() - t0
    rows = []
    if (out / "results.json").is_file():
        doc = json.loads((out / "results.json").read_text())
        rows = doc if isinstance(doc, list) else doc.get("runs") or doc.get("rows") or []
    ok = sum(r.get("status") == "ok" for r in rows)
    text = p.stdout + p.stderr + "".join(f.read_text(errors="replace") for f in out.rglob("*.log"))
    chunk = text.count(CHUNK_WARNING)
    return {"runs": n_runs, "ok": ok, "failed": n_runs - ok, "rc": p.returncode, "jobs": 2,
            "seconds": round(seconds, 1), "ema_chunk_warnings": chunk,
            "_failed": ok < n_runs or p.returncode != 0 or chunk > 0,
            **({"stderr": p.stderr.strip().splitlines()[-1][:200]} if ok < n_runs and p.stderr.strip() else {})}


def part_torchrun(ctx) -> dict:
    from common.backbones import preprocess_for
    from common.feature_cache import load_cache

    n, batch = (8, 8) if ctx.args.tiny else (256, 64)
    workers, _ = _workers_that_fit(2, batch, preprocess_for(ctx.args.backbone).crop)
    outs = {}
    for how in ("plain", "torchrun"):
        out = _fresh_cache(ctx.work / f"{how}.h5")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] \
            if how == "torchrun" else [sys.executable]
        cmd = [*launcher, "-m", "stage1_extract", "--images", str(ctx.jpegs / "images"), "--captions",
               str(ctx.jpegs / "captions.csv"), "--out", str(out), "--backbone", ctx.args.backbone, "--weights", "none",
               "--dtype", "float32", "--limit", str(n), "--batch-size", str(batch),
               "--workers", str(workers), "--device", str(ctx.device), "--no-progress"]
        p = _run(cmd, timeout=300)
        if p.returncode != 0:
            return {"torchrun_equal": False, "_failed": True,
                    "error": f"{how}: " + " ".join(p.stderr.strip().splitlines()[-1:])[:200]}
        outs[how] = load_cache(str(out))
    a, b = outs["plain"], outs["torchrun"]
    rel = float(np.abs(a.features - b.features).max() / max(float(np.abs(a.features).max()), 1e-30))
    # bf16 on CUDA: cudnn.benchmark may time other kernels in each process, so equal up to bf16 rounding
    equal = a.keys == b.keys and rel < 1e-2
    return {"torchrun_equal": equal, "bitwise": a.keys == b.keys and rel == 0.0, "images": n, "processes": 2,
            "max_rel_diff": rel, "_failed": not equal}


def part_caption(ctx) -> dict:
    image = sorted((ctx.jpegs / "images").iterdir())[0]
    t0 = time.perf_counter()
    p = _run([sys.executable, "-m", "stage2_decoder.caption", str(image), "--checkpoint", str(ctx.run / "best.pt"),
              "--device", str(ctx.device)], timeout=300)
    s = time.perf_counter() - t0
    ok = p.returncode == 0 and bool(p.stdout.strip())
    last = (p.stdout.strip().splitlines() or p.stderr.strip().splitlines() or [""])[-1][:120]
    out = {"caption_cold_start_s": round(s, 2) if ok else None, "output": last, "_failed": not ok}
    limit = ctx.limits.get("caption")
    if ok and (limit is None or limit - s > CAPTION_WARM_NEEDS_S):
        folder = {}
        try:  # the cold start is the part's figure: running out of time here costs only the folder's
            _caption_folder(ctx, 8 if ctx.args.tiny else 256, folder)
        except PartTimeout:
            out["note"] = "caption_folder: the part's limit came before its 4 passes ended"
        except Exception as e:  # noqa: BLE001
            out["note"] = f"caption_folder: {_error_text(e, 200)}"
        out["caption_folder"] = folder
    elif ok:
        out["note"] = f"caption_folder not timed: the cold start left under {CAPTION_WARM_NEEDS_S} s of the part"
    return out


CAPTION_WARM_NEEDS_S = 6  # the caption part's time a warm folder needs after the cold start (load, 4 passes)


def _caption_folder(ctx, n: int, out: dict) -> None:
    """A folder of COCO-size JPEGs through the warm Python API (what `caption DIR` runs), its files read one
    after another against in `default_read_threads()` threads while the model works: images per second, filled
    into `out` pass by pass (a part that runs out of time keeps the passes done)."""
    from stage2_decoder.api import Captioner, default_read_threads

    files = sorted((ctx.jpegs / "images").iterdir())[:n]
    cap = Captioner.load(ctx.run / "best.pt", str(ctx.device))
    threads = default_read_threads()
    out.update(images=len(files), read_threads=threads)
    list(cap.caption_iter(files[:36], read_threads=threads))  # warm-up: cuDNN picks its kernels for both shapes (4, 32)
    times, captions = {0: [], threads: []}, {}
    for t in (0, threads, 0, threads):
        t0 = time.perf_counter()
        captions[t] = [r["caption"] for r in cap.caption_iter(files, read_threads=t)]
        times[t].append(time.perf_counter() - t0)
        out[f"img_s_read_threads_{t}"] = round(len(files) / min(times[t]), 1)
        if len(captions) == 2:
            out["same_captions"] = captions[0] == captions[threads]


RUNNERS = {"jpegs": part_jpegs, "stage1": part_stage1, "choices": part_choices, "train": part_train,
           "stage2": part_stage2, "syncs": part_syncs, "profile": part_profile, "sweep": part_sweep,
           "torchrun": part_torchrun, "caption": part_caption}
NEEDS = {"stage1": "jpegs", "choices": "jpegs", "train": "stage1", "syncs": "stage2", "profile": "stage2",
         "sweep": "stage1", "torchrun": "jpegs", "caption": "train"}


def _alarm(signum, frame):
    raise PartTimeout


def run_part(name: str, ctx, log) -> dict:
    """Run one part within its time limit; its JSON line goes to stdout and `log` at once."""
    limit = ctx.limits.get(name)
    t0 = time.perf_counter()
    line = {"part": name}
    need = NEEDS.get(name)
    if need and ctx.status.get(need) != "ok":
        line.update(status="skipped", error=f"needs part {need!r}, which did not finish")
    else:
        timed = limit and hasattr(signal, "SIGALRM")
        if timed:
            old = signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(int(math.ceil(limit)))
        try:
            result = RUNNERS[name](ctx) or {}
            failed = result.pop("_failed", False)
            line.update(status="failed" if failed else "ok", **result)
        except PartTimeout:
            line.update(status="timeout", error=f"ran past its limit of {limit} s")
        except Exception as e:  # noqa: BLE001  (a part's failure is reported, and the others still run)
            line.update(status="error", error=_error_text(e, 300))
        finally:
            if timed:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old)
    line["part_s"] = round(time.perf_counter() - t0, 2)
    # a part that failed still leaves what later parts need (the cache, the run) when it made them
    ctx.status[name] = "ok" if line["status"] in ("ok", "failed") else line["status"]
    text = json.dumps(line)
    print(text, flush=True)
    log.write(text + "\n")
    log.flush()
    return line


def _commit() -> str:
    """The checkout's commit: CAPCACHE_COMMIT when set (a copied checkout on the GPU machine may have no .git),
    else git's."""
    return os.environ.get("CAPCACHE_COMMIT") or _git_commit()


@functools.cache  # gpu.json is written after every part: git is asked once
def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def summary(lines: dict[str, dict], device, planned: Sequence[str] = ()) -> dict:
    """gpu.json: the parts' figures in one document (None where a part did not measure; the `planned` parts
    that have not run yet are "not run")."""
    import torch

    def pick(part, *keys):
        got = lines.get(part, {})
        return {k: got.get(k) for k in keys}

    stage1 = {**pick("jpegs", "images", "jpeg_size", "mean_kb"),
              **pick("stage1", "decode_only_img_s", "forward_img_s", "end_to_end_img_s", "end_to_end_images", "workers",
                     "batch", "backbone", "precision")}
    notes = [f"{name}: {line['status']}: {line.get('error', '')}".rstrip(": ")
             for name, line in lines.items() if line["status"] != "ok"]
    notes += [f"{name}: {line['note']}" for name, line in lines.items() if line.get("note")]  # e.g. fewer workers
    where = lines.get("syncs", {}).get("where") or {}
    notes += [f"syncs in {k} at {', '.join(v)}" for k, v in where.items() if v]
    notes += [f"{name}: not run (the check stopped before it)" for name in planned if name not in lines]
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({machine()})",
            "commit": _commit(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "stage1": stage1,
            "stage2": pick("stage2", "images", "captions", "vocab", "xe_epoch_s", "scst_epoch_s", "val_500_beam3_s",
                           "recipe_projected_s", "peak_gpu_gb"),
            "syncs": pick("syncs", "xe_step", "scst_step", "beam", "results_reads"),
            "profile": pick("profile", "xe_step", "scst_step", "beam", "stage1_forward"),
            "stage1_choices": {**pick("choices", "forward_img_s_by_batch", "forward_img_s_contiguous",
                                      "contiguous_batch", "end_to_end_images", "end_to_end_img_s",
                                      "torchvision_decode_img_s", "torchvision_decode_images"),
                               **pick("stage1", "decode_only_img_s", "workers")},
            "sweep": pick("sweep", "runs", "ok", "failed", "rc", "jobs", "seconds", "ema_chunk_warnings"),
            "torchrun_equal": lines.get("torchrun", {}).get("torchrun_equal"),
            "caption_cold_start_s": lines.get("caption", {}).get("caption_cold_start_s"),
            "caption_folder": lines.get("caption", {}).get("caption_folder"),
            "parts": {**{name: line["status"] for name, line in lines.items()},
                      **{name: "not run" for name in planned if name not in lines}}, "notes": notes}


def _limits(items: list[str], tiny: bool) -> dict[str, float | None]:
    # tiny runs on shared CPUs: no limits unless asked (a loaded test machine must not time a part out)
    limits: dict[str, float | None] = {p: None for p in PARTS} if tiny else dict(LIMITS)
    for item in items:
        name, _, value = item.partition("=")
        if name not in PARTS or not value:
            raise SystemExit(f"error: --limit {item!r}: use PART=SECONDS with PART one of {', '.join(PARTS)}")
        limits[name] = float(value) if float(value) > 0 else None
    return limits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda[:N] (the point of it) or cpu")
    ap.add_argument("--tiny", action="store_true", help="a few images and batches: seconds, the same code paths")
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--photos", type=int, default=None, help="carried photos used (default 300, 16 with --tiny)")
    ap.add_argument("--jpegs", type=int, default=None, help="COCO-size JPEGs made (default 20000, 24 with --tiny)")
    ap.add_argument("--batch-size", type=int, default=None, help="stage 1 batch (default 256, 8 with --tiny)")
    ap.add_argument("--backbone", default=None, help="stage 1 CNN (default resnet152, mobilenet_v2 with --tiny)")
    ap.add_argument("--compile", action="store_true", help="stage 1 through torch.compile (extract --compile)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                    help="a part's time limit (defaults add up to 310 s; 0 = none; none by default with --tiny)")
    ap.add_argument("--prepare", action="store_true", help="only copy the photos into bench/gpu-photos/, then exit")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-gpu", help="scratch folder (JPEGs, caches)")
    ap.add_argument("--results", type=Path, default=None,
                    help="folder for gpu.json and gpu.jsonl (default bench/results; --work with --tiny)")
    args = ap.parse_args(argv)
    args.photos = args.photos or (16 if args.tiny else 300)
    args.jpegs = args.jpegs or (24 if args.tiny else 20_000)
    args.batch_size = args.batch_size or (8 if args.tiny else 256)
    args.backbone = args.backbone or ("mobilenet_v2" if args.tiny else "resnet152")
    parts = [p for p in args.parts.split(",") if p]
    if unknown := [p for p in parts if p not in PARTS]:
        raise SystemExit(f"error: --parts: unknown {', '.join(unknown)} (known: {', '.join(PARTS)})")
    limits = _limits(args.limit, args.tiny)
    photos = photo_dir(args.data, args.photos)
    if args.prepare:
        print(f"{photos}: {args.photos} photos")
        return 0
    from common.atomic import atomic_write
    from common.device import resolve_device

    device = resolve_device(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    results = args.results or (args.work if args.tiny else REPO / "bench" / "results")
    results.mkdir(parents=True, exist_ok=True)
    print(f"== device check: {device}, {args.backbone}, {args.jpegs} JPEGs from {args.photos} photos  [{machine()}]",
          flush=True)
    ctx = SimpleNamespace(args=args, device=device, work=args.work, photos=photos, limits=limits, status={},
                          jpegs=None, cache=None, stage1_img_s=None, run=None, s2=None)
    lines: dict[str, dict] = {}
    with open(results / "gpu.jsonl", "w", encoding="utf-8") as log, _exit_on_sigterm():
        for name in parts:
            lines[name] = run_part(name, ctx, log)
            # after every part: a run stopped from outside (the wrapper's time limit) still leaves gpu.json
            atomic_write(results / "gpu.json", json.dumps(summary(lines, device, parts), indent=1) + "\n",
                         what="results")
    bad = [n for n, line in lines.items() if line["status"] != "ok"]
    print(f"{results / 'gpu.json'}: {len(lines) - len(bad)}/{len(lines)} parts ok" +
          (f"; not ok: {', '.join(bad)}" if bad else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # as a user's sweep runs: the subprocesses inherit it
    sys.exit(main())
