"""Sweep grids: load, check, expand or sample a grid of TrainConfig settings; name each run (docs/sweeps.md)."""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import os
import random
import re
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from common.bounds import BOUNDS, check
from common.jsonio import JSONFileError, read_json
from stage2_decoder.training.config import TrainConfig

# set by the sweep itself (its option), not by the grid
SWEEP_OWNED = {"features": "--features", "out": "--out", "progress": "--no-progress", "dry_run": "--dry-run"}


MAX_NAME = 96


class SweepError(ValueError):
    """A grid or sweep setting that cannot work (unknown key, wrong type, empty list...)."""

def _train_fields() -> dict:
    return {f.name: f for f in fields(TrainConfig)}


def _coerce(name: str, value, default):
    """`value` as the type of the TrainConfig field's default (ints stay ints: run names depend on it)."""
    kind = ("true or false" if isinstance(default, bool) else "an integer" if isinstance(default, int)
            else "a number" if isinstance(default, float) else "a string")
    bad = SweepError(f"grid value {_short(value)} for {name!r} should be {kind}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            raise bad
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise SweepError(f"grid value {_short(value)} for {name!r} is too large for a number") from None
    if value is None and default is None:
        return None
    if not isinstance(value, str):
        raise bad
    return value


def _bounded(name: str, raw, value):
    """`value` (`raw` coerced) if the CLI's option would take it (common.bounds: no NaN lr, no 1e308 epochs)."""
    if name not in BOUNDS or value is None:
        return value
    try:
        check(name, value)
    except ValueError:
        raise SweepError(f"grid value {_short(raw)} for {name!r} should be {BOUNDS[name].describe()} "
                         f"(as --{name.replace('_', '-')})") from None
    return value


def _chosen(name: str, value):
    """`value` if it is one of the setting's choices (TrainConfig.CHOICES), as the CLI's option would take it."""
    choices = TrainConfig.CHOICES.get(name)
    if choices is not None and value not in choices:
        raise SweepError(f"grid value {_short(value)} for {name!r} should be one of {', '.join(choices)}")
    return value


def _short(value) -> str:
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 200 else "a huge integer"
    return text if len(text) <= 40 else text[:37] + "..."


def normalize_grid(grid: dict) -> dict[str, list]:
    """Check a grid against TrainConfig: known keys, values of the field's type; scalars -> [scalar]."""
    if not isinstance(grid, dict) or not grid:
        raise SweepError("the grid must be a non-empty JSON object mapping training settings to lists of values")
    known = _train_fields()
    out = {}
    for key, values in grid.items():
        if key in SWEEP_OWNED:
            raise SweepError(f"grid key {key!r} is set by the sweep itself ({SWEEP_OWNED[key]}), not by the grid")
        fl = known.get(key)
        if fl is None:
            names = [k for k in known if k not in SWEEP_OWNED]
            close = difflib.get_close_matches(key, names, n=1)
            raise SweepError(f"unknown grid key {key!r}: " + (f"did you mean {close[0]!r}?" if close else
                                                              f"the training settings are {', '.join(names)}"))
        values = values if isinstance(values, list) else [values]
        if not values:
            raise SweepError(f"grid key {key!r} has an empty list of values")
        default = None if fl.default is MISSING else fl.default
        vals = [_chosen(key, _bounded(key, v, _coerce(key, v, default))) for v in values]
        if len(set(map(repr, vals))) != len(vals):
            raise SweepError(f"grid key {key!r} lists a value twice: {values}")
        out[key] = vals
    return out


def load_grid(path: str | os.PathLike) -> dict[str, list]:
    """Read and check a JSON grid file."""
    path = Path(path)
    try:
        grid = read_json(path, "grid file", expect=dict, reject_duplicate_keys=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"grid file not found: {path}") from None
    except JSONFileError as e:
        raise SweepError(str(e)) from None
    return normalize_grid(grid)


MAX_RUNS = 10_000  # points one sweep expands or samples: more is a typo (or a hostile grid), not a plan


def expand_grid(grid: dict) -> list[dict]:
    """Every point of the grid's product, in file order (the last key varies fastest); its size is
    checked before anything is built."""
    g = normalize_grid(grid)
    total = math.prod(len(v) for v in g.values())
    if total > MAX_RUNS:
        raise SweepError(f"the grid has {total:,} points ({' x '.join(str(len(v)) for v in g.values())}); at most "
                         f"{MAX_RUNS:,} are expanded: draw some of them with --random N")
    return [dict(zip(g, combo)) for combo in itertools.product(*g.values())]


def sample_grid(grid: dict, n: int, seed: int = 0) -> list[dict]:
    """`n` distinct points of the product drawn with `seed` (all of it if n >= its size), in product order.

    Points are drawn by index, so a huge product is never built in memory.
    """
    if n < 1:
        raise SweepError(f"--random must be at least 1, got {n}")
    if n > MAX_RUNS:
        raise SweepError(f"--random {n:,} is more than the {MAX_RUNS:,} runs one sweep holds")
    g = normalize_grid(grid)
    sizes = [len(v) for v in g.values()]
    total = math.prod(sizes)
    rng = random.Random(seed)
    if total <= sys.maxsize:
        chosen = sorted(rng.sample(range(total), min(n, total)))
    else:  # past sys.maxsize a range has no len() for sample(); n distinct indices drawn one by one
        picked: set[int] = set()
        while len(picked) < n:
            picked.add(rng.randrange(total))
        chosen = sorted(picked)
    points = []
    for index in chosen:
        combo = []
        for size in reversed(sizes):  # mixed radix, the last key is the fastest digit
            index, digit = divmod(index, size)
            combo.append(digit)
        points.append({k: v[d] for (k, v), d in zip(g.items(), reversed(combo))})
    return points


def varied_keys(grid: dict[str, list]) -> list[str]:
    return [k for k, v in grid.items() if len(v) > 1]


def format_value(v) -> str:
    return format(v, "g") if isinstance(v, float) else str(v)


def format_point(point: dict) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in point.items())


def run_digest(name: str) -> str:
    """The hash of a run's settings that ends its folder name ("lr=0.001-f1b8b1be" -> "f1b8b1be")."""
    return name.rsplit("-", 1)[-1]


def effective(params: dict) -> dict:
    """`params` without the settings at TrainConfig's default: what a run trains with beyond the defaults, so
    `"dropout": 0.5` spelt out and left out are one run."""
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    return {k: v for k, v in params.items()
            if not (k in defaults and v == defaults[k] and isinstance(v, bool) == isinstance(defaults[k], bool))}


def run_name(params: dict, varied: list[str], features: str, spelt: bool = False) -> str:
    """Deterministic, readable, file-system-safe: the varied settings plus a hash of the effective settings.
    `spelt`: the hash of every setting as given, defaults included (how folders were named before `effective`)."""
    ident = json.dumps({"features": os.path.abspath(features), **(params if spelt else effective(params))},
                       sort_keys=True)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:8]
    readable = ",".join(f"{k}={format_value(params[k])}" for k in varied)
    readable = re.sub(r"[^A-Za-z0-9._=,+-]", "_", readable)[:MAX_NAME]
    return f"{readable}-{digest}" if readable else f"run-{digest}"


@dataclass
class RunSpec:
    name: str
    run_dir: str
    features: str
    params: dict[str, int | float | str | bool | None]  # TrainConfig fields this run sets (grid point + fixed settings)
