"""Caption your own photos with a trained checkpoint (a thin CLI over stage2_decoder.api.Captioner).

    python -m stage2_decoder.caption IMAGE_OR_DIR... [--checkpoint FILE] [--num-captions N] [--json]

Without --checkpoint: $CAPCACHE_CHECKPOINT, else the newest runs/*/best.pt (after `make demo` or `make
train`). `--onnx DIR` captions with an exported model through onnxruntime, without torch. Output and
options: docs/captioning.md.
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict
from pathlib import Path

import click

from common.atomic import ready_to_write
from common.cli import bounded, decode_options, one_line, run_guarded, sampling_options
from common.jsonio import dump_json
from common.text import printable
from stage2_decoder.api import find_checkpoint, Captioner


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ALT_MARKER = "  alt"  # starts each alternative caption's line: `  alt<TAB>score<TAB>caption`


def collect_images(inputs: list[str], recursive: bool = False) -> list[str]:
    """Files as given; folders expanded to their entries with an image suffix (sorted), and with
    `recursive` those of their subfolders too (not through symlinked folders: no loops).

    An entry named like an image that is not a readable file (a folder `x.jpg` of a folder listed
    alone, a dangling or looping symlink) is kept, so it gets its own error line instead of vanishing
    silently.
    """
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            # os.walk: symlinked folders not entered
            found = (Path(d) / f for d, _, files in os.walk(p) for f in files) if recursive else p.iterdir()
            out.extend(str(f) for f in sorted(found) if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(item)
    return out


def nothing_found(images: tuple[str, ...], recursive: bool) -> str:
    """The error when no image file was named: with a hint when a folder given holds only subfolders."""
    nested = not recursive and any(Path(i).is_dir() and any(f.is_dir() for f in Path(i).iterdir()) for i in images)
    return f"no image files in {' '.join(images)}" + (" (add --recursive to look in subfolders)" if nested else "")


def text_lines(result: dict) -> list[str]:
    """`path<TAB>caption`, then with several captions one `  alt<TAB>score<TAB>caption` line per alternative.
    A path with a tab, newline or terminal control character is printed escaped (common/text.py)."""
    lines = [f"{printable(result['image'])}\t{result['caption']}"]
    lines += [f"{ALT_MARKER}\t{c['score']:.4f}\t{c['caption']}" for c in result["captions"][1:]]
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("images", nargs=-1, required=True)
@click.option("--checkpoint", type=click.Path(), default=None,
              help="A best.pt / last.pt from training [default: $CAPCACHE_CHECKPOINT, else the newest runs/*/best.pt].")
@decode_options
@sampling_options
@click.option("--batch-size", type=bounded("batch_size"), default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--weights", default=None, help="Backbone weights file, if it moved since extraction.")
@click.option("--onnx", "onnx_dir", type=click.Path(), default=None,
              help="Caption with the ONNX export in DIR (onnxruntime, no torch) instead of a checkpoint.")
@click.option("--json", "as_json", is_flag=True,
              help='Print a JSON list of {"image", "caption", "captions": [{"caption", "score"}]}.')
@click.option("--save-figure", "figure_dir", type=click.Path(file_okay=False), default=None,
              help="Also write DIR/<image>.png: the photo, its caption and (beam > 1) the alternatives with scores.")
@click.option("-r", "--recursive", is_flag=True, help="A folder's subfolders too.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--dry-run", is_flag=True, help="Resolve the checkpoint and list the images; load no model.")
def main(images, checkpoint, decode, sampling, batch_size, device, weights, onnx_dir, as_json, figure_dir,
         recursive, no_progress, dry_run):
    """Caption image files (or every image in a folder)."""
    def work():
        if onnx_dir is not None and (checkpoint is not None or weights is not None):
            raise click.UsageError("--onnx DIR replaces --checkpoint and --weights")
        if onnx_dir is not None and device not in ("auto", "cpu"):
            click.echo(f"warning: --device {printable(device)} is not used with --onnx (onnxruntime runs on the "
                       f"CPU here)", err=True)
        source = onnx_dir if onnx_dir is not None else _checkpoint(checkpoint)
        paths = collect_images(list(images), recursive)
        if not paths:
            raise ValueError(nothing_found(images, recursive))
        if dry_run:
            click.echo("\n".join(map(printable, paths)))
            click.echo(f"dry run: {len(paths)} images, {'onnx' if onnx_dir else 'checkpoint'} {source}", err=True)
            return 0
        if figure_dir is not None:
            ready_to_write(figure_dir, "figures into", folder=True)  # before the model runs, not after
        kwargs = {**asdict(decode), **asdict(sampling)}
        shown = sampling.num_captions
        if figure_dir is not None and not sampling.sample:  # the figure lists the beam's alternatives
            kwargs["num_captions"] = max(shown, decode.beam_size)
        results = _results(source, onnx_dir is not None, paths, kwargs, batch_size, device, weights,
                           progress=not no_progress and len(paths) > batch_size)
        out, failed, failed_figures, figure_names = [], 0, 0, set()
        for r in results:
            if "error" in r:
                failed += 1
                click.echo(f"error: {printable(r['error'])}", err=True)
                continue
            if figure_dir is not None:
                # imported on use: matplotlib only when asked
                from stage2_decoder.reporting.figures import figure_path, save_caption_figure

                hyps = [(c["caption"], c["score"]) for c in r["captions"]] if len(r["captions"]) > 1 else None
                target = None
                try:
                    target = figure_path(figure_dir, r["image"], figure_names)
                    save_caption_figure(r["image"], r["caption"], target, hyps, label=Path(r["image"]).name)
                except (OSError, ValueError) as e:  # its caption is still printed; the other photos go on
                    if target is not None:
                        figure_names.discard(target.name)
                    failed_figures += 1
                    click.echo(f"error: {printable(one_line(e))}", err=True)
            r = {**r, "captions": r["captions"][:shown]}
            out.append(r)
            if not as_json:
                click.echo("\n".join(text_lines(r)))
        if as_json:
            click.echo(dump_json(out, indent=2))
        if figure_dir is not None:
            click.echo(f"{len(figure_names)} figures in {figure_dir}", err=True)
        if failed:
            click.echo(f"{failed} of {len(paths)} images could not be read", err=True)
        if failed_figures:
            click.echo(f"{failed_figures} figures could not be written", err=True)
        return 1 if failed or failed_figures else 0

    sys.exit(run_guarded(work))


def _checkpoint(checkpoint: str | None) -> str:
    """The checkpoint to use; says on stderr which one was found when none was named."""

    path = find_checkpoint(checkpoint)
    if checkpoint is None:
        click.echo(f"using checkpoint {path}", err=True)
    return str(path)


def _results(source: str, onnx: bool, paths: list[str], kwargs: dict, batch_size: int, device: str,
             weights: str | None, progress: bool):
    """Result dicts in order: streamed batch by batch from a checkpoint, all at once from an ONNX export."""
    if onnx:  # no torch on this path
        # imported on use: importing this module stays free of PIL, numpy
        from stage2_decoder.serving.onnx_captioner import OnnxCaptioner

        return OnnxCaptioner.load(source).caption(paths, batch_size=batch_size, on_error="return", **kwargs)

    cap = Captioner.load(source, device, weights)
    return cap.caption_iter(paths, batch_size, on_error="return", progress=progress, **kwargs)


if __name__ == "__main__":
    main()
