"""Stage 1's writer of the feature cache: the shards of `OUT.parts/` and their assembly into OUT.

The HDF5 schema of OUT is documented (and checked by the reader) in common/feature_cache.py.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from common.atomic import AtomicWriteError, atomic_path, atomic_write
from common.jsonio import read_json
from common.feature_cache import (DONE, FAILED, PENDING, SCHEMA, SCHEMA_VERSION, CacheError, CacheMeta, differences,
                                  parts_dir)

_STR = h5py.string_dtype("utf-8")
META_FILE = "meta.json"
ASSEMBLING_FILE = "assembling.h5"
_SHARD = re.compile(r"^rank(\d{3,})-(\d{6,})\.npz$")
_TMP_SHARD = re.compile(r"^\.rank(\d{3,})-(\d{6,})\.npz(\.\w+)?\.tmp$")  # common.atomic's temporaries
_QUEUED_SHARDS = 8  # shards waiting for the writer thread before write() blocks (back-pressure)


def shard_name(rank: int, seq: int) -> str:
    """The file name of rank `rank`'s shard number `seq` in OUT.parts/."""
    return f"rank{rank:03d}-{seq:06d}.npz"


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
        have, stored_keys = read_parts_meta(self.parts)
        check_resumable(self.parts, have, stored_keys, self.meta, self.keys)

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
        self._record_failures(failed_rows, failed_errors)

    def _record_failures(self, failed_rows, failed_errors) -> None:
        for r, e in zip(failed_rows, failed_errors):
            if self._status[r] != DONE:  # a row a resumed run read after an earlier run could not (a retry)
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
        arrays = dict(rows=rows, features=_cast(feats, self.meta.dtype), failed_rows=failed_rows,
                      failed_errors=np.array(failed_errors, dtype=str) if failed_errors else np.zeros(0, "U1"))
        if views is not None:
            arrays["views"] = _cast(views, self.meta.dtype)
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
            self._status[fresh] = DONE
        for s in shards:  # after every shard's read rows: a retry that read a row outranks an earlier failure
            self._record_failures(s.failed_rows, s.failed_errors)
        pending = int((self._status == PENDING).sum())
        if pending:
            bad = f" (unreadable shards skipped: {', '.join(self.unreadable)})" if self.unreadable else ""
            raise CacheError(f"{pending} rows still pending in {self.parts}{bad}: re-run the same command "
                             f"to compute them")
        # the features and views, the keys, errors and status, and HDF5's own headers (a MiB is ample)
        need = (n * d * self.meta.views * np.dtype(self.meta.dtype).itemsize + n
                + sum(len(k.encode()) + 16 for k in self.keys) + sum(len(e.encode()) + 16 for e in self._errors.values())
                + 2**20)
        free = shutil.disk_usage(self.parts).free
        if need > free:
            raise CacheError(f"cannot write {self.out}: it needs {_size(need)}, only {_size(free)} free; finished "
                             f"batches are kept in {self.parts}, free space and re-run")
        try:
            # the temporary lives in OUT.parts/ (removed with it after a kill); atomic_path removes it on failure
            with atomic_path(self.out, what="feature cache", scratch=self.parts) as tmp:
                self._assemble(tmp, shards, owner)
        except (OSError, RuntimeError) as e:  # h5py says a write that failed at closing as a RuntimeError
            raise CacheError(f"cannot write {self.out}: {_why(e) if isinstance(e, OSError) else _h5_why(e)}; finished "
                             f"batches are kept in {self.parts}, re-run the same command to finish") from None
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


def _h5_why(e: RuntimeError) -> str:
    """HDF5's failed write at closing: its system error message (`error message = 'No space left on device'`)."""
    found = re.search(r"error message = '([^']*)'", str(e))
    return found.group(1) if found else " ".join(str(e).split())[:200]


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def read_parts_meta(parts: Path) -> tuple[CacheMeta, list]:
    """OUT.parts/meta.json: the settings the unfinished work was started with, and its image keys."""
    meta_file = parts / META_FILE
    try:
        doc = read_json(meta_file, "cache meta", expect=dict)
        have = CacheMeta(**{**CacheMeta.OPTIONAL, **doc["meta"]})
        stored_keys = doc["keys"]
        if doc.get("schema") != SCHEMA or doc.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"schema {doc.get('schema')!r} version {doc.get('schema_version')!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CacheError(f"cannot resume from {meta_file} ({type(e).__name__}: {e}); "
                         f"delete {parts} to start over") from e
    return have, stored_keys


def check_resumable(parts: Path, have: CacheMeta, stored_keys: list, want: CacheMeta, keys: list[str]) -> None:
    """The unfinished work in `parts` may go on only with the settings, source and image list it began with."""
    diffs = differences(have, want, stored_keys, keys)
    if diffs:
        raise CacheError(f"unfinished cache {parts} was started with other settings "
                         f"({'; '.join(diffs)}): delete it or use another --out")


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


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("capcache")
    except Exception:
        return "unknown"


def _torch_version() -> str:
    import torch
    return str(torch.__version__)


def _cast(feats: np.ndarray, dtype: str) -> np.ndarray:
    """`feats` in the cache's dtype; ValueError when float16 cannot hold them: a vector all zero once cast though
    it was not (a random MobileNetV2's pooled features are ~1e-8, under float16's smallest 6e-8: every image
    would get one all-zero vector) or a finite value cast to inf (over 65504). Run on the writer's thread."""
    cast = feats.astype(dtype, copy=False)
    if np.dtype(dtype) != np.float16 or not len(feats):
        return cast
    rows, cast_rows = feats.reshape(len(feats), -1), cast.reshape(len(cast), -1)
    lost = (np.abs(rows).max(1) > 0) & (np.abs(cast_rows).max(1) == 0)
    over = np.isinf(cast_rows) & np.isfinite(rows)
    if lost.any() or over.any():
        finite = np.abs(rows[np.isfinite(rows) & (rows != 0)])
        span = f"{finite.min():.2g} to {finite.max():.2g}" if finite.size else "none"
        raise ValueError(f"float16 cannot hold these features (magnitudes {span}; float16 holds 6e-08 to 65504): "
                         f"{'every value of a feature vector rounds to 0' if lost.any() else 'values overflow'}; "
                         f"extract with --dtype float32")
    return cast
