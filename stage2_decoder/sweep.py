"""Decoder hyperparameter sweeps from one feature cache, many runs at once.

    python -m stage2_decoder.sweep --features FILE.h5 --out runs/sweep-NAME --grid sweep.json
        [--n-jobs N] [--random N] [--seed S] [--metric cider|loss] [--threads N]
        [--backend local|dask --scheduler ADDRESS] [--retry-failed] [--dry-run]

The grid file maps TrainConfig field names to lists of values ({"lr": [0.001, 0.003], "epochs": 3});
every point (or `--random N` of them) is one run of the same `train(cfg)` the train CLI calls, in
OUT/<varied settings>-<hash>, with params.json, train.log and, once finished, result.json (the
completion marker: a rerun skips those runs and resumes the others). OUT gets results.csv/.md/.json
ranked by the metric, sweep.json and sweep.png. Locally each run is a fork of this process, which has
imported torch but never run a torch op, so torch's pages stay shared; with `--backend dask` the runs
go to a Dask cluster. User guide and the memory measurements behind the fork design: docs/sweeps.md.
On a GPU each run gets one visible GPU (CUDA_VISIBLE_DEVICES), RUNS_PER_GPU at once per GPU by default;
this process never initialises CUDA (PYTORCH_NVML_BASED_CUDA_CHECK=1), or runs start with spawn (docs/gpu.md).
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import queue
import random
import re
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import click
from tqdm import tqdm

# CUDA queries by NVML (is_available, device_count) instead of the driver API, which would create a CUDA
# context in this process and make forking its runs unsafe; torch reads this when first asked
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

from common.atomic import atomic_path, atomic_write  # noqa: E402
from common.cli import INT64, run_guarded  # noqa: E402
from common.feature_cache import read_meta  # noqa: E402
from common.lock import LOCK_NAME, hold  # noqa: E402
from stage2_decoder.train import TrainConfig, train  # noqa: E402

METRICS = {"cider": ("val_cider", True), "loss": ("val_loss", False)}  # column, higher is better
SWEEP_OWNED = ("features", "out", "progress")  # set by the sweep itself, not by the grid
RESULT, PARAMS, LOG = "result.json", "params.json", "train.log"
INTERRUPTED_EXIT = 130  # a run stopped by Ctrl-C / SIGTERM: unfinished, not failed
MAX_NAME = 96
RUNS_PER_GPU = 2  # default concurrent runs per GPU: small decoders leave a GPU mostly idle, one run at a time


class SweepError(ValueError):
    """A grid or sweep setting that cannot work (unknown key, wrong type, empty list...)."""


# --- the grid --------------------------------------------------------------------------------------------------

def _train_fields() -> dict:
    return {f.name: f for f in fields(TrainConfig)}


def _coerce(name: str, value, default):
    """`value` as the type of the TrainConfig field's default (ints stay ints: run names depend on it)."""
    kind = ("true or false" if isinstance(default, bool) else "an integer" if isinstance(default, int)
            else "a number" if isinstance(default, float) else "a string")
    bad = SweepError(f"grid value {value!r} for {name!r} should be {kind}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            raise bad
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if value is None and default is None:
        return None
    if not isinstance(value, str):
        raise bad
    return value


def normalize_grid(grid: dict) -> dict[str, list]:
    """Check a grid against TrainConfig: known keys, values of the field's type; scalars -> [scalar]."""
    if not isinstance(grid, dict) or not grid:
        raise SweepError("the grid must be a non-empty JSON object mapping training settings to lists of values")
    known = _train_fields()
    out = {}
    for key, values in grid.items():
        if key in SWEEP_OWNED:
            raise SweepError(f"grid key {key!r} is set by the sweep itself (--{key}), not by the grid")
        fl = known.get(key)
        if fl is None:
            names = [k for k in known if k not in SWEEP_OWNED]
            close = difflib.get_close_matches(key, names, n=1)
            raise SweepError(f"unknown grid key {key!r}: " + (f"did you mean {close[0]!r}?" if close else
                                                              f"the training settings are {', '.join(names)}"))
        values = values if isinstance(values, list) else [values]
        if not values:
            raise SweepError(f"grid key {key!r} has an empty list of values")
        default = None if fl.default is MISSING else fl.default
        vals = [_coerce(key, v, default) for v in values]
        if len(set(map(repr, vals))) != len(vals):
            raise SweepError(f"grid key {key!r} lists a value twice: {values}")
        out[key] = vals
    return out


def load_grid(path: str | os.PathLike) -> dict[str, list]:
    """Read and check a JSON grid file."""
    path = Path(path)
    try:
        grid = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"grid file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SweepError(f"{path} is not valid JSON: {e}") from e
    return normalize_grid(grid)


MAX_RUNS = 10_000  # points one sweep expands or samples: more is a typo (or a hostile grid), not a plan


def expand_grid(grid: dict) -> list[dict]:
    """Every point of the grid's product, in file order (the last key varies fastest); its size is
    checked before anything is built."""
    g = normalize_grid(grid)
    total = math.prod(len(v) for v in g.values())
    if total > MAX_RUNS:
        raise SweepError(f"the grid has {total:,} points ({' x '.join(str(len(v)) for v in g.values())}); at most "
                         f"{MAX_RUNS:,} are expanded: draw some of them with --random N")
    return [dict(zip(g, combo)) for combo in itertools.product(*g.values())]


def sample_grid(grid: dict, n: int, seed: int = 0) -> list[dict]:
    """`n` distinct points of the product drawn with `seed` (all of it if n >= its size), in product order.

    Points are drawn by index, so a huge product is never built in memory.
    """
    if n < 1:
        raise SweepError(f"--random must be at least 1, got {n}")
    if n > MAX_RUNS:
        raise SweepError(f"--random {n:,} is more than the {MAX_RUNS:,} runs one sweep holds")
    g = normalize_grid(grid)
    sizes = [len(v) for v in g.values()]
    total = math.prod(sizes)
    chosen = sorted(random.Random(seed).sample(range(total), min(n, total)))
    points = []
    for index in chosen:
        combo = []
        for size in reversed(sizes):  # mixed radix, the last key is the fastest digit
            index, digit = divmod(index, size)
            combo.append(digit)
        points.append({k: v[d] for (k, v), d in zip(g.items(), reversed(combo))})
    return points


def varied_keys(grid: dict[str, list]) -> list[str]:
    return [k for k, v in grid.items() if len(v) > 1]


def _fmt(v) -> str:
    return format(v, "g") if isinstance(v, float) else str(v)


def run_name(params: dict, varied: list[str], features: str) -> str:
    """Deterministic, readable, file-system-safe: the varied settings plus a hash of everything."""
    ident = json.dumps({"features": os.path.abspath(features), **params}, sort_keys=True)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:8]
    readable = ",".join(f"{k}={_fmt(params[k])}" for k in varied)
    readable = re.sub(r"[^A-Za-z0-9._=,+-]", "_", readable)[:MAX_NAME]
    return f"{readable}-{digest}" if readable else f"run-{digest}"


