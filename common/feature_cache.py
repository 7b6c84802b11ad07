"""The HDF5 feature cache that stage 1 writes and stage 2 reads.

Schema (version 1), one file per (dataset, backbone):

    /features   float16 or float32, shape (N, D)  pooled CNN feature of image row i
    /keys       UTF-8 strings, shape (N,)         image key of row i (COCO id as text, or
                                                  Flickr8k file name), rows in dataset order
    /status     uint8, shape (N,)                 0 = not done yet, 1 = done, 2 = failed
    /errors     UTF-8 strings, shape (N,)         why a failed row failed ("" otherwise)
    /views      like /features, shape (N, V-1, D) only when views = V > 1: the extra views of image
                                                  row i, in the order of common.backbones.VIEWS after
                                                  the first ("centre-flip", "whole", "whole-flip");
                                                  /features is always the centre view, the one that
                                                  captioning computes from a raw photo

    attributes of the file:
      schema = "capcache-features", schema_version = 1
      backbone, weights, weights_sha256 ("" unless a weights file), feature_dim,
      preprocess (canonical JSON of common.backbones.Preprocess)
      dataset_format ("coco" | "flickr8k"), images_dir, captions_file (absolute paths), limit (-1 = all)
      dtype, views (1 when absent: caches written before views existed),
      precision ("float32" | "bfloat16": what the CNN computed in; "float32" when absent),
      complete (True once every row is done or failed), capcache_version, torch_version

A file at the final name OUT is always whole: it only ever appears there by `os.replace`.

While extraction runs, the work lives in the directory `OUT.parts/` (HDF5 itself is not
crash-safe: a kill in the middle of a write or flush can leave the whole file unreadable):

    OUT.parts/meta.json           {"schema", "schema_version", "meta": CacheMeta fields, "keys": [...]},
                                  written first; a resumed run must match it (same backbone,
                                  weights, preprocessing, dtype and image list) or is refused
    OUT.parts/rank000-000017.npz  one shard per written batch (np.savez, loaded with allow_pickle=False):
                                    rows          int64 (n,)    rows whose features follow
                                    features      dtype (n, D)  their features, in the same order
                                    views         dtype (n, V-1, D)  their extra views (only if V > 1)
                                    failed_rows   int64 (m,)    rows whose image could not be read
                                    failed_errors str (m,)      why, in the same order
                                  named by the writing rank (torchrun) and a per-rank sequence number
    OUT.parts/.rank000-000018.npz.*.tmp   a shard being written: ignored, its rows are recomputed
    OUT.parts/.OUT.*.tmp                  the final file being assembled (rebuilt on a rerun)
    OUT.parts/.lock                       held (flock, common.lock) by the one extraction writing OUT

Every file is written by common.atomic (a fresh exclusive temporary, fsync, `os.replace`), so
the set of shard files *is* the record of finished rows: features and bookkeeping are one
atomic step, and a SIGKILL at any instant loses at most the shards not yet renamed. A rerun
reads only the row lists of the shards present and computes the rest. When every row is done
or failed, the shards are streamed (one at a time, never the whole cache twice in RAM) into
a temporary in OUT.parts/, which is fsynced and renamed to OUT; then OUT.parts/ is removed.
"""
from __future__ import annotations

import errno
import json
import os
import queue
import re
import shutil
import threading
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import h5py
import numpy as np

from common.atomic import AtomicWriteError, atomic_path, atomic_write

SCHEMA = "capcache-features"
SCHEMA_VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2
_STR = h5py.string_dtype("utf-8")

META_FILE = "meta.json"
ASSEMBLING_FILE = "assembling.h5"
_SHARD = re.compile(r"^rank(\d{3,})-(\d{6,})\.npz$")
_TMP_SHARD = re.compile(r"^\.rank(\d{3,})-(\d{6,})\.npz(\.\w+)?\.tmp$")  # common.atomic's temporaries
_QUEUED_SHARDS = 8  # shards waiting for the writer thread before write() blocks (back-pressure)


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
    views: int = 1  # cached views per image (common.backbones.VIEWS): /features + (views - 1) in /views
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


