"""Score a checkpoint with the standard caption metrics.

    python -m stage2_decoder.evaluate [--checkpoint FILE] --features FILE.h5 --split test [--beam-size K] [--json-out OUT]
    python -m stage2_decoder.evaluate [--checkpoint FILE] --dataset coco --images DIR --captions FILE [--limit N]

From the cache (fast: a split of the training dataset, the split stored in the checkpoint) or
from raw images with their captions file (any supported format), through stage 1's preprocessing.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
import time
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from common.atomic import atomic_write
from common.backbones import default_workers
from common.cli import bounded, decode_options, run_guarded
from common.datasets import FORMATS, OUTSIDE_FLAG, ImageRecord, load_dataset
from stage2_decoder.decode_config import DecodeConfig


def captions_from_cache(cap, ckpt: dict, features: str, split: str, records_override: dict | None = None,
                        decode_cfg: DecodeConfig | None = None, allow_outside_images: bool = False
                        ) -> tuple[dict[str, str], list[ImageRecord]]:
    """Decode the split's images from the cache. Returns ({key: caption}, records)."""
    from common.feature_cache import load_cache

    bb = ckpt["backbone"]
    cache = load_cache(features, backbone=bb["name"], feature_dim=bb["feature_dim"], preprocess=bb["preprocess"])
    keys = (ckpt.get("split") or {}).get(split)
    if keys is None:
        raise ValueError(f"the checkpoint records no {split!r} split; evaluate raw images instead")
    m = cache.meta
    o = records_override or {}
    recs = {r.key: r for r in load_dataset(o.get("dataset") or m.dataset_format, o.get("captions") or m.captions_file,
                                           o.get("images") or m.images_dir, allow_outside_images=allow_outside_images)}
    rows = cache.rows_by_key()
    keys = [k for k in keys if k in rows and k in recs]
    if not keys:
        raise ValueError(f"no image of the {split!r} split has features in {features}")
    feats = torch.from_numpy(cache.features[[rows[k] for k in keys]]).float()
    return _decode_all(cap, keys, feats, decode_cfg), [recs[k] for k in keys]


def captions_from_images(cap, records: list[ImageRecord], workers: int = default_workers(), batch_size: int = 64,
                         progress: bool = True, decode_cfg: DecodeConfig | None = None
                         ) -> tuple[dict[str, str], list[ImageRecord], dict[str, str]]:
    """Encode raw images (stage 1's preprocessing, in DataLoader workers) and decode them."""
    from torch.utils.data import DataLoader

    from common.backbones import ImageRows

    loader = DataLoader(ImageRows(list(enumerate(r.path for r in records)), cap.backbone.preprocess),
                        batch_size=batch_size, num_workers=workers)
    feats = torch.zeros(len(records), cap.backbone.feature_dim)
    ok = np.zeros(len(records), dtype=bool)
    errors = {}
    for rows, images, errs in tqdm(loader, desc="encode", unit="batch", disable=not progress, leave=False):
        good = torch.tensor([not e for e in errs])
        if good.any():
            feats[rows[good]] = cap.backbone.encode(images[good]).cpu()
            ok[rows[good].numpy()] = True
        for r, e in zip(rows.tolist(), errs):
            if e:
                errors[records[r].key] = e
    kept = [r for r, g in zip(records, ok) if g]
    return _decode_all(cap, [r.key for r in kept], feats[torch.from_numpy(ok)], decode_cfg), kept, errors


def _decode_all(cap, keys: list[str], feats: torch.Tensor, decode_cfg: DecodeConfig | None,
                batch_size: int = 256) -> dict[str, str]:
    """Each key's best caption, decoded through the Captioner API (the captioner users run)."""
    settings = asdict(decode_cfg or DecodeConfig())
    out = {}
    for s in range(0, len(keys), batch_size):
        out.update(zip(keys[s:s + batch_size],
                       (r["caption"] for r in cap.caption_features(feats[s:s + batch_size], **settings))))
    return out


