"""Train the projection + LSTM decoder from a feature cache (hand-written loop).

    python -m stage2_decoder.train --features FILE.h5 --out RUN_DIR [--epochs N] ...

RUN_DIR gets config.json, split.json, vocab.json, metrics.jsonl, last.pt (every epoch, with the state
to resume) and best.pt (the selected epoch, what captioning needs). Rerunning with the same RUN_DIR
resumes from last.pt.
"""
from __future__ import annotations

from pathlib import Path

import click

from common.cli import config_options, run_guarded
from common.datasets import FORMATS
from stage2_decoder.training.config import TrainConfig
from stage2_decoder.training.loop import train


_CLI_OWN = {"features", "out", "captions", "images", "dataset", "device", "progress", "dry_run"}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--features", required=True, type=click.Path(), help="Feature cache from stage 1.")
@click.option("--out", required=True, type=click.Path(), help="Run directory (resumed if it has last.pt).")
@click.option("--captions", default=None, help="Override the captions file recorded in the cache.")
@click.option("--images", default=None, help="Override the images folder recorded in the cache.")
@click.option("--dataset", type=click.Choice(list(FORMATS)), default=None,
              help="Override the dataset format recorded in the cache.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--no-progress", is_flag=True, help="No progress bars or per-epoch lines.")
@click.option("--dry-run", is_flag=True, help="One batch per epoch (smoke test).")
@config_options(TrainConfig, skip=_CLI_OWN)
def main(features, out, captions, images, dataset, device, no_progress, dry_run, **hyper):
    """Train the decoder from a feature cache (each option is a TrainConfig field)."""
    cfg = TrainConfig(features=features, out=out, captions=captions, images=images, dataset=dataset,
                      device=device, progress=not no_progress, dry_run=dry_run, **hyper)

    def work():
        r = train(cfg)
        click.echo(f"trained {r.epochs_run} epochs; best epoch {r.best_epoch} (val loss {r.best_val_loss:.4f}, "
                   f"val CIDEr {r.best_val_cider:.3f}); "
                   f"checkpoint {Path(r.run_dir) / 'best.pt'}")
        return 0

    def interrupted() -> str:
        if (Path(out) / "last.pt").is_file():
            return f"training interrupted; the last finished epoch is in {out}/last.pt, re-run the same command to resume"
        return "training interrupted before its first epoch finished: nothing to resume"

    raise SystemExit(run_guarded(work, interrupted_msg=interrupted))


if __name__ == "__main__":
    main()
