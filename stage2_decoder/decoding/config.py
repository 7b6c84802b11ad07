"""The decoding settings every entry point shares, torch-free (the ONNX captioner's CLI runs without torch).

`common.cli.decode_options` / `sampling_options` turn these fields into click options (help text from each
field's metadata, limits from common.bounds.BOUNDS by the field's name), so caption, evaluate and the service
declare them once, and the Python API checks its arguments against the same limits (`check_bounds`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from common.bounds import check_fields


def _opt(default, help: str):
    """A field with its CLI help (its limits are common.bounds.BOUNDS[its name])."""
    return field(default=default, metadata={"help": help})


def check_bounds(cfg) -> None:
    """ValueError naming the first field of `cfg` that is not a value its CLI option would take (a number of
    the wrong type, nan, inf, out of common.bounds' limits; a bool field that is not True or False)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(f.default, bool) and not isinstance(value, bool):
            raise ValueError(f"{f.name} must be True or False, got {value!r}")
    check_fields(cfg)


@dataclass
class DecodeConfig:
    """Beam search (greedy when beam_size == 1)."""
    beam_size: int = _opt(3, "Beam width (1 = greedy).")
    max_len: int = _opt(20, "Most words per caption.")
    min_len: int = _opt(1, "Words before <end> may end a caption.")
    length_penalty: float = _opt(0.7, "Beam score = sum log p / length ** this (0 = plain sum).")
    no_repeat_ngram: int = _opt(0, "Forbid repeating n-grams of this size (0 = off).")


@dataclass
class SampleConfig:
    """How many captions per image, and whether they are drawn at random instead of searched."""
    num_captions: int = _opt(1, "Captions per image: the N best distinct beam hypotheses (beam raised to N), "
                                "or N samples with --sample.")
    sample: bool = _opt(False, "Draw captions at random (temperature, top-p) instead of beam search.")
    temperature: float = _opt(1.0, "Sampling: divide the logits by this (<1 safer, >1 more varied).")
    top_p: float = _opt(1.0, "Sampling: draw from the smallest word set holding this much probability.")
    seed: int | None = _opt(None, "Sampling: random seed (same seed, same captions).")
