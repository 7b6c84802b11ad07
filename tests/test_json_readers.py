"""The JSON files stage 2 reads back (a sweep grid, an evaluate report, metrics.jsonl, config.json,
results.json, split.json, a run's result.json, stage 1's meta.json) go through common/jsonio.py: nested
100,000 levels deep, of the wrong shape, or with wrong-typed fields, each is one error naming the file."""
from __future__ import annotations

import json
import os
import threading

import pytest
from click.testing import CliRunner

from reliability_helpers import one_error_line

DEEP = "[" * 100_000 + "]" * 100_000
DEEP_OBJECT = '{"a":' * 100_000 + "1" + "}" * 100_000


# --- sweep grids ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, says", [
    (DEEP, "nested deeper than"),
    ('{"lr": [0.001], "hidden_size": [16], "lr": [0.01]}', "names the key 'lr' twice"),
    ('{"lr": [NaN]}', "'lr' should be a number in (0.0, 10.0]"),
    ('{"lr": Infinity}', "'lr' should be a number"),
    ('{"seed": [1e20]}', "'seed' should be an integer"),
    ('{"epochs": [1e308]}', "'epochs' should be an integer from 1 to 10000"),
    ('{"num_layers": [100000], "hidden_size": [32]}', "'num_layers' should be an integer from 1 to 8"),
    ('{"vocab_threshold": [100000000]}', "'vocab_threshold' should be an integer"),
    ("[1, 2]", "must be a JSON object"),
])
def test_a_bad_grid_file_is_one_error_line_before_anything_runs(tmp_path, text, says):
    from stage2_decoder.sweep import main

    grid = tmp_path / "grid.json"
    grid.write_text(text)
    line = one_error_line(CliRunner().invoke(main, ["--features", str(tmp_path / "none.h5"), "--out",
                                                    str(tmp_path / "s"), "--grid", str(grid)]))
    assert says in line, line
    assert not (tmp_path / "s").exists()


def test_a_grid_that_is_a_fifo_is_refused_without_hanging(tmp_path):
    from stage2_decoder.sweeps.grid import SweepError, load_grid

    fifo = tmp_path / "grid.json"
    os.mkfifo(fifo)
    result = []

    def load():
        try:
            load_grid(fifo)
        except SweepError as e:
            result.append(str(e))

    t = threading.Thread(target=load, daemon=True)  # on a hang the daemon thread is left blocked, the test fails
    t.start()
    t.join(10)
    assert result and "not a regular file" in result[0]


# --- report, plot, samples -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, says", [
    (DEEP, "nested deeper than"),
    (DEEP_OBJECT, "nested deeper than"),
    ('{"images": "x"}', "not an `evaluate --json` output"),
    ('{"images": [], "metrics": [1]}', "metrics"),
])
def test_report_of_a_hostile_eval_json_is_one_error_line(tmp_path, text, says):
    from stage2_decoder.report import main

    src = tmp_path / "eval.json"
    src.write_text(text)
    line = one_error_line(CliRunner().invoke(main, [str(src), "--out", str(tmp_path / "r.html"), "--dry-run"]))
    assert says in line and str(src) in line


@pytest.mark.parametrize("lines, says", [
    ([DEEP], "nested deeper than"),
    (["[1, 2]"], "must be a JSON object"),
    (['{"epoch": "one"}'], "its epoch is 'one'"),
    (['{"epoch": 1e308}'], "its epoch is 1e+308"),
    (['{"epoch": true}'], "its epoch is True"),
])
def test_plot_of_a_hostile_metrics_jsonl_is_one_error_line(tmp_path, lines, says):
    from stage2_decoder.plot import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    line = one_error_line(CliRunner().invoke(main, [str(run)]))
    assert says in line and "metrics.jsonl" in line


def test_plot_reads_a_run_whose_config_json_is_hostile_as_an_old_run(tmp_path):
    from stage2_decoder.reporting.curves import run_config

    for text in (DEEP, "[1]", "{bad"):
        (tmp_path / "config.json").write_text(text)
        assert run_config(tmp_path) == {}


