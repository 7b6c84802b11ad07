"""Run a frozen backbone once over every image of a captions dataset and cache the features.

Crash-safe and resumable: finished batches are atomic shard files in `OUT.parts/` (see
stage1_extract.cache_writer), assembled into OUT at the end; re-running the same command after a
kill, Ctrl-C or a full disk computes only the rows no shard holds. Under torchrun every rank
takes its own share of the rows (stage1_extract.distributed) and rank 0 assembles.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.backbones import (DEFAULT_BACKBONE, REGISTRY, Backbone, BackboneError, ImageRows, check_shm,
                              default_workers, get_spec, load_backbone)
from common.cli import one_line, opt
from common.datasets import FORMATS, OUTSIDE_FLAG, guess_format, load_dataset
from common.device import resolve_device
from common.feature_cache import (DONE, CacheError, CacheMeta, differences, parts_dir, read_failures, read_keys,
                                  read_meta)
from common.lock import LOCK_NAME, OutputBusy, hold
from common.paths import refuse_inside
from common.preprocess import VIEWS
from common.records import ImageRecord
from common.text import printable
from stage1_extract.cache_writer import META_FILE, CacheWriter, check_resumable, read_parts_meta, remove_parts
from stage1_extract.distributed import Dist, device_for, from_env


PREFETCH = 4  # batches each DataLoader worker keeps ready (in shared memory)


@dataclass
class ExtractConfig:
    """Stage 1's settings; `python -m stage1_extract` declares one option per field (common.cli.config_group)."""
    images: str = opt(help="Folder of the dataset's images.", path=True)
    captions: str = opt(help="Captions file (COCO JSON, Karpathy dataset_*.json, Flickr8k captions.txt, Flickr30k "
                             ".token/.csv, or your own image,caption[,split] CSV / JSON Lines: docs/own-photos.md).", path=True)
    out: str = opt(help="Output HDF5 cache (work in progress lives in OUT.parts/ until complete).", path=True)
    dataset: str = opt("auto", "Captions file format (auto: from its extension and first bytes).",
                       choices=["auto", *FORMATS])
    backbone: str = opt(DEFAULT_BACKBONE, choices=list(REGISTRY))
    weights: str = opt("default", "'default' (torchvision ImageNet weights), 'none' (random, plumbing tests only) "
                                  "or a state_dict file.")
    batch_size: int = opt(64)
    workers: int = opt(default_workers(), "DataLoader worker processes decoding images.")
    device: str = opt("auto", "auto | cpu | cuda[:N]")
    limit: int | None = opt(None, "Only the first N images (by image id).")
    dtype: str = opt("float16", choices=["float16", "float32"])
    # 1 = the centre crop only; 2-4 also cache VIEWS[1:views] (flips, whole image) for training
    views: int = opt(1, f"Views cached per image, in this order: {', '.join(VIEWS)}. The centre crop is what "
                        f"captioning sees; the others are training augmentations (stage 2 draws one at random per "
                        f"caption). Each view costs one more forward pass.")
    allow_outside_images: bool = opt(False, "Also read captions entries whose image resolves outside --images "
                                            "(absolute, ../, symlinks).", flag=OUTSIDE_FLAG)
    progress: bool = opt(True, "No progress bar.")
    compile: bool = opt(False, "Run the CNN through torch.compile (GPU; its compile time counts against the images "
                               "it speeds up: docs/gpu.md).")
    # torchrun: how long a rank waits for the others at a sync point
    dist_timeout_s: float = opt(1800.0, "Under torchrun: seconds a rank waits for the others before giving up.",
                                flag="--dist-timeout")


@dataclass
class ExtractSummary:
    out: str
    total: int
    done_now: int  # over all ranks
    failed_now: int
    already_done: int
    failed: dict[str, str]  # key -> reason, every failed row of the cache (on rank 0)
    seconds: float
    rank: int = 0
    world_size: int = 1
    was_complete: bool = False  # OUT was already finished: nothing done

    @property
    def images_per_s(self) -> float:
        return (self.done_now + self.failed_now) / self.seconds if self.seconds > 0 else 0.0


def _check_settings(cfg: ExtractConfig) -> None:
    """The settings a Python caller may get wrong (the CLI's option types already refuse them)."""
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {cfg.workers}")
    if cfg.dtype not in ("float16", "float32"):
        raise ValueError(f"--dtype must be float16 or float32, got {cfg.dtype}")
    if not 1 <= cfg.views <= len(VIEWS):
        raise ValueError(f"--views must be 1..{len(VIEWS)} ({', '.join(VIEWS)}), got {cfg.views}")


def _out_path(cfg: ExtractConfig) -> Path:
    out = refuse_inside(cfg.out, cfg.images, "the cache")
    if out.is_dir():  # h5py's own message spans a line of C detail and its advice (re-run stage 1) is this run
        raise IsADirectoryError(f"--out {out} is a folder: give the cache file's path, e.g. "
                                f"{out / (Path(cfg.captions).stem + '.h5')}")
    return out


