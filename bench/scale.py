"""Full-COCO scale on this CPU: a synthetic full-size workload, measured at 10/25/50/100% with the
product's own code, one table, and each cost's growth exponent.

    .venv/bin/python bench/scale.py [--sizes 0.1,0.25,0.5,1] [--out runs/scale] [--threads 1] [--tiny] [--check]

The workload (built once under --out, reused on a rerun): for each size a COCO-format captions JSON
(the first images of one full-size set of 123,287 images, 5 captions each and a sixth for 1 in 60:
~616k captions: real COCO-mini and Flickr8k-mini captions resampled, with a share of their words
swapped for made-up words drawn from a Zipf list, sized so ~10k words pass the vocabulary threshold
at full size) and
a feature cache of its images written through stage 1's CacheWriter (123,287 x 2048 float16, random,
finite, non-negative). Writing the cache times stage 1's assembly of the rows from shards.

Each size is measured in fresh child processes (their peak RSS is theirs alone): a cold start (empty
token cache) and a warm one, each from the start of training to the first optimisation step (the
cache, the captions file, tokens, vocabulary, caption tensors, the decoder); the warm child then
times cross-entropy steps, validation, the SCST scorer and batches, checkpoints, `evaluate` and
the gallery. Costs that are long on this CPU are timed on a part and projected (the table says which).
The exponent of a cost is the slope of log(cost) against log(size) over the sizes measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import harness  # noqa: F401  (puts the repository on sys.path)
from harness import REPO, Report, default_data, machine, median

import numpy as np  # noqa: E402

FULL_IMAGES = 123_287
FEATURE_DIM = 2048
SIZES = (0.1, 0.25, 0.5, 1.0)
WORKLOAD_VERSION = 1


def _rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the workload ------------------------------------------------------------------------------------------

def _real_captions(data: Path) -> list[str]:
    from common.datasets import load_dataset

    caps = [c for r in load_dataset("coco", data / "coco2017-mini" / "captions.json", data / "coco2017-mini" / "images")
            for c in r.captions]
    caps += [c for r in load_dataset("flickr8k", data / "flickr8k-mini" / "captions.txt",
                                     data / "flickr8k-mini" / "Images") for c in r.captions]
    return caps


def _made_up_words(n: int, rng: np.random.Generator) -> list[str]:
    letters = np.array(list("bcdfghjklmnprstvz")), np.array(list("aeiou"))
    out, seen = [], set()
    while len(out) < n:
        k = int(rng.integers(2, 5))
        w = "".join(letters[0][rng.integers(17)] + letters[1][rng.integers(5)] for _ in range(k)) + "x"
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def build_captions(n_caps: int, data: Path, rng: np.random.Generator, vocab_target: int = 10_000
                   ) -> list[list[str]]:
    """`n_caps` captions (word lists): real captions resampled, made-up words mixed in."""
    real = _real_captions(data)
    words = [c.split() for c in real]
    n_real_words = len({w.lower().strip(".,") for c in words for w in c})
    tokens = n_caps * 10.5
    made_up = max(vocab_target - n_real_words, 100)
    # Zipf (s = 1) over K made-up words: rank r is seen ~ F * T / (H_K r) times; rank `made_up` about 4 times
    k = 20 * made_up
    harmonic = float(np.sum(1.0 / np.arange(1, k + 1)))
    frac = min(0.5, 4 * made_up * harmonic / tokens)
    lexicon = np.array(_made_up_words(k, rng), dtype=object)
    cdf = np.cumsum(1.0 / np.arange(1, k + 1))
    cdf /= cdf[-1]
    pick = rng.integers(len(words), size=n_caps)
    out = []
    for i in pick:
        c = list(words[i])
        swap = rng.random(len(c)) < frac
        if swap.any():
            for j, w in zip(np.nonzero(swap)[0], lexicon[np.searchsorted(cdf, rng.random(int(swap.sum())))]):
                c[j] = w
        out.append(c)
    return out


def write_workload(out: Path, sizes, full_images: int, data: Path, feature_dim: int) -> dict:
    """Captions files and feature caches for each size under `out` (kept when already there)."""
    from common.atomic import atomic_write

    manifest_path = out / "workload.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("version") != WORKLOAD_VERSION or manifest.get("full_images") != full_images:
        manifest = {"version": WORKLOAD_VERSION, "full_images": full_images, "sizes": {}}
    todo = [s for s in sizes if not (str(s) in manifest["sizes"]
                                     and Path(manifest["sizes"][str(s)]["features"]).is_file())]
    if not todo:
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)  # records need a folder; the cache stands in for the photos
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    per_image = [5 + (i % 60 == 0) for i in range(full_images)]
    starts = np.concatenate([[0], np.cumsum(per_image)])
    caps = build_captions(int(starts[-1]), data, rng)
    print(f"  captions made: {len(caps)} in {time.perf_counter() - t0:.0f}s", flush=True)
    for s in todo:
        n = max(int(round(full_images * s)), 10)
        cap_file = out / f"captions-{s}.json"
        doc = {"images": [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg"} for i in range(n)],
               "annotations": [{"id": j + 1, "image_id": i + 1, "caption": " ".join(caps[j])}
                               for i in range(n) for j in range(starts[i], starts[i + 1])]}
        atomic_write(cap_file, json.dumps(doc), what="captions")
        feats = out / f"features-{s}.h5"
        child = _child(["assemble", "--captions", str(cap_file), "--features", str(feats),
                        "--feature-dim", str(feature_dim), "--images-dir", str(out / "images")], {})
        manifest["sizes"][str(s)] = {"captions": str(cap_file), "features": str(feats), "images": n,
                                     "captions_count": int(starts[n]), **child}
        print(f"  size {s}: {n} images, cache assembled in {child['assemble_s']:.1f}s "
              f"(peak RSS {child['assemble_rss_mb']:.0f} MB)", flush=True)
        atomic_write(manifest_path, json.dumps(manifest, indent=1), what="workload manifest")
    return manifest


def child_assemble(a) -> dict:
    """Write the cache through CacheWriter (random non-negative float16 shards), then time finish()."""
    from common.backbones import preprocess_for
    from common.datasets import load_dataset
    from common.feature_cache import CacheMeta
    from stage1_extract.cache_writer import CacheWriter

    keys = [r.key for r in load_dataset("coco", a.captions, a.images_dir)]
    meta = CacheMeta("resnet152", "none", "", a.feature_dim, preprocess_for("resnet152").describe(), "coco",
                     os.path.abspath(a.images_dir), os.path.abspath(a.captions), dtype="float16")
    rng = np.random.default_rng(1)
    w = CacheWriter(a.features, keys, meta)
    shard = 4096
    for s in range(0, len(keys), shard):
        rows = np.arange(s, min(s + shard, len(keys)))
        w.write(rows, rng.random((len(rows), a.feature_dim), dtype=np.float32).astype(np.float16))
    w.flush()
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    w.finish()
    return {"assemble_s": time.perf_counter() - t0, "assemble_rss_mb": _rss_mb(), "writing_rss_mb": rss_before}


# --- one size: start-up and the costs after it ----------------------------------------------------------------

def _start(features: str, out: str):
    """train()'s start-up to its first optimisation step, with the product's functions; returns its parts."""
    import torch

    from common.feature_cache import load_cache
    from stage2_decoder.model import CaptionDecoder
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.data import prepare_data
    from stage2_decoder.training.epochs import train_step
    from stage2_decoder.training.pairs import CaptionPairs

    cfg = TrainConfig(features=features, out=out, progress=False)
    t = {}
    t0 = time.perf_counter()
    cache = load_cache(features)
    t["load_cache_s"] = time.perf_counter() - t0
    parts, split, vocab, rows, tokens = prepare_data(cfg, cache)
    t["prepare_data_s"] = time.perf_counter() - t0 - t["load_cache_s"]
    train_set = CaptionPairs(parts["train"], rows, vocab, cfg.max_caption_len, tokens)
    val_set = CaptionPairs(parts["val"], rows, vocab, cfg.max_caption_len, tokens)
    features_t = torch.from_numpy(cache.features)  # (N, D) in the cache's dtype, as train() keeps it
    cache.features = None
    model = CaptionDecoder(cfg.decoder_config(cache.meta.feature_dim, len(vocab)))
    opt = cfg.optimizer(model.parameters())
    g = torch.Generator().manual_seed(0)
    batches = train_set.batches(cfg.batch_size, g, cfg.length_buckets)
    model.train()
    train_step(model, opt, train_set.gather(batches[0], features_t, g), "cpu", cfg.grad_clip)
    t["startup_s"] = time.perf_counter() - t0
    t["startup_rss_mb"] = _rss_mb()
    t.update(vocab=len(vocab), train_pairs=len(train_set), train_images=len(parts["train"]),
             test_images=len(parts["test"]))
    return t, cfg, (parts, split, vocab, rows, tokens, train_set, val_set, features_t, model, opt, batches, g)


def child_measure(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    t, cfg, state = _start(a.features, a.run)
    if a.startup_only:
        return t
    parts, split, vocab, rows, tokens, train_set, val_set, features, model, opt, batches, g = state
    from stage2_decoder.api import Captioner
    from stage2_decoder.decoding.captions import caption_keys
    from stage2_decoder.reporting.evaluation import captions_from_cache, evaluate_captions
    from stage2_decoder.reporting.gallery import write_html
    from stage2_decoder.training.checkpoint import cpu_state, inference_extra, save_checkpoint
    from stage2_decoder.training.cider import CiderD
    from stage2_decoder.training.ema import EMA
    from stage2_decoder.training.epochs import evaluate_loss, train_step, validation_cider
    from stage2_decoder.training.pairs import CaptionPairs
    from stage2_decoder.training.scst import scst_epoch, scst_refs

    plan = dict(steps=2, val_batches=1, val_images=10, scst_batches=1, eval_images=20) if a.tiny else \
        dict(steps=6, val_batches=3, val_images=100, scst_batches=1, eval_images=100)
    # cross-entropy steps (median of a few after the first), projected over an epoch
    ema = EMA(model, cfg.ema_decay)
    times = []
    for idx in batches[1:1 + plan["steps"]]:
        s0 = time.perf_counter()
        train_step(model, opt, train_set.gather(idx, features, g), "cpu", cfg.grad_clip)
        ema.update(model)
        times.append(time.perf_counter() - s0)
    t["xe_step_s"] = median(times)
    t["xe_epoch_s"] = t["xe_step_s"] * len(batches)
    # validation: loss over the val pairs (a few batches, projected) + beam-3 CIDEr of 500 images (projected)
    bs = cfg.batch_size * 4
    sub = CaptionPairs(parts["val"][: max(1, plan["val_batches"] * bs // 5)], rows, vocab, cfg.max_caption_len, tokens)
    s0 = time.perf_counter()
    evaluate_loss(model, sub, features, bs, "cpu")
    t["val_loss_s"] = (time.perf_counter() - s0) * len(val_set) / max(len(sub), 1)
    val_refs = {r.key: r.captions for r in parts["val"][: plan["val_images"]] if r.captions}
    s0 = time.perf_counter()
    validation_cider(model, vocab, features, rows, val_refs, beam_size=cfg.val_beam_size)
    t["val_cider_500_s"] = (time.perf_counter() - s0) * 500 / max(len(val_refs), 1)
    t["val_epoch_s"] = t["val_loss_s"] + t["val_cider_500_s"]
    # SCST: the scorer over the training references, then batches of 128 images x 5 samples, projected
    refs = scst_refs(parts["train"], tokens)
    s0 = time.perf_counter()
    scorer = CiderD(refs)
    t["scorer_build_s"] = time.perf_counter() - s0
    import tracemalloc

    tracemalloc.start()  # numpy reports its buffers to tracemalloc: the peak is Python objects + arrays
    CiderD(refs)
    t["scorer_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    t["scorer_arrays_mb"] = scorer.nbytes() / 2**20
    s0 = time.perf_counter()
    scst_epoch(model, opt, features, rows, scorer, vocab.itos, cfg.batch_size, torch.Generator().manual_seed(0),
               cfg.scst_samples, cfg.grad_clip, max_batches=plan["scst_batches"])
    t["scst_batch_s"] = (time.perf_counter() - s0) / plan["scst_batches"]
    n_scst = math.ceil(sum(1 for k in scorer.keys if k in rows and scorer.n_refs(k)) / cfg.batch_size)
    t["scst_epoch_s"] = t["scst_batch_s"] * n_scst
    keys = [k for k in scorer.keys if scorer.n_refs(k)][: cfg.batch_size]
    hyps = [tokens[k][0] for k in keys for _ in range(cfg.scst_samples)]
    s0 = time.perf_counter()
    scorer.score_batch([k for k in keys for _ in range(cfg.scst_samples)], hyps)
    t["scst_reward_ms"] = (time.perf_counter() - s0) * 1e3
    # checkpoints, as train() writes them
    run = Path(a.run)
    run.mkdir(parents=True, exist_ok=True)
    backbone = {"name": "resnet152", "weights": "none", "weights_sha256": None, "feature_dim": FEATURE_DIM,
                "preprocess": "{}"}
    extra = dict(epoch=1, optimizer_state=opt.state_dict(), scheduler_state={}, rng_state=torch.get_rng_state(),
                 train_config={}, history=[], best={"epoch": 1}, split={"val": split["val"], "test": split["test"]},
                 train_model_state=cpu_state(model))
    for name, kw in (("best", inference_extra(extra)), ("last", extra)):
        s0 = time.perf_counter()
        save_checkpoint(run / f"{name}.pt", ema.module, vocab, backbone, **kw)
        t[f"{name}_pt_s"] = time.perf_counter() - s0
        t[f"{name}_pt_mb"] = (run / f"{name}.pt").stat().st_size / 2**20
    t["run_rss_mb"] = _rss_mb()  # everything a training run holds (evaluate is a process of its own)
    if a.evaluate:
        t.update(_evaluate(a, ema.module, vocab, split, plan, Captioner, captions_from_cache, caption_keys,
                           evaluate_captions, write_html, run))
    return t


def _evaluate(a, model, vocab, split, plan, Captioner, captions_from_cache, caption_keys, evaluate_captions,
              write_html, run: Path) -> dict:
    """`evaluate` of 5,000 cached test images: its own cache read and decode of a part (the decode
    projected to 5,000), the metrics of 5,000 captions; the gallery of 5,000 real photos (capped page)."""
    import torch

    from common.backbones import preprocess_for
    from common.records import ImageRecord

    t = {}
    n = 5000 if not a.tiny else 40
    cap = Captioner(None, model, vocab, "")  # decoding from the cache needs no backbone
    test = split["test"]
    ckpt = {"backbone": {"name": "resnet152", "weights": "none", "weights_sha256": None,  # the cache's
                         "feature_dim": model.cfg.feature_dim, "preprocess": preprocess_for("resnet152").describe()},
            "split": {"test": test[: plan["eval_images"]]}}
    s0 = time.perf_counter()
    res, recs = captions_from_cache(cap, ckpt, a.features, "test")
    part = time.perf_counter() - s0
    feats = torch.rand(len(res), model.cfg.feature_dim)
    s0 = time.perf_counter()
    caption_keys(cap.decoder, cap.vocab, list(res), feats, None)
    per_image = (time.perf_counter() - s0) / max(len(res), 1)
    t["evaluate_decode_s"] = part + per_image * (n - len(res))
    caps = list(res.values())
    photos = sorted(Path(a.photos).glob("*.jpg"))
    many = [ImageRecord(f"{i}", i, str(photos[i % len(photos)]), recs[i % len(recs)].captions) for i in range(n)]
    s0 = time.perf_counter()
    report = evaluate_captions({r.key: caps[i % len(caps)] for i, r in enumerate(many)}, many)
    t["evaluate_metrics_s"] = time.perf_counter() - s0
    t["evaluate_s"] = t["evaluate_decode_s"] + t["evaluate_metrics_s"]
    s0 = time.perf_counter()
    page = write_html(report, run / "gallery.html", max_images=1000 if not a.tiny else 10)
    t["gallery_s"] = time.perf_counter() - s0
    t["gallery_mb"] = page.stat().st_size / 2**20
    return t


def _child(args: list[str], env: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, cwd=REPO, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"child {' '.join(args[:1])} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# --- the table ----------------------------------------------------------------------------------------------

ROWS = [  # (label, key, unit, projected?)
    ("start-up to 1st step, cold (no token cache)", "cold_startup_s", "s", False),
    ("  peak RSS of it", "cold_startup_rss_mb", "MB", False),
    ("start-up to 1st step, warm", "startup_s", "s", False),
    ("  peak RSS of it", "startup_rss_mb", "MB", False),
    ("  of it: cache load", "load_cache_s", "s", False),
    ("  of it: captions, tokens, vocabulary, split", "prepare_data_s", "s", False),
    ("vocabulary (words)", "vocab", "", False),
    ("cross-entropy step (batch 128)", "xe_step_s", "s", False),
    ("cross-entropy epoch (projected)", "xe_epoch_s", "s", True),
    ("validation: loss (projected)", "val_loss_s", "s", True),
    ("validation: 500-image beam-3 CIDEr (projected)", "val_cider_500_s", "s", True),
    ("validation per epoch", "val_epoch_s", "s", True),
    ("SCST scorer construction", "scorer_build_s", "s", False),
    ("  its peak memory while built (tracemalloc)", "scorer_peak_mb", "MB", False),
    ("  its arrays", "scorer_arrays_mb", "MB", False),
    ("SCST batch (128 images x 5 samples)", "scst_batch_s", "s", False),
    ("  of it: reward of 640 samples", "scst_reward_ms", "ms", False),
    ("SCST epoch (projected)", "scst_epoch_s", "s", True),
    ("best.pt size", "best_pt_mb", "MB", False),
    ("best.pt save", "best_pt_s", "s", False),
    ("last.pt size", "last_pt_mb", "MB", False),
    ("last.pt save", "last_pt_s", "s", False),
    ("peak RSS of the training process", "run_rss_mb", "MB", False),
    ("evaluate, 5,000 cached test images (decode projected)", "evaluate_s", "s", True),
    ("HTML gallery of 5,000 images (capped at 1,000): time", "gallery_s", "s", False),
    ("HTML gallery: size", "gallery_mb", "MB", False),
    ("stage 1 assembly from shards: time", "assemble_s", "s", False),
    ("stage 1 assembly: peak RSS", "assemble_rss_mb", "MB", False),
]


def exponent(sizes: list[float], values: list[float]) -> float | None:
    pts = [(math.log(s), math.log(v)) for s, v in zip(sizes, values) if v is not None and v > 0]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--out", default=str(REPO / "runs" / "scale"))
    ap.add_argument("--data", default=str(default_data()))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="Write the table here too (default OUT/scale.json).")
    ap.add_argument("--tiny", action="store_true", help="Smoke mode: 600 images at full size, two sizes.")
    ap.add_argument("--check", action="store_true", help="Exit 1 if a target is missed.")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        return _run_child(a.child)
    out = Path(a.out) / ("tiny" if a.tiny else "full")
    sizes = [float(s) for s in a.sizes.split(",")] if not a.tiny or a.sizes != ",".join(map(str, SIZES)) \
        else [0.5, 1.0]
    full = 600 if a.tiny else FULL_IMAGES
    report = Report("scale: full-COCO workload on this CPU" + (" (tiny)" if a.tiny else ""))
    t0 = time.perf_counter()
    manifest = write_workload(out, sizes, full, Path(a.data), 64 if a.tiny else FEATURE_DIM)
    results = {}
    for s in sizes:
        w = manifest["sizes"][str(s)]
        tokens_dir = out / f"tokens-{s}"
        for f in tokens_dir.glob("*.npz") if tokens_dir.is_dir() else []:
            f.unlink()  # cold: an empty token cache
        env = {"CAPCACHE_TOKEN_CACHE": str(tokens_dir), "OMP_NUM_THREADS": str(a.threads)}
        common = ["measure", "--features", w["features"], "--run", str(out / f"run-{s}"), "--threads", str(a.threads)]
        common += ["--tiny"] if a.tiny else []
        cold = _child(common + ["--startup-only"], env)
        warm_args = common + (["--evaluate", "--photos", str(Path(a.data) / "coco2017-mini" / "images")]
                              if s == max(sizes) or (s == min(sizes) and not a.tiny) else [])
        warm = _child(warm_args, env)
        results[s] = {**warm, "cold_startup_s": cold["startup_s"], "cold_startup_rss_mb": cold["startup_rss_mb"],
                      "assemble_s": w["assemble_s"], "assemble_rss_mb": w["assemble_rss_mb"], "images": w["images"],
                      "captions": w["captions_count"]}
        print(f"  size {s}: {w['images']} images, {w['captions_count']} captions, vocabulary {warm['vocab']}: "
              f"cold start {cold['startup_s']:.1f}s, warm {warm['startup_s']:.1f}s "
              f"({time.perf_counter() - t0:.0f}s so far)", flush=True)
    header = ["cost"] + [f"{s:g} ({results[s]['images']} img)" for s in sizes] + ["exponent"]
    rows, exps = [], {}
    for label, key, unit, projected in ROWS:
        vals = [results[s].get(key) for s in sizes]
        e = exponent(sizes, vals)
        exps[key] = e
        rows.append([f"{label}{' [' + unit + ']' if unit else ''}"] + ["-" if v is None else float(v) for v in vals]
                    + ["-" if e is None else round(e, 2)])
    report.table(header, rows)
    big = results[max(sizes)]
    if not a.tiny and max(sizes) == 1.0:
        report.ratio("warm start-up to the first step [s]", big["startup_s"], 30, higher_is_better=False, unit="s")
        report.ratio("cold start-up to the first step [s]", big["cold_startup_s"], 180, higher_is_better=False,
                     unit="s")
        report.ratio("peak RSS of a training run [GB]", big["run_rss_mb"] / 1024, 6, higher_is_better=False,
                     unit="GB")
        report.ratio("SCST scorer construction [s]", big["scorer_build_s"], 10, higher_is_better=False, unit="s")
        report.ratio("SCST scorer memory [GB]", big["scorer_peak_mb"] / 1024, 1, higher_is_better=False, unit="GB")
        report.ratio("best.pt [MB]", big["best_pt_mb"], 25, higher_is_better=False, unit="MB")
        growth = {k: e for k, e in exps.items() if e is not None and k not in ("vocab",)}
        worst = max(growth, key=growth.get)
        report.ratio(f"largest growth exponent ({worst})", growth[worst], 1.1, higher_is_better=False, unit="")
    doc = {"machine": machine(), "date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": _commit(),
           "sizes": sizes, "results": {str(s): results[s] for s in sizes}, "exponents": exps,
           "seconds": round(time.perf_counter() - t0, 1)}
    from common.atomic import atomic_write

    json_path = Path(a.json) if a.json else out / "scale.json"
    atomic_write(json_path, json.dumps(doc, indent=1), what="benchmark table")
    print(f"  table written to {json_path} ({doc['seconds']:.0f}s)", flush=True)
    return report.done(strict=a.check)


def _commit() -> str:
    if os.environ.get("BENCH_COMMIT"):  # a run from an exported copy of the checkout
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _run_child(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["assemble", "measure"])
    ap.add_argument("--captions")
    ap.add_argument("--features")
    ap.add_argument("--feature-dim", type=int, default=FEATURE_DIM)
    ap.add_argument("--images-dir")
    ap.add_argument("--run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--startup-only", action="store_true")
    ap.add_argument("--evaluate", action="store_true")
    ap.add_argument("--photos")
    a = ap.parse_args(argv)
    result = child_assemble(a) if a.what == "assemble" else child_measure(a)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
