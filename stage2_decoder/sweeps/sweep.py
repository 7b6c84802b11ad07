"""A sweep from start to end: plan the runs of a grid, run them, write the results tables and plot.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from common.feature_cache import read_meta
from common.lock import LOCK_NAME, hold
from common.paths import refuse_inside
from stage2_decoder.reporting.curves import METRICS, plot_sweep
from stage2_decoder.sweeps.grid import (RunSpec, SweepError, expand_grid, format_point, load_grid, normalize_grid,
                                       run_digest, run_name, sample_grid, varied_keys)
from stage2_decoder.sweeps.results import rank_rows, write_json, write_results
from stage2_decoder.sweeps.run import (SWEEP_PID, read_result, record, redone_by_a_rerun, warm_page_cache, run_dask,
                                       run_local)
from stage2_decoder.training.config import TrainConfig
from stage2_decoder.training.loop import check_settings


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
    # a run keeps its folder when the grid changes around it: its name shows the settings that varied when it
    # was made, its hash (the same settings, the same hash) finds it again; without this a setting that goes
    # from fixed to varied renamed every finished run, and each was trained again
    made = {run_digest(p.name): p.name for p in sorted(out.iterdir()) if p.is_dir()} if out.is_dir() else {}
    specs = []
    for point in points:
        params = dict(point)
        if cfg.metric == "loss" and "select_by" not in params:
            params["select_by"] = "loss"  # best.pt and the ranked number are then the same thing
        if cfg.dry_run:
            params["dry_run"] = True
        name = run_name(params, varied, features)
        name = made.get(run_digest(name)) or made.get(run_digest(run_name(params, varied, features, spelt=True)), name)
        spec = RunSpec(name, str(out / name), features, params)
        try:  # a combination no run could train with (4 layers of 4096) fails here, not hours into the sweep
            check_settings(TrainConfig(features=features, out=spec.run_dir, **params))
        except (ValueError, OSError) as e:  # OSError: the run's folder name is a file
            raise SweepError(f"grid point {format_point(point)}: {e}") from None
        specs.append(spec)
    return specs, grid, varied


def _execute(cfg: SweepConfig, pending: list[RunSpec], bar) -> dict[str, dict]:
    """Run the pending specs; returns their records by name (a run interrupted or lost has none)."""
    if not pending:
        return {}
    if cfg.backend == "dask":
        return run_dask(pending, bar, cfg.scheduler, cfg.threads or 1)
    return run_local(pending, bar, cfg.n_jobs, cfg.threads)


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """Run (or resume) a sweep; writes the results tables and plot, returns the ranked runs."""
    _check_config(cfg)
    t0 = time.perf_counter()
    specs, grid, varied = plan_runs(cfg)
    meta = read_meta(cfg.features)  # a missing or foreign cache is one clear error, not N failed runs
    for images in sorted({str(s.params.get("images") or meta.images_dir) for s in specs}):
        refuse_inside(cfg.out, images, "the sweep")  # before the folder, its lock or any run is made
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out} is a file, not a folder for the sweep's runs")
    out.mkdir(parents=True, exist_ok=True)
    with hold(out / LOCK_NAME, "sweep folder"):  # one sweep per folder; each run also locks its own folder
        return _run_locked(cfg, out, specs, grid, varied, t0)


def _run_locked(cfg: SweepConfig, out: Path, specs: list[RunSpec], grid: dict[str, list], varied: list[str],
                t0: float) -> SweepResult:
    SWEEP_PID[:] = [os.getpid()]
    write_json(out / "sweep.json", {"features": os.path.abspath(cfg.features), "grid": grid, "varied": varied,
                                    "metric": cfg.metric, "random": cfg.random, "seed": cfg.seed,
                                    "dry_run": cfg.dry_run, "runs": [s.name for s in specs]})
    records: dict[str, dict] = {}
    pending = []
    for s in specs:
        rec = read_result(s)
        if rec is not None and (rec["status"] == "ok" or not (cfg.retry_failed or redone_by_a_rerun(rec))):
            records[s.name] = rec
        else:
            pending.append(s)
    skipped = len(records)
    if pending:
        warm_page_cache(cfg.features)
    tqdm.monitor_interval = 0  # no tqdm monitor thread: nothing else may print while runs fork
    with tqdm(total=len(pending), desc="sweep", unit="run", disable=not cfg.progress, dynamic_ncols=True) as bar:
        records.update(_execute(cfg, pending, bar))
    rows = [records.get(s.name) or record(s, "not run", "interrupted or lost; rerun the sweep to redo it")
            for s in specs]
    rows = rank_rows([dict(r) for r in rows], cfg.metric)
    result = SweepResult(str(out), rows, varied, cfg.metric, ran=len(pending), skipped=skipped,
                         seconds=round(time.perf_counter() - t0, 1))
    result.tables = [str(p) for p in write_results(out, rows, grid, varied, cfg.metric)]
    if cfg.plot:
        try:  # a convenience, as a run's curves are: the runs and their tables are what a sweep is for
            result.plot = str(plot_sweep(out))
        except Exception as e:  # noqa: BLE001
            tqdm.write(f"warning: sweep plot not drawn: {e}", file=sys.stderr)
    return result