def plan(cfg: ExtractConfig) -> str:
    """What `extract(cfg)` would do, in one line, after checking the settings, the captions file, the images
    folder and the backbone name; loads no CNN (the --dry-run of stage 1)."""
    _check_settings(cfg)
    spec = get_spec(cfg.backbone)
    named = ("default", "none", spec.weights.split(".")[1])  # what load_backbone takes without a file
    if cfg.weights not in named and not os.path.isfile(os.path.expanduser(cfg.weights)):
        raise BackboneError(f"--weights {cfg.weights}: no such file (use default, none or a state_dict file)")
    records = load_dataset(cfg.dataset, cfg.captions, cfg.images, cfg.limit, cfg.allow_outside_images)
    fmt = cfg.dataset if cfg.dataset != "auto" else guess_format(cfg.captions)
    out = _out_path(cfg)
    if out.exists():
        _check_planned(out, cfg, spec.name, fmt, [r.key for r in records])
        state = "already exists, made from these images with this backbone: the run checks its weights and precision"
    elif (parts_dir(out) / META_FILE).is_file():
        have, stored_keys = read_parts_meta(parts_dir(out))
        check_resumable(parts_dir(out), have, stored_keys, _planned(have, cfg, spec.name, fmt),
                        [r.key for r in records])
        state = f"resumes the work in {parts_dir(out)}: the run checks its weights and precision"
    elif parts_dir(out).is_dir():
        state = f"resumes the work in {parts_dir(out)}"
    else:
        state = "new"
    return (f"{len(records)} images from {cfg.captions} ({fmt}) -> {spec.name} ({cfg.weights} weights, "
            f"{spec.feature_dim} features, {cfg.views} view(s), {cfg.dtype}), batches of {cfg.batch_size}, "
            f"{cfg.workers} workers, on {resolve_device(cfg.device)} -> {out} ({state})")


def _check_planned(out: Path, cfg: ExtractConfig, backbone: str, fmt: str, keys: list[str]) -> None:
    """What a dry run can check of a finished OUT without building the CNN: the backbone, the settings, where
    the images and captions came from, the image list (the weights and precision are the run's to check)."""
    _check_finished(out, _planned(read_meta(out), cfg, backbone, fmt), keys)


def _planned(have: CacheMeta, cfg: ExtractConfig, backbone: str, fmt: str) -> CacheMeta:
    """`have` with what the run would write that is known without the CNN (not its weights or precision)."""
    return replace(have, backbone=backbone, dataset_format=fmt, images_dir=os.path.realpath(cfg.images),
                   captions_file=os.path.realpath(cfg.captions), limit=cfg.limit or -1, dtype=cfg.dtype,
                   views=cfg.views)


def extract(cfg: ExtractConfig) -> ExtractSummary:
    """Extract features for every image of the dataset into cfg.out (resuming if possible)."""
    _check_settings(cfg)
    d = from_env(cfg.dist_timeout_s)
    try:
        with contextlib.ExitStack() as owned:  # the cache-in-progress lock, held until extraction ends
            return _extract(cfg, d, owned)
    finally:
        d.close()


def setup_extract(cfg: ExtractConfig, d: Dist) -> tuple[list[ImageRecord], Path, Backbone, CacheMeta]:
    records = load_dataset(cfg.dataset, cfg.captions, cfg.images, cfg.limit, cfg.allow_outside_images)
    fmt = cfg.dataset if cfg.dataset != "auto" else guess_format(cfg.captions)
    out = _out_path(cfg)
    # real paths: a symlinked folder re-pointed at another is another source (the same names, other photos)
    images_dir = Path(os.path.realpath(cfg.images))
    backbone = load_backbone(cfg.backbone, cfg.weights, device_for(cfg.device, d))
    if backbone.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has one shape: time the conv algorithms once, keep the best
    if cfg.compile:
        backbone.compile(cfg.batch_size * cfg.views)  # what encode() gets: every view of a batch in one pass
    info = backbone.describe()
    meta = CacheMeta(backbone=info["name"], weights=info["weights"], weights_sha256=info["weights_sha256"] or "",
                     feature_dim=info["feature_dim"], preprocess=info["preprocess"], dataset_format=fmt,
                     images_dir=str(images_dir), captions_file=os.path.realpath(cfg.captions),
                     limit=cfg.limit or -1, dtype=cfg.dtype, views=cfg.views, precision=info["precision"])
    return records, out, backbone, meta


def _check_finished(out: Path, meta: CacheMeta, keys: list[str]) -> None:
    diffs = differences(read_meta(out), meta, read_keys(out), keys)
    if diffs:
        raise CacheError(f"{out} already exists and was made differently ({'; '.join(diffs)}): "
                         f"delete it or choose another --out")