# --- one run ---------------------------------------------------------------------------------------------------

@dataclass
class RunSpec:
    name: str
    run_dir: str
    features: str
    params: dict[str, int | float | str | bool | None]  # TrainConfig fields this run sets (grid point + fixed settings)


def _write_json(path: Path, value) -> None:
    atomic_write(path, json.dumps(value, indent=1), what=path.name)


def _finite(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _divergence(history: list[dict]) -> str | None:
    """Why a finished run's history is unusable (a nan/inf loss or reward), or None.

    Only the values an epoch records are checked: self-critical epochs record a reward, no train loss.
    """
    if not history:
        return "no epoch finished"
    for h in history:
        for key in ("train_loss", "val_loss", "train_reward"):
            v = h.get(key, 0.0)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                return f"diverged: {key} is {v} in epoch {h.get('epoch')}"
    return None


def _record(spec: RunSpec, status: str, error: str = "", **values) -> dict:
    return {"run": spec.name, "status": status, "val_cider": _finite(values.get("val_cider")),
            "val_loss": _finite(values.get("val_loss")), "best_epoch": values.get("best_epoch"),
            "epochs_run": values.get("epochs_run"), "seconds": values.get("seconds"),
            "checkpoint": values.get("checkpoint", ""), "error": error, "params": spec.params}


def _run_one(spec: RunSpec, threads: int | None) -> dict:
    """Train one configuration and write its result.json. Never raises for a failure of the run itself."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / PARAMS, {"run": spec.name, "features": spec.features, "params": spec.params})
    t0, started = time.perf_counter(), time.time()
    try:
        r = train(TrainConfig(features=spec.features, out=spec.run_dir, progress=False, **spec.params))
        seconds = round(time.perf_counter() - t0, 2)
        why = _divergence(r.history)
        ckpt = str(Path(r.run_dir) / "best.pt")
        rec = _record(spec, "failed" if why else "ok", why or "", val_cider=r.best_val_cider,
                      val_loss=r.best_val_loss, best_epoch=r.best_epoch, epochs_run=r.epochs_run, seconds=seconds,
                      checkpoint=ckpt if not why and os.path.exists(ckpt) else "")
    except Exception as e:  # noqa: BLE001 - any error of one run is that run's failure, not the sweep's
        traceback.print_exc(file=sys.stderr)  # into train.log for the full story
        msg = (str(e).strip().splitlines() or [""])[0]
        rec = _record(spec, "failed", f"{type(e).__name__}: {msg}" if msg else type(e).__name__,
                      seconds=round(time.perf_counter() - t0, 2))
    rec.update(started_at=started, host=socket.gethostname(), pid=os.getpid())  # where and when it ran
    _write_json(run_dir / RESULT, rec)
    return rec


def _read_result(spec: RunSpec) -> dict | None:
    path = Path(spec.run_dir) / RESULT
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    # same name = same settings (the hash), unless the directory was edited by hand
    return rec if isinstance(rec, dict) and rec.get("params") == spec.params and rec.get("status") else None


# Forked runs. Forks come from joblib's threads; these locks keep the main thread from printing (tqdm)
# while a fork happens, so no child inherits a held stdout lock, and let an interrupt stop new forks.
_FORK = mp.get_context("fork")
_LIVE: set = set()
_LIVE_LOCK = threading.Lock()
_STOP = threading.Event()


_SWEEP_PID: list[int] = []  # the sweep process, as its forked runs see it


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(INTERRUPTED_EXIT)


def _die_with_parent() -> None:
    """A run never outlives its sweep (kill -9 included): an orphan would go on training and collide with the
    re-run. Linux: PR_SET_PDEATHSIG; elsewhere a thread watching the parent's pid."""
    parent = _SWEEP_PID[0] if _SWEEP_PID else os.getppid()
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the sweep died before the signal was armed
        os._exit(INTERRUPTED_EXIT)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _child_main(spec: RunSpec, threads: int | None, gpu: str | None = None) -> None:
    _die_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's click handler: just stop (SIGINT as inherited)
    if gpu is not None:  # before anything touches CUDA in this process: the run sees its one GPU as cuda:0
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    log = open(Path(spec.run_dir) / LOG, "a")
    os.dup2(log.fileno(), 1)  # whatever the run prints goes to its own log, not over the progress bar
    os.dup2(log.fileno(), 2)
    try:
        _run_one(spec, threads)
    except KeyboardInterrupt:
        sys.stdout.flush()
        os._exit(INTERRUPTED_EXIT)


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        sig = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"the run's process was killed by {sig}{hint}"
    return f"the run's process exited with code {code} without a result"


def _start_context():
    """fork while this process has no CUDA context (a forked child cannot use its parent's), spawn otherwise."""
    import torch

    return mp.get_context("spawn") if torch.cuda.is_initialized() else _FORK


def _run_forked(spec: RunSpec, threads: int | None, gpus: "queue.Queue | None" = None) -> dict | None:
    """Run `spec` in a forked child and wait; None if the sweep was interrupted meanwhile. With `gpus`
    (a pool of CUDA_VISIBLE_DEVICES ids, one entry per concurrent run) the child gets one of them."""
    Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
    gpu = gpus.get() if gpus is not None and _spreads(spec) else None
    try:
        p = _start_context().Process(target=_child_main, args=(spec, threads, gpu), name=f"sweep-run {spec.name}",
                                     daemon=True)
        with _LIVE_LOCK:
            if _STOP.is_set():
                return None
            p.start()
            _LIVE.add(p)
        p.join()
        with _LIVE_LOCK:
            _LIVE.discard(p)
    finally:
        if gpu is not None:
            gpus.put(gpu)
    rec = _read_result(spec)
    if rec is not None:
        return rec
    if _STOP.is_set() or p.exitcode in (INTERRUPTED_EXIT, -signal.SIGINT, -signal.SIGTERM):
        return None  # interrupted, not failed: a rerun redoes it
    rec = _record(spec, "failed", _exit_reason(p.exitcode))
    _write_json(Path(spec.run_dir) / RESULT, rec)
    return rec


def _stop_children() -> None:
    with _LIVE_LOCK:
        _STOP.set()
        for p in list(_LIVE):
            p.terminate()


# --- the sweep -------------------------------------------------------------------------------------------------

@dataclass
class SweepConfig:
    features: str
    out: str
    grid: str | dict  # a JSON grid file, or the grid itself
    n_jobs: int | None = None  # concurrent runs (default: cores, or RUNS_PER_GPU per GPU on CUDA); local backend only
    random: int = 0  # sample this many points of the product (0 = all of it)
    seed: int = 0  # for --random
    metric: str = "cider"  # rank by validation "cider" (higher is better) or "loss" (lower is better)
    threads: int | None = None  # torch threads per run (default: cores // concurrent runs; 1 on dask)
    backend: str = "local"  # local (forked runs on this machine) | dask
    scheduler: str | None = None  # Dask scheduler address, for backend="dask"
    retry_failed: bool = False  # redo runs recorded as failed
    dry_run: bool = False  # every run one batch per epoch (smoke test)
    progress: bool = True
    plot: bool = True


@dataclass
class SweepResult:
    out: str
    rows: list[dict]  # every run, ranked: ok runs by the metric, then failed / not run
    varied: list[str]
    metric: str
    ran: int
    skipped: int
    seconds: float
    tables: list[str] = field(default_factory=list)  # results.csv, results.md, results.json
    plot: str | None = None

    @property
    def best(self) -> dict | None:
        return self.rows[0] if self.rows and self.rows[0]["status"] == "ok" else None

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != "ok"]


