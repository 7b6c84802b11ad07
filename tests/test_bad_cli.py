"""Bad command lines (Bad input: CLI) for every entry point where the case applies.

Two kinds of answer, never a traceback:
- a value click itself can check (unknown choice, a number out of range): click's usage error,
  exit 2, naming the option;
- anything found later (a missing path, an output inside the images folder, a setting out of
  range for training): one `error:` line naming the path or option, exit 1, nothing written.

In process through click's CliRunner (the CLIs are thin click layers over importable functions);
tests/test_e2e.py and the other reliability tests run the same errors through `python -m`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO, small_shm
from reliability_helpers import TINY, no_traceback, one_error_line, tiny_run


def usage_error(result, option: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    no_traceback(result)
    assert "Error" in result.stderr and option in result.stderr, result.stderr


def _invoke(module: str, args: list) -> object:
    import importlib

    main = importlib.import_module(module).main
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, coco_records) -> tuple[Path, Path]:
    """An images folder (copies of 3 real photos) and its COCO captions file, in a scratch folder."""
    root = tmp_path_factory.mktemp("cli_set")
    images = root / "images"
    images.mkdir()
    recs = coco_records[:3]
    for r in recs:
        shutil.copy(r.path, images / Path(r.path).name)  # copies: a link out of the folder is not read
    coco = {"images": [{"id": r.image_id, "file_name": Path(r.path).name} for r in recs],
            "annotations": [{"id": n, "image_id": r.image_id, "caption": c}
                            for n, (r, c) in enumerate(((r, c) for r in recs for c in r.captions), 1)]}
    (root / "captions.json").write_text(json.dumps(coco))
    return images, root / "captions.json"


@pytest.fixture(scope="module")
def run_dir(shared_cache, tmp_path_factory) -> Path:
    return tiny_run(shared_cache, tmp_path_factory)


# --- stage1_extract ----------------------------------------------------------------------------------------

def _extract_args(images, captions, out, *more):
    return ["--images", images, "--captions", captions, "--out", out, "--no-progress", "--workers", 0,
            "--backbone", "mobilenet_v2", *more]


@pytest.mark.parametrize("bad, option", [
    (["--backbone", "vgg16"], "--backbone"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--limit", "0"], "--limit"),
    (["--workers", "-1"], "--workers"),
    (["--dtype", "int8"], "--dtype"),
    (["--dataset", "voc"], "--dataset"),
])
def test_extract_usage_errors(small_set, tmp_path, bad, option):
    images, captions = small_set
    usage_error(_invoke("stage1_extract.__main__", _extract_args(images, captions, tmp_path / "c.h5", *bad)), option)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("what", ["images", "captions", "weights", "device"])
def test_extract_missing_paths_and_bad_device(small_set, tmp_path, what):
    images, captions = small_set
    missing = tmp_path / "nope"
    args = {"images": _extract_args(missing, captions, tmp_path / "c.h5"),
            "captions": _extract_args(images, missing, tmp_path / "c.h5"),
            "weights": _extract_args(images, captions, tmp_path / "c.h5", "--weights", missing),
            "device": _extract_args(images, captions, tmp_path / "c.h5", "--device", "gpu0")}[what]
    line = one_error_line(_invoke("stage1_extract.__main__", args))
    assert (str(missing) if what != "device" else "gpu0") in line
    assert not list(tmp_path.glob("c.h5*"))


def test_extract_output_inside_the_images_folder_is_refused(small_set):
    images, captions = small_set
    before = sorted(os.listdir(images))
    line = one_error_line(_invoke("stage1_extract.__main__", _extract_args(images, captions, images / "sub" / "c.h5")))
    assert "inside the images folder" in line
    assert sorted(os.listdir(images)) == before  # nothing written there


# --- stage2_decoder.train ----------------------------------------------------------------------------------

def _train_args(features, out, *more):
    return ["--features", features, "--out", out, "--epochs", 1, "--dry-run", "--no-progress", "--device", "cpu",
            "--embed-size", TINY["embed_size"], "--hidden-size", TINY["hidden_size"], *more]


@pytest.mark.parametrize("bad, option", [
    (["--val-frac", "0.6", "--test-frac", "0.6"], "val=0.6"),
    (["--device", "gpu"], "--device 'gpu'"),
])
def test_train_bad_settings_are_one_error_line(shared_cache, tmp_path, bad, option):
    line = one_error_line(_invoke("stage2_decoder.train", _train_args(shared_cache, tmp_path / "run", *bad)))
    assert option in line
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("*.pt"))


@pytest.mark.parametrize("option, value", [("--select-by", "bleu"), ("--tokenizer", "wordpiece")])
def test_train_string_settings_are_choices_refused_as_usage_errors(shared_cache, tmp_path, option, value):
    # --help lists the choices, and a misspelt one is refused before the cache is read
    r = _invoke("stage2_decoder.train", _train_args(shared_cache, tmp_path / "run", option, value))
    assert r.exit_code == 2 and f"Invalid value for '{option}': '{value}' is not one of" in r.output
    assert not (tmp_path / "run").exists()


# a number out of common.bounds' limits is click's usage error, before anything is read
@pytest.mark.parametrize("bad, option", [
    (["--batch-size", "-8"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "0"], "--lr"),
    (["--hidden-size", "-1"], "--hidden-size"),
    (["--dropout", "1.5"], "--dropout"),
    (["--label-smoothing", "2"], "--label-smoothing"),
    (["--lr-factor", "1.5"], "--lr-factor"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--val-images", "-3"], "--val-images"),
    (["--val-frac", "1.5"], "--val-frac"),
])
def test_train_settings_out_of_bounds_are_usage_errors(shared_cache, tmp_path, bad, option):
    usage_error(_invoke("stage2_decoder.train", _train_args(shared_cache, tmp_path / "run", *bad)), option)
    assert not (tmp_path / "run").exists()


def test_train_usage_errors(shared_cache, tmp_path):
    usage_error(_invoke("stage2_decoder.train", _train_args(shared_cache, tmp_path / "r", "--dataset", "voc")),
                "--dataset")
    usage_error(_invoke("stage2_decoder.train", _train_args(shared_cache, tmp_path / "r", "--epochs", "two")),
                "--epochs")


@pytest.mark.parametrize("what", ["features", "captions", "images"])
def test_train_missing_paths(shared_cache, tmp_path, what):
    missing = tmp_path / "nope"
    args = {"features": _train_args(missing, tmp_path / "run"),
            "captions": _train_args(shared_cache, tmp_path / "run", "--captions", missing),
            "images": _train_args(shared_cache, tmp_path / "run", "--images", missing)}[what]
    assert str(missing) in one_error_line(_invoke("stage2_decoder.train", args))
    assert not (tmp_path / "run").exists()


def test_train_output_inside_the_images_folder_is_refused(shared_cache, small_set, coco_dir, tmp_path):
    images, _ = small_set
    before = sorted(os.listdir(images))
    args = _train_args(shared_cache, images / "run", "--images", images,
                       "--captions", coco_dir / "captions.json")
    assert "inside the images folder" in one_error_line(_invoke("stage2_decoder.train", args))
    assert sorted(os.listdir(images)) == before


def test_train_out_is_a_file(shared_cache, tmp_path):
    out = tmp_path / "run"
    out.write_text("not a folder")
    assert str(out) in one_error_line(_invoke("stage2_decoder.train", _train_args(shared_cache, out)))
    assert out.read_text() == "not a folder"


# --- stage2_decoder.caption --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, option", [
    (["--beam-size", "0"], "--beam-size"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--max-len", "0"], "--max-len"),
    (["--no-repeat-ngram", "-2"], "--no-repeat-ngram"),
])
def test_caption_usage_errors(run_dir, coco_records, bad, option):
    usage_error(_invoke("stage2_decoder.caption", [coco_records[0].path, "--checkpoint", run_dir / "best.pt", *bad]),
                option)


def test_caption_no_images_at_all(run_dir):
    usage_error(_invoke("stage2_decoder.caption", ["--checkpoint", run_dir / "best.pt"]), "IMAGES")


def test_caption_missing_checkpoint_and_bad_device(coco_records, run_dir, tmp_path):
    missing = tmp_path / "nope.pt"
    assert str(missing) in one_error_line(_invoke("stage2_decoder.caption",
                                                  [coco_records[0].path, "--checkpoint", missing]))
    assert "cuda:x" in one_error_line(_invoke("stage2_decoder.caption", [coco_records[0].path, "--checkpoint",
                                                                         run_dir / "best.pt", "--device", "cuda:x"]))


def test_caption_missing_image_and_empty_folder(run_dir, coco_records, tmp_path):
    missing = tmp_path / "nope.jpg"
    result = _invoke("stage2_decoder.caption", [coco_records[0].path, missing, "--checkpoint", run_dir / "best.pt",
                                                "--beam-size", 1])
    assert result.exit_code == 1
    no_traceback(result)
    assert [ln for ln in result.stderr.splitlines() if ln.startswith("error:")] == \
        [f"error: {missing}: FileNotFoundError: [Errno 2] No such file or directory: '{missing}'"]
    assert result.stdout.startswith(coco_records[0].path + "\t")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no image files" in one_error_line(_invoke("stage2_decoder.caption",
                                                      [empty, "--checkpoint", run_dir / "best.pt"]))


# --- stage2_decoder.evaluate -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, option", [
    (["--limit", "0"], "--limit"),
    (["--beam-size", "0"], "--beam-size"),
    (["--split", "train"], "--split"),
    (["--workers", "-1"], "--workers"),
])
def test_evaluate_usage_errors(run_dir, shared_cache, bad, option):
    usage_error(_invoke("stage2_decoder.evaluate", ["--checkpoint", run_dir / "best.pt", "--features", shared_cache,
                                                    *bad]), option)


def test_evaluate_needs_exactly_one_source(run_dir, shared_cache, small_set):
    images, captions = small_set
    for args in ([], ["--features", shared_cache, "--images", images, "--captions", captions], ["--images", images]):
        result = _invoke("stage2_decoder.evaluate", ["--checkpoint", run_dir / "best.pt", *args])
        assert result.exit_code == 2 and "Traceback" not in result.output


def test_evaluate_from_the_cache_needs_no_cnn_weights(run_dir, shared_cache, monkeypatch):
    """Scoring a cache split decodes cached features: it built the CNN anyway (ResNet-152's weights file, seconds,
    GPU memory), and failed where the weights were not at hand (a cache and checkpoint copied from elsewhere)."""
    import common.backbones

    def no_weights(*a, **k):
        raise common.backbones.BackboneError("no weights file here")

    monkeypatch.setattr(common.backbones, "load_backbone", no_weights)
    r = _invoke("stage2_decoder.evaluate", ["--checkpoint", run_dir / "best.pt", "--features", shared_cache,
                                            "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["source"] == "cache:test" and report["metrics"]["CIDEr"] >= 0


def test_evaluate_from_the_cache_shows_its_decoding(run_dir, shared_cache):
    # minutes on a full COCO split on a CPU, and nothing was printed until the table
    args = ["--checkpoint", run_dir / "best.pt", "--features", shared_cache, "--device", "cpu", "--json"]
    shown, quiet = _invoke("stage2_decoder.evaluate", args), _invoke("stage2_decoder.evaluate", [*args, "--no-progress"])
    assert shown.exit_code == quiet.exit_code == 0, shown.output + quiet.output
    assert "decode" in shown.stderr and "img" in shown.stderr and quiet.stderr == ""


def test_evaluate_from_the_cache_takes_limit_and_refuses_dataset(run_dir, shared_cache):
    # --limit and --dataset were silently ignored with --features (--workers: nothing to decode, harmless)
    args = ["--checkpoint", run_dir / "best.pt", "--features", shared_cache, "--device", "cpu", "--no-progress"]
    whole, first = (_invoke("stage2_decoder.evaluate", [*args, "--split", "val", *more, "--json"])
                    for more in ([], ["--limit", "1"]))
    assert whole.exit_code == first.exit_code == 0, whole.output + first.output
    assert json.loads(first.stdout)["n_images"] == 1 < json.loads(whole.stdout)["n_images"]
    r = _invoke("stage2_decoder.evaluate", [*args, "--dataset", "coco"])
    assert r.exit_code == 2 and "--dataset is for raw-image mode" in r.output


def test_evaluate_on_raw_images_refuses_workers_dev_shm_cannot_hold(run_dir, small_set, monkeypatch):
    """In a container with Docker's 64 MB of /dev/shm, the decoding workers died with "Bus error" and a
    traceback once they had filled it; stage 1 already checked, evaluate did not."""
    images, captions = small_set
    small_shm(monkeypatch, free=2**20)
    line = one_error_line(_invoke("stage2_decoder.evaluate", ["--checkpoint", run_dir / "best.pt", "--device", "cpu",
                                                              "--images", images, "--captions", captions,
                                                              "--workers", "2"]))
    assert "/dev/shm has 1 MB free but --workers 2" in line and "--shm-size" in line and "--batch-size" not in line
    monkeypatch.undo()
    ok = _invoke("stage2_decoder.evaluate", ["--checkpoint", run_dir / "best.pt", "--device", "cpu",
                                             "--images", images, "--captions", captions, "--workers", "0", "--json"])
    assert ok.exit_code == 0, ok.output  # no workers: nothing goes through /dev/shm


@pytest.mark.parametrize("what", ["checkpoint", "features", "images", "captions"])
def test_evaluate_missing_paths(run_dir, shared_cache, small_set, tmp_path, what):
    images, captions = small_set
    missing = tmp_path / "nope"
    ckpt = missing if what == "checkpoint" else run_dir / "best.pt"
    src = {"checkpoint": ["--features", shared_cache], "features": ["--features", missing],
           "images": ["--images", missing, "--captions", captions],
           "captions": ["--images", images, "--captions", missing]}[what]
    line = one_error_line(_invoke("stage2_decoder.evaluate", ["--checkpoint", ckpt, "--device", "cpu", *src]))
    assert str(missing) in line


def test_output_piped_into_a_reader_that_stops_early_ends_quietly():
    """`caption --recursive photos/ | head -3` ended with "error: [Errno 32] Broken pipe"; a tool whose reader
    left ends as one killed by SIGPIPE: no message, status 141."""
    import socket
    import subprocess
    import sys

    code = ("import click\nfrom common.cli import run_guarded\n"
            "def work():\n    for i in range(10**6):\n        click.echo(f'line {i}')\n    return 0\n"
            "raise SystemExit(run_guarded(work))\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    assert p.stdout.readline() == b"line 0\n"
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(60) == 141 and err == "", err
    # a socket (a service's socket unit, nc) hangs up rather than failing the poll
    ours, theirs = socket.socketpair()
    p = subprocess.Popen([sys.executable, "-c", code], stdout=theirs, stderr=subprocess.PIPE, cwd=REPO)
    theirs.close()
    assert ours.recv(7) == b"line 0\n"[:7]
    ours.close()
    err = p.stderr.read().decode()
    assert p.wait(60) == 141 and err == "", err