def _lock(out: Path, owned: contextlib.ExitStack) -> None:
    """One extraction per OUT: OUT.parts/.lock (removed with OUT.parts/ once OUT is whole: whoever takes
    a lock after that finds OUT complete)."""
    parts = parts_dir(out)
    if out.exists():
        return
    if parts.is_symlink() or (parts.exists() and not parts.is_dir()):
        raise CacheError(f"{parts} is in the way (not a folder); it holds extraction work for {out}: move it away")
    try:
        parts.mkdir(parents=True, exist_ok=True)
        owned.enter_context(hold(parts / LOCK_NAME, "cache in progress"))
    except OutputBusy:
        raise
    except OSError as e:
        raise CacheError(f"cannot create {parts}: {e.strerror or e}") from e


def _extract(cfg: ExtractConfig, d: Dist, owned: contextlib.ExitStack) -> ExtractSummary:
    records, out, backbone, meta = d.agree("setting up", lambda: setup_extract(cfg, d))
    keys = [r.key for r in records]
    d.agree(f"locking {parts_dir(out)}", lambda: _lock(out, owned) if d.rank == 0 else None)
    if out.exists():
        d.agree(f"checking {out}", lambda: _check_finished(out, meta, keys))
        if d.rank == 0:
            remove_parts(out)  # left over if a run was killed between its final rename and this clean-up
        failed = read_failures(out) if d.rank == 0 else {}
        return ExtractSummary(str(out), len(keys), 0, 0, len(keys) - len(failed), failed, 0.0, d.rank, d.world_size,
                              was_complete=True)

    t0 = time.perf_counter()
    # rank 0 creates OUT.parts/ (or checks it was started with these settings), then the others join it
    writer = d.agree(f"preparing {parts_dir(out)}", lambda: CacheWriter(out, keys, meta) if d.rank == 0 else None)
    try:
        if d.active:
            joined = d.agree(f"joining {parts_dir(out)}",
                             lambda: CacheWriter(out, keys, meta, rank=d.rank, create=False) if d.rank else None)
            writer = writer or joined
        status = writer.status()
        already = int((status == DONE).sum())
        # an earlier run's unreadable images too: a folder mounted since, a file copied in (an uninterrupted run
        # would have read them)
        pending = np.flatnonzero(status != DONE)
        # every rank has read the status before any rank writes: all split the same pending list
        d.agree("reading the work done", lambda: None)
        mine = d.mine(pending)
        share = max(len(d.mine(range(len(keys)))), len(mine))
        done_here, failed_here = d.agree("extracting", lambda: _extract_rows(cfg, d, writer, backbone, records, mine,
                                                                             share))
        _, (done_now, failed_now) = d.reduce(True, done_here, failed_here)
        if already + done_now:  # a cache of no image is no use (the wrong --images folder, say): not written
            d.agree(f"assembling {out}", lambda: writer.finish() if d.rank == 0 else None)
    finally:
        if writer is not None:
            writer.close()
    failed = {keys[i]: reason for i, reason in writer.failures().items()} if d.rank == 0 else {}
    if not already + done_now:
        if d.rank == 0:
            remove_parts(out)
        first = f" (first: {printable(next(iter(failed)))}: {printable(next(iter(failed.values())))})" if failed else ""
        raise CacheError(f"none of the {len(keys)} images could be read{first}: is --images {cfg.images} the folder "
                         f"that holds them? Nothing was written")
    return ExtractSummary(str(out), len(keys), done_now, failed_now, already, failed, time.perf_counter() - t0,
                          d.rank, d.world_size)


