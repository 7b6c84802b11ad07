"""The prepared GPU run: the whole CUDA path exercised and timed, one table (at most ~8 minutes on one GPU).

    python bench/gpu.py                      # on a machine with a GPU
    python bench/gpu.py --device cpu --tiny  # the same code paths in seconds (the tests run this)
    python bench/gpu.py --prepare            # only copy the photos (~53 MB) for a machine without ../shared

1. stage 1: ResNet-152 (random weights: the same compute as real ones; MobileNetV2 with --tiny) over the
   COCO photos, batch 192,
   every core decoding: images/s of decode + forward (extract()) and of the forward alone.
2. stage 2 from that cache: 5 epochs with the default settings + 1 SCST epoch, seconds per epoch and
   peak GPU memory; a few training steps under `torch.cuda.set_sync_debug_mode("error")` (any host
   sync in the step raises); the beam-3 decode of the cache's images.
3. a 4-run sweep with 2 jobs on one GPU; torchrun with 1 process against a plain extraction (the same
   features); caption cold start (`python -m stage2_decoder.caption IMAGE`, process start to exit).

The photos: `--data`'s coco2017-mini (../shared/data), copied (the first --photos of them, ~26 KB each)
into bench/gpu-photos/ (git-ignored) so the folder can travel to a GPU machine that lacks ../shared.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness import REPO, default_data, machine

PHOTOS = Path(__file__).resolve().parent / "gpu-photos"


def photo_dir(data: Path, n: int) -> Path:
    """A COCO-format folder (captions.json, images/) of n photos: bench/gpu-photos/, filled from `data` if
    it is at hand, else as an earlier run left it."""
    src = data / "coco2017-mini"
    have = PHOTOS / "captions.json"
    if have.is_file() and len(json.loads(have.read_text())["images"]) >= n:
        return PHOTOS
    if not (src / "captions.json").is_file():
        raise SystemExit(f"error: no COCO photos: neither {src} nor {PHOTOS} (run once where ../shared/data is)")
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


def stage1(photos: Path, work: Path, device, args, rows: list):
    import torch

    from common.backbones import load_backbone
    from stage1_extract.extract import PREFETCH, ExtractConfig, check_shm, extract

    cache = work / f"{args.backbone}.h5"
    for p in (cache, Path(str(cache) + ".parts")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    cfg = ExtractConfig(images=str(photos / "images"), captions=str(photos / "captions.json"), out=str(cache),
                        backbone=args.backbone, weights="none", batch_size=args.batch_size, device=str(device),
                        dtype="float32", progress=False, limit=args.photos)
    note = ""
    try:
        check_shm(cfg.workers, cfg.batch_size, 224)
    except ValueError:  # a small /dev/shm (Docker's 64 MB): as many workers as fit, and say so
        per_worker = PREFETCH * cfg.batch_size * 3 * 224 * 224
        cfg.workers = max(0, min(cfg.workers, shutil.disk_usage("/dev/shm").free // per_worker))
        note = " (as many as /dev/shm holds)"
    s = extract(cfg)
    rows.append(("stage 1 decode + forward (extract), images/s", f"{s.images_per_s:.1f}",
                 f"{s.done_now} images, batch {cfg.batch_size}, {cfg.workers} workers{note}"))
    bb = load_backbone(args.backbone, "none", device)
    crop = bb.preprocess.crop
    x = torch.randint(0, 256, (args.batch_size, 3, crop, crop), dtype=torch.uint8)
    x = x.pin_memory() if device.type == "cuda" else x
    bb.encode(x)  # warm-up: cudnn.benchmark picks its kernels here
    n = 2 if args.tiny else 10
    with Clock(device) as c:
        for _ in range(n):
            bb.encode(x)
    rows.append(("stage 1 forward alone, images/s", f"{n * args.batch_size / c.s:.1f}", f"precision {bb.precision}"))
    return cache


def stage2(cache: Path, work: Path, device, args, rows: list):
    import torch

    from stage2_decoder.train import TrainConfig, train

    run = work / "train"
    shutil.rmtree(run, ignore_errors=True)
    cfg = TrainConfig(features=str(cache), out=str(run), epochs=2 if args.tiny else 5, scst_epochs=1,
                      device=str(device), progress=False, dry_run=args.tiny)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    r = train(cfg)
    xe = [h["seconds"] for h in r.history if h.get("phase") != "scst"]
    scst = [h["seconds"] for h in r.history if h.get("phase") == "scst"]
    peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a (CPU)"
    rows.append(("stage 2 cross-entropy epoch, s (mean)", f"{sum(xe) / len(xe):.2f}", f"{len(xe)} epochs, "
                 f"val CIDEr {r.history[len(xe) - 1]['val_cider']:.3f}"))
    rows.append(("stage 2 SCST epoch, s", f"{scst[0]:.2f}", f"val CIDEr {r.history[-1]['val_cider']:.3f}"))
    rows.append(("stage 2 peak GPU memory", peak, "train(), both phases"))
    rows.append(("training step host syncs", sync_check(cache, device, cfg), "set_sync_debug_mode('error')"))
    rows.append(beam_decode(run / "best.pt", cache, device))
    return run


def sync_check(cache: Path, device, cfg) -> str:
    """A few steps of train()'s own step + EMA with any host sync made an error (CUDA only)."""
    import torch

    from common.feature_cache import load_cache
    from stage2_decoder.data import CaptionPairs
    from stage2_decoder.ema import EMA
    from stage2_decoder.model import CaptionDecoder
    from stage2_decoder.train import prepare_data, train_step

    c = load_cache(str(cache))
    parts, _, vocab, rows, tokens = prepare_data(cfg, c)
    pairs = CaptionPairs(parts["train"], rows, vocab, cfg.max_caption_len, tokens).to(device)
    feats = torch.from_numpy(c.features).float().to(device)
    model = CaptionDecoder(cfg.decoder_config(c.meta.feature_dim, len(vocab))).to(device).train()
    opt = cfg.optimizer(model.parameters())
    ema = EMA(model, cfg.ema_decay)
    batches = [i for i in pairs.batches(cfg.batch_size, torch.Generator().manual_seed(0)) if len(i) > 1][:6]
    for idx in batches[:2]:  # warm-up outside the check: the first steps allocate and pick kernels
        train_step(model, opt, pairs.gather(idx, feats), device, cfg.grad_clip)
        ema.update(model)
    if device.type != "cuda":
        return "not checked (CPU)"
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for idx in batches[2:]:
            train_step(model, opt, pairs.gather(idx, feats), device, cfg.grad_clip)
            ema.update(model)
    except RuntimeError as e:
        return f"SYNC: {str(e).splitlines()[0][:80]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return f"none in {len(batches) - 2} steps"