def test_plot_draws_a_run_whose_config_json_holds_text_for_the_beam_width(tmp_path):
    """`"val_beam_size": "$\\frac{1}{$"` went into the legend as mathtext: the plot failed, curves.png not drawn."""
    from stage2_decoder.plot import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 3.0, "val_loss": 3.1,
                                                   "val_perplexity": 22.0, "val_cider": 0.2}) + "\n")
    (run / "config.json").write_text(json.dumps({"val_beam_size": "$\\frac{1}{$"}))
    r = CliRunner().invoke(main, [str(run)])
    assert r.exit_code == 0, r.output
    assert (run / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("results, says", [
    (DEEP, "nested deeper than"),
    ({"metric": "bleu", "varied": [], "rows": []}, "'metric' is not one of"),
    ({"metric": "cider", "varied": "lr", "rows": []}, "'varied' is not a list"),
    ({"metric": "cider", "varied": ["lr"], "rows": [[1, 2]]}, "'rows' is not a list of run objects"),
    ({"metric": "cider", "varied": ["lr"], "rows": [{"status": "ok", "val_cider": "high"}]},
     "rows[0].val_cider is 'high'"),
    ({"metric": "cider", "varied": ["lr"], "rows": [{"status": "ok", "params": [1]}]}, "'params'"),
])
def test_plot_of_a_hostile_sweep_results_json_is_one_error_line(tmp_path, results, says):
    from stage2_decoder.plot import main

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
    line = one_error_line(CliRunner().invoke(main, [str(sweep)]))
    assert says in line and "results.json" in line


@pytest.mark.parametrize("text", [DEEP, "[1, 2]", '{"test": "abc"}', '{"test": [1, 2]}'])
def test_samples_of_a_hostile_split_json_is_one_error(tmp_path, shared_cache, text):
    from stage2_decoder.samples import split_image_paths

    (tmp_path / "split.json").write_text(text)
    with pytest.raises(ValueError, match="split"):
        split_image_paths(str(tmp_path), str(shared_cache))


def test_samples_prints_any_name_one_per_line_or_exactly_with_print0(tmp_path, shared_cache, monkeypatch):
    """Names were printed raw (a line break made two lines), and `make demo` split names with spaces."""
    import os

    import stage2_decoder.samples as samples
    from click.testing import CliRunner

    odd = ["/p/a b.jpg", "/p/ne\nw.jpg", os.fsdecode(b"/p/caf\xe9.jpg")]
    monkeypatch.setattr(samples, "split_image_paths", lambda *a: odd)
    text = CliRunner().invoke(samples.main, [str(tmp_path), "--features", str(shared_cache)])
    assert text.exit_code == 0 and len(text.stdout.splitlines()) == 3 and "/p/a b.jpg" in text.stdout
    raw = CliRunner().invoke(samples.main, [str(tmp_path), "--features", str(shared_cache), "--print0"])
    assert raw.stdout_bytes.split(b"\0")[:-1] == [os.fsencode(p) for p in odd]


# --- a sweep run's result.json, a resumed run's config.json, stage 1's meta.json -----------------------------

@pytest.mark.parametrize("hostile", [
    DEEP, "[1]",
    {"status": "ok", "val_cider": "high"},
    {"status": "ok", "val_cider": 0.5, "best_epoch": "one"},
    {"status": "ok", "val_cider": float("nan")},
    {"status": ["ok"]},
])
def test_a_hostile_result_json_means_the_run_is_redone(tmp_path, hostile):
    from stage2_decoder.sweeps.grid import RunSpec
    from stage2_decoder.sweeps.run import read_result, record

    spec = RunSpec("r", str(tmp_path), "f.h5", {"lr": 0.001})
    good = {**record(spec, "ok", val_cider=0.5, val_loss=2.0, best_epoch=1, epochs_run=1, seconds=1.0,
                      checkpoint="x"), "started_at": 1.0}
    (tmp_path / "result.json").write_text(json.dumps(good))
    assert read_result(spec) == good
    text = hostile if isinstance(hostile, str) else json.dumps({**good, **hostile})
    (tmp_path / "result.json").write_text(text)
    assert read_result(spec) is None


def test_a_hostile_config_json_is_ignored_on_resume(tmp_path):
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.resume import run_config

    cfg = TrainConfig(features="f", out=str(tmp_path))
    for text in (DEEP, "[1]", '{"resumed": "x", "epochs": 3}'):
        (tmp_path / "config.json").write_text(text)
        if text.startswith("{"):
            out = run_config(tmp_path, cfg, start_epoch=1)
        else:  # unreadable: said, since its record of earlier resumes is lost
            with pytest.warns(UserWarning, match="config.json could not be read"):
                out = run_config(tmp_path, cfg, start_epoch=1)
        assert out["epochs"] == cfg.epochs


@pytest.mark.parametrize("text", [DEEP, "[1]", '{"meta": [1], "keys": []}', '{"meta": {}, "keys": 5}'])
def test_stage1_resume_of_a_hostile_meta_json_is_a_cache_error(tmp_path, text):
    from common.feature_cache import CacheError
    from stage1_extract.cache_writer import CacheWriter

    writer = object.__new__(CacheWriter)  # only what _check_meta reads
    writer.parts, writer.keys, writer.meta = tmp_path, ["a"], None
    (tmp_path / "meta.json").write_text(text)
    with pytest.raises(CacheError, match="meta.json"):
        writer._check_meta(tmp_path / "meta.json")