def evaluate_captions(res: dict[str, str], records: list[ImageRecord], spice: bool = False,
                      tokenizer: str = "nltk") -> dict:
    """Metrics + diversity stats + per-image results, as one JSON-able dict; references and results are
    split by `tokenizer`, the checkpoint vocabulary's."""
    from stage2_decoder.metrics import caption_stats, score_captions

    unscored = sum(1 for r in records if not r.captions)  # pycocoevalcap asserts on an empty reference list
    records = [r for r in records if r.captions]
    if not records:
        raise ValueError("none of these images has a reference caption to score against")
    res = {r.key: res[r.key] for r in records}
    gts = {r.key: r.captions for r in records}
    metrics, per_cider, notes = score_captions(gts, res, spice=spice, tokenizer=tokenizer)
    if unscored:
        notes.append(f"{unscored} images without reference captions were left out of the scores")
    images = [{"key": r.key, "image": r.path, "caption": res[r.key], "references": r.captions,
               "cider": per_cider.get(r.key)} for r in records]
    return {"metrics": metrics, "stats": caption_stats(res, tokenizer), "notes": notes, "n_images": len(records),
            "images": images}


def format_table(report: dict) -> str:
    m, s = report["metrics"], report["stats"]
    names = [k for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE") if k in m]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names),
             "| " + " | ".join(f"{m[k]:.3f}" for k in names) + " |",
             f"images: {report['n_images']}   words used: {s['vocab_used']}   distinct captions: "
             f"{s['distinct_fraction']:.1%}   most repeated ({s['most_common_fraction']:.1%}): "
             f"\"{s['most_common_caption']}\""]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(), default=None,
              help="[default: $CAPCACHE_CHECKPOINT, else the newest runs/*/best.pt]")
@click.option("--features", type=click.Path(), help="Evaluate a split of this cache (fast path).")
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True)
@click.option("--dataset", type=click.Choice(["auto", *FORMATS]), default=None,
              help="Raw-image mode: captions file format.")
@click.option("--images", type=click.Path(), default=None, help="Raw-image mode: images folder.")
@click.option("--captions", type=click.Path(), default=None, help="Raw-image mode: captions file.")
@click.option("--limit", type=bounded("limit"), default=None, help="Raw-image mode: first N images.")
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
    from stage2_decoder.api import Captioner, find_checkpoint
    from stage2_decoder.checkpoint import load_checkpoint

    def work():
        t0 = time.perf_counter()
        raw = images is not None or captions is not None
        if raw == (features is not None):
            raise click.UsageError("give either --features (cache split) or --images and --captions (raw images)")
        if raw and not (images and captions):
            raise click.UsageError("raw-image mode needs both --images and --captions")
        if not raw:  # a wrong --features path fails now, not after building the backbone
            from common.feature_cache import read_meta
            read_meta(features)
        ckpt_path = str(find_checkpoint(checkpoint))
        if checkpoint is None:
            click.echo(f"using checkpoint {ckpt_path}", err=True)
        if dry_run:
            n = len(load_dataset(dataset or "auto", captions, images, limit, allow_outside_images)) if raw else None
            click.echo(f"dry run: checkpoint {ckpt_path}, " + (f"{n} images from {captions}" if raw
                                                               else f"the {split} split of {features}"), err=True)
            return 0
        cap = Captioner.load(ckpt_path, device)
        errors = {}
        if raw:
            recs = load_dataset(dataset or "auto", captions, images, limit, allow_outside_images)
            res, recs, errors = captions_from_images(cap, recs, workers, progress=not no_progress, decode_cfg=decode)
            for k, e in errors.items():
                click.echo(f"skipped {k}: {e}", err=True)
        else:
            res, recs = captions_from_cache(cap, load_checkpoint(ckpt_path), features, split, decode_cfg=decode,
                                            allow_outside_images=allow_outside_images)
        if not res:
            raise ValueError("no image could be captioned")
        report = evaluate_captions(res, recs, spice, cap.vocab.tokenizer)
        images_root = os.path.abspath(images) if raw else read_meta(features).images_dir
        report.update({"checkpoint": os.path.abspath(ckpt_path), "decode": asdict(decode), "images_root": images_root,
                       "source": "images" if raw else f"cache:{split}", "skipped": errors,
                       "seconds": round(time.perf_counter() - t0, 2)})
        if as_json:
            click.echo(json.dumps(report, indent=1, ensure_ascii=False))
        else:
            click.echo(format_table(report))
            click.echo(f"{report['seconds']:.1f}s")
        if json_out:
            atomic_write(json_out, json.dumps(report, indent=1, ensure_ascii=False), what="evaluation report")
        if html_out:
            from stage2_decoder.report import write_html

            write_html(report, html_out, f"Caption evaluation: {Path(ckpt_path).name}, {report['source']}",
                       progress=not no_progress, max_images=html_max,
                       images_root=None if allow_outside_images else images_root)
            click.echo(f"gallery: {html_out}", err=as_json)
        return 0

    raise SystemExit(run_guarded(work))


if __name__ == "__main__":
    main()