def beam_decode(ckpt_path: Path, cache: Path, device):
    import torch

    from common.feature_cache import load_cache
    from stage2_decoder.checkpoint import load_checkpoint
    from stage2_decoder.decode import DecodeConfig, decode
    from stage2_decoder.model import CaptionDecoder, DecoderConfig

    ckpt = load_checkpoint(ckpt_path, map_location=device)
    model = CaptionDecoder(DecoderConfig(**ckpt["decoder_config"])).to(device).eval()
    model.load_state_dict(ckpt["model_state"])
    feats = torch.from_numpy(load_cache(str(cache)).features).float().to(device)
    decode(model, feats[:8], DecodeConfig(3))  # warm-up
    with Clock(device) as c:
        for s in range(0, len(feats), 256):
            decode(model, feats[s:s + 256], DecodeConfig(3))
    return "beam-3 decode, images/s", f"{len(feats) / c.s:.1f}", f"{len(feats)} images, batches of 256"


def sweep(cache: Path, work: Path, device, args, rows: list) -> None:
    from stage2_decoder.sweep import SweepConfig, run_sweep

    out = work / "sweep"
    shutil.rmtree(out, ignore_errors=True)
    grid = {"lr": [1e-3, 2e-3], "dropout": [0.3, 0.5], "epochs": [1], "scst_epochs": [0], "device": [str(device)]}
    t0 = time.perf_counter()
    r = run_sweep(SweepConfig(features=str(cache), out=str(out), grid=grid, n_jobs=2, progress=False, plot=False,
                              dry_run=args.tiny))
    ok = sum(row["status"] == "ok" for row in r.rows)
    rows.append(("sweep of 4 runs, 2 jobs, s", f"{time.perf_counter() - t0:.1f}", f"{ok}/4 runs ok"))