def _check_config(cfg: SweepConfig) -> None:
    if cfg.metric not in METRICS:
        raise SweepError(f"--metric must be one of {', '.join(METRICS)}, got {cfg.metric!r}")
    if cfg.backend not in ("local", "dask"):
        raise SweepError(f"--backend must be local or dask, got {cfg.backend!r}")
    if cfg.backend == "dask" and not cfg.scheduler:
        raise SweepError("--backend dask needs --scheduler ADDRESS (e.g. tcp://127.0.0.1:8786)")
    if cfg.n_jobs is not None and cfg.n_jobs < 1:
        raise SweepError(f"--n-jobs must be at least 1, got {cfg.n_jobs}")
    if cfg.threads is not None and cfg.threads < 1:
        raise SweepError(f"--threads must be at least 1, got {cfg.threads}")
    if cfg.random < 0:
        raise SweepError(f"--random must not be negative, got {cfg.random}")


def plan_runs(cfg: SweepConfig) -> tuple[list[RunSpec], dict[str, list], list[str]]:
    """The runs a sweep consists of (grid checked, points expanded or sampled, names fixed)."""
    grid = load_grid(cfg.grid) if isinstance(cfg.grid, (str, os.PathLike)) else normalize_grid(cfg.grid)
    points = sample_grid(grid, cfg.random, cfg.seed) if cfg.random else expand_grid(grid)
    varied = varied_keys(grid)
    features = os.path.abspath(cfg.features)  # runs may execute elsewhere (forked cwd, Dask workers)
    out = Path(os.path.abspath(cfg.out))
    specs = []
    for point in points:
        params = dict(point)
        if cfg.metric == "loss" and "select_by" not in params:
            params["select_by"] = "loss"  # best.pt and the ranked number are then the same thing
        if cfg.dry_run:
            params["dry_run"] = True
        name = run_name(params, varied, features)
        specs.append(RunSpec(name, str(out / name), features, params))
    return specs, grid, varied


