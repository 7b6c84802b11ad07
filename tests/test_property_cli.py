"""Property: whatever option values and JSON shapes the entry points' parsing layer is given, the answer is
success, click's usage error (exit 2, naming the problem) or one `error:` line (exit 1), never a traceback.

Random values (huge and negative integers, nan, inf, 1e308, strings) go to every number and choice option of
the CLIs, random JSON documents (nested, of every type, with training-setting keys) to the sweep grid loader
and the report loader. Nothing here reaches a model: the inputs named are missing, so each command stops at
its first read after parsing.
"""
from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.cli import Bounded
from stage2_decoder.training.config import TrainConfig

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NUMBERS = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1e308", "-1e308", "nan", "inf", "-inf", "1e8", "100000", "0", "-1", "2.5", "", " ", "0x10",
                     "1_000", str(2**63), str(-(2**63) - 1), "\x00", "é"]),
    st.text(max_size=8),
)

# each command: its fixed arguments (inputs that do not exist) and its options to vary
COMMANDS = {
    "stage2_decoder.caption": ["MISSING.jpg", "--checkpoint", "MISSING.pt", "--dry-run"],
    "stage2_decoder.evaluate": ["--checkpoint", "MISSING.pt", "--features", "MISSING.h5", "--dry-run"],
    "stage2_decoder.train": ["--features", "MISSING.h5", "--out", "run", "--dry-run", "--device", "cpu"],
    "stage2_decoder.sweep": ["--features", "MISSING.h5", "--out", "sweep", "--grid", "MISSING.json", "--dry-run"],
    "stage1_extract.__main__": ["--images", "MISSING", "--captions", "MISSING.json", "--out", "c.h5", "--dry-run"],
}


def _varied_options(module: str) -> list[str]:
    """The number and choice options of a command (paths and free strings are left as given)."""
    main = importlib.import_module(module).main
    return [p.opts[0] for p in main.params if isinstance(p, click.Option) and not p.is_flag
            and isinstance(p.type, (Bounded, click.Choice, click.types.IntParamType, click.types.FloatParamType))]


def assert_clean(result) -> None:
    """Exit 0, 2 with click's usage error, or 1 with exactly one `error:` line; no traceback anywhere."""
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), repr(exc)
    assert "Traceback" not in result.output, result.output
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.output)
    if result.exit_code == 2:
        assert "Error: " in result.stderr, result.stderr
    elif result.exit_code == 1:
        lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def _invoke(module: str, args: list[str]):
    return CliRunner().invoke(importlib.import_module(module).main, args)


@pytest.mark.parametrize("module", list(COMMANDS))
def test_random_option_values_are_refused_cleanly(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the relative outputs named above, should a command get that far
    options = _varied_options(module)
    assert options

    @SETTINGS
    @given(st.lists(st.tuples(st.sampled_from(options), NUMBERS), min_size=1, max_size=3))
    def check(chosen):
        assert_clean(_invoke(module, [*COMMANDS[module], *(x for pair in chosen for x in pair)]))

    check()


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
TRAIN_KEYS = [f for f in TrainConfig.__dataclass_fields__ if f not in ("RESUME_FIXED",)]
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(TRAIN_KEYS), st.text(max_size=5)),
                                                 inner, max_size=4)), max_leaves=12)


def _deep(n: int, opener: str) -> str:
    return (opener * n) + ("]" * n if opener == "[" else "1" + "}" * n)


JSON_TEXTS = st.one_of(
    JSON_VALUES.map(json.dumps),  # NaN and Infinity included, as Python writes them
    st.builds(_deep, st.integers(min_value=1, max_value=20_000), st.sampled_from(["[", '{"a":'])),
    st.text(max_size=30),
)


@SETTINGS
@given(JSON_TEXTS)
def test_random_grid_files_are_refused_cleanly(text):
    with tempfile.TemporaryDirectory() as d:
        grid = Path(d) / "grid.json"
        grid.write_text(text, encoding="utf-8", errors="surrogatepass")
        from stage2_decoder.sweep import main

        result = CliRunner().invoke(main, ["--features", str(Path(d) / "MISSING.h5"), "--out", str(Path(d) / "s"),
                                           "--grid", str(grid), "--dry-run"])
        assert_clean(result)
        assert result.exit_code != 0  # the cache is missing: at best the grid passes and the cache is refused
        assert not (Path(d) / "s").exists()


@SETTINGS
@given(JSON_TEXTS)
def test_random_report_files_are_refused_cleanly(text):
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "eval.json"
        src.write_text(text, encoding="utf-8", errors="surrogatepass")
        from stage2_decoder.report import main

        assert_clean(CliRunner().invoke(main, [str(src), "--out", str(Path(d) / "r.html"), "--dry-run"]))


@SETTINGS
@given(st.lists(JSON_TEXTS, min_size=1, max_size=4))
def test_random_metrics_files_are_refused_cleanly(lines):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "metrics.jsonl").write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        from stage2_decoder.plot import main

        assert_clean(CliRunner().invoke(main, [d, "--dry-run"]))
