"""ONNX export vs PyTorch on this CPU: cold start of the caption CLI and warm per-image latency, in one run
(not named onnx.py: run as a script, it would shadow the onnx package).

    .venv/bin/python bench/onnx_export.py [--repeats 3] [--images 8] [--threads 1] [--tiny]

Set-up (not timed): a mobilenet_v2 (real weights) cache of a few COCO images, a decoder trained on
it for a few epochs (the default sizes), and its export (`stage2_decoder.export`).
- cold start: `python -m stage2_decoder.caption IMAGE --onnx DIR` against `... --checkpoint best.pt`,
  alternated, from before the process starts to its first caption line: wall time and the child's
  CPU time (on a shared machine the CPU time is what the process itself needed).
- warm: in one process, seconds per image of `OnnxCaptioner.caption([path])` against
  `Captioner.caption([path])` (file in, words out), greedy and beam 3, alternated image by image.
Ratios are PyTorch / onnxruntime (above 1: the export is faster). Both use --threads threads.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness  # noqa: F401  (puts the repository on sys.path)
from harness import Report, default_data, median, pin_threads, timed

from stage1_extract.extract import ExtractConfig, extract  # noqa: E402
from stage2_decoder.api import Captioner  # noqa: E402
from stage2_decoder.serving.onnx_captioner import OnnxCaptioner  # noqa: E402
from stage2_decoder.serving.onnx_export import ExportConfig, export  # noqa: E402
from stage2_decoder.training.config import TrainConfig  # noqa: E402
from stage2_decoder.training.loop import train  # noqa: E402


def make_export(coco: Path, n_images: int, epochs: int, tmp: Path) -> tuple[Path, Path]:
    """(checkpoint, export folder) of a mobilenet_v2 decoder trained briefly on n_images."""
    cache = tmp / "cache.h5"
    extract(ExtractConfig(images=str(coco / "images"), captions=str(coco / "captions.json"), out=str(cache),
                          dataset="coco", backbone="mobilenet_v2", weights="default", batch_size=16, workers=1,
                          device="cpu", limit=n_images, progress=False))
    run = tmp / "run"
    train(TrainConfig(features=str(cache), out=str(run), epochs=epochs, scst_epochs=0, device="cpu", progress=False))
    export(ExportConfig(checkpoint=str(run / "best.pt"), out=str(tmp / "onnx")))
    return run / "best.pt", tmp / "onnx"


def cold_start(source: list[str], image: str, threads: int) -> tuple[float, float]:
    """(wall s, child CPU s) from process start to the first caption line of `caption IMAGE SOURCE...`."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "stage2_decoder.caption", image, *source, "--no-progress"],
                         cwd=harness.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    wall = time.perf_counter() - t0
    if "\t" not in line:
        p.kill()
        raise SystemExit(f"caption CLI printed no caption: {line!r} {p.stderr.read()[-2000:]}")
    p.stdout.close()
    _, _, usage = os.wait4(p.pid, 0)
    p.returncode = 0  # reaped above
    p.stderr.close()
    return wall, usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--images", type=int, default=8, help="images timed one by one (warm)")
    ap.add_argument("--repeats", type=int, default=3, help="cold starts per side, and passes over the images")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (1: the machine is shared)")
    ap.add_argument("--tiny", action="store_true", help="smoke mode: 8 training images, 2 timed, one repeat")
    args = ap.parse_args(argv)
    if args.tiny:
        args.images, args.repeats = 2, 1
    pin_threads(args.threads)
    coco = args.data / "coco2017-mini"
    rep = Report(f"ONNX export vs PyTorch, cpu, {args.threads} thread(s)")
    # images not used to train the decoder (those are the first ones by name)
    photos = sorted(str(p) for p in (coco / "images").glob("*.jpg"))[-args.images:]
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        ckpt, onnx_dir = make_export(coco, 8 if args.tiny else 64, 1 if args.tiny else 3, Path(tmp))
        sides = {"pytorch": ["--checkpoint", str(ckpt), "--device", "cpu"], "onnx": ["--onnx", str(onnx_dir)]}
        cold = {k: [] for k in sides}
        for _ in range(args.repeats):
            for k, src in sides.items():  # alternate
                cold[k].append(cold_start(src, photos[0], args.threads))
        cap = Captioner.load(ckpt, "cpu")
        oc = OnnxCaptioner.load(onnx_dir, threads=args.threads)
        runners = {"pytorch": cap.caption, "onnx": oc.caption}
        warm = {(k, b): [] for k in runners for b in (1, 3)}
        agree = {b: 0 for b in (1, 3)}
        for k in runners:  # warm-up
            runners[k](photos[:1], beam_size=3)
        for _ in range(args.repeats):
            for p in photos:
                for b in (1, 3):
                    texts = {}
                    for k, run in runners.items():
                        t, out = timed(lambda: run([p], beam_size=b))
                        warm[k, b].append(t)
                        texts[k] = out[0]["caption"]
                    agree[b] += texts["pytorch"] == texts["onnx"]
    rows = []
    for k in sides:
        wall, cpu = median([w for w, _ in cold[k]]), median([c for _, c in cold[k]])
        rows.append([k, wall, cpu, median(warm[k, 1]) * 1000, median(warm[k, 3]) * 1000])
    (_, pw, pc, pg, pb), (_, ow, oc_cpu, og, ob) = rows
    print("cold start: process start to the first caption line, 1 image, beam 3 (wall; CPU = the child's "
          "user + system time); warm: ms per image, file in, words out")
    rep.table(["runtime", "cold wall s", "cold CPU s", "warm greedy ms", "warm beam 3 ms"], rows)
    n = len(photos) * args.repeats
    print(f"captions equal (pytorch vs onnx): greedy {agree[1]}/{n}, beam 3 {agree[3]}/{n}")
    rep.ratio("onnx.cold_start pytorch/onnx", pw / ow, note=f"CPU {pc / oc_cpu:.2f}x")
    rep.ratio("onnx.warm_greedy pytorch/onnx", pg / og)
    rep.ratio("onnx.warm_beam3 pytorch/onnx", pb / ob)
    rep.ratio("onnx.captions_equal", (agree[1] + agree[3]) / (2 * n), 1.0)
    return rep.done()


if __name__ == "__main__":
    sys.exit(main())
