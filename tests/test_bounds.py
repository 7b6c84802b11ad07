"""One table of limits (common/bounds.py) for every number setting: the click options, TrainConfig, the
Python API and sweep grids refuse the same values, and the probe's cases are each one clear error."""
from __future__ import annotations

import math
import shutil
import typing
from dataclasses import fields

import click
import pytest
import torch
from click.testing import CliRunner

from common.bounds import BOUNDS, check
from common.cli import Bounded
from reliability_helpers import TINY, no_traceback, one_error_line, tiny_run
from stage1_extract.extract import ExtractConfig
from stage2_decoder.api import Captioner, decode_settings
from stage2_decoder.decoding.config import DecodeConfig, SampleConfig
from stage2_decoder.sweeps.grid import SweepError, normalize_grid
from stage2_decoder.training.config import TrainConfig

CONFIGS = (TrainConfig, DecodeConfig, SampleConfig, ExtractConfig)


def _number_fields(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    kinds = {f.name: next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
             for f in fields(cls)}
    return [n for n, k in kinds.items() if k in (int, float)]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_number_setting_has_its_row_and_its_option_uses_it(cls):
    names = _number_fields(cls)
    assert names and all(n in BOUNDS for n in names), [n for n in names if n not in BOUNDS]


@pytest.mark.parametrize("module", ["stage2_decoder.train", "stage2_decoder.caption", "stage2_decoder.evaluate",
                                    "stage2_decoder.sweep", "stage1_extract.__main__"])
def test_every_number_option_of_the_clis_is_bounded_by_the_table(module):
    import importlib

    main = importlib.import_module(module).main
    for p in main.params:
        if isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType)) \
                and p.name not in ("port",):  # plain int/float: no limit at all
            pytest.fail(f"{module} {p.opts} takes any {p.type.name}")
        if isinstance(p.type, Bounded):
            assert p.type.bound is BOUNDS[p.type.setting]


def _outside(b) -> list:
    """Values just past each end of a bound, and the non-numbers every number setting refuses."""
    out = [float("nan"), float("inf"), "3", True]
    step = 1 if b.kind is int else 1e-6
    if b.lo is not None:
        out.append(b.lo if b.lo_open else b.lo - step)
    if b.hi is not None:
        out.append(b.hi if b.hi_open else b.hi + step)
    if b.kind is int:
        out.append(2.5)
    return out


TRAIN_NUMBERS = _number_fields(TrainConfig)


@pytest.mark.parametrize("name", TRAIN_NUMBERS)
def test_train_cli_grid_and_python_refuse_the_same_values(name):
    b = BOUNDS[name]
    option = Bounded(name)
    for v in _outside(b):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            with pytest.raises(click.BadParameter):
                option.convert(repr(v) if isinstance(v, float) else str(v), None, None)
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')}"):
            TrainConfig(features="f", out="o", **{name: v})
        with pytest.raises(SweepError, match=repr(name)):
            normalize_grid({name: [v]})
    for v in (b.lo, b.hi):  # the ends themselves, where closed, pass all three
        if v is None or (v == b.lo and b.lo_open) or (v == b.hi and b.hi_open):
            continue
        v = b.kind(v)
        assert option.convert(str(v), None, None) == v
        assert getattr(TrainConfig(features="f", out="o", **{name: v}), name) == v
        assert normalize_grid({name: [v]}) == {name: [v]}


@pytest.mark.parametrize("name", [f.name for cls in (DecodeConfig, SampleConfig) for f in fields(cls)
                                  if f.name in BOUNDS])
def test_decode_cli_and_python_api_refuse_the_same_values(name):
    b = BOUNDS[name]
    for v in _outside(b):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            decode_settings(**{name: v})
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            with pytest.raises(click.BadParameter):
                Bounded(name).convert(repr(v) if isinstance(v, float) else str(v), None, None)


