"""Self-describing checkpoints: plain values only, loaded with `torch.load(weights_only=True)`.

A checkpoint holds everything `caption` needs: the decoder's state_dict and config, the
vocabulary (its word list), and the backbone (name, weights, feature size, preprocessing), plus
small metadata (epoch, best validation scores, split, training settings). A run's last.pt also
holds the training state for resuming (optimizer, scheduler and RNG state, CUDA's too, history, the
trained weights beside their average); its best.pt does not (`inference_extra`).
"""
from __future__ import annotations

import io
import os
import pickle
from dataclasses import asdict
from pathlib import Path

import torch

from common.atomic import atomic_write
from common.torchload import load_plain
from common.vocab import Vocabulary, VocabError
from stage2_decoder.model import CaptionDecoder, DecoderConfig

CHECKPOINT_FORMAT = "capcache-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable capcache checkpoint."""

def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state_dict as detached CPU tensors: what a checkpoint stores."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def cpu_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """An optimiser's state_dict with its tensors on the CPU (fused Adam keeps even its step counts on the GPU),
    so a GPU run's last.pt loads on any machine; `load_state_dict` moves them back to the parameters' device."""
    sd = opt.state_dict()
    return {**sd, "state": {k: {n: v.detach().cpu() if torch.is_tensor(v) else v for n, v in s.items()}
                            for k, s in sd["state"].items()}}


def save_checkpoint(path: str | os.PathLike, model: CaptionDecoder, vocab: Vocabulary, backbone: dict,
                    **extra) -> None:
    """Write atomically: a crash, a kill or a full disk never leaves a truncated .pt at `path`.

    The checkpoint is serialised in memory first, so torch's zip writer never meets a failing
    disk (it reports that as a bare RuntimeError); the bytes go to `path`.tmp, created afresh
    (O_EXCL: a leftover or planted link there is removed, never followed), are fsynced, then
    renamed over `path`. On any failure the temporary file is removed and the previous `path`,
    if any, is left as it was.
    """
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "model_state": cpu_state(model),
            "decoder_config": asdict(model.cfg), "vocab": vocab.to_dict(), "backbone": dict(backbone), **extra}
    path = Path(path)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    try:
        atomic_write(path, bytes(buf.getbuffer()), what="checkpoint")
    except OSError as e:  # disk full, read-only or vanished folder
        raise CheckpointError(str(e)) from e


BACKBONE_KEYS = ("name", "weights", "feature_dim", "preprocess")
# what only resuming needs: last.pt keeps it, best.pt (what captioning loads) leaves it out (the Adam
# moments and the trained weights beside the averaged ones are 3x the weights: 78 MB vs 19 MB, 10k words)
RESUME_ONLY = ("optimizer_state", "scheduler_state", "rng_state", "cuda_rng_state", "history", "train_model_state",
               "torch_threads", "cache_identity")


def inference_extra(extra: dict) -> dict:
    """The extras of a best.pt: `extra` without the resume-only state (small metadata like epoch,
    best scores, split and train_config stay)."""
    return {k: v for k, v in extra.items() if k not in RESUME_ONLY}


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}" if not path.exists() else f"{path} is not a file")
    try:
        ckpt = load_plain(path, map_location)
    except pickle.UnpicklingError as e:
        if "Unsupported operand" in str(e) or "invalid load key" in str(e):  # not a pickle: an HDF5 file, a PNG
            raise CheckpointError(f"{path} is not a PyTorch checkpoint file") from e
        raise CheckpointError(f"{path} holds objects other than plain values and tensors; refusing to "
                              f"unpickle it (weights_only=True)") from e
    except Exception as e:  # zip/format errors: not a torch file at all, or truncated
        raise CheckpointError(f"{path} is not a PyTorch checkpoint file (or it is truncated): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a capcache checkpoint")
    version = ckpt.get("version")
    if version != CHECKPOINT_VERSION:
        newer = "; it was written by a newer capcache: upgrade" if isinstance(version, int) \
            and version > CHECKPOINT_VERSION else ""
        raise CheckpointError(f"{path} has checkpoint version {version!r}; this capcache reads version "
                              f"{CHECKPOINT_VERSION}{newer}")
    for k in ("model_state", "decoder_config", "vocab", "backbone"):
        if k not in ckpt:
            raise CheckpointError(f"{path} lacks {k!r}")
    bb = ckpt["backbone"]
    if not isinstance(bb, dict) or any(k not in bb for k in BACKBONE_KEYS):
        raise CheckpointError(f"{path}: its backbone description lacks one of {', '.join(BACKBONE_KEYS)}")
    types = {"name": (str,), "weights": (str, type(None)), "weights_sha256": (str, type(None)),
             "feature_dim": (int,), "preprocess": (str,)}
    for k, allowed in types.items():
        v = bb.get(k)
        if not isinstance(v, allowed) or isinstance(v, bool):
            raise CheckpointError(f"{path}: its backbone {k} must be "
                                  f"{' or '.join('None' if t is type(None) else t.__name__ for t in allowed)}, "
                                  f"got {type(v).__name__}")
    if not isinstance(ckpt["model_state"], dict) or not isinstance(ckpt["decoder_config"], dict):
        raise CheckpointError(f"{path}: model_state and decoder_config must be dicts")
    split = ckpt.get("split")
    if split is not None and not (isinstance(split, dict) and all(
            isinstance(v, list) and all(isinstance(k, str) for k in v) for v in split.values())):
        raise CheckpointError(f"{path}: its split must map split names to lists of image keys, got "
                              f"{type(split).__name__}")
    if not isinstance(ckpt.get("train_config", {}), dict):
        raise CheckpointError(f"{path}: its train_config must be a dict, got {type(ckpt['train_config']).__name__}")
    return ckpt


def _check_shapes(probe: CaptionDecoder, state: dict, config: dict) -> None:
    """The weights a config declares must be the weights stored: a config with huge sizes beside small
    tensors is refused before anything that large is allocated."""
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    bad = [k for k in want if k in have and want[k] != have[k]]
    if bad:
        k = bad[0]
        raise CheckpointError(f"checkpoint weights do not fit its decoder config {config}: {k} is stored as "
                              f"{list(have[k])}, the config needs {list(want[k])}")
    missing, extra = sorted(set(want) - set(have)), sorted(map(str, set(state) - set(want)))
    if missing or extra:
        raise CheckpointError("checkpoint weights do not fit its decoder config: "
                              + (f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(extra[:3])}"))


def model_from_checkpoint(ckpt: dict, device="cpu") -> tuple[CaptionDecoder, Vocabulary]:
    """Rebuild the decoder (eval mode) and its vocabulary; strict loading, no silent partial load."""
    try:
        vocab = Vocabulary.from_dict(ckpt["vocab"])
        cfg = DecoderConfig(**ckpt["decoder_config"])
    except (VocabError, TypeError) as e:
        raise CheckpointError(f"checkpoint has a malformed vocabulary or decoder config: {e}") from e
    if cfg.vocab_size != len(vocab):
        raise CheckpointError(f"checkpoint's decoder has {cfg.vocab_size} words but its vocabulary {len(vocab)}")
    try:  # on the meta device first: its parameter shapes, without allocating them
        with torch.device("meta"):
            probe = CaptionDecoder(cfg)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:  # sizes that are not positive ints
        raise CheckpointError(f"checkpoint has an unusable decoder config {ckpt['decoder_config']}: {e}") from e
    _check_shapes(probe, ckpt["model_state"], ckpt["decoder_config"])
    try:
        model = CaptionDecoder(cfg)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint has an unusable decoder config {ckpt['decoder_config']}: {e}") from e
    try:
        model.load_state_dict(ckpt["model_state"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its decoder config: {str(e).splitlines()[0]}") from e
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:  # a diverged run's weights: every caption would be empty, every score NaN
        raise CheckpointError(f"checkpoint weights are not finite (NaN or inf in {', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}): the training that wrote them diverged")
    return model.to(device).eval(), vocab
