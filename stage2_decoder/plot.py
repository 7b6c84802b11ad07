"""Training curves and sweep plots as PNGs: python -m stage2_decoder.plot RUN_DIR (or a sweep directory).

For a run directory (it has metrics.jsonl, written by train.py each epoch) this writes
RUN_DIR/curves.png: train/val loss, train/val perplexity and validation CIDEr per epoch, the best
epoch marked. train() calls `plot_run` itself when it finishes. For a sweep directory `plot_sweep`
draws sweep.png (docs/sweeps.md). matplotlib is imported only when drawing (headless Agg canvas).
"""
from __future__ import annotations

from pathlib import Path

import click
from common.cli import run_guarded
from stage2_decoder.reporting.curves import CURVES_NAME, dir_kind, plot_path, read_metrics


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path())
@click.option("--no-progress", is_flag=True, help="Accepted for symmetry with the other commands (plotting shows no bar).")
@click.option("--dry-run", is_flag=True, help="Say what would be drawn (a run's curves or a sweep's plot); write nothing.")
def main(run_dir, no_progress, dry_run):
    """Plot a training run's curves (RUN_DIR/curves.png) or a sweep directory's results."""

    def work():
        if dry_run:
            p = Path(run_dir)
            if dir_kind(p) == "run":
                click.echo(f"dry run: {len(read_metrics(p))} epochs of {run_dir} -> {p / CURVES_NAME}")
            else:
                click.echo(f"dry run: the sweep {run_dir} -> {p / 'sweep.png'}")
            return 0
        written = plot_path(run_dir)
        for w in written:
            click.echo(f"wrote {w}")
        return 0

    raise SystemExit(run_guarded(work))


if __name__ == "__main__":
    main()
