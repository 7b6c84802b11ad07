"""Run a frozen backbone once over every image of a captions dataset and cache the features."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.backbones import DEFAULT_BACKBONE, ImageRows, load_backbone, resolve_device
from common.datasets import guess_format, load_dataset
from common.feature_cache import DONE, PENDING, CacheError, CacheMeta, CacheWriter, mismatch, read_keys, read_meta


@dataclass
class ExtractConfig:
    images: str
    captions: str
    out: str
    dataset: str = "auto"  # coco | flickr8k | auto (from the captions file's extension)
    backbone: str = DEFAULT_BACKBONE
    weights: str = "default"  # default | none | path to a state_dict
    batch_size: int = 64
    workers: int = min(4, os.cpu_count() or 1)
    device: str = "auto"
    limit: int | None = None
    dtype: str = "float16"
    progress: bool = True


@dataclass
class ExtractSummary:
    out: str
    total: int
    done_now: int
    failed_now: int
    already_done: int
    failed: dict[str, str]
    seconds: float

    @property
    def images_per_s(self) -> float:
        return (self.done_now + self.failed_now) / self.seconds if self.seconds > 0 else 0.0


def extract(cfg: ExtractConfig) -> ExtractSummary:
    """Extract features for every image of the dataset into cfg.out (resuming if possible)."""
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {cfg.workers}")
    if cfg.dtype not in ("float16", "float32"):
        raise ValueError(f"--dtype must be float16 or float32, got {cfg.dtype}")
    records = load_dataset(cfg.dataset, cfg.captions, cfg.images, cfg.limit)
    fmt = cfg.dataset if cfg.dataset != "auto" else guess_format(cfg.captions)
    out = Path(os.path.abspath(cfg.out))
    images_dir = Path(os.path.abspath(cfg.images))
    if out.is_relative_to(images_dir):
        raise ValueError(f"--out {out} is inside the images folder {images_dir}; write the cache elsewhere")

    device = resolve_device(cfg.device)
    backbone = load_backbone(cfg.backbone, cfg.weights, device)
    info = backbone.describe()
    meta = CacheMeta(backbone=info["name"], weights=info["weights"], weights_sha256=info["weights_sha256"] or "",
                     feature_dim=info["feature_dim"], preprocess=info["preprocess"], dataset_format=fmt,
                     images_dir=str(images_dir), captions_file=os.path.abspath(cfg.captions),
                     limit=cfg.limit or -1, dtype=cfg.dtype)
    keys = [r.key for r in records]
    if out.exists():
        have = read_meta(out)
        diffs = mismatch(have, meta)
        if read_keys(out) != keys:
            diffs.append("its image list differs (other --limit, captions file or images)")
        if diffs:
            raise CacheError(f"{out} already exists and was made differently ({'; '.join(diffs)}): "
                             f"delete it or choose another --out")
        return ExtractSummary(str(out), len(keys), 0, 0, len(keys), {}, 0.0)

    t0 = time.perf_counter()
    writer = CacheWriter(out, keys, meta)
    try:
        status = writer.status()
        pending = [(i, records[i].path) for i in np.flatnonzero(status == PENDING)]
        already = int((status == DONE).sum())
        loader = DataLoader(ImageRows(pending, backbone.preprocess), batch_size=cfg.batch_size,
                            num_workers=cfg.workers, pin_memory=device.type == "cuda",
                            persistent_workers=False, prefetch_factor=4 if cfg.workers > 0 else None)
        done_now = failed_now = 0
        bar = tqdm(total=len(keys), initial=len(keys) - len(pending), unit="img", desc=f"extract {cfg.backbone}",
                   disable=not cfg.progress, dynamic_ncols=True)
        for rows, images, errors in loader:
            rows = rows.numpy()
            ok = np.array([not e for e in errors])
            if ok.any():
                feats = backbone.encode(images[torch.from_numpy(ok)] if not ok.all() else images)  # (b, D)
                writer.write(rows[ok], feats.cpu().numpy())
                done_now += int(ok.sum())
            for row, err in zip(rows[~ok], [e for e in errors if e]):
                writer.fail(int(row), err)
                failed_now += 1
                tqdm.write(f"skipped {keys[row]}: {err}")
            bar.update(len(rows))
        bar.close()
        failed = {keys[i]: reason for i, reason in writer.failures().items()}
        writer.finish()
    finally:
        writer.close()
    return ExtractSummary(str(out), len(keys), done_now, failed_now, already, failed, time.perf_counter() - t0)