def shard_name(rank: int, seq: int) -> str:
    return f"rank{rank:03d}-{seq:06d}.npz"


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


def mismatch(have: CacheMeta, want: CacheMeta) -> list[str]:
    """Human-readable differences in the fields that identify how features were made."""
    return [f"{k}: {getattr(have, k)!r} != {getattr(want, k)!r}" for k in CacheMeta.IDENTITY
            if getattr(have, k) != getattr(want, k)]


def _why(e: OSError) -> str:
    """One line for an OSError, including h5py's long ones (which carry errno only in their text)."""
    if isinstance(e, AtomicWriteError) and isinstance(e.__cause__, OSError):
        e = e.__cause__  # the caller names the file itself
    if e.errno == errno.ENOSPC or "No space left" in str(e):
        return "No space left on device"
    return e.strerror or str(e).splitlines()[0]


@dataclass
class _Shard:
    path: Path
    rows: np.ndarray  # (n,) int64
    failed_rows: np.ndarray  # (m,) int64
    failed_errors: list[str]


def _read_shard_rows(path: Path) -> _Shard:
    """The bookkeeping half of a shard (its features are read only when assembling)."""
    with np.load(path, allow_pickle=False) as z:
        return _Shard(path, z["rows"].astype(np.int64), z["failed_rows"].astype(np.int64),
                      [str(s) for s in z["failed_errors"]])


def _atomic_write_bytes(path: Path, write) -> None:
    """`write(file)` through common.atomic: `path` is whole or absent, no planted link is followed."""
    atomic_write(path, write, what="cache part")


