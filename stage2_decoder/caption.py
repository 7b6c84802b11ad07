"""Caption raw images with a trained checkpoint (the full encoder reconnected).

    python -m stage2_decoder.caption IMAGE_OR_DIR... --checkpoint runs/NAME/best.pt [--beam-size K]

The backbone is rebuilt from what the checkpoint records and images go through the very
preprocessing stage 1 used (common.backbones), so features match the cached ones.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import torch
from tqdm import tqdm

from common.cli import FINITE

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FIRST_CHUNK = 4  # images in the first batch of a folder (time to the first caption)


@dataclass
class Captioner:
    """Backbone + decoder + vocabulary, rebuilt from one checkpoint."""
    backbone: object  # common.backbones.Backbone
    decoder: object  # stage2_decoder.model.CaptionDecoder
    vocab: object  # common.vocab.Vocabulary

    @classmethod
    def from_checkpoint(cls, path, device: str = "auto", weights: str | None = None) -> "Captioner":
        """`weights` overrides the backbone weights the checkpoint names (e.g. a moved file)."""
        from common.backbones import BackboneError, load_backbone
        from common.device import resolve_device
        from stage2_decoder.checkpoint import load_checkpoint, model_from_checkpoint

        dev = resolve_device(device)
        ckpt = load_checkpoint(path)
        decoder, vocab = model_from_checkpoint(ckpt, dev)
        bb = ckpt["backbone"]
        backbone = load_backbone(bb["name"], weights or bb["weights"], dev, expected_sha256=bb.get("weights_sha256"))
        if backbone.feature_dim != decoder.cfg.feature_dim or backbone.preprocess.describe() != bb["preprocess"]:
            raise BackboneError(f"backbone {bb['name']} built here does not match the checkpoint's "
                                f"(feature size or preprocessing differ)")
        return cls(backbone, decoder, vocab)

    def features(self, paths: list[str]) -> torch.Tensor:
        """Raw image files -> (B, D) features, exactly as stage 1 computes them. Raises ImageError."""
        from common.backbones import load_image_u8

        batch = torch.stack([load_image_u8(p, self.backbone.preprocess) for p in paths])
        return self.backbone.encode(batch)

    def caption_features(self, feats: torch.Tensor, beam_size: int = 3, max_len: int = 20,
                         decode_cfg=None) -> list[str]:
        """(B, D) features -> captions; `decode_cfg` (DecodeConfig) overrides beam_size/max_len."""
        from stage2_decoder.decode import DecodeConfig, decode

        cfg = decode_cfg or DecodeConfig(beam_size=beam_size, max_len=max_len)
        feats = feats.to(next(self.decoder.parameters()).device)
        return [" ".join(self.vocab.decode(s)) for s in decode(self.decoder, feats, cfg)]

    def caption_features_nbest(self, feats: torch.Tensor, decode_cfg) -> list[list[tuple[str, float]]]:
        """(B, D) features -> per image the beam's [(caption, score)], best first (the first is what
        `caption_features` returns for a beam search with the same settings)."""
        from stage2_decoder.decode import beam_search_nbest

        feats = feats.to(next(self.decoder.parameters()).device)
        return [[(" ".join(self.vocab.decode(ids)), score) for ids, score in hyps]
                for hyps in beam_search_nbest(self.decoder, feats, decode_cfg)]


def collect_images(inputs: list[str]) -> list[str]:
    """Files as given; folders expanded to their entries with an image suffix (sorted, not recursive).

    An entry named like an image that is not a readable file (a folder `x.jpg`, a dangling or
    looping symlink) is kept, so it gets its own error line instead of vanishing silently.
    """
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(str(f) for f in sorted(p.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(item)
    return out


def caption_paths(cap: Captioner, paths: list[str], beam_size: int = 3, max_len: int = 20, batch_size: int = 32,
                  progress: bool = False, decode_cfg=None, nbest: bool = False):
    """Yield (path, caption or None, error or None) for each path, batching the readable ones.
    With `nbest` (needs `decode_cfg`) the caption is the beam's [(caption, score)] list, best first."""
    from common.backbones import ImageError, load_image_u8

    bar = tqdm(total=len(paths), unit="img", desc="caption", disable=not progress, leave=False)
    # a small first chunk, so a folder's first caption prints after a few images rather than a whole
    # batch (bench/caption.py: cold start); full batches after it
    starts = [0, *range(min(FIRST_CHUNK, batch_size), len(paths), batch_size)]
    for s, end in zip(starts, [*starts[1:], len(paths)]):
        chunk = paths[s:end]
        good, tensors, errors = [], [], {}
        for p in chunk:
            try:
                tensors.append(load_image_u8(p, cap.backbone.preprocess))
                good.append(p)
            except ImageError as e:
                errors[p] = str(e)
        captions = {}
        if tensors:
            feats = cap.backbone.encode(torch.stack(tensors))
            out = (cap.caption_features_nbest(feats, decode_cfg) if nbest
                   else cap.caption_features(feats, beam_size, max_len, decode_cfg))
            captions = dict(zip(good, out))
        for p in chunk:
            yield p, captions.get(p), errors.get(p)
        bar.update(len(chunk))
    bar.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("images", nargs=-1, required=True)
