"""The HDF5 feature cache that stage 1 writes and stage 2 reads.

Schema (version 1), one file per (dataset, backbone):

    /features   float16 or float32, shape (N, D)  pooled CNN feature of image row i
    /keys       UTF-8 strings, shape (N,)         image key of row i (COCO id as text, or
                                                  Flickr8k file name), rows in dataset order
    /status     uint8, shape (N,)                 0 = not done yet, 1 = done, 2 = failed
    /errors     UTF-8 strings, shape (N,)         why a failed row failed ("" otherwise)
    /views      like /features, shape (N, V-1, D) only when views = V > 1: the extra views of image
                                                  row i, in the order of common.preprocess.VIEWS after
                                                  the first ("centre-flip", "whole", "whole-flip");
                                                  /features is always the centre view, the one that
                                                  captioning computes from a raw photo

    attributes of the file:
      schema = "capcache-features", schema_version = 1
      backbone, weights, weights_sha256 ("" unless a weights file), feature_dim,
      preprocess (canonical JSON of common.preprocess.Preprocess)
      dataset_format ("coco" | "flickr8k" | "karpathy" | "flickr30k" | "folder"), images_dir, captions_file
      (absolute paths), limit (-1 = all)
      dtype, views (1 when absent: caches written before views existed),
      precision ("float32" | "bfloat16": what the CNN computed in; "float32" when absent),
      complete (True once every row is done or failed), capcache_version, torch_version

A file at the final name OUT is always whole: it only ever appears there by `os.replace`; while
extraction runs, its work lives in `OUT.parts/` (the shard layout is documented where it is
written, in stage1_extract/cache_writer.py). Stage 2 reads finished caches only.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import h5py
import numpy as np

SCHEMA = "capcache-features"
SCHEMA_VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2


class CacheError(ValueError):
    """A feature cache that is missing, corrupt, incomplete or made differently than asked."""


@dataclass
class CacheMeta:
    backbone: str
    weights: str
    weights_sha256: str
    feature_dim: int
    preprocess: str
    dataset_format: str
    images_dir: str
    captions_file: str
    limit: int = -1
    dtype: str = "float16"
    views: int = 1  # cached views per image (common.preprocess.VIEWS): /features + (views - 1) in /views
    # what the CNN computed in (Backbone.describe: bfloat16 autocast on CUDA, float32 on the CPU): rows of
    # another precision differ in their last bits, so a cache started on a CPU is not finished on a GPU
    precision: str = "float32"

    # what must match for unfinished work to be resumed or a finished cache to count as already made
    IDENTITY = ("backbone", "weights", "weights_sha256", "feature_dim", "preprocess", "dtype", "views", "precision")
    # attributes older caches lack, and what they mean there (no cache had been made on a GPU before precision)
    OPTIONAL = {"views": 1, "precision": "float32"}


def parts_dir(path: str | os.PathLike) -> Path:
    """Where the unfinished work of the cache `path` lives: `path.parts/`."""
    return Path(str(path) + ".parts")


def _read_meta(f: h5py.File, path) -> CacheMeta:
    a = f.attrs
    if _plain(a.get("schema")) != SCHEMA:
        raise CacheError(f"{path} is not a capcache feature cache (no schema={SCHEMA!r} attribute)")
    version = _plain(a.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        raise CacheError(f"{path} has cache schema version {version!r}, this capcache reads version "
                         f"{SCHEMA_VERSION}: re-run stage 1 (make features) to rebuild it")

    def attr(name: str):  # `name in a` itself raises RuntimeError on a damaged attribute table
        try:
            return _plain(a[name])
        except KeyError:
            if name in CacheMeta.OPTIONAL:
                return CacheMeta.OPTIONAL[name]
            raise

    try:
        values = {fl.name: attr(fl.name) for fl in fields(CacheMeta)}
    except KeyError as e:
        raise CacheError(f"{path} lacks the cache attribute {e}") from e
    for fl in fields(CacheMeta):  # a hand-edited or hostile file: every attribute a plain value of its type
        kind = int if fl.type in (int, "int") else str
        v = values[fl.name]
        if not isinstance(v, kind) or isinstance(v, bool):
            raise CacheError(f"{path}: cache attribute {fl.name!r} is {type(v).__name__} {_short(v)}, expected "
                             f"{kind.__name__}; the file is damaged: re-run stage 1")
    if values["feature_dim"] < 1 or values["views"] < 1:
        raise CacheError(f"{path}: cache attributes feature_dim={values['feature_dim']}, views={values['views']} "
                         f"must be positive; the file is damaged: re-run stage 1")
    return CacheMeta(**values)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


_SIZE_SLACK = 64  # declared bytes may exceed the file by this factor (HDF5 compression), no more


def _check_datasets(f: h5py.File, path, meta: CacheMeta, with_views: bool = False) -> None:
    """Shapes, types and declared sizes of the datasets, from their headers, before any is read: a tiny
    file declaring a huge array must not be allocated first."""
    need = {"keys": 1, "status": 1, "errors": 1, "features": 2}
    if with_views and meta.views > 1:
        need["views"] = 3
    ds = {}
    for name, ndim in need.items():
        d = f.get(name)
        if not isinstance(d, h5py.Dataset):
            raise CacheError(f"{path} lacks the {name!r} dataset; re-run stage 1 to rebuild it")
        if d.ndim != ndim:
            raise CacheError(f"{path}: {name!r} is {d.ndim}-D {list(d.shape)}, expected {ndim}-D; the file is "
                             f"damaged: re-run stage 1")
        ds[name] = d
    n = ds["keys"].shape[0]
    for name in ("keys", "errors"):
        if h5py.check_string_dtype(ds[name].dtype) is None:
            raise CacheError(f"{path}: {name!r} holds {ds[name].dtype}, expected text; re-run stage 1")
    for name in ("features", "views"):
        if name in ds and ds[name].dtype.kind != "f":
            raise CacheError(f"{path}: {name!r} holds {ds[name].dtype}, expected floats; re-run stage 1")
    if ds["status"].dtype.kind not in "iu":
        raise CacheError(f"{path}: 'status' holds {ds['status'].dtype}, expected integers; re-run stage 1")
    want = {"status": (n,), "errors": (n,), "features": (n, meta.feature_dim),
            "views": (n, meta.views - 1, meta.feature_dim)}
    for name, d in ds.items():
        if name != "keys" and d.shape != want[name]:
            raise CacheError(f"{path}: {name!r} has shape {list(d.shape)} but the cache lists {n} images of "
                             f"{meta.feature_dim} features (expected {list(want[name])}); re-run stage 1")
    size = os.path.getsize(path)
    for name, d in ds.items():
        declared = d.size * d.dtype.itemsize
        if declared > _SIZE_SLACK * size + (1 << 20):
            raise CacheError(f"{path}: {name!r} declares {list(d.shape)} ({declared / 2**20:,.0f} MiB) in a "
                             f"{size / 2**10:,.1f} KiB file: it is damaged; re-run stage 1")


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _plain(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


SOURCE = ("dataset_format", "images_dir", "captions_file")  # where the images and their captions came from


def source_mismatch(have: CacheMeta, want: CacheMeta) -> list[str]:
    """Differences in where the images and captions came from (folders compared as real paths): stage 1
    reuses or resumes a cache only for the same ones, since the same file names in another folder may be other
    photos (a second trip's IMG_0001.jpg), and another captions file may bring another split."""
    def same(k: str) -> bool:
        a, b = getattr(have, k), getattr(want, k)
        return a == b or (k != "dataset_format" and os.path.realpath(a) == os.path.realpath(b))

    return [f"{k}: {getattr(have, k)!r} != {getattr(want, k)!r}" for k in SOURCE if not same(k)]


def differences(have: CacheMeta, want: CacheMeta, have_keys: list, want_keys: list[str]) -> list[str]:
    """Everything that keeps a cache (or its unfinished work) from being the one asked for: how its features
    were made, where its images and captions came from, its image list."""
    diffs = mismatch(have, want) + source_mismatch(have, want)
    if have_keys != want_keys:
        diffs.append("the image list differs (other --limit, captions file or images)")
    return diffs


def mismatch(have: CacheMeta, want: CacheMeta) -> list[str]:
    """Human-readable differences in the fields that identify how features were made."""
    return [f"{k}: {getattr(have, k)!r} != {getattr(want, k)!r}" for k in CacheMeta.IDENTITY
            if getattr(have, k) != getattr(want, k)]


@dataclass
class FeatureCache:
    """A complete cache loaded into RAM: `features[i]` belongs to image `keys[i]`."""
    path: str
    meta: CacheMeta
    features: np.ndarray  # (N, D): the centre view
    keys: list[str]
    status: np.ndarray  # (N,) uint8
    errors: dict[str, str]
    views: np.ndarray | None = None  # (N, V-1, D): the extra views, if asked for and the cache has them

    def rows_by_key(self) -> dict[str, int]:
        """key -> row for the rows whose features are valid."""
        return {k: i for i, k in enumerate(self.keys) if self.status[i] == DONE}


def read_meta(path: str | os.PathLike) -> CacheMeta:
    with _open(path) as f:
        return _read_meta(f, path)


def read_keys(path: str | os.PathLike) -> list[str]:
    with _open(path) as f:
        _check_datasets(f, path, _read_meta(f, path))
        return [_text(k) for k in f["keys"][:]]


def read_failures(path: str | os.PathLike) -> dict[str, str]:
    """{key: why} of the images a finished cache could not read, without loading its features."""
    with _open(path) as f:
        _check_datasets(f, path, _read_meta(f, path))
        failed = np.flatnonzero(f["status"][:] == FAILED)
        return {_text(f["keys"][i]): _text(f["errors"][i]) for i in failed}


def _open(path) -> h5py.File:
    if not str(path).strip():
        raise CacheError("no feature cache named (the path is empty)")
    path = Path(path)
    if path.is_dir():
        raise CacheError(f"{path} is a folder, not a feature cache (the .h5 file stage 1 writes)")
    if not path.exists():
        if parts_dir(path).exists():
            raise CacheError(f"{path} is not finished ({parts_dir(path).name}/ exists): re-run stage 1 "
                             f"with the same --out to complete it")
        raise CacheError(f"feature cache not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"{path} is not a readable HDF5 file ({e}): delete it and re-run stage 1, or give stage 1 "
                         f"another --out") from e


def load_cache(path: str | os.PathLike, backbone: str | None = None, feature_dim: int | None = None,
               preprocess: str | None = None, views: bool = False,
               weights: tuple[str, str | None] | None = None) -> FeatureCache:
    """Load a complete cache into RAM, refusing one made with another backbone/feature size.

    `views`: also read the extra views (`FeatureCache.views`) when the cache has them; only
    training draws from them, so every other reader leaves them on disk.
    `weights`: (weights, sha256) as a checkpoint records them: a cache made with other weights is refused
    (a file is known by its sha256, wherever it was).
    """
    try:
        return _load_cache(path, backbone, feature_dim, preprocess, views, weights)
    except CacheError:
        raise
    except (OSError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:  # a damaged file, read by h5py
        raise CacheError(f"{path} is corrupt ({type(e).__name__}: {e}); re-run stage 1 to rebuild it") from e


def _other_weights(meta: CacheMeta, weights: tuple[str, str | None] | None) -> bool:
    if weights is None:
        return False
    name, sha = weights[0], weights[1] or ""
    return meta.weights_sha256 != sha if (sha or meta.weights_sha256) else meta.weights != name


def _load_cache(path, backbone, feature_dim, preprocess, with_views, weights=None) -> FeatureCache:
    with _open(path) as f:
        meta = _read_meta(f, path)
        complete = _plain(f.attrs.get("complete", False))
        if complete is not True and complete is not False:  # "no" or "False" would count as finished
            raise CacheError(f"{path}: cache attribute 'complete' is {type(complete).__name__} {_short(complete)}, "
                             f"expected bool; the file is damaged: re-run stage 1")
        if not complete:
            raise CacheError(f"{path} is incomplete: re-run stage 1 with the same --out to finish it")
        wrong = []
        if backbone is not None and meta.backbone != backbone:
            wrong.append(f"backbone {meta.backbone!r}, expected {backbone!r}")
        if feature_dim is not None and meta.feature_dim != feature_dim:
            wrong.append(f"feature size {meta.feature_dim}, expected {feature_dim}")
        if preprocess is not None and meta.preprocess != preprocess:
            wrong.append("different preprocessing")
        if _other_weights(meta, weights):
            wrong.append(f"weights {meta.weights!r}, expected {weights[0]!r}")
        if wrong:
            raise CacheError(f"{path} was made with {', '.join(wrong)}: re-run stage 1 "
                             f"(python -m stage1_extract --backbone {backbone or meta.backbone} ...) "
                             f"or use a checkpoint trained on this cache")
        _check_datasets(f, path, meta, with_views)
        try:
            feats = f["features"][:]
            keys = [_text(k) for k in f["keys"][:]]
            status = f["status"][:]
            errs = f["errors"][:]
            views = f["views"][:] if with_views and meta.views > 1 else None
        except (KeyError, OSError) as e:
            raise CacheError(f"{path} is corrupt ({e}); re-run stage 1 to rebuild it") from e
    if feats.shape != (len(keys), meta.feature_dim):
        raise CacheError(f"{path}: features have shape {feats.shape}, expected ({len(keys)}, {meta.feature_dim})")
    if views is not None and views.shape != (len(keys), meta.views - 1, meta.feature_dim):
        raise CacheError(f"{path}: views have shape {views.shape}, expected "
                         f"({len(keys)}, {meta.views - 1}, {meta.feature_dim})")
    if len(set(keys)) != len(keys):  # rows_by_key would give two images' features one key
        twice = next(k for k, n in Counter(keys).items() if n > 1)
        raise CacheError(f"{path}: key {twice!r} names more than one row; the cache is damaged: re-run stage 1")
    # HDF5 has no checksums: a damaged file reads as garbage, and non-finite rows decode to empty captions
    done = np.flatnonzero(status == DONE)
    if not all(_finite_rows(a, done) for a in (feats, views) if a is not None):
        raise CacheError(f"{path} holds non-finite (nan/inf) features: it is damaged; re-run stage 1")
    errors = {keys[i]: _text(e) for i, e in enumerate(errs) if status[i] == FAILED}
    return FeatureCache(str(path), meta, feats, keys, status, errors, views)


def _finite_rows(a: np.ndarray, rows: np.ndarray, chunk: int = 4096) -> bool:
    """Whether a[rows] is all finite, a chunk at a time: a full-COCO copy would double the cache's memory."""
    return all(np.isfinite(a[rows[i:i + chunk]]).all() for i in range(0, len(rows), chunk))
