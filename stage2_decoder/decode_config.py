"""The decoding settings every entry point shares, torch-free (the ONNX captioner's CLI runs without torch).

`common.cli.decode_options` / `sampling_options` turn these fields into click options (help text and
lower bound from each field's metadata), so caption, evaluate and the service declare them once.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields


def _opt(default, help: str, min=None, max=None, min_open: bool = False):
    """A field with its CLI help and bounds (min_open: the value must exceed min)."""
    return field(default=default, metadata={"help": help, "min": min, "max": max, "min_open": min_open})


def check_bounds(cfg) -> None:
    """ValueError naming the first field of `cfg` outside its bounds (for the Python API's arguments)."""
    for f in fields(cfg):
        value, lo, hi = getattr(cfg, f.name), f.metadata.get("min"), f.metadata.get("max")
        if value is None or isinstance(value, bool):
            continue
        if lo is not None and (value <= lo if f.metadata.get("min_open") else value < lo):
            raise ValueError(f"{f.name} must be {'above' if f.metadata.get('min_open') else 'at least'} {lo}, "
                             f"got {value}")
        if hi is not None and value > hi:
            raise ValueError(f"{f.name} must be at most {hi}, got {value}")


@dataclass
class DecodeConfig:
    """Beam search (greedy when beam_size == 1)."""
    beam_size: int = _opt(3, "Beam width (1 = greedy).", min=1)
    max_len: int = _opt(20, "Most words per caption.", min=1)
    min_len: int = _opt(1, "Words before <end> may end a caption.", min=0)
    length_penalty: float = _opt(0.7, "Beam score = sum log p / length ** this (0 = plain sum).")
    no_repeat_ngram: int = _opt(0, "Forbid repeating n-grams of this size (0 = off).", min=0)


@dataclass
class SampleConfig:
    """How many captions per image, and whether they are drawn at random instead of searched."""
    num_captions: int = _opt(1, "Captions per image: the N best distinct beam hypotheses (beam raised to N), "
                                "or N samples with --sample.", min=1)
    sample: bool = _opt(False, "Draw captions at random (temperature, top-p) instead of beam search.")
    temperature: float = _opt(1.0, "Sampling: divide the logits by this (<1 safer, >1 more varied).", min=0, min_open=True)
    top_p: float = _opt(1.0, "Sampling: draw from the smallest word set holding this much probability.",
                        min=0, max=1.0, min_open=True)
    seed: int | None = _opt(None, "Sampling: random seed (same seed, same captions).")
