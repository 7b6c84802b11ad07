"""Captioning latency: cold start of the real CLI and warm per-image time, greedy and beam 3, for
mobilenet_v2 and resnet152, one image and a folder of 64.

    .venv/bin/python bench/caption.py [--backbones mobilenet_v2,resnet152] [--repeats 3] [--threads 1]
                                      [--tiny] [--check]

Set-up (not timed): per backbone a small cache and a decoder trained for a few epochs on it
(resnet152 with `--weights none`: random weights, the same compute), so captions have their
usual length.
- cold start: `python -m stage2_decoder.caption INPUT --checkpoint best.pt` in a fresh process,
  from before the process starts to its first caption line (the folder run is stopped there);
  wall time and the child's CPU time (on a shared machine the CPU time is what the process itself
  needed). Target with mobilenet_v2: <= 5 s.
- warm: in one process, `Captioner.caption` (JPEG decode, preprocessing, encoder, decoding, words)
  per image, against the bare encoder + decoder forward: `Backbone.model` on in-memory
  normalised tensors + `decode.greedy`, same batches (1, or 32 as the CLI batches a folder).
  Target: greedy within 1.2x of the bare forward. Beam 3 is timed, without a target.
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
from harness import WEIGHTS, Report, cache_dtype, default_data, median, pin_threads, timed

import torch  # noqa: E402

from stage1_extract.extract import ExtractConfig, extract  # noqa: E402
from stage2_decoder.api import Captioner  # noqa: E402
from stage2_decoder.decoding.beam import greedy  # noqa: E402
from stage2_decoder.training.config import TrainConfig  # noqa: E402
from stage2_decoder.training.loop import train  # noqa: E402

FOLDER_BATCH = 32  # the CLI's --batch-size default


def make_checkpoint(coco: Path, name: str, n_images: int, epochs: int, tmp: Path) -> Path:
    cache = tmp / f"{name}.h5"
    extract(ExtractConfig(images=str(coco / "images"), captions=str(coco / "captions.json"), out=str(cache),
                          dataset="coco", backbone=name, weights=WEIGHTS[name], batch_size=16, workers=1,
                          device="cpu", limit=n_images, dtype=cache_dtype(name), progress=False))
    run = tmp / f"run-{name}"
    train(TrainConfig(features=str(cache), out=str(run), epochs=epochs, scst_epochs=0, device="cpu", progress=False))
    return run / "best.pt"


def cold_start(ckpt: Path, target: str, beam: int, threads: int) -> tuple[float, float]:
    """(wall s, child CPU s) from process start to the first caption line on stdout."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "stage2_decoder.caption", target, "--checkpoint", str(ckpt),
                          "--beam-size", str(beam), "--device", "cpu"], cwd=harness.REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    wall = time.perf_counter() - t0
    if "\t" not in line:
        p.kill()
        raise SystemExit(f"caption CLI printed no caption: {line!r} {p.stderr.read()[-2000:]}")
    p.terminate()  # a folder run: the first caption is what is timed
    p.stdout.close()
    _, _, usage = os.wait4(p.pid, 0)
    p.returncode = 0  # reaped above
    p.stderr.close()
    return wall, usage.ru_utime + usage.ru_stime


def warm(cap: Captioner, paths: list[str], batch: int, beam: int) -> float:
    """Seconds per image of the real captioning path (files in, words out)."""
    t, out = timed(lambda: cap.caption(paths, batch_size=batch, beam_size=beam))
    assert all(r["caption"] for r in out), "an image was not captioned"
    return t / len(paths)


def bare(cap: Captioner, batches: list[torch.Tensor]) -> float:
    """Seconds per image of encoder forward + greedy decoding on in-memory normalised batches."""
    model, decoder = cap.backbone.model, cap.decoder
    n = sum(len(x) for x in batches)

    def run():
        with torch.inference_mode():
            for x in batches:
                greedy(decoder, model(x), max_len=20, min_len=1)

    return timed(run)[0] / n


