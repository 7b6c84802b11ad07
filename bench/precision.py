"""Features computed in bfloat16 (stage 1 and captioning on a GPU) against float32 (the CPU): does a decoder
trained on one precision caption as well from the other?

    .venv/bin/python bench/precision.py [--data ../shared/data] [--epochs 6] [--work DIR] [--json FILE] [--quick]

On this CPU, MobileNetV2 with its real ImageNet weights makes two caches of the COCO-mini photos: one in
float32, as on a CPU, and one in bfloat16, as on a GPU. Both go through the same code, common.backbones.Backbone,
with its precision set to bfloat16 for the second (BatchNorm folded in fp32, the weights cast to bf16 once,
channels_last). `make demo`'s recipe (the defaults, `--epochs`) trains one decoder on each cache, with the same
split and seed. Each decoder then captions the held-out images (val + test, never trained on) from features
of both precisions, computed from the photos as `caption` does (beam 3; not rounded to the cache's float16).

Prints, for each decoder, CIDEr from float32 and from bfloat16 features, the share of captions that change,
and the paired 95 % bootstrap interval of the CIDEr ratio (resampling the images); and the features'
relative difference between the two precisions. The CPU's bf16 kernels are not cuDNN's: both round the same
weights and activations to bf16, but sum in their own order, so this measures the rounding, not a GPU's last bits.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from unittest import mock
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import default_data, machine  # noqa: E402
from quality import DATASETS, ratio_interval  # noqa: E402

from common.backbones import Backbone, ImageRows, load_backbone  # noqa: E402
from common.datasets import load_dataset  # noqa: E402
from stage1_extract.extract import ExtractConfig, extract  # noqa: E402
from stage2_decoder.api import Captioner  # noqa: E402
from stage2_decoder.decoding.captions import caption_keys  # noqa: E402
from stage2_decoder.reporting.evaluation import evaluate_captions  # noqa: E402
from stage2_decoder.training.checkpoint import load_checkpoint  # noqa: E402
from stage2_decoder.training.config import TrainConfig  # noqa: E402
from stage2_decoder.training.loop import train  # noqa: E402

PRECISIONS = ("float32", "bfloat16")
HELD_OUT = ("val", "test")


class BF16Backbone(Backbone):
    """The CUDA path's bfloat16 encoder on any device."""

    @property
    def precision(self) -> str:
        return "bfloat16"


@contextlib.contextmanager
def precision(name: str):
    """Backbones built inside (by load_backbone, stage 1's too) compute in `name`, and keep it after."""
    with mock.patch("common.backbones.Backbone", BF16Backbone if name == "bfloat16" else Backbone):
        yield


def encode_both(records, workers: int) -> dict[str, torch.Tensor]:
    """{precision: (N, D) float32 features of `records`' photos}, the photos decoded once."""
    backbones = {}
    for p in PRECISIONS:
        with precision(p):
            backbones[p] = load_backbone("mobilenet_v2", "default", "cpu")
    pp = backbones["float32"].preprocess
    loader = DataLoader(ImageRows(list(enumerate(r.path for r in records)), pp), batch_size=64, num_workers=workers)
    out = {p: torch.zeros(len(records), backbones[p].feature_dim) for p in PRECISIONS}
    for rows, images, errs in loader:
        if any(errs):
            raise RuntimeError(f"unreadable photo: {next(e for e in errs if e)}")
        for p in PRECISIONS:
            out[p][rows] = backbones[p].encode(images)
    return out


def held_out_keys(checkpoint: Path) -> list[str]:
    """The keys of the checkpoint's val + test images."""
    split = load_checkpoint(checkpoint)["split"]
    return [k for s in HELD_OUT for k in split[s]]


def score(checkpoint: Path, records, feats: dict[str, torch.Tensor]) -> dict:
    cap = Captioner.load(checkpoint, "cpu")
    keys = [r.key for r in records]
    res = {p: caption_keys(cap.decoder, cap.vocab, keys, feats[p]) for p in PRECISIONS}
    reports = {p: evaluate_captions(res[p], records, tokenizer=cap.vocab.tokenizer) for p in PRECISIONS}
    changed = sum(res["float32"][k] != res["bfloat16"][k] for k in keys) / len(keys)
    lo, hi = ratio_interval(reports["bfloat16"], reports["float32"])
    return {"cider": {p: reports[p]["metrics"]["CIDEr"] for p in PRECISIONS},
            "bleu4": {p: reports[p]["metrics"]["BLEU-4"] for p in PRECISIONS},
            "captions_changed": changed, "ratio_bf16_over_fp32_95": [lo, hi]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--work", type=Path, default=Path("/tmp/capcache-bench-precision"))
    ap.add_argument("--epochs", type=int, default=6, help="make demo's")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke mode: 120 photos, 1 epoch")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args()
    images, captions = (args.data / p for p in DATASETS["coco"])
    args.work.mkdir(parents=True, exist_ok=True)
    runs, t0 = {}, time.perf_counter()
    for p in PRECISIONS:
        cache = args.work / f"coco-mobilenet_v2-{p}.h5"
        with precision(p):
            extract(ExtractConfig(images=str(images), captions=str(captions), out=str(cache),
                                  backbone="mobilenet_v2", workers=args.workers, progress=False,
                                  limit=120 if args.quick else None))
        run = args.work / f"coco-{p}"
        if not (run / "best.pt").is_file():
            train(TrainConfig(features=str(cache), out=str(run), epochs=1 if args.quick else args.epochs,
                              progress=False))
        runs[p] = run / "best.pt"
    keys = held_out_keys(runs["float32"])
    assert keys == held_out_keys(runs["bfloat16"]), "splits differ"
    recs = {r.key: r for r in load_dataset("coco", str(captions), str(images))}
    records = [recs[k] for k in keys]
    feats = encode_both(records, args.workers)
    rel = ((feats["bfloat16"] - feats["float32"]).norm(dim=1) / feats["float32"].norm(dim=1)).numpy()
    out = {"images": len(records), "epochs": 1 if args.quick else args.epochs, "machine": machine(),
           "feature_relative_difference": {"median": float(np.median(rel)), "max": float(rel.max())},
           "trained_on": {p: score(runs[p], records, feats) for p in PRECISIONS},
           "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    print("\n| decoder trained on | CIDEr from float32 features | from bfloat16 | captions changed | "
          "bf16 / fp32 CIDEr, 95 % |\n|---|---|---|---|---|")
    for p, s in out["trained_on"].items():
        lo, hi = s["ratio_bf16_over_fp32_95"]
        print(f"| {p} cache | {s['cider']['float32']:.3f} | {s['cider']['bfloat16']:.3f} | "
              f"{s['captions_changed']:.1%} | {lo:.2f}-{hi:.2f} |")
    print(f"\n{len(records)} held-out photos; features' relative difference bf16 vs fp32: median "
          f"{out['feature_relative_difference']['median']:.4f}, max {out['feature_relative_difference']['max']:.4f}")


if __name__ == "__main__":
    main()
