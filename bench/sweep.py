"""Sweep benchmark: the same 8-run grid sequentially and with n_jobs=2, and what the seed would need.

    .venv/bin/python bench/sweep.py [--features cache/demo-coco-mobilenet_v2.h5] [--epochs 1] [--tiny]

Runs `python -m stage2_decoder.sweep` twice on the same cache and grid (lr x hidden_size x dropout,
8 runs), once with --n-jobs 1 and once with --n-jobs 2, each in a fresh directory, and samples the
memory of each sweep's whole process tree every 0.2 s: peak PSS (proportional set size: pages
shared between the sweep's processes counted once, i.e. the memory the sweep really takes) and,
for reference, peak summed RSS (shared pages counted in every process). Torch threads per run are
the sweep's own rule, cores // n_jobs.

Then the seed's end-to-end approach, which runs the CNN on every (image, caption) pair of every
epoch: the CNN's cost per image (JPEG decode + preprocessing + forward, batched, on this CPU) is
measured on a few images for the cache's backbone and for ResNet-152 (the seed's encoder; random
weights, same compute), and the same 8 runs are estimated as
    8 x epochs x (training pairs x CNN seconds per image + the decoder's own epoch time).
A lower bound for the seed: the CNN is timed here under inference_mode with this project's fast
(draft-mode) JPEG decoding, where the seed decoded and ran it inside its training loop.

Targets: n_jobs=2 at least 1.5x faster than sequential on 2 cores, and the
parallel sweep's peak memory under 1.5x the sequential one. `--tiny` is a smoke mode (dry-run
training on a 2-run grid, the CNN timed on 2 images) that checks the plumbing, not the targets.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# cross-entropy epochs only (no self-critical fine-tuning): the part a sweep explores and the seed compares to
GRID = {"lr": [0.001, 0.003], "hidden_size": [128, 256], "dropout": [0.0, 0.3], "embed_size": 128, "scst_epochs": 0}
TINY_GRID = {"lr": [0.001, 0.003], "hidden_size": 16, "embed_size": 16, "val_images": 8, "scst_epochs": 0}  # 2 runs


class TreeMemory:
    """Peak summed PSS and RSS of a process and all its descendants, sampled on a thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_pss = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        pss = rss = 0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                m = p.memory_full_info()  # smaps_rollup: pss needs it
                pss, rss = pss + m.pss, rss + m.rss
            except psutil.Error:  # exited between listing and reading
                pass
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_sweep_process(features: Path, out: Path, grid_file: Path, n_jobs: int, dry_run: bool) -> dict:
    cores = os.cpu_count() or 1
    threads = max(1, cores // n_jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "stage2_decoder.sweep", "--features", str(features), "--out", str(out),
           "--grid", str(grid_file), "--n-jobs", str(n_jobs), "--no-progress"] + (["--dry-run"] if dry_run else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeMemory(proc.pid) as mem:
        log, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: the sweep with --n-jobs {n_jobs} failed ({proc.returncode}):\n{log}")
    rows = json.loads((out / "results.json").read_text())["rows"]
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        raise SystemExit(f"error: {len(bad)} runs of the --n-jobs {n_jobs} sweep failed: {bad[0]['error']}")
    return {"n_jobs": n_jobs, "threads": threads, "wall": wall, "pss": mem.peak_pss, "rss": mem.peak_rss,
            "rows": rows}


def decoder_epoch_seconds(sweep_dir: Path, rows: list[dict]) -> tuple[float, int]:
    """Mean seconds of one decoder epoch over the sweep's runs, and the training pairs per epoch."""
    secs, pairs = [], 0
    for r in rows:
        for line in (sweep_dir / r["run"] / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            secs.append(rec["seconds"])
            pairs = rec["train_pairs"]
    return statistics.mean(secs), pairs


def cnn_seconds_per_image(features: Path, backbone: str, weights: str, n_images: int, batch: int = 16) -> float:
    """Decode + preprocess + forward of `backbone` per image, on this CPU, over the cache's first images."""
    import torch

    from common.backbones import load_backbone, load_image_u8, preprocess_for
    from common.datasets import load_dataset
    from common.feature_cache import read_meta

    meta = read_meta(features)
    records = load_dataset(meta.dataset_format, meta.captions_file, meta.images_dir)[:n_images]
    net = load_backbone(backbone, weights, "cpu")
    pp = preprocess_for(backbone)
    torch.set_num_threads(os.cpu_count() or 1)
    net.encode(torch.stack([load_image_u8(records[0].path, pp)]))  # warm-up: first-call allocations
    t0 = time.perf_counter()
    for s in range(0, len(records), batch):
        net.encode(torch.stack([load_image_u8(r.path, pp) for r in records[s:s + batch]]))
    return (time.perf_counter() - t0) / len(records)


def fmt_time(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", default=str(REPO / "cache" / "demo-coco-mobilenet_v2.h5"),
                    help="feature cache (default: the demo cache, `make sweep` or `make demo` builds it)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per run")
    ap.add_argument("--cnn-images", type=int, default=32, help="images the CNN is timed on (seed estimate)")
    ap.add_argument("--work", default=None, help="where the sweeps write (default: a temporary folder)")
    ap.add_argument("--tiny", action="store_true", help="smoke mode: dry-run training, 2-run grid, 2 CNN images")
    args = ap.parse_args()

    features = Path(args.features).resolve()
    if not features.is_file():
        raise SystemExit(f"error: feature cache not found: {features} (build it with `make sweep` or "
                         f"`make features BACKBONE=mobilenet_v2 OUT={args.features}`)")
    from common.feature_cache import read_meta

    meta = read_meta(features)
    grid = dict(TINY_GRID if args.tiny else GRID, epochs=args.epochs)
    n_runs = 1
    for v in grid.values():
        n_runs *= len(v) if isinstance(v, list) else 1
    cnn_images = 2 if args.tiny else args.cnn_images
    backbones = [(meta.backbone, meta.weights)] + ([] if args.tiny or meta.backbone == "resnet152"
                                                  else [("resnet152", "none")])

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work = Path(args.work).resolve() if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        grid_file = work / "grid.json"
        grid_file.write_text(json.dumps(grid))
        print(f"grid: {n_runs} runs ({', '.join(f'{k}={v}' for k, v in grid.items())}) on {features.name} "
              f"({meta.backbone}, {meta.feature_dim}-d); {os.cpu_count()} cores"
              + ("; tiny: dry-run training" if args.tiny else ""), flush=True)
        results = []
        for n_jobs in (1, 2):
            out = work / f"sweep-n{n_jobs}"
            if out.exists():
                raise SystemExit(f"error: {out} exists; give an empty --work folder (a resumed sweep times nothing)")
            r = run_sweep_process(features, out, grid_file, n_jobs, args.tiny)
            results.append(r)
            print(f"{'sequential' if n_jobs == 1 else 'parallel  '} n_jobs={n_jobs} ({r['threads']} torch threads/run): "
                  f"wall {r['wall']:.1f} s, peak memory {r['pss'] / 2**20:.0f} MB PSS "
                  f"({r['rss'] / 2**20:.0f} MB summed RSS)", flush=True)
        seq, par = results
        speedup = seq["wall"] / par["wall"]
        mem_ratio = par["pss"] / seq["pss"]
        check = (lambda ok: "tiny: not checked") if args.tiny else (lambda ok: "PASS" if ok else "FAIL")
        print(f"speed-up n_jobs=2 vs sequential: {speedup:.2f}x (target >= 1.5x: {check(speedup >= 1.5)})")
        print(f"peak memory parallel / sequential: {mem_ratio:.2f}x PSS, {par['rss'] / seq['rss']:.2f}x RSS "
              f"(target < 1.5x: {check(mem_ratio < 1.5)})")
        best = {r["rows"][0]["run"] for r in results}
        print(f"best run: {', '.join(sorted(best))}" + (" (both sweeps agree)" if len(best) == 1 else " (sweeps differ)"))

        dec_epoch, pairs = decoder_epoch_seconds(work / "sweep-n1", seq["rows"])
        epochs = grid["epochs"]
        for name, weights in backbones:
            per_img = cnn_seconds_per_image(features, name, weights, cnn_images)
            seed = n_runs * epochs * (pairs * per_img + dec_epoch)
            print(f"seed end-to-end with {name} (CNN on each of {pairs} training captions every epoch, "
                  f"{per_img * 1000:.1f} ms/image measured on {cnn_images} images): {fmt_time(seed)} for the "
                  f"{n_runs} runs = {seed / seq['wall']:.0f}x the sequential sweep, {seed / par['wall']:.0f}x the "
                  f"parallel one", flush=True)


if __name__ == "__main__":
    main()
