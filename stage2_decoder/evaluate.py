"""Score a checkpoint with the standard caption metrics.

    python -m stage2_decoder.evaluate [--checkpoint FILE] --features FILE.h5 --split test [--beam-size K] [--json-out OUT]
    python -m stage2_decoder.evaluate [--checkpoint FILE] --dataset coco --images DIR --captions FILE [--split test]
        [--limit N]

From the cache (fast: a split of the training dataset, the split stored in the checkpoint) or
from raw images with their captions file (any supported format), through stage 1's preprocessing.
Raw images of the checkpoint's own dataset are scored whole unless `--split` picks its held-out
images; the report then notes how many of them were likely trained on.
"""
from __future__ import annotations

import os
from dataclasses import asdict
import time
from pathlib import Path

import click

from common.atomic import atomic_write, ready_to_write
from common.backbones import default_workers
from common.cli import bounded, decode_options, run_guarded
from common.datasets import FORMATS, OUTSIDE_FLAG, load_dataset
from common.device import resolve_device
from common.jsonio import dump_json
from common.paths import refuse_overwriting
from common.text import printable
from stage2_decoder.reporting.evaluation import (captions_from_cache, captions_from_images, evaluate_captions,
                                                 format_table, raw_records)
from stage2_decoder.api import Captioner, find_checkpoint
from stage2_decoder.reporting.gallery import write_html
from stage2_decoder.training.checkpoint import load_checkpoint, model_from_checkpoint


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(), default=None,
              help="[default: $CAPCACHE_CHECKPOINT, else the newest runs/*/best.pt]")
@click.option("--features", type=click.Path(), help="Evaluate a split of this cache (fast path).")
@click.option("--split", type=click.Choice(["val", "test"]), default=None,
              help="The checkpoint's split to score [default: test from a cache; every image in raw-image mode].")
@click.option("--dataset", type=click.Choice(["auto", *FORMATS]), default=None,
              help="Raw-image mode: captions file format.")
@click.option("--images", type=click.Path(), default=None, help="Raw-image mode: images folder.")
@click.option("--captions", type=click.Path(), default=None, help="Raw-image mode: captions file.")
@click.option("--limit", type=bounded("limit"), default=None, help="Score the first N images (of --split).")
@decode_options
@click.option("--spice", is_flag=True, help="Also try SPICE (needs a download on first use).")
@click.option("--workers", type=bounded("workers"), default=default_workers(), show_default=True,
              help="Raw-image mode: DataLoader worker processes decoding images.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report (metrics + every caption) as JSON, not a table.")
@click.option("--json-out", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the report (metrics + every caption) to this JSON file.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False), default=None,
              help="Write a self-contained HTML gallery: metrics, then each photo with its captions and CIDEr.")
@click.option("--html-max", type=bounded("html_max"), default=1000, show_default=True,
              help="Most photos in the gallery: the best and worst half by CIDEr (0 = all).")
@click.option(OUTSIDE_FLAG, "allow_outside_images", is_flag=True,
              help="Also read captions entries whose image resolves outside the images folder.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--dry-run", is_flag=True, help="Check the options, the checkpoint and the data source; decode nothing.")
def main(checkpoint, features, split, dataset, images, captions, limit, decode, spice, workers, device, as_json,
         json_out, html_out, html_max, allow_outside_images, no_progress, dry_run):
    """Score a checkpoint with BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE where it runs)."""

    def work():
        t0 = time.perf_counter()
        raw = images is not None or captions is not None
        if raw == (features is not None):
            raise click.UsageError("give either --features (cache split) or --images and --captions (raw images)")
        if raw and not (images and captions):
            raise click.UsageError("raw-image mode needs both --images and --captions")
        if not raw and dataset is not None:  # the cache records its captions' format: not silently dropped
            raise click.UsageError("--dataset is for raw-image mode (--images and --captions), not --features")
        if not raw:  # a wrong --features path fails now, not after building the backbone
            # imported on use: importing this module stays free of h5py
            from common.feature_cache import read_meta
            read_meta(features)
        ckpt_path = str(find_checkpoint(checkpoint))
        if checkpoint is None:
            click.echo(f"using checkpoint {ckpt_path}", err=True)
        refuse_overwriting({"--json-out": json_out, "--html": html_out},
                           {"checkpoint": ckpt_path, "feature cache": features, "captions file": captions})
        # the reports' folders made and checked now: not found wanting after the decoding
        for path, what in ((json_out, "evaluation report"), (html_out, "gallery")):
            if path:
                ready_to_write(path, what)
        ckpt, note = load_checkpoint(ckpt_path), None
        if raw:  # which images: read (and checked) before the model is built
            recs, note = raw_records(load_dataset(dataset or "auto", captions, images, None, allow_outside_images),
                                     ckpt.get("split"), split, limit)
        if dry_run:
            click.echo(f"dry run: checkpoint {ckpt_path}, " + (f"{len(recs)} images from {captions}" if raw
                                                               else f"the {split or 'test'} split of {features}"),
                       err=True)
            return 0
        if note:
            click.echo(f"warning: {note}", err=True)
        errors = {}
        if raw:
            cap = Captioner.from_checkpoint(ckpt, ckpt_path, device)
            res, recs, errors = captions_from_images(cap, recs, workers, progress=not no_progress, decode_cfg=decode)
            for k, e in errors.items():
                click.echo(f"skipped {printable(k)}: {printable(e)}", err=True)
        else:
            # the decoder alone: the CNN (its weights file, seconds to build, GPU memory) is not needed here
            cap = Captioner(None, *model_from_checkpoint(ckpt, resolve_device(device)), ckpt_path)
            res, recs = captions_from_cache(cap, ckpt, features, split or "test", decode_cfg=decode,
                                            allow_outside_images=allow_outside_images, progress=not no_progress,
                                            limit=limit)
        if not res:
            raise ValueError("no image could be captioned")
        report = evaluate_captions(res, recs, spice, cap.vocab.tokenizer)
        report["notes"] += [note] if note else []
        images_root = os.path.abspath(images) if raw else read_meta(features).images_dir
        report.update({"checkpoint": os.path.abspath(ckpt_path), "decode": asdict(decode), "images_root": images_root,
                       "source": (f"images:{split}" if split else "images") if raw else f"cache:{split or 'test'}",
                       "skipped": errors,
                       "seconds": round(time.perf_counter() - t0, 2)})
        if as_json:
            click.echo(dump_json(report, indent=1))
        else:
            click.echo(format_table(report))
            click.echo(f"{report['seconds']:.1f}s")
        failed = None  # one report that cannot be written does not cost the other
        if json_out:
            try:
                atomic_write(json_out, dump_json(report, indent=1), what="evaluation report")
            except OSError as e:
                failed = e
        if html_out:
            write_html(report, html_out, f"Caption evaluation: {Path(ckpt_path).name}, {report['source']}",
                       progress=not no_progress, max_images=html_max,
                       images_root=None if allow_outside_images else images_root)
            click.echo(f"gallery: {html_out}", err=as_json)
        if failed is not None:
            raise failed
        return 0

    raise SystemExit(run_guarded(work))


if __name__ == "__main__":
    main()
