"""Self-describing checkpoints: plain values only, loaded with `torch.load(weights_only=True)`.

A checkpoint holds everything `caption` needs: the decoder's state_dict and config, the
vocabulary (its word list), and the backbone (name, weights, feature size, preprocessing), plus
the training state for resuming (epoch, optimizer state, RNG state, metrics).
"""
from __future__ import annotations

import os
import pickle
from dataclasses import asdict
from pathlib import Path

import torch

from common.vocab import Vocabulary, VocabError
from stage2_decoder.model import CaptionDecoder, DecoderConfig

CHECKPOINT_FORMAT = "capcache-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable capcache checkpoint."""


def save_checkpoint(path: str | os.PathLike, model: CaptionDecoder, vocab: Vocabulary, backbone: dict,
                    **extra) -> None:
    """Write atomically (temporary name + os.replace): a crash never leaves a truncated .pt."""
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "decoder_config": asdict(model.cfg), "vocab": vocab.to_dict(), "backbone": dict(backbone), **extra}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than plain values and tensors; refusing to "
                              f"unpickle it (weights_only=True)") from e
    except Exception as e:  # zip/format errors: not a torch file at all, or truncated
        raise CheckpointError(f"{path} is not a PyTorch checkpoint file (or it is truncated): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a capcache checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')}; this capcache reads "
                              f"version {CHECKPOINT_VERSION}")
    for k in ("model_state", "decoder_config", "vocab", "backbone"):
        if k not in ckpt:
            raise CheckpointError(f"{path} lacks {k!r}")
    return ckpt


def model_from_checkpoint(ckpt: dict, device="cpu") -> tuple[CaptionDecoder, Vocabulary]:
    """Rebuild the decoder (eval mode) and its vocabulary; strict loading, no silent partial load."""
    try:
        vocab = Vocabulary.from_dict(ckpt["vocab"])
        cfg = DecoderConfig(**ckpt["decoder_config"])
    except (VocabError, TypeError) as e:
        raise CheckpointError(f"checkpoint has a malformed vocabulary or decoder config: {e}") from e
    if cfg.vocab_size != len(vocab):
        raise CheckpointError(f"checkpoint's decoder has {cfg.vocab_size} words but its vocabulary {len(vocab)}")
    model = CaptionDecoder(cfg)
    try:
        model.load_state_dict(ckpt["model_state"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its decoder config: {str(e).splitlines()[0]}") from e
    return model.to(device).eval(), vocab