def normalised(cap: Captioner, paths: list[str], batch: int) -> list[torch.Tensor]:
    from common.backbones import load_image_u8

    pp = cap.backbone.preprocess
    mean, std = torch.tensor(pp.mean).view(1, 3, 1, 1), torch.tensor(pp.std).view(1, 3, 1, 1)
    out = []
    for s in range(0, len(paths), batch):
        u8 = torch.stack([load_image_u8(p, pp) for p in paths[s:s + batch]])
        out.append(((u8.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--backbones", default="mobilenet_v2,resnet152")
    ap.add_argument("--folder-images", type=int, default=64)
    ap.add_argument("--single-images", type=int, default=None, help="images timed one by one (default 8 / 3)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each warm mobilenet_v2 measurement "
                                                             "and of its cold start (resnet152: fewer)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--tiny", action="store_true", help="smoke mode: mobilenet_v2, 4 images, one cold start")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    if args.tiny:
        args.backbones, args.folder_images, args.single_images, args.repeats = "mobilenet_v2", 4, 2, 1
    pin_threads(args.threads)
    coco = args.data / "coco2017-mini"
    rep = Report(f"captioning latency, cpu, {args.threads} thread(s)")
    all_paths = sorted(str(p) for p in (coco / "images").glob("*.jpg"))
    cold_rows, warm_rows = [], []
    with tempfile.TemporaryDirectory(prefix="bench-caption-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "folder"
        folder.mkdir()
        # images not used to train the decoders below (those are the first ones by id)
        picked = all_paths[-args.folder_images:]
        for p in picked:
            (folder / Path(p).name).symlink_to(p)
        folder_paths = sorted(str(p) for p in folder.iterdir())
        for name in args.backbones.split(","):
            light = name == "mobilenet_v2"
            repeats = args.repeats if light else max(1, args.repeats // 2)
            n_single = args.single_images or (8 if light else 3)
            ckpt = make_checkpoint(coco, name, 8 if args.tiny else (64 if light else 16), 1 if args.tiny else 3, tmp)
            for beam in (1,) if args.tiny else (1, 3):
                inputs = [("1 image", folder_paths[0])]
                # a folder's first caption waits for its first 32 images to be encoded: with resnet152
                # that is most of a minute of CPU, so its folder cold start is timed with greedy only
                if not args.tiny and (light or beam == 1):
                    inputs.append((f"folder of {len(folder_paths)}", str(folder)))
                for label, target in inputs:
                    first = beam == 1 and label == "1 image"  # the headline figure gets the repeats
                    runs = [cold_start(ckpt, target, beam, args.threads) for _ in range(repeats if first else 1)]
                    wall, cpu = median([w for w, _ in runs]), median([c for _, c in runs])
                    cold_rows.append([name, "greedy" if beam == 1 else "beam 3", label, wall, cpu])
                    if light:
                        rep.ratio(f"caption.cold_start {name} {'greedy' if beam == 1 else 'beam3'} {label}", wall,
                                  5.0, higher_is_better=False, unit=" s", note=f"CPU {cpu:.2f} s")
            cap = Captioner.load(ckpt, "cpu")
            singles = folder_paths[:n_single]
            for label, paths, batch in (("1 image", singles, 1), (f"folder of {len(folder_paths)}", folder_paths,
                                                                    FOLDER_BATCH)):
                xs = normalised(cap, paths, batch)
                warm(cap, paths[:1], 1, 1), bare(cap, xs[:1])  # warm-up
                t_ours, t_beam, t_bare = [], [], []
                for _ in range(repeats):  # alternate
                    if batch == 1:
                        t_ours += [warm(cap, [p], 1, 1) for p in paths]
                        t_bare += [bare(cap, [x]) for x in xs]
                    else:
                        t_ours.append(warm(cap, paths, batch, 1))
                        t_bare.append(bare(cap, xs))
                    t_beam.append(warm(cap, paths, batch, 3))
                r = median(t_ours) / median(t_bare)
                warm_rows.append([name, label, median(t_bare) * 1000, median(t_ours) * 1000, median(t_beam) * 1000, r])
                rep.ratio(f"caption.warm_greedy {name} {label} ours/bare", r, 1.2, higher_is_better=False)
            del cap
    print("cold start: process start to the first caption line (wall; CPU = the child's user + system time)")
    rep.table(["backbone", "decoding", "input", "wall s", "CPU s"], cold_rows)
    print("warm, ms per image: bare = encoder forward + greedy on in-memory normalised tensors; ours = "
          "Captioner.caption from the files")
    rep.table(["backbone", "input", "bare greedy", "ours greedy", "ours beam 3", "greedy ours/bare"], warm_rows)
    return rep.done(args.check)


if __name__ == "__main__":
    sys.exit(main())
