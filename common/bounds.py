"""The limits of every number an entry point takes, in one table: the click options (common/cli.py), the
Python API's arguments (stage2_decoder/api.py), TrainConfig, the sweep grids and the service's decode
options all check a setting here by its name, so a value one of them refuses every other refuses too.

A limit is where a value stops being a setting and becomes a typo or an attack: `--max-len 1e8` allocates
for minutes, `--num-layers 100000` passes the weight cap and runs for hours, `epochs: 1e308` in a grid never
ends, `--length-penalty 1e308` overflows. Torch-free (the ONNX captioner's CLI runs without torch).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what torch (seeds) and numpy take


@dataclass(frozen=True)
class Bound:
    """A number of type `kind` (int or float) in [lo, hi] (an open end excludes it); floats are finite."""
    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.lo is not None and self.hi is not None:
            if self.kind is int:
                return f"{what} from {self.lo} to {self.hi}"
            return f"{what} in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{what} {'above' if self.lo_open else 'of at least'} {self.lo}"
        if self.hi is not None:
            return f"{what} {'below' if self.hi_open else 'of at most'} {self.hi}"
        return "a finite number" if self.kind is float else what

    def holds(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)


def _int(lo, hi) -> Bound:
    return Bound(int, lo, hi)


MAX_BEAM = 64  # wider beams find nothing better (docs/defaults.md) and cost beam x the memory
MAX_TOKENS = 200  # words per decoded caption; a chars model's caption fits (docs/own-photos.md)
MAX_EPOCHS = 10_000
SEED = _int(INT64_MIN, INT64_MAX)

BOUNDS: dict[str, Bound] = {
    # decoding: caption, evaluate, serve, the Python API, the ONNX captioner (DecodeConfig, SampleConfig)
    "beam_size": _int(1, MAX_BEAM),
    "max_len": _int(1, MAX_TOKENS),
    "min_len": _int(0, MAX_TOKENS),
    "length_penalty": Bound(float, 0.0, 5.0),
    "no_repeat_ngram": _int(0, MAX_TOKENS),
    "num_captions": _int(1, MAX_BEAM),
    # below 0.001 sampling is the argmax already; near 0, logits / temperature overflow float32 to -inf (NaN draws)
    "temperature": Bound(float, 0.001, 100.0),
    "top_p": Bound(float, 0.0, 1.0, lo_open=True),
    "seed": SEED,  # sampling, training and --random's seed alike
    "batch_size": _int(1, 65_536),  # images per captioning batch, captions per training batch
    "first_chunk": _int(1, 65_536),  # the API's first, smaller batch (caption_iter)
    # training (TrainConfig): the CLI, sweep grids and train(cfg) from Python
    "epochs": _int(1, MAX_EPOCHS),
    "lr": Bound(float, 0.0, 10.0, lo_open=True),
    "weight_decay": Bound(float, 0.0, 10.0),
    "grad_clip": Bound(float, 0.0, 1e6, lo_open=True),
    "embed_size": _int(1, 16_384),
    "hidden_size": _int(1, 16_384),
    "num_layers": _int(1, 8),  # with the weight cap (training/loop.py): deep and narrow is as slow as wide
    "dropout": Bound(float, 0.0, 1.0, hi_open=True),
    "vocab_threshold": _int(1, 1_000_000),
    "max_caption_len": _int(1, 1_000),
    "val_frac": Bound(float, 0.0, 1.0, hi_open=True),
    "test_frac": Bound(float, 0.0, 1.0, hi_open=True),
    "split_seed": SEED,
    "label_smoothing": Bound(float, 0.0, 1.0, hi_open=True),
    "ema_decay": Bound(float, 0.0, 1.0, hi_open=True),
    "ema_start": _int(0, 10**9),
    "length_buckets": _int(1, 1_000_000),
    "patience": _int(0, MAX_EPOCHS),
    "lr_patience": _int(0, MAX_EPOCHS),
    "lr_factor": Bound(float, 0.0, 1.0, lo_open=True, hi_open=True),
    "scst_epochs": _int(0, MAX_EPOCHS),
    "scst_lr": Bound(float, 0.0, 10.0, lo_open=True),
    "scst_samples": _int(1, MAX_BEAM),
    "scst_max_len": _int(1, MAX_TOKENS),
    "val_beam_size": _int(1, MAX_BEAM),
    "val_images": _int(0, 10**9),
    # stage 1 (ExtractConfig) and evaluate's raw-image mode
    "workers": _int(0, 256),
    "limit": _int(1, 10**9),
    "views": _int(1, 4),  # common.preprocess.VIEWS
    "dist_timeout_s": Bound(float, 1.0, 7 * 24 * 3600.0),
    "html_max": _int(0, 10**9),
    # sweeps
    "n_jobs": _int(1, 1_024),
    "threads": _int(1, 1_024),
    "random": _int(0, 10_000),  # sweeps.grid.MAX_RUNS
}


def _show(value) -> str:
    """A value for an error message, short (a 10,000-digit integer is not printed whole)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1:,} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check(name: str, value, label: str | None = None):
    """`value` as BOUNDS[name] says (an int, or a finite float), else ValueError naming `label` (default:
    `name`): a bool, a string, 2.5 for an integer, nan, inf or a value out of range."""
    b, label = BOUNDS[name], label or name
    if b.kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{label} must be {b.describe()}, got {_show(value)}")
        v = int(value)
    else:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{label} must be {b.describe()}, got {_show(value)}")
        try:
            v = float(value)
        except OverflowError:  # an int past the float range
            raise ValueError(f"{label} must be {b.describe()}, got {_show(value)}") from None
        if not math.isfinite(v):
            raise ValueError(f"{label} must be {b.describe()}, got {_show(value)}")
    if not b.holds(v):
        raise ValueError(f"{label} must be {b.describe()}, got {_show(value)}")
    return v


def check_fields(cfg, label=lambda name: name) -> None:
    """Check every field of dataclass `cfg` that has a row in BOUNDS (None means "not set" and passes);
    the ValueError names the field as `label(name)` says."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in BOUNDS and value is not None:
            check(f.name, value, label(f.name))
