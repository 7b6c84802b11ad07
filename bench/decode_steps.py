"""Decoding on the CPU with "all ended?" read every step against every DONE_CHECK_EVERY steps (the GPU's
cadence, which runs up to 3 steps past the last caption's <end>): the same captions, the time per image.

    .venv/bin/python bench/decode_steps.py [--images 320] [--repeats 5] [--threads 1] [--tiny] [--check]

Set-up (not timed): a mobilenet_v2 cache of the first `--images` COCO-mini photos and a decoder trained a
few epochs on it (bench/caption.py's), so captions have their usual length. Timed on those features,
each cadence in turn, `--repeats` times: greedy and beam 3 at batch 1 (`caption` on one photo, the CPU
service), 32 (a folder) and 500 (validation); 5 sampled captions per image; an SCST batch's sampling
(64 images x 5, with the graph, no backward). Each row must give the same output both ways; the ratio
is every step / every DONE_CHECK_EVERY (target <= 1).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import harness  # noqa: F401  (puts the repository on sys.path)
from caption import make_checkpoint
from harness import Report, default_data, median, pin_threads, timed

import torch  # noqa: E402

from common.feature_cache import load_cache  # noqa: E402
from stage2_decoder.decoding import beam, sampling  # noqa: E402
from stage2_decoder.decoding.config import DecodeConfig  # noqa: E402
from stage2_decoder.training import scst  # noqa: E402
from stage2_decoder.training.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402


def set_cadence(every: int) -> None:
    """Every decoding loop reads "all ended?" every `every` steps, whatever the device."""
    for mod in (beam, sampling, scst):
        mod.done_check_every = lambda device, every=every: every


def workloads(model, feats: torch.Tensor, tiny: bool) -> list[tuple[str, int, object]]:
    """(label, images, a call returning its output as plain values)."""
    cfg3 = DecodeConfig(beam_size=3)
    n = feats.shape[0]
    singles = feats[: 4 if tiny else 16]

    def per_batch(fn, batch):
        return lambda: [fn(feats[s:s + batch]) for s in range(0, n, batch)]

    def scst_sample():
        torch.manual_seed(0)
        with scst.scst_mode(model):
            ids, logp, _ = scst.sample(model, feats[:64], 5, 16)
        model.eval()
        return ids.tolist(), logp.detach().tolist()

    return [
        ("greedy, batch 1", len(singles), lambda: [beam.greedy(model, f[None]) for f in singles]),
        ("beam 3, batch 1", len(singles), lambda: [beam.beam_search_nbest(model, f[None], cfg3) for f in singles]),
        ("greedy, batch 32", n, per_batch(lambda f: beam.greedy(model, f), 32)),
        ("beam 3, batch 32", n, per_batch(lambda f: beam.beam_search_nbest(model, f, cfg3), 32)),
        (f"greedy, batch {min(n, 500)}", n, per_batch(lambda f: beam.greedy(model, f), 500)),
        (f"beam 3, batch {min(n, 500)}", n, per_batch(lambda f: beam.beam_search_nbest(model, f, cfg3), 500)),
        ("5 sampled, batch 32", n, per_batch(lambda f: sampling.sample_captions(
            model, f, 5, seed=0, keys=list(range(len(f)))), 32)),
        ("SCST sampling, 64 x 5", min(n, 64), scst_sample),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--tiny", action="store_true", help="smoke mode: 16 images, one epoch, one repeat")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    if args.tiny:
        args.images, args.epochs, args.repeats = 16, 1, 1
    pin_threads(args.threads)
    gpu_every = beam.DONE_CHECK_EVERY
    rep = Report(f"decoding's done check: every step / every {gpu_every} steps, cpu, {args.threads} thread(s)")
    with tempfile.TemporaryDirectory(prefix="bench-decode-steps-") as tmp:
        ckpt = make_checkpoint(args.data / "coco2017-mini", "mobilenet_v2", args.images, args.epochs, Path(tmp))
        model, _ = model_from_checkpoint(load_checkpoint(ckpt))
        feats = torch.as_tensor(load_cache(Path(tmp) / "mobilenet_v2.h5").features[:]).float()
    rows, real = [], beam.done_check_every
    try:
        for label, images, run in workloads(model, feats, args.tiny):
            times, outs = {1: [], gpu_every: []}, {}
            for every in (1, gpu_every):  # warm-up
                set_cadence(every)
                outs[every] = run()
            if outs[1] != outs[gpu_every]:
                raise SystemExit(f"{label}: the two cadences decoded differently")
            for _ in range(args.repeats):  # alternate
                for every in (1, gpu_every):
                    set_cadence(every)
                    times[every].append(timed(run)[0] / images)
            every1, every4 = median(times[1]) * 1000, median(times[gpu_every]) * 1000
            rows.append([label, every4, every1, every1 / every4])
            rep.ratio(f"decode_steps {label} every 1/{gpu_every}", every1 / every4, 1.0, higher_is_better=False)
    finally:
        for mod in (beam, sampling, scst):
            mod.done_check_every = real
    print(f"ms per image ({feats.shape[0]} COCO-mini images; the same output both ways)")
    rep.table(["decoding", f"every {gpu_every} steps", "every step", "ratio"], rows)
    return rep.done(args.check)


if __name__ == "__main__":
    sys.exit(main())
