"""Bad input of every kind the click layer can meet is one `error:` line naming the file or option
(exit 1), or click's usage message naming the option (exit 2): never a traceback."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from reliability_helpers import TINY, no_traceback, one_error_line, tiny_run


@pytest.fixture(scope="module")
def run_dir(shared_cache, tmp_path_factory) -> Path:
    return tiny_run(shared_cache, tmp_path_factory)


def _train(features, out, *more):
    from stage2_decoder.train import main

    return CliRunner().invoke(main, ["--features", str(features), "--out", str(out), "--epochs", "1",
                                     "--scst-epochs", "0", "--dry-run", "--no-progress", "--batch-size", "16",
                                     "--embed-size", str(TINY["embed_size"]), "--hidden-size", str(TINY["hidden_size"]),
                                     "--vocab-threshold", str(TINY["vocab_threshold"]), "--device", "cpu", *more])


def _usage_error(result, option: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    no_traceback(result)
    assert option in result.stderr, result.stderr


_GOOD = {"metrics": {"CIDEr": 0.5}, "n_images": 1,
         "images": [{"key": "1", "image": None, "caption": "a dog", "references": ["a dog"], "cider": 0.5}]}


@pytest.mark.parametrize("field, edit", [
    ("images[0].cider", lambda r: r["images"][0].update(cider="high")),
    ("images[0].references", lambda r: r["images"][0].update(references=5)),
    ("images[0].caption", lambda r: r["images"][0].update(caption=["a", "list"])),
    ("metrics", lambda r: r.update(metrics=[1, 2])),
    ("stats", lambda r: r.update(stats={"vocab_used": "many"})),
    ("notes", lambda r: r.update(notes=[1, 2])),
])
def test_report_on_a_wrong_typed_eval_json_is_one_line_naming_the_field(tmp_path, field, edit):
    from stage2_decoder.report import main

    rep = json.loads(json.dumps(_GOOD))
    edit(rep)
    (tmp_path / "e.json").write_text(json.dumps(rep))
    line = one_error_line(CliRunner().invoke(main, [str(tmp_path / "e.json"), "--out", str(tmp_path / "r.html")]))
    assert f"{field} is" in line and "e.json" in line
    assert not (tmp_path / "r.html").exists()


def _doctored(src: Path, dst: Path, edit) -> Path:
    ckpt = torch.load(src, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


def test_a_checkpoint_whose_split_has_the_wrong_shape_is_one_line(run_dir, shared_cache, tmp_path):
    from stage2_decoder.evaluate import main

    bad = _doctored(run_dir / "best.pt", tmp_path / "b.pt", lambda c: c.update(split=["1", "2"]))
    line = one_error_line(CliRunner().invoke(main, ["--checkpoint", str(bad), "--features", str(shared_cache),
                                                    "--device", "cpu", "--workers", "0"]))
    assert "split must map" in line and str(bad) in line


def test_a_last_pt_whose_train_config_has_the_wrong_shape_is_one_line(run_dir, shared_cache, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    _doctored(run / "last.pt", run / "last.pt", lambda c: c.update(train_config=[1, 2]))
    line = one_error_line(_train(shared_cache, run, "--epochs", "2"))
    assert "train_config must be a dict" in line and str(run / "last.pt") in line


def _cache_copy(shared_cache, dst, edit) -> Path:
    shutil.copy(shared_cache, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def _replace(name, data):
    def edit(f):
        del f[name]
        f.create_dataset(name, data=data)
    return edit


@pytest.mark.parametrize("case, edit, says", [
    ("feature_dim as text", lambda f: f.attrs.__setitem__("feature_dim", "1280"), "'feature_dim' is str"),
    ("backbone as a number", lambda f: f.attrs.__setitem__("backbone", 5), "'backbone' is int"),
    ("captions_file as an array", lambda f: f.attrs.__setitem__("captions_file", np.arange(3)), "'captions_file'"),
    ("images_dir as a float", lambda f: f.attrs.__setitem__("images_dir", 1.5), "'images_dir' is float"),
    ("schema_version as text", lambda f: f.attrs.__setitem__("schema_version", "1"), "schema version '1'"),
    ("bytes-typed features", lambda f: _replace("features", np.zeros((48, 1280), dtype="S2"))(f), "'features' holds"),
    ("2-D keys", lambda f: _replace("keys", np.array([[b"a"] * 2] * 24, dtype=h5py.string_dtype()))(f), "'keys' is 2-D"),
    ("a short status", lambda f: _replace("status", np.ones(10, dtype="uint8"))(f), "'status' has shape [10]"),
])
def test_a_cache_with_wrong_typed_attributes_or_datasets_is_one_line(shared_cache, tmp_path, case, edit, says):
    bad = _cache_copy(shared_cache, tmp_path / "bad.h5", edit)
    line = one_error_line(_train(bad, tmp_path / "run"))
    assert says in line and str(bad) in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device", ["xla", "mps", "meta"])
def test_unsupported_device_types_are_one_line(shared_cache, tmp_path, device):
    line = one_error_line(_train(shared_cache, tmp_path / "run", "--device", device))
    assert device in line


def test_an_absurd_hidden_size_is_refused_before_allocating(shared_cache, tmp_path):
    # the widest --hidden-size common.bounds allows still passes the weight cap only with fewer layers
    line = one_error_line(_train(shared_cache, tmp_path / "run", "--hidden-size", "16384", "--num-layers", "2"))
    assert "--hidden-size 16384" in line and "GiB" in line


@pytest.mark.parametrize("module, args, option", [
    ("stage2_decoder.evaluate", ["--checkpoint", "x.pt", "--length-penalty", "-inf"], "--length-penalty"),
    ("stage2_decoder.caption", ["x.jpg", "--checkpoint", "x.pt", "--length-penalty", "nan"], "--length-penalty"),
    ("stage2_decoder.train", ["--features", "x.h5", "--out", "r", "--seed", str(10**20)], "--seed"),
    ("stage2_decoder.train", ["--features", "x.h5", "--out", "r", "--lr", "inf"], "--lr"),
    ("stage2_decoder.sweep", ["--features", "x.h5", "--out", "s", "--grid", "g.json", "--seed", str(10**20)], "--seed"),
])
def test_non_finite_floats_and_huge_ints_are_usage_errors_naming_the_option(module, args, option):
    import importlib

    _usage_error(CliRunner().invoke(importlib.import_module(module).main, args), option)