def _warm_page_cache(path: str) -> None:
    """Read the cache file once so the runs, starting together, load it from the OS page cache."""
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def _preload() -> None:
    """Import in this process what every run imports later, so forked runs share it instead of each
    importing its own copy (matplotlib for train's curves.png, the CIDEr scorer, the decoder search)."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401
    import pycocoevalcap.cider.cider  # noqa: F401

    import stage2_decoder.decode  # noqa: F401
    import stage2_decoder.metrics  # noqa: F401
    import stage2_decoder.plot  # noqa: F401


def _cpu_count() -> int:
    import joblib

    return max(1, joblib.cpu_count())


def _spreads(spec: RunSpec) -> bool:
    """Whether a run's device lets the sweep pick its GPU ("auto" or "cuda"; an explicit cuda:N stays as asked)."""
    return str(spec.params.get("device", "auto")) in ("auto", "cuda")


def visible_gpus(pending: list[RunSpec]) -> list[str]:
    """The GPU ids (CUDA_VISIBLE_DEVICES entries) the runs are spread over; [] when they train on the CPU.
    Asks NVML, so this process still has no CUDA context afterwards."""
    import torch

    if not any(_spreads(s) for s in pending) or not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def default_jobs(gpus: list[str]) -> int:
    """Concurrent runs when --n-jobs is not given: RUNS_PER_GPU per GPU (at most one per core), else one per core."""
    return min(_cpu_count(), RUNS_PER_GPU * len(gpus)) if gpus else _cpu_count()


