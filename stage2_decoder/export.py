"""Export a checkpoint as ONNX files that caption images without PyTorch.

    python -m stage2_decoder.export [--checkpoint runs/NAME/best.pt] --out DIR

DIR gets three graphs and a description (`capcache-onnx.json`, written last, so a folder that
has it is complete):
- encoder.onnx       images (B, 3, crop, crop) uint8 -> features (B, D): the frozen backbone
                     including the /255 and ImageNet normalisation.
- decoder_init.onnx  features (B, D) -> h, c (L, B, H): the LSTM state after the t=0 image step.
- decoder_step.onnx  tokens (B,) int64, h, c -> logp (B, V) (log-probs, <pad>/<start> masked as
                     in training-time decoding), h, c.
- capcache-onnx.json format + version, vocabulary, the image contract (every rule that turns a file
                     into the encoder's input, `common.preprocess.image_contract`), the text rule
                     (how tokens join), decode defaults, backbone (with its weights' sha256) and
                     decoder descriptions, the source checkpoint's name, each file's sha256 and size.
`stage2_decoder.serving.onnx_captioner` runs them with onnxruntime, numpy and Pillow alone; docs/deploy.md
describes the contract for a deployer who writes their own.
"""
from __future__ import annotations

import sys

import click

# the reader owns the format
from common.cli import run_guarded
from stage2_decoder.api import find_checkpoint
from stage2_decoder.serving.onnx_captioner import GRAPHS, MANIFEST
from stage2_decoder.serving.onnx_export import ExportConfig, export


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(), default=None,
              help="A best.pt / last.pt from training (default: $CAPCACHE_CHECKPOINT, else the newest runs/*/best.pt).")
@click.option("--out", required=True, type=click.Path(), help="Folder for the .onnx files and capcache-onnx.json.")
@click.option("--weights", default=None, help="Backbone weights file, if it moved since extraction.")
@click.option("--no-progress", is_flag=True, help="Accepted for symmetry with the other commands (export shows no bar).")
@click.option("--dry-run", is_flag=True, help="Check the checkpoint and say what would be written; export nothing.")
def main(checkpoint, out, weights, no_progress, dry_run):
    """Export a checkpoint's encoder and decoder as ONNX (for `caption --onnx DIR`)."""

    def work():
        ExportConfig(checkpoint, out, weights).out_folder()
        if checkpoint is None:
            click.echo(f"using checkpoint {find_checkpoint()}", err=True)
        if dry_run:
            # imported on use: importing this module stays free of torch
            from stage2_decoder.training.checkpoint import load_checkpoint, model_from_checkpoint

            path = find_checkpoint(checkpoint)
            decoder, vocab = model_from_checkpoint(load_checkpoint(path))
            click.echo(f"dry run: {path} ({decoder.cfg.feature_dim}-d features, {len(vocab)} words) -> "
                       f"{', '.join(GRAPHS)} and {MANIFEST} in {out}")
            return 0
        manifest = export(ExportConfig(checkpoint, out, weights))
        click.echo(f"wrote {', '.join(GRAPHS)} and {manifest.name} to {manifest.parent}")
        return 0

    sys.exit(run_guarded(work))


if __name__ == "__main__":
    main()