class CacheWriter:
    """Writes (or resumes writing) the shards of OUT into `OUT.parts/`; `finish()` assembles OUT.

    Under torchrun each rank has its own writer (its own shard names); rank 0 creates the
    parts folder (`create=True`), the others only join it, and rank 0 alone calls `finish()`
    once every rank has closed its writer. Shards are written by a background thread, so the
    caller never waits on the disk (unless it is `_QUEUED_SHARDS` shards behind).
    """

    def __init__(self, out: str | os.PathLike, keys: list[str], meta: CacheMeta, rank: int = 0,
                 create: bool = True):
        self.out = Path(out)
        self.parts = parts_dir(out)
        self.keys = list(keys)
        self.meta = meta
        self.rank = rank
        self.resumed = False
        self._status = np.zeros(len(self.keys), dtype=np.uint8)  # (N,) as of opening + own writes
        self._errors: dict[int, str] = {}
        self._open_or_create(create)
        self._seq = 1 + max((int(m.group(2)) for m in map(_SHARD.match, os.listdir(self.parts))
                             if m and int(m.group(1)) == rank), default=-1)
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUED_SHARDS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_loop, name=f"shard-writer-{rank}", daemon=True)
        self._thread.start()

    # --- opening -----------------------------------------------------------------------------------------
    def _open_or_create(self, create: bool) -> None:
        meta_file = self.parts / META_FILE
        if self.parts.is_symlink() or (self.parts.exists() and not self.parts.is_dir()):
            raise CacheError(f"{self.parts} is in the way (not a folder); it holds extraction work for "
                             f"{self.out.name}: move it away or use another --out")
        if meta_file.exists():
            self._check_meta(meta_file)
            self.resumed = True
        elif create:
            if any(map(_SHARD.match, os.listdir(self.parts) if self.parts.is_dir() else [])):
                raise CacheError(f"{self.parts} holds shards but no {META_FILE} (how they were made is unknown): "
                                 f"delete it to start over")
            try:
                self.parts.mkdir(parents=True, exist_ok=True)
                doc = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "meta": asdict(self.meta),
                       "keys": self.keys}
                _atomic_write_bytes(meta_file, lambda fh: fh.write(json.dumps(doc).encode()))
            except OSError as e:
                raise CacheError(f"cannot write {meta_file}: {_why(e)}") from e
        else:
            raise CacheError(f"{meta_file} not found: rank 0 should have created it (is {self.parts} "
                             f"on a filesystem every node shares?)")
        self._remove_own_scratch()
        for shard in self._scan():
            self._record(shard.rows, shard.failed_rows, shard.failed_errors)

    def _check_meta(self, meta_file: Path) -> None:
        try:
            doc = json.loads(meta_file.read_text())
            have = CacheMeta(**{**CacheMeta.OPTIONAL, **doc["meta"]})
            stored_keys = doc["keys"]
            if doc.get("schema") != SCHEMA or doc.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(f"schema {doc.get('schema')!r} version {doc.get('schema_version')!r}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheError(f"cannot resume from {meta_file} ({type(e).__name__}: {e}); "
                             f"delete {self.parts} to start over") from e
        diffs = mismatch(have, self.meta)
        if stored_keys != self.keys:
            diffs.append("the image list differs (other --limit, captions file or images)")
        if diffs:
            raise CacheError(f"unfinished cache {self.parts} was started with other settings "
                             f"({'; '.join(diffs)}): delete it or use another --out")

    def _remove_own_scratch(self) -> None:
        """Torn shards of this rank from a killed run (other ranks may be writing theirs right now)."""
        for name in os.listdir(self.parts):
            m = _TMP_SHARD.match(name)
            if m and int(m.group(1)) == self.rank:
                (self.parts / name).unlink(missing_ok=True)

    def _scan(self) -> list[_Shard]:
        """Every readable shard of every rank, in name order. An unreadable one (only possible if the
        disk lost data: shards appear by rename) is skipped, so its rows count as pending again."""
        shards, self.unreadable = [], []
        for name in sorted(os.listdir(self.parts)):
            if not _SHARD.match(name):
                continue
            try:
                shard = _read_shard_rows(self.parts / name)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                self.unreadable.append(name)
                continue
            rows = np.concatenate([shard.rows, shard.failed_rows])
            if rows.size and (rows.min() < 0 or rows.max() >= len(self.keys)):
                self.unreadable.append(name)  # not a shard of this image list
                continue
            shards.append(shard)
        return shards

    def _record(self, rows: np.ndarray, failed_rows, failed_errors) -> None:
        self._status[rows] = DONE
        for r, e in zip(failed_rows, failed_errors):
            self._status[r] = FAILED
            self._errors[int(r)] = e

    # --- writing -------------------------------------------------------------------------------------------
    def status(self) -> np.ndarray:
        """(N,) PENDING/DONE/FAILED: the shards found on opening plus this writer's own writes."""
        return self._status.copy()

    def failures(self) -> dict[int, str]:
        """row -> reason for every failed row (every rank's, after `finish()`)."""
        return dict(sorted(self._errors.items()))

    def write(self, rows: np.ndarray, feats: np.ndarray | None, failed: dict[int, str] | None = None,
              views: np.ndarray | None = None) -> None:
        """Queue one shard: features for `rows` (any order), their extra views (n, V-1, D) when the
        cache has V > 1, and the rows that failed (row -> reason)."""
        self._raise_writer_error()
        rows = np.asarray(rows, dtype=np.int64)
        d, extra = self.meta.feature_dim, self.meta.views - 1
        feats = np.zeros((0, d), self.meta.dtype) if feats is None else np.asarray(feats)
        if feats.shape != (len(rows), d):
            raise ValueError(f"features of shape {feats.shape} for {len(rows)} rows of size {d}")
        if extra:
            views = np.zeros((0, extra, d), self.meta.dtype) if views is None else np.asarray(views)
            if views.shape != (len(rows), extra, d):
                raise ValueError(f"views of shape {views.shape} for {len(rows)} rows, {extra} extra views of size {d}")
        elif views is not None:
            raise ValueError("views given for a cache of one view")
        failed = failed or {}
        failed_rows = np.array(list(failed), dtype=np.int64)
        failed_errors = list(failed.values())
        path = self.parts / shard_name(self.rank, self._seq)
        self._seq += 1
        self._queue.put((path, rows, feats, failed_rows, failed_errors, views))
        self._record(rows, failed_rows, failed_errors)

    def fail(self, row: int, reason: str) -> None:
        self.write(np.zeros(0, np.int64), None, {int(row): reason})

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None:  # after a failure, drop the rest: they are recomputed on a rerun
                    self._write_shard(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _write_shard(self, path: Path, rows, feats, failed_rows, failed_errors, views=None) -> None:
        arrays = dict(rows=rows, features=feats.astype(self.meta.dtype, copy=False), failed_rows=failed_rows,
                      failed_errors=np.array(failed_errors, dtype=str) if failed_errors else np.zeros(0, "U1"))
        if views is not None:
            arrays["views"] = views.astype(self.meta.dtype, copy=False)
        try:
            _atomic_write_bytes(path, lambda fh: np.savez(fh, **arrays))
        except OSError as e:
            raise CacheError(f"cannot write {path}: {_why(e)}; finished batches are kept in {self.parts}, "
                             f"re-run the same command to resume") from e

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            raise self._error

    def flush(self) -> None:
        """Wait until every queued shard is on disk; raise the writer's error if one failed."""
        self._queue.join()
        self._raise_writer_error()

    def close(self) -> None:
        """Write what is queued (finished work is kept, also on Ctrl-C) and stop the writer thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    # --- assembling ---------------------------------------------------------------------------------------
    def finish(self) -> None:
        """Assemble every rank's shards into OUT (atomically), then remove OUT.parts/.

        Streams one shard at a time into a contiguous dataset: memory stays at one shard plus
        the (N,) bookkeeping, whatever the cache size.
        """
        self.flush()
        self.close()
        shards = self._scan()
        n, d = len(self.keys), self.meta.feature_dim
        self._status[:] = PENDING
        self._errors = {}
        owner = np.full(n, -1, dtype=np.int64)  # which shard provides row i's features (first one wins)
        for i, s in enumerate(shards):
            fresh = s.rows[self._status[s.rows] == PENDING]
            owner[fresh] = i
            self._record(fresh, s.failed_rows, s.failed_errors)
        pending = int((self._status == PENDING).sum())
        if pending:
            bad = f" (unreadable shards skipped: {', '.join(self.unreadable)})" if self.unreadable else ""
            raise CacheError(f"{pending} rows still pending in {self.parts}{bad}: re-run the same command "
                             f"to compute them")
        need = n * d * self.meta.views * np.dtype(self.meta.dtype).itemsize
        free = shutil.disk_usage(self.parts).free
        if need > free:
            raise CacheError(f"cannot write {self.out}: it needs {need / 2**20:.1f} MiB, only {free / 2**20:.1f} MiB "
                             f"free; finished batches are kept in {self.parts}, free space and re-run")
        try:
            # the temporary lives in OUT.parts/ (removed with it after a kill); atomic_path removes it on failure
            with atomic_path(self.out, what="feature cache", scratch=self.parts) as tmp:
                self._assemble(tmp, shards, owner)
        except OSError as e:
            raise CacheError(f"cannot write {self.out}: {_why(e)}; finished batches are kept in {self.parts}, re-run the same "
                             f"command to finish") from e
        remove_parts(self.out)

    def _assemble(self, tmp: Path, shards: list[_Shard], owner: np.ndarray) -> None:
        n, d = len(self.keys), self.meta.feature_dim
        with h5py.File(tmp, "w") as f:
            feats = f.create_dataset("features", (n, d), dtype=self.meta.dtype)  # contiguous: fast full reads
            views = (f.create_dataset("views", (n, self.meta.views - 1, d), dtype=self.meta.dtype)
                     if self.meta.views > 1 else None)
            f.create_dataset("keys", data=np.array(self.keys, dtype=object), dtype=_STR)
            f.create_dataset("status", data=self._status)
            errs = np.array([""] * n, dtype=object)
            for r, e in self._errors.items():
                errs[r] = e
            f.create_dataset("errors", data=errs, dtype=_STR)
            for i, s in enumerate(shards):
                keep = owner[s.rows] == i
                if keep.any():
                    _copy_shard(feats, s, keep, views)
            f.attrs.update({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "complete": True,
                            "capcache_version": _version(), "torch_version": _torch_version()})
            f.attrs.update({k: str(v) if isinstance(v, str) else v for k, v in asdict(self.meta).items()})


def _copy_shard(feats: h5py.Dataset, shard: _Shard, keep: np.ndarray, views: h5py.Dataset | None = None) -> None:
    """Copy the features of `shard.rows[keep]` into their rows of the cache's (N, D) dataset (and
    their extra views into the (N, V-1, D) one)."""
    try:
        with np.load(shard.path, allow_pickle=False) as z:
            block = z["features"]  # (n_s, D), row order of shard.rows
            extra = z["views"] if views is not None else None  # (n_s, V-1, D)
    except (ValueError, KeyError, zipfile.BadZipFile) as e:
        shard.path.unlink(missing_ok=True)
        raise CacheError(f"shard {shard.path} was unreadable ({type(e).__name__}: {e}) and is removed: "
                         f"re-run the same command to recompute its rows") from e
    rows, block = shard.rows[keep], block[keep]
    order = np.argsort(rows)  # h5py point selections need increasing rows
    feats[rows[order]] = block[order]
    if views is not None:
        views[rows[order]] = extra[keep][order]


def remove_parts(out: str | os.PathLike) -> None:
    """Delete OUT.parts/ once OUT is whole: only the files extraction writes there, then the folder."""
    parts = parts_dir(out)
    if not parts.is_dir() or parts.is_symlink():
        return
    for name in os.listdir(parts):
        scratch = name.startswith((f".{META_FILE}.", f".{Path(out).name}.")) and name.endswith(".tmp")
        if name in (META_FILE, ASSEMBLING_FILE, ".lock") or scratch or _SHARD.match(name) or _TMP_SHARD.match(name):
            (parts / name).unlink(missing_ok=True)
    try:
        parts.rmdir()
    except OSError:
        pass  # something else was put there: leave it to its owner


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


def _open(path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        if parts_dir(path).exists():
            raise CacheError(f"{path} is not finished ({parts_dir(path).name}/ exists): re-run stage 1 "
                             f"with the same --out to complete it")
        raise CacheError(f"feature cache not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"{path} is not a readable HDF5 file ({e}); re-run stage 1 to rebuild it") from e


def load_cache(path: str | os.PathLike, backbone: str | None = None, feature_dim: int | None = None,
               preprocess: str | None = None, views: bool = False) -> FeatureCache:
    """Load a complete cache into RAM, refusing one made with another backbone/feature size.

    `views`: also read the extra views (`FeatureCache.views`) when the cache has them; only
    training draws from them, so every other reader leaves them on disk.
    """
    try:
        return _load_cache(path, backbone, feature_dim, preprocess, views)
    except CacheError:
        raise
    except (OSError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:  # a damaged file, read by h5py
        raise CacheError(f"{path} is corrupt ({type(e).__name__}: {e}); re-run stage 1 to rebuild it") from e


def _load_cache(path, backbone, feature_dim, preprocess, with_views) -> FeatureCache:
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
    errors = {keys[i]: _text(e) for i, e in enumerate(errs) if status[i] == FAILED}
    return FeatureCache(str(path), meta, feats, keys, status, errors, views)


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("capcache")
    except Exception:
        return "unknown"


def _torch_version() -> str:
    import torch
    return str(torch.__version__)
