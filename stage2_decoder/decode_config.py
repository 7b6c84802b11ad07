"""The decoding settings every entry point shares, torch-free (the ONNX captioner's CLI runs without torch).

`common.cli.decode_options` / `sampling_options` turn these fields into click options (help text and
lower bound from each field's metadata), so caption, evaluate and the service declare them once.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def _opt(default, help: str, min=None, max=None):
    return field(default=default, metadata={"help": help, "min": min, "max": max})


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
    temperature: float = _opt(1.0, "Sampling: divide the logits by this (<1 safer, >1 more varied).", min=1e-6)
    top_p: float = _opt(1.0, "Sampling: draw from the smallest word set holding this much probability.",
                        min=1e-6, max=1.0)
    seed: int | None = _opt(None, "Sampling: random seed (same seed, same captions).")
