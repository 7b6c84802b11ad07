"""Decoder hyperparameter sweeps from one feature cache, many runs at once (user guide: docs/sweeps.md).

    python -m stage2_decoder.sweep --features FILE.h5 --out runs/sweep-NAME --grid sweep.json
        [--n-jobs N] [--random N] [--seed S] [--metric cider|loss] [--threads N]
        [--backend local|dask --scheduler ADDRESS] [--retry-failed] [--dry-run]

The CLI; the sweep itself is in sweeps/ (sweep.py runs it, grid.py, run.py, results.py), the plot in
reporting/curves.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from common.cli import bounded, run_guarded
from stage2_decoder.reporting.curves import METRICS
from stage2_decoder.sweeps.results import format_cell
from stage2_decoder.sweeps.sweep import SweepConfig, SweepResult, run_sweep


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
    click.echo(f"best: {b['run']}  {col} {format_cell(b[col])}  {other} {format_cell(b[other])}  "
               f"(epoch {b['best_epoch']})")
    click.echo(f"checkpoint: {b['checkpoint']}")
    click.echo(f"config: {json.dumps(b['params'], sort_keys=True)}  "
               f"(full: {Path(b['checkpoint']).parent / 'config.json'})")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--features", required=True, type=click.Path(), help="Feature cache from stage 1 (shared by all runs).")
@click.option("--out", required=True, type=click.Path(), help="Sweep directory (resumed when it exists).")
@click.option("--grid", required=True, type=click.Path(), help="JSON: training setting -> list of values.")
@click.option("--n-jobs", type=bounded("n_jobs"), default=None,
              help="Runs at once (default: number of cores; on CUDA 2 per GPU).")
@click.option("--random", "random_n", type=bounded("random"), default=0,
              help="Sample N points of the grid instead of all.")
@click.option("--seed", type=bounded("seed"), default=0, show_default=True, help="Seed for --random.")
@click.option("--metric", type=click.Choice(list(METRICS)), default="cider", show_default=True,
              help="Rank runs by validation CIDEr or validation loss.")
@click.option("--threads", type=bounded("threads"), default=None,
              help="Torch threads per run (default: cores // n-jobs).")
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