def _extract_rows(cfg: ExtractConfig, d: Dist, writer: CacheWriter, backbone: Backbone,
                  records: list[ImageRecord], rows: list[int], share: int) -> tuple[int, int]:
    """Encode `rows` batch by batch, one shard per batch; returns (rows done, rows failed)."""
    device = backbone.device
    check_shm(cfg.workers, cfg.batch_size * cfg.views, backbone.preprocess.crop, PREFETCH)
    loader = DataLoader(ImageRows([(i, records[i].path) for i in rows], backbone.preprocess, cfg.views),
                        batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                        persistent_workers=False, prefetch_factor=PREFETCH if cfg.workers > 0 else None,
                        worker_init_fn=_leave_signals_to_main if cfg.workers > 0 else None)
    desc = f"extract {cfg.backbone}" + (f" (rank 0 of {d.world_size})" if d.active else "")
    bar = tqdm(total=share, initial=share - len(rows), unit="img", desc=desc,
               disable=not cfg.progress or d.rank != 0, dynamic_ncols=True)
    done_now = failed_now = 0
    stop = _StopRequest()
    batches = iter(loader)
    watched = stop.watch(batches)
    pending = None  # the batch whose features are on their way to the host while the next one is encoded
    try:
        for batch_rows, images, errors in watched:
            batch_rows = batch_rows.numpy()
            ok = np.array([not e for e in errors])
            feats = None
            if ok.any():
                images = images[torch.from_numpy(ok)] if not ok.all() else images  # (b, 3, H, W) or (b, V, 3, H, W)
                if cfg.views > 1:  # every view of the batch in one forward pass
                    feats = backbone.encode(images.flatten(0, 1)).unflatten(0, (-1, cfg.views))  # (b, V, D)
                else:
                    feats = backbone.encode(images)  # (b, D)
            failed = {int(r): e for r, e in zip(batch_rows, errors) if e}
            out = _CopyOut(batch_rows[ok], feats, failed, cfg.views > 1)
            if pending is not None:
                pending, prev = None, pending
                prev.write(writer)
            if out.event is None:  # on the CPU: written at once, as before
                out.write(writer)
            else:
                pending = out
            done_now += int(ok.sum())
            failed_now += len(failed)
            for r, e in failed.items():
                tqdm.write(f"skipped {printable(records[r].key)}: {printable(e)}")
            bar.update(len(batch_rows))
        if pending is not None:
            pending, last = None, pending
            last.write(writer)
        writer.flush()
    except RuntimeError as e:  # torch's report of a worker that died or failed: a user's matter
        if "DataLoader worker" not in str(e):
            raise
        raise CacheError(f"{_worker_failure(e)}; finished batches are kept in {parts_dir(writer.out)}, re-run the "
                         f"same command to resume") from e
    finally:
        watched.close()
        # the DataLoader's workers shut down now, also on an error (whose traceback may still hold the iterator);
        # one still alive then ignored torch's SIGTERM (_leave_signals_to_main) and would hang the exit: killed
        workers = list(getattr(batches, "_workers", ()))
        getattr(batches, "_shutdown_workers", lambda: None)()
        del batches
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join(5)
        bar.close()
        if pending is not None:  # an error after the batch was encoded: its shard is still written
            with contextlib.suppress(Exception):
                pending.write(writer)
        writer.close()  # shards of the batches already computed are still written
    stop.act()
    return done_now, failed_now


class _CopyOut:
    """One batch's features on their way to the host: on CUDA a non-blocking copy into pinned memory, waited
    for (an event, not a device-wide sync) only when the shard is handed to the writer, after the next
    batch's forward has been queued; on the CPU the features are already there."""

    def __init__(self, rows: np.ndarray, feats: torch.Tensor | None, failed: dict[int, str], views: bool):
        self.rows, self.failed, self.views, self.event = rows, failed, views, None
        self.host = feats
        if feats is not None and feats.device.type == "cuda":
            self.host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
            self.host.copy_(feats, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def write(self, writer: CacheWriter) -> None:
        if self.event is not None:
            self.event.synchronize()
        feats = views = None
        if self.host is not None:
            arr = self.host.numpy()
            feats, views = (arr[:, 0], arr[:, 1:]) if self.views else (arr, None)  # (b, D), (b, V-1, D)
        self.host = None
        writer.write(self.rows, feats, self.failed, views)  # queued; a background thread writes the shard


def _worker_failure(e: RuntimeError) -> str:
    """One line for torch's report of a DataLoader worker: an error it raised (its traceback's last line), or
    its death (the OOM killer's SIGKILL)."""
    text = str(e).strip()
    if "Original Traceback" in text:
        return f"an image-decoding worker failed: {text.splitlines()[-1].strip()} (a full /dev/shm or disk?)"
    return f"{one_line(e)} (out of memory? fewer --workers or a smaller --batch-size need less)"


def _leave_signals_to_main(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C / SIGTERM: the main process stops them in order (and they exit on
    their own if it dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _StopRequest:
    """Ctrl-C / SIGTERM while extracting: finish the batch in hand, write its shard, stop the workers, then
    act on the signal as before (run_guarded: exit 130 / 143). A second signal acts at once.

    Why not raise at once: interrupting the main process while it receives a batch from a worker
    resets the worker's file-descriptor-sharing connection (a traceback on stderr), and the batch
    being encoded would be lost.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def watch(self, batches):
        """Iterate `batches` until exhausted or a stop is requested, handling SIGINT/SIGTERM meanwhile."""
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) not in (signal.SIG_IGN, None):
                    self._previous[sig] = signal.signal(sig, self._handle)
        try:
            for batch in batches:
                yield batch
                if self.signum is not None:
                    return
        finally:
            self._restore()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: no more waiting
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name}: stopping after the current batch (again to stop at once)",
                   file=sys.stderr)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def act(self) -> None:
        """Deliver the deferred signal to the handler that was there before (after the clean-up)."""
        if self.signum is not None:
            signal.raise_signal(self.signum)