@click.option("--checkpoint", required=True, type=click.Path(), help="A best.pt / last.pt from training.")
@click.option("--beam-size", type=click.IntRange(min=1), default=3, show_default=True, help="1 = greedy.")
@click.option("--max-len", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--min-len", type=click.IntRange(min=0), default=1, show_default=True, help="Words before <end> may end it.")
@click.option("--length-penalty", type=FINITE, default=0.7, show_default=True,
              help="Beam score = log p / length ** this (0 = plain sum).")
@click.option("--no-repeat-ngram", type=click.IntRange(min=0), default=0, show_default=True,
              help="Forbid repeating n-grams of this size (0 = off).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--weights", default=None, help="Backbone weights file, if it moved since extraction.")
@click.option("--json", "as_json", is_flag=True, help='Print a JSON list of {"image", "caption"}.')
@click.option("--save-figure", "figure_dir", type=click.Path(file_okay=False), default=None,
              help="Also write DIR/<image>.png: the photo, its caption and (beam > 1) the alternatives with scores.")
def main(images, checkpoint, beam_size, max_len, min_len, length_penalty, no_repeat_ngram, batch_size, device,
         weights, as_json, figure_dir):
    """Caption image files (or every image in a folder)."""
    from common.cli import run_guarded
    from stage2_decoder.decode import DecodeConfig

    dcfg = DecodeConfig(beam_size, max_len, min_len, length_penalty, no_repeat_ngram)

    def work():
        cap = Captioner.from_checkpoint(checkpoint, device, weights)
        paths = collect_images(list(images))
        if not paths:
            raise ValueError(f"no image files in {' '.join(images)}")
        results, failed, figure_names = [], 0, set()
        nbest = figure_dir is not None and beam_size > 1  # the figure lists the beam's alternatives
        for path, caption, err in caption_paths(cap, paths, beam_size, max_len, batch_size,
                                                progress=len(paths) > batch_size, decode_cfg=dcfg, nbest=nbest):
            if err is not None:
                failed += 1
                click.echo(f"error: {err}", err=True)
                continue
            if figure_dir is not None:
                from stage2_decoder.figures import figure_path, save_caption_figure  # matplotlib only when asked

                hyps, caption = (caption, caption[0][0]) if nbest else (None, caption)
                save_caption_figure(path, caption, figure_path(figure_dir, path, figure_names), hyps,
                                    label=Path(path).name)
            results.append({"image": path, "caption": caption})
            if not as_json:
                click.echo(f"{path}\t{caption}")
        if as_json:
            click.echo(json.dumps(results, indent=2, ensure_ascii=False))
        if figure_dir is not None:
            click.echo(f"{len(figure_names)} figures in {figure_dir}", err=True)
        if failed:
            click.echo(f"{failed} of {len(paths)} images could not be read", err=True)
        return 1 if failed else 0

    sys.exit(run_guarded(work))


if __name__ == "__main__":
    main()
