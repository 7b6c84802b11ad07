"""Stage 1 benchmark: images/s of the real extraction pipeline against a bare forward pass of the
same backbone, in one process.

    .venv/bin/python bench/stage1.py [--backbones resnet152,mobilenet_v2] [--repeats 3] [--device cpu]
                                     [--images N] [--batch-size B] [--workers 1] [--threads 1] [--tiny] [--check]

pipeline = `stage1_extract.extract.extract(ExtractConfig(...))` on the first N COCO-mini images:
JPEG decode + resize + crop in DataLoader workers, uint8 batches normalised on the device,
the CNN, shards written by a background thread and assembled into the HDF5 cache. Its images/s
is the summary's (extraction loop through the finished file; building the model and reading the
captions file happen before and are printed apart). bare = `load_backbone(...).model` on an
in-memory, already normalised channels_last batch of the same size, the same number of batches.
The two alternate, `--repeats` times; the ratio is of the medians. Target on CPU: >= 0.85.

Also measured, once each, for the choices the pipeline makes: channels_last against the default
memory format and BatchNorm folded into the convolutions against not (bare forward), and the decode paths (PIL as used,
PIL without JPEG draft mode, PIL without the EXIF orientation step, torchvision.io.decode_jpeg; on the shared JPEGs
and on COCO-sized 640x480 copies), in ms per image.
On CUDA (`--device cuda`) the bare forward runs in bf16 like `Backbone.encode` (the weights cast
once when loaded; autocast only casts the input); the GPU target (docs/gpu.md) is >= 3,000
images/s end to end for ResNet-152 on COCO-sized JPEGs (point --images-dir/--captions at real COCO
val2017 for that), and the GPU JPEG decoder (`decode_jpeg(device="cuda")`) is timed beside the
CPU one.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import harness  # noqa: F401  (puts the repository on sys.path)
from harness import WEIGHTS, Report, cache_dtype, default_data, median, pin_threads

import torch  # noqa: E402

from common.backbones import load_backbone, load_image_u8  # noqa: E402
from stage1_extract.extract import ExtractConfig, extract  # noqa: E402

# per backbone on CPU: (batch size, batches per run), so a run takes several seconds on one core
CPU_PLAN = {"resnet152": (16, 2), "resnet101": (16, 2), "resnet50": (16, 4), "mobilenet_v2": (32, 6)}
GPU_PLAN = (256, 8)


def bare_images_per_s(model: torch.nn.Module, batch: int, n_batches: int, device: torch.device,
                      channels_last: bool = True, warm_up: bool = False) -> float:
    """images/s of the model alone on an in-memory normalised batch (what Backbone.encode feeds it)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as extract() sets it: every batch has one shape
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=fmt)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if warm_up:  # kernel selection, weight reorders: once per model and memory format
            model(x)
            _sync(device)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            model(x)
        _sync(device)
        seconds = time.perf_counter() - t0
    model.to(memory_format=torch.channels_last)  # as load_backbone leaves it (not timed)
    return batch * n_batches / seconds


def load_unfolded(name: str, device: torch.device):
    """The backbone as `load_backbone` builds it, without BatchNorm folded into the convolutions."""
    import common.backbones as backbones

    fold = backbones.fold_batchnorm
    backbones.fold_batchnorm = lambda model: model
    try:
        return load_backbone(name, WEIGHTS[name], device)
    finally:
        backbones.fold_batchnorm = fold


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pipeline_run(args, name: str, out: Path, batch: int, n_images: int):
    t0 = time.perf_counter()
    s = extract(ExtractConfig(images=str(args.images_dir), captions=str(args.captions), out=str(out),
                              dataset="auto", backbone=name, weights=WEIGHTS[name], batch_size=batch,
                              workers=args.workers, device=args.device, limit=n_images,
                              dtype=cache_dtype(name), progress=False))
    wall = time.perf_counter() - t0
    if s.done_now != n_images:
        raise SystemExit(f"extraction did {s.done_now} of {n_images} images ({len(s.failed)} failed)")
    out.unlink()
    return s.images_per_s, wall - s.seconds


