"""Caption a split (from the cache or raw images) and score it with the standard caption metrics.
"""
from __future__ import annotations


import numpy as np
import torch
from tqdm import tqdm

from common.backbones import check_shm, default_workers, ImageRows
from common.datasets import load_dataset
from common.records import ImageRecord
from common.text import printable
from stage2_decoder.decoding.captions import caption_keys
from stage2_decoder.decoding.config import DecodeConfig
from stage2_decoder.reporting.metrics import caption_stats, score_captions

PREFETCH = 2  # batches each DataLoader worker keeps ready (in shared memory): PyTorch's default


def captions_from_cache(cap, ckpt: dict, features: str, split: str, records_override: dict | None = None,
                        decode_cfg: DecodeConfig | None = None, allow_outside_images: bool = False,
                        progress: bool = False, limit: int | None = None) -> tuple[dict[str, str], list[ImageRecord]]:
    """Decode the split's images from the cache (the first `limit` of them). Returns ({key: caption}, records)."""
    # imported on use: importing this module stays free of h5py
    from common.feature_cache import load_cache

    bb = ckpt["backbone"]
    cache = load_cache(features, backbone=bb["name"], feature_dim=bb["feature_dim"], preprocess=bb["preprocess"],
                       weights=(bb["weights"], bb.get("weights_sha256")))
    keys = (ckpt.get("split") or {}).get(split)
    if keys is None:
        raise ValueError(f"the checkpoint records no {split!r} split; evaluate raw images instead")
    m = cache.meta
    o = records_override or {}
    recs = {r.key: r for r in load_dataset(o.get("dataset") or m.dataset_format, o.get("captions") or m.captions_file,
                                           o.get("images") or m.images_dir, allow_outside_images=allow_outside_images)}
    rows = cache.rows_by_key()
    keys = [k for k in keys if k in rows and k in recs][:limit]
    if not keys:
        raise ValueError(f"no image of the {split!r} split has features in {features}")
    feats = torch.from_numpy(cache.features[[rows[k] for k in keys]]).float()
    return caption_keys(cap.decoder, cap.vocab, keys, feats, decode_cfg, progress=progress), [recs[k] for k in keys]


def raw_records(records: list[ImageRecord], ckpt_split: dict | None, split: str | None = None,
                limit: int | None = None) -> tuple[list[ImageRecord], str | None]:
    """The raw-image records to score (the first `limit`), and a note when they are not held out.

    With `split` ("val" or "test"): only the images of that split the checkpoint records. Without: all of
    them; when the captions file is the checkpoint's own dataset (some of its images are in the recorded
    val or test split), those outside both were most likely trained on, and the note says how many."""
    keys = ckpt_split or {}
    if split is not None:
        if split not in keys:
            raise ValueError(f"the checkpoint records no {split!r} split; leave out --split to score every image")
        wanted = set(keys[split])
        kept = [r for r in records if r.key in wanted]
        if not kept:
            raise ValueError(f"none of the {len(records)} images of this captions file is in the checkpoint's "
                             f"{split} split ({len(wanted)} images); leave out --split to score them all")
        return kept[:limit], None
    held = set(keys.get("val", ())) | set(keys.get("test", ()))
    same_dataset = any(r.key in held for r in records)
    records = records[:limit]
    seen = sum(r.key not in held for r in records)
    if not same_dataset or not seen:
        return records, None
    return records, (f"{seen} of {len(records)} images are in neither the val nor the test split of the dataset "
                     f"this checkpoint was trained on: most likely training images, so these scores are not held "
                     f"out (--split test scores its test images alone)")


def captions_from_images(cap, records: list[ImageRecord], workers: int = default_workers(), batch_size: int = 64,
                         progress: bool = True, decode_cfg: DecodeConfig | None = None
                         ) -> tuple[dict[str, str], list[ImageRecord], dict[str, str]]:
    """Encode raw images (stage 1's preprocessing, in DataLoader workers) and decode them."""
    from torch.utils.data import DataLoader


    check_shm(workers, batch_size, cap.backbone.preprocess.crop, PREFETCH, lower="--workers")
    loader = DataLoader(ImageRows(list(enumerate(r.path for r in records)), cap.backbone.preprocess),
                        batch_size=batch_size, num_workers=workers, prefetch_factor=PREFETCH if workers else None)
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
    return caption_keys(cap.decoder, cap.vocab,
                        [r.key for r in kept], feats[torch.from_numpy(ok)], decode_cfg, progress=progress), kept, errors


def evaluate_captions(res: dict[str, str], records: list[ImageRecord], spice: bool = False,
                      tokenizer: str = "nltk") -> dict:
    """Metrics + diversity stats + per-image results, as one JSON-able dict; references and results are
    split by `tokenizer`, the checkpoint vocabulary's."""

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
             f"\"{printable(s['most_common_caption'])}\""]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