def _execute(cfg: SweepConfig, pending: list[RunSpec], bar) -> dict[str, dict]:
    """Run the pending specs; returns their records by name (a run interrupted or lost has none)."""
    from joblib import Parallel, delayed, parallel_config

    done: dict[str, dict] = {}
    if not pending:
        return done
    if cfg.backend == "dask":
        from distributed import Client

        threads = cfg.threads or 1
        with Client(cfg.scheduler, timeout="30s") as client, parallel_config(backend="dask", client=client):
            try:
                # batch_size=1: one run per Dask task, so a long run never holds others hostage
                for rec in Parallel(batch_size=1, return_as="generator_unordered")(
                        delayed(_run_one)(s, threads) for s in pending):
                    done[rec["run"]] = rec
                    bar.update()
            except Exception as e:  # noqa: BLE001 - e.g. KilledWorker: keep what finished, report the rest
                tqdm.write(f"warning: the Dask cluster lost runs ({type(e).__name__}: {e}); "
                           f"rerun the sweep to redo them", file=sys.stderr)
        return done

    _preload()
    gpu_ids = visible_gpus(pending)
    n_jobs = min(cfg.n_jobs or default_jobs(gpu_ids), len(pending))
    threads = cfg.threads or max(1, _cpu_count() // n_jobs)
    gpus = None
    if gpu_ids:  # one pool entry per concurrent run, GPUs in turn: runs spread evenly over them
        gpus = queue.Queue()
        for i in range(n_jobs):
            gpus.put(gpu_ids[i % len(gpu_ids)])
    _STOP.clear()
    try:
        with parallel_config(backend="threading", n_jobs=n_jobs):
            for rec in Parallel(batch_size=1, return_as="generator_unordered")(
                    delayed(_run_forked)(s, threads, gpus) for s in pending):
                if rec is not None:
                    done[rec["run"]] = rec
                with _LIVE_LOCK:
                    bar.update()
    except BaseException:
        _stop_children()  # Ctrl-C / SIGTERM: the running runs stop now and are redone by a rerun
        raise
    return done


def _rank(rows: list[dict], metric: str) -> list[dict]:
    col, higher = METRICS[metric]

    def key(r):
        v = r.get(col)
        if r["status"] != "ok":
            return (2, 0.0, r["run"])
        if v is None:
            return (1, 0.0, r["run"])
        return (0, -v if higher else v, r["run"])

    ranked = sorted(rows, key=key)
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    return ranked


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """Run (or resume) a sweep; writes the results tables and plot, returns the ranked runs."""
    _check_config(cfg)
    t0 = time.perf_counter()
    specs, grid, varied = plan_runs(cfg)
    read_meta(cfg.features)  # a missing or foreign cache is one clear error, not N failed runs
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with hold(out / LOCK_NAME, "sweep folder"):  # one sweep per folder; each run also locks its own folder
        return _run_locked(cfg, out, specs, grid, varied, t0)


def _run_locked(cfg: SweepConfig, out: Path, specs: list[RunSpec], grid: dict[str, list], varied: list[str],
                t0: float) -> SweepResult:
    _SWEEP_PID[:] = [os.getpid()]
    _write_json(out / "sweep.json", {"features": os.path.abspath(cfg.features), "grid": grid, "varied": varied,
                                     "metric": cfg.metric, "random": cfg.random, "seed": cfg.seed,
                                     "dry_run": cfg.dry_run, "runs": [s.name for s in specs]})
    records: dict[str, dict] = {}
    pending = []
    for s in specs:
        rec = _read_result(s)
        if rec is not None and (rec["status"] == "ok" or not cfg.retry_failed):
            records[s.name] = rec
        else:
            pending.append(s)
    skipped = len(records)
    if pending:
        _warm_page_cache(cfg.features)
    tqdm.monitor_interval = 0  # no tqdm monitor thread: nothing else may print while runs fork
    with tqdm(total=len(pending), desc="sweep", unit="run", disable=not cfg.progress, dynamic_ncols=True) as bar:
        records.update(_execute(cfg, pending, bar))
    rows = [records.get(s.name) or _record(s, "not run", "interrupted or lost; rerun the sweep to redo it")
            for s in specs]
    rows = _rank([dict(r) for r in rows], cfg.metric)
    result = SweepResult(str(out), rows, varied, cfg.metric, ran=len(pending), skipped=skipped,
                         seconds=round(time.perf_counter() - t0, 1))
    result.tables = [str(p) for p in write_results(out, rows, grid, varied, cfg.metric)]
    if cfg.plot:
        result.plot = str(plot_sweep(out))
    return result


# --- results ---------------------------------------------------------------------------------------------------

def _columns(varied: list[str], metric: str) -> list[str]:
    first = ["val_cider", "val_loss"] if metric == "cider" else ["val_loss", "val_cider"]
    return ["rank", "run", "status", *first, "best_epoch", "epochs_run", "seconds", *varied, "checkpoint", "error"]


def _flat(row: dict, varied: list[str]) -> dict:
    return {**{k: v for k, v in row.items() if k != "params"}, **{k: row["params"].get(k) for k in varied}}


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_results(out: Path, rows: list[dict], grid: dict[str, list], varied: list[str], metric: str) -> list[Path]:
    """results.csv, results.md and results.json in `out`, rows as ranked. Returns the paths."""
    cols = _columns(varied, metric)
    flat = [_flat(r, varied) for r in rows]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(flat)
    paths = [out / "results.csv", out / "results.md", out / "results.json"]
    atomic_write(paths[0], buf.getvalue(), what="results table")

    col, higher = METRICS[metric]
    fixed = {k: v[0] for k, v in grid.items() if len(v) == 1}
    n_ok = sum(r["status"] == "ok" for r in rows)
    lines = [f"# Sweep: {len(rows)} runs, {n_ok} ok", "",
             f"Ranked by {col} ({'higher' if higher else 'lower'} is better)."
             + (f" Fixed: {', '.join(f'{k}={_fmt(v)}' for k, v in fixed.items())}." if fixed else ""), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in flat:
        lines.append("| " + " | ".join(_cell(r.get(c)).replace("|", "\\|").replace("\n", " ") for c in cols) + " |")
    atomic_write(paths[1], "\n".join(lines) + "\n", what="results table")
    _write_json(paths[2], {"metric": metric, "varied": varied, "fixed": fixed, "rows": rows})
    return paths


def plot_sweep(sweep_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the metric against each varied setting from SWEEP_DIR/results.json into sweep.png (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazily, no pyplot: no global backend state
    from matplotlib.figure import Figure

    sweep_dir = Path(sweep_dir)
    try:
        res = json.loads((sweep_dir / "results.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{sweep_dir / 'results.json'} not found: is {sweep_dir} a sweep directory?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{sweep_dir / 'results.json'} is damaged ({e}); rerun the sweep to rewrite it") from e
    metric, varied = res["metric"], res["varied"] or ["run"]
    col, higher = METRICS[metric]
    ok = [r for r in res["rows"] if r["status"] == "ok" and r.get(col) is not None]
    fig = Figure(figsize=(4.2 * len(varied), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(varied), squeeze=False)[0]
    for ax, key in zip(axes, varied):
        xs = [r["params"].get(key) if key != "run" else r["run"] for r in ok]
        ys = [r[col] for r in ok]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs) and xs
        if numeric:
            levels = sorted(set(xs))
            if min(levels) > 0 and max(levels) / min(levels) >= 10:
                ax.set_xscale("log")  # learning rates and other settings swept by factors
            pos = xs
        else:  # strings, booleans: one slot per value, in the grid's order
            levels = list(dict.fromkeys(map(str, xs)))
            pos = [levels.index(str(x)) for x in xs]
            ax.set_xticks(range(len(levels)), levels, rotation=30 if key == "run" else 0, fontsize=8)
        ax.scatter(pos, ys, alpha=0.6, label="runs")
        if levels:  # the mean over the other settings, per value of this one
            lv = levels if numeric else list(range(len(levels)))
            means = [sum(y for p, y in zip(pos, ys) if p == v) / max(1, sum(p == v for p in pos)) for v in lv]
            ax.plot(lv, means, color="tab:red", marker="_", label="mean")
        ax.set(xlabel=key, ylabel=col, title=f"{col} vs {key}")
        ax.grid(alpha=0.3)
    if not ok:
        axes[0].text(0.5, 0.5, "no finished run", ha="center", va="center", transform=axes[0].transAxes)
    elif len(ok) > 1:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"{sweep_dir.resolve().name}: {len(ok)} of {len(res['rows'])} runs "
                 f"({'higher' if higher else 'lower'} {col} is better)")
    out = Path(out) if out is not None else sweep_dir / "sweep.png"
    with atomic_path(out, what="sweep plot") as tmp:
        fig.savefig(tmp, format="png")
    return out


# --- CLI -------------------------------------------------------------------------------------------------------

def _report(r: SweepResult) -> None:
    col = METRICS[r.metric][0]
    n_fail = sum(x["status"] == "failed" for x in r.rows)
    click.echo(f"sweep: {len(r.rows)} runs ({r.ran} run now, {r.skipped} already finished, {n_fail} failed) "
               f"in {r.seconds:.1f}s")
    for x in r.failed:
        click.echo(f"  {x['status']}: {x['run']}: {x['error']}")
    click.echo(f"results: {', '.join(r.tables)}" + (f", {r.plot}" if r.plot else ""))
    b = r.best
    if b is None:
        return
    other = "val_loss" if col == "val_cider" else "val_cider"
    click.echo(f"best: {b['run']}  {col} {_cell(b[col])}  {other} {_cell(b[other])}  (epoch {b['best_epoch']})")
    click.echo(f"checkpoint: {b['checkpoint']}")
    click.echo(f"config: {json.dumps(b['params'], sort_keys=True)}  "
               f"(full: {Path(b['checkpoint']).parent / 'config.json'})")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--features", required=True, type=click.Path(), help="Feature cache from stage 1 (shared by all runs).")
@click.option("--out", required=True, type=click.Path(), help="Sweep directory (resumed when it exists).")
@click.option("--grid", required=True, type=click.Path(), help="JSON: training setting -> list of values.")
@click.option("--n-jobs", type=int, default=None, help="Runs at once (default: number of cores; on CUDA 2 per GPU).")
@click.option("--random", "random_n", type=int, default=0, help="Sample N points of the grid instead of all.")
@click.option("--seed", type=INT64, default=0, show_default=True, help="Seed for --random.")
@click.option("--metric", type=click.Choice(list(METRICS)), default="cider", show_default=True,
              help="Rank runs by validation CIDEr or validation loss.")
@click.option("--threads", type=int, default=None, help="Torch threads per run (default: cores // n-jobs).")
@click.option("--backend", type=click.Choice(["local", "dask"]), default="local", show_default=True)
@click.option("--scheduler", default=None, help="Dask scheduler address (with --backend dask).")
@click.option("--retry-failed", is_flag=True, help="Redo runs recorded as failed.")
@click.option("--dry-run", is_flag=True, help="Every run one batch per epoch (smoke test).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def main(features, out, grid, n_jobs, random_n, seed, metric, threads, backend, scheduler, retry_failed, dry_run,
         no_progress):
    """Train many decoders from one feature cache, in parallel, and rank them."""
    cfg = SweepConfig(features=features, out=out, grid=grid, n_jobs=n_jobs, random=random_n, seed=seed,
                      metric=metric, threads=threads, backend=backend, scheduler=scheduler,
                      retry_failed=retry_failed, dry_run=dry_run, progress=not no_progress)

    def work():
        r = run_sweep(cfg)
        _report(r)
        if r.best is None:
            first = next((x["error"] for x in r.rows if x["error"]), "")
            click.echo(f"error: no run of the sweep finished{': ' + first if first else ''}", err=True)
            return 1
        return 0

    raise SystemExit(run_guarded(work, interrupted_msg=f"sweep interrupted; finished runs are kept in {out}, "
                                                       f"re-run the same command to resume"))


if __name__ == "__main__":
    main()