def decode_choices(paths: list[str], pp, tmp: Path, device: torch.device) -> list[list[object]]:
    """ms per image of the decode paths, on the dataset's own JPEGs and on COCO-sized copies."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as F2

    big = []
    for i, p in enumerate(paths):  # COCO originals are ~640x480; the shared copies were shrunk to 256
        q = tmp / f"big{i}.jpg"
        with Image.open(p) as im:
            im.convert("RGB").resize((640, 480), Image.BICUBIC).save(q, quality=90)
        big.append(str(q))

    for f in paths + big:  # into the page cache first: the first path timed must not pay the disk reads
        Path(f).read_bytes()

    def ms(fn, files, passes: int = 5) -> float:
        fn(files[0])
        _sync(device)
        times = []
        for _ in range(passes):  # the median pass: one pass over 32 files is a fraction of a second
            t0 = time.perf_counter()
            for f in files:
                fn(f)
            _sync(device)  # the GPU decoder returns before its work is done
            times.append((time.perf_counter() - t0) / len(files) * 1000)
        return median(times)

    def tv_io(f, dev="cpu"):
        x = decode_jpeg(read_file(f), mode=ImageReadMode.RGB, device=dev)
        return F2.center_crop(F2.resize(x, [pp.resize], antialias=True), [pp.crop])

    no_draft = dataclasses.replace(pp, jpeg_draft=False)
    no_exif = dataclasses.replace(pp, exif_transpose=False)
    rows = [["PIL, as stage 1 uses it (draft mode)", ms(lambda f: load_image_u8(f, pp), paths),
             ms(lambda f: load_image_u8(f, pp), big)],
            ["PIL without JPEG draft mode", ms(lambda f: load_image_u8(f, no_draft), paths),
             ms(lambda f: load_image_u8(f, no_draft), big)],
            ["PIL without the EXIF orientation step", ms(lambda f: load_image_u8(f, no_exif), paths),
             ms(lambda f: load_image_u8(f, no_exif), big)],
            ["torchvision.io.decode_jpeg + resize (CPU)", ms(tv_io, paths), ms(tv_io, big)]]
    if device.type == "cuda":
        rows.append(["torchvision.io.decode_jpeg on the GPU", ms(lambda f: tv_io(f, "cuda"), paths),
                     ms(lambda f: tv_io(f, "cuda"), big)])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--images-dir", type=Path, default=None, help="default: DATA/coco2017-mini/images")
    ap.add_argument("--captions", type=Path, default=None, help="default: DATA/coco2017-mini/captions.json")
    ap.add_argument("--backbones", default="resnet152,mobilenet_v2")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--images", type=int, default=None, help="images per pipeline run (default: per backbone)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: per backbone")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader decode workers")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--no-choices", action="store_true", help="skip the channels_last / decode measurements")
    ap.add_argument("--tiny", action="store_true", help="seconds-long smoke mode (mobilenet_v2, 16 images)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    if args.tiny:
        args.backbones, args.repeats, args.no_choices = "mobilenet_v2", 1, True
        args.batch_size, args.images = args.batch_size or 8, args.images or 16
    args.images_dir = args.images_dir or args.data / "coco2017-mini" / "images"
    args.captions = args.captions or args.data / "coco2017-mini" / "captions.json"
    pin_threads(args.threads)
    device = torch.device(args.device)
    rep = Report(f"stage 1: pipeline vs bare forward, {args.device}, {args.threads} thread(s), "
                 f"{args.workers} worker(s)")
    rows, choice_rows = [], []
    with tempfile.TemporaryDirectory(prefix="bench-stage1-") as tmp:
        tmp = Path(tmp)
        for name in args.backbones.split(","):
            batch, n_batches = GPU_PLAN if device.type == "cuda" else CPU_PLAN[name]
            batch = args.batch_size or batch
            n_images = args.images or batch * n_batches
            n_batches = -(-n_images // batch)
            bb = load_backbone(name, WEIGHTS[name], device)
            bare, pipe, setup = [], [], []
            for r in range(args.repeats):  # alternate, so drifting load hits both alike
                bare.append(bare_images_per_s(bb.model, batch, n_batches, device, warm_up=r == 0))
                ips, other = pipeline_run(args, name, tmp / f"{name}-{r}.h5", batch, n_images)
                pipe.append(ips)
                setup.append(other)
            ratio = median(pipe) / median(bare)
            rows.append([name, batch, n_images, median(bare), median(pipe), median(setup), ratio])
            rep.ratio(f"stage1.{name} pipeline/bare", ratio, 0.85 if device.type == "cpu" else None, unit="",
                      note=f"{median(pipe):.1f} vs {median(bare):.1f} images/s")
            if device.type == "cuda" and name == "resnet152":
                rep.ratio("stage1.resnet152 pipeline images/s (GPU)", median(pipe), 3000, unit=" img/s")
            if not args.no_choices:
                cl = bare_images_per_s(bb.model, batch, 1, device, channels_last=True)
                plain = bare_images_per_s(bb.model, batch, 1, device, channels_last=False, warm_up=True)
                choice_rows.append([f"{name}: channels_last / default memory format (bare forward)",
                                    cl / plain, "x", f"{cl:.1f} vs {plain:.1f} images/s"])
                unfolded = load_unfolded(name, device)
                for b in sorted({1, 4, batch}):
                    n = max(2, 32 // b)
                    folded = bare_images_per_s(bb.model, b, n, device, warm_up=True)
                    plain = bare_images_per_s(unfolded.model, b, n, device, warm_up=True)
                    choice_rows.append([f"{name}: BatchNorm folded / not (bare forward, batch {b})",
                                        folded / plain, "x", f"{folded:.1f} vs {plain:.1f} images/s"])
                del unfolded
            del bb
        print("pipeline images/s: extraction loop through the finished file; 'set-up s' = the rest of the "
              "extract() call (model build, captions file), not in the ratio")
        rep.table(["backbone", "batch", "images", "bare img/s", "pipeline img/s", "set-up s", "pipeline/bare"], rows)
        if not args.no_choices:
            rep.table(["choice", "ratio", "", "measured"], choice_rows)
            from common.backbones import preprocess_for

            paths = sorted(str(p) for p in args.images_dir.glob("*.jpg"))[:32]
            rep.table(["decode path (ms per image, 1 thread)", "shared JPEGs (256 px)", "COCO-sized 640x480"],
                      decode_choices(paths, preprocess_for("resnet152"), tmp, device))
    return rep.done(args.check)


if __name__ == "__main__":
    sys.exit(main())
