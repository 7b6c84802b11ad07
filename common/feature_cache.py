"""The HDF5 feature cache that stage 1 writes and stage 2 reads.

Schema (version 1), one file per (dataset, backbone):

    /features   float16 or float32, shape (N, D)  pooled CNN feature of image row i
    /keys       UTF-8 strings, shape (N,)         image key of row i (COCO id as text, or
                                                  Flickr8k file name), rows in dataset order
    /status     uint8, shape (N,)                 0 = not done yet, 1 = done, 2 = failed
    /errors     UTF-8 strings, shape (N,)         why a failed row failed ("" otherwise)

    attributes of the file:
      schema = "capcache-features", schema_version = 1
      backbone, weights, weights_sha256 ("" unless a weights file), feature_dim,
      preprocess (canonical JSON of common.backbones.Preprocess)
      dataset_format ("coco" | "flickr8k"), images_dir, captions_file (absolute paths), limit (-1 = all)
      dtype, complete (True once every row is done or failed), capcache_version, torch_version

Rows are addressed by key, never by the order a DataLoader yields them: a row is written,
then marked done in /status, and the file is flushed, so an interrupted run resumes with
exactly the rows still pending (a row written but not yet marked is simply recomputed).
While extraction runs the file is `OUT.partial`; it is renamed to OUT only when complete,
so a file at the final name is always whole.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import h5py
import numpy as np

SCHEMA = "capcache-features"
SCHEMA_VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2
_STR = h5py.string_dtype("utf-8")


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

    # what must match for a partial file to be resumed, or a cache to be used with a model
    IDENTITY = ("backbone", "weights", "weights_sha256", "feature_dim", "preprocess", "dtype")


def partial_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".partial")


def _read_meta(f: h5py.File, path) -> CacheMeta:
    a = f.attrs
    if a.get("schema") != SCHEMA:
        raise CacheError(f"{path} is not a capcache feature cache (no schema={SCHEMA!r} attribute)")
    version = int(a.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        raise CacheError(f"{path} has cache schema version {version}, this capcache reads version "
                         f"{SCHEMA_VERSION}: re-run stage 1 (make features) to rebuild it")
    try:
        return CacheMeta(**{fl.name: _plain(a[fl.name]) for fl in fields(CacheMeta)})
    except KeyError as e:
        raise CacheError(f"{path} lacks the cache attribute {e}") from e


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _plain(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def mismatch(have: CacheMeta, want: CacheMeta) -> list[str]:
    """Human-readable differences in the fields that identify how features were made."""
    return [f"{k}: {getattr(have, k)!r} != {getattr(want, k)!r}" for k in CacheMeta.IDENTITY
            if getattr(have, k) != getattr(want, k)]


class CacheWriter:
    """Writes (or resumes writing) `OUT.partial`; `finish()` renames it to OUT."""

    def __init__(self, out: str | os.PathLike, keys: list[str], meta: CacheMeta):
        self.out = Path(out)
        self.tmp = partial_path(out)
        self.meta = meta
        self.resumed = False
        self.f = self._open_or_create(keys)

    def _open_or_create(self, keys: list[str]) -> h5py.File:
        if self.tmp.exists():
            try:
                f = h5py.File(self.tmp, "r+")
            except OSError as e:
                raise CacheError(f"cannot reopen the unfinished cache {self.tmp} ({e}); delete it to start over") from e
            have = _read_meta(f, self.tmp)
            stored = [_text(k) for k in f["keys"][:]]
            diffs = mismatch(have, self.meta)
            if stored != keys:
                diffs.append("the image list differs (other --limit, captions file or images)")
            if diffs:
                f.close()
                raise CacheError(f"unfinished cache {self.tmp} was started with other settings "
                                 f"({'; '.join(diffs)}): delete it or use another --out")
            self.resumed = True
            return f
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        # build the empty layout under a scratch name first, so `.partial` is never a bare file
        new = Path(str(self.tmp) + ".new")
        f = h5py.File(new, "w")
        n, d = len(keys), self.meta.feature_dim
        f.create_dataset("features", (n, d), dtype=self.meta.dtype, chunks=(min(n, 256), d))
        f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=_STR)
        f.create_dataset("status", (n,), dtype="uint8", fillvalue=PENDING)
        f.create_dataset("errors", (n,), dtype=_STR)
        f.attrs.update({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "complete": False,
                        "capcache_version": _version(), "torch_version": _torch_version()})
        f.attrs.update({k: str(v) if isinstance(v, str) else v for k, v in asdict(self.meta).items()})
        f.close()
        os.replace(new, self.tmp)
        return h5py.File(self.tmp, "r+")

    def status(self) -> np.ndarray:
        return self.f["status"][:]

    def failures(self) -> dict[int, str]:
        """row -> reason for every failed row."""
        status, errs = self.status(), self.f["errors"][:]
        return {int(i): _text(errs[i]) for i in np.flatnonzero(status == FAILED)}

    def write(self, rows: np.ndarray, feats: np.ndarray) -> None:
        """Store features for `rows` (any order), then mark them done and flush."""
        order = np.argsort(rows)  # h5py fancy indexing needs increasing indices
        rows, feats = rows[order], feats[order]
        self.f["features"][rows] = feats.astype(self.meta.dtype)
        self.f["status"][rows] = DONE
        self.f.flush()

    def fail(self, row: int, reason: str) -> None:
        self.f["errors"][row] = reason
        self.f["status"][row] = FAILED
        self.f.flush()

    def finish(self) -> None:
        status = self.status()
        if (status == PENDING).any():
            raise CacheError(f"{int((status == PENDING).sum())} rows still pending in {self.tmp}")
        self.f.attrs["complete"] = True
        self.f.close()
        os.replace(self.tmp, self.out)

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()


@dataclass
class FeatureCache:
    """A complete cache loaded into RAM: `features[i]` belongs to image `keys[i]`."""
    path: str
    meta: CacheMeta
    features: np.ndarray  # (N, D)
    keys: list[str]
    status: np.ndarray  # (N,) uint8
    errors: dict[str, str]

    def rows_by_key(self) -> dict[str, int]:
        """key -> row for the rows whose features are valid."""
        return {k: i for i, k in enumerate(self.keys) if self.status[i] == DONE}


def read_meta(path: str | os.PathLike) -> CacheMeta:
    with _open(path) as f:
        return _read_meta(f, path)


def read_keys(path: str | os.PathLike) -> list[str]:
    with _open(path) as f:
        _read_meta(f, path)
        return [_text(k) for k in f["keys"][:]]


def _open(path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        if partial_path(path).exists():
            raise CacheError(f"{path} is not finished ({partial_path(path).name} exists): re-run stage 1 "
                             f"with the same --out to complete it")
        raise CacheError(f"feature cache not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"{path} is not a readable HDF5 file ({e}); re-run stage 1 to rebuild it") from e


def load_cache(path: str | os.PathLike, backbone: str | None = None, feature_dim: int | None = None,
               preprocess: str | None = None) -> FeatureCache:
    """Load a complete cache into RAM, refusing one made with another backbone/feature size."""
    with _open(path) as f:
        meta = _read_meta(f, path)
        if not bool(f.attrs.get("complete", False)):
            raise CacheError(f"{path} is incomplete: re-run stage 1 with the same --out to finish it")
        wrong = []
        if backbone is not None and meta.backbone != backbone:
            wrong.append(f"backbone {meta.backbone!r}, expected {backbone!r}")
        if feature_dim is not None and meta.feature_dim != feature_dim:
            wrong.append(f"feature size {meta.feature_dim}, expected {feature_dim}")
        if preprocess is not None and meta.preprocess != preprocess:
            wrong.append("different preprocessing")
        if wrong:
            raise CacheError(f"{path} was made with {', '.join(wrong)}: re-run stage 1 "
                             f"(python -m stage1_extract --backbone {backbone or meta.backbone} ...) "
                             f"or use a checkpoint trained on this cache")
        try:
            feats = f["features"][:]
            keys = [_text(k) for k in f["keys"][:]]
            status = f["status"][:]
            errs = f["errors"][:]
        except (KeyError, OSError) as e:
            raise CacheError(f"{path} is corrupt ({e}); re-run stage 1 to rebuild it") from e
    if feats.shape != (len(keys), meta.feature_dim):
        raise CacheError(f"{path}: features have shape {feats.shape}, expected ({len(keys)}, {meta.feature_dim})")
    errors = {keys[i]: _text(e) for i, e in enumerate(errs) if status[i] == FAILED}
    return FeatureCache(str(path), meta, feats, keys, status, errors)


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("capcache")
    except Exception:
        return "unknown"


def _torch_version() -> str:
    import torch
    return str(torch.__version__)