# --- the probe's cases ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("module, args, option", [
    ("stage2_decoder.caption", ["x.jpg", "--max-len", "100000000"], "--max-len"),
    ("stage2_decoder.caption", ["x.jpg", "--max-len", "1e8"], "--max-len"),
    ("stage2_decoder.caption", ["x.jpg", "--beam-size", "100000"], "--beam-size"),
    ("stage2_decoder.caption", ["x.jpg", "--num-captions", "100000"], "--num-captions"),
    ("stage2_decoder.caption", ["x.jpg", "--length-penalty", "1e308"], "--length-penalty"),
    ("stage2_decoder.evaluate", ["--features", "x.h5", "--length-penalty", "1e308"], "--length-penalty"),
    ("stage2_decoder.evaluate", ["--features", "x.h5", "--max-len", "100000000"], "--max-len"),
    ("stage2_decoder.train", ["--features", "x.h5", "--out", "r", "--num-layers", "100000", "--hidden-size", "32"],
     "--num-layers"),
    ("stage2_decoder.train", ["--features", "x.h5", "--out", "r", "--epochs", str(10**308)], "--epochs"),
    ("stage2_decoder.train", ["--features", "x.h5", "--out", "r", "--vocab-threshold", "100000000"],
     "--vocab-threshold"),
    ("stage2_decoder.sweep", ["--features", "x.h5", "--out", "s", "--grid", "g.json", "--random", str(10**9)],
     "--random"),
])
def test_unbounded_options_of_the_probe_are_usage_errors(module, args, option):
    import importlib

    r = CliRunner().invoke(importlib.import_module(module).main, [*args, "--dry-run"])
    assert r.exit_code == 2, r.output
    no_traceback(r)
    assert "Error" in r.stderr and option in r.stderr


@pytest.mark.parametrize("kwargs, says", [
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 1e-300}, "temperature"),  # logits / 1e-300 overflow float32 to -inf: NaN probabilities
    ({"top_p": float("nan")}, "top_p"),
    ({"beam_size": 2.5}, "beam_size"),
    ({"seed": 2**70}, "seed"),
    ({"length_penalty": float("nan")}, "length_penalty"),
    ({"length_penalty": float("inf")}, "length_penalty"),
    ({"length_penalty": 1e308}, "length_penalty"),
    ({"max_len": 10**8}, "max_len"),
    ({"num_captions": 10**6}, "num_captions"),
    ({"sample": "yes"}, "sample"),
])
def test_python_api_values_the_cli_refuses_are_value_errors_naming_the_argument(kwargs, says):
    with pytest.raises(ValueError, match=f"^{says} must be"):
        decode_settings(**kwargs)


def test_a_huge_integer_is_named_without_being_printed_whole():
    with pytest.raises(ValueError) as e:
        check("seed", 10**5000)
    assert len(str(e.value)) < 200 and "digits" in str(e.value)
    assert check("lr", 1) == 1.0 and math.isfinite(check("length_penalty", 5))


@pytest.fixture(scope="module")
def run_dir(shared_cache, tmp_path_factory):
    return tiny_run(shared_cache, tmp_path_factory)


def test_captioner_takes_one_path_as_a_list_of_one(run_dir, tmp_path):
    cap = Captioner.load(run_dir / "best.pt", "cpu")
    missing = str(tmp_path / "photo.jpg")
    out = cap.caption(missing, on_error="return")  # a str, not a list: one image, not one per character
    assert len(out) == 1 and out[0]["image"] == missing and "error" in out[0]
    with pytest.raises(ValueError, match="batch_size"):
        cap.caption([missing], batch_size=2.5)
    with pytest.raises(ValueError, match="^images must be"):
        cap.caption(42)


# --- train: a vocabulary without words, a last.pt without a best score ------------------------------------

def test_a_vocabulary_threshold_that_leaves_no_word_is_one_clear_error(shared_cache, tmp_path):
    from stage2_decoder.training.loop import train

    cfg = TrainConfig(features=str(shared_cache), out=str(tmp_path / "run"), epochs=1, scst_epochs=0,
                      batch_size=16, dry_run=True, **{**TINY, "vocab_threshold": 1_000_000})
    with pytest.raises(ValueError, match="--vocab-threshold 1000000 leaves no word"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("field, value, says", [
    ("best", {"epoch": 1}, "its best has no score"),
    ("best", {"score": "high", "epoch": 1}, "its best has no score"),
    ("best", {"score": 0.5, "epoch": 7}, "its best epoch is 7"),
    ("best", {"score": 0.5, "epoch": 1, "val_loss": "low"}, "not a number"),
    ("best", [1, 2], "cannot resume"),
    ("history", "abc", "its history is not a list of epoch records"),
    ("epoch", -3, "its epoch is -3"),
])
def test_resuming_from_a_damaged_last_pt_is_one_clear_error(shared_cache, run_dir, tmp_path, field, value, says):
    from stage2_decoder.train import main

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt[field] = value
    torch.save(ckpt, run / "last.pt")
    args = ["--features", shared_cache, "--out", run, "--epochs", 2, "--scst-epochs", 0, "--batch-size", 16,
            "--dry-run", "--no-progress", *[x for k, v in TINY.items() if k != "progress"
                                              for x in (f"--{k.replace('_', '-')}", v)]]
    line = one_error_line(CliRunner().invoke(main, [str(a) for a in args]))
    assert says in line and str(run / "last.pt") in line