def torchrun_vs_plain(photos: Path, work: Path, device, args, rows: list) -> None:
    import numpy as np

    from common.feature_cache import load_cache

    n = 8 if args.tiny else 256
    outs = {}
    for how in ("plain", "torchrun"):
        out = work / f"{how}.h5"
        out.unlink(missing_ok=True)
        shutil.rmtree(str(out) + ".parts", ignore_errors=True)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] \
            if how == "torchrun" else [sys.executable]
        cmd = [*launcher, "-m", "stage1_extract", "--images", str(photos / "images"), "--captions",
               str(photos / "captions.json"), "--out", str(out), "--backbone", args.backbone, "--weights", "none",
               "--dtype", "float32", "--limit", str(n), "--batch-size", "8" if args.tiny else "32", "--workers", "1",
               "--device", str(device), "--no-progress"]
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            rows.append((f"torchrun 1 process vs plain: {how} failed", "FAIL", p.stderr.strip().splitlines()[-1:]))
            return
        outs[how] = load_cache(str(out))
    a, b = outs["plain"], outs["torchrun"]
    same_keys = a.keys == b.keys
    rel = float(np.abs(a.features - b.features).max() / max(float(np.abs(a.features).max()), 1e-30))
    verdict = "equal" if same_keys and rel == 0 else ("close" if same_keys and rel < 1e-2 else "DIFFERENT")
    rows.append(("torchrun 1 process vs plain extraction", verdict, f"{n} images, max |diff| / max |x| = {rel:.1e}"))


def caption_cold_start(run: Path, photos: Path, device, rows: list) -> None:
    image = sorted((photos / "images").iterdir())[0]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "stage2_decoder.caption", str(image), "--checkpoint",
                        str(run / "best.pt"), "--device", str(device)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    s = time.perf_counter() - t0
    ok = p.returncode == 0 and p.stdout.strip()
    rows.append(("caption cold start (1 image, beam 3), s", f"{s:.2f}" if ok else "FAIL",
                 (p.stdout.strip().splitlines() or p.stderr.strip().splitlines() or [""])[-1][:60]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda[:N] (the point of it) or cpu")
    ap.add_argument("--tiny", action="store_true", help="a few images, one batch per epoch: seconds, same code paths")
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--photos", type=int, default=None, help="photos used (default 2000, 16 with --tiny)")
    ap.add_argument("--batch-size", type=int, default=None, help="stage 1 batch (default 192, 8 with --tiny)")
    ap.add_argument("--backbone", default=None, help="stage 1 CNN (default resnet152, mobilenet_v2 with --tiny)")
    ap.add_argument("--prepare", action="store_true", help="only copy the photos into bench/gpu-photos/, then exit")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-gpu")
    args = ap.parse_args(argv)
    args.photos = args.photos or (16 if args.tiny else 2000)
    args.batch_size = args.batch_size or (8 if args.tiny else 192)
    args.backbone = args.backbone or ("mobilenet_v2" if args.tiny else "resnet152")
    photos = photo_dir(args.data, args.photos)
    if args.prepare:
        print(f"{photos}: {args.photos} photos")
        return 0
    from common.device import resolve_device

    device = resolve_device(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"== GPU path: {device}, {args.backbone}, {args.photos} COCO photos  [{machine()}]", flush=True)
    rows: list = []
    t0 = time.perf_counter()
    cache = stage1(photos, args.work, device, args, rows)
    run = stage2(cache, args.work, device, args, rows)
    sweep(cache, args.work, device, args, rows)
    torchrun_vs_plain(photos, args.work, device, args, rows)
    caption_cold_start(run, photos, device, rows)
    width = max(len(r[0]) for r in rows)
    print(f"| {'what':<{width}} | value | note |\n|{'-' * (width + 2)}|---|---|")
    for what, value, note in rows:
        print(f"| {what:<{width}} | {value} | {note} |")
    print(f"total {time.perf_counter() - t0:.0f} s")
    failed = [r for r in rows if r[1] in ("FAIL", "DIFFERENT") or str(r[1]).startswith("SYNC")]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # the sweep forks: no CUDA context before it
    sys.exit(main())
