"""Resume is strict and truthful: a setting that changes the training math is refused on resume with
one line naming it; epochs / patience may change and then really apply, and config.json says so; a
resume from another working directory (features given as an absolute path) is the same run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from reliability_helpers import TINY, one_error_line
from stage2_decoder.training.checkpoint import load_checkpoint


def _args(features, out, *more) -> list[str]:
    return ["--features", str(features), "--out", str(out), "--scst-epochs", "0", "--dry-run", "--no-progress",
            "--batch-size", "16", "--embed-size", str(TINY["embed_size"]), "--hidden-size", str(TINY["hidden_size"]),
            "--vocab-threshold", str(TINY["vocab_threshold"]), "--device", "cpu", "--val-images", "4", *more]


def _train(features, out, *more):
    from stage2_decoder.train import main

    return CliRunner().invoke(main, _args(features, out, *more))


@pytest.fixture(scope="module")
def two_epoch_run(shared_cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("resume") / "run"
    r = _train(shared_cache, run, "--epochs", "2")
    assert r.exit_code == 0, r.output
    return run


@pytest.fixture
def run(two_epoch_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(two_epoch_run, copy)
    return copy


@pytest.mark.parametrize("option, value", [("--lr", "0.002"), ("--weight-decay", "0.01"), ("--batch-size", "8"),
                                           ("--seed", "5"), ("--label-smoothing", "0.1"), ("--ema-decay", "0.9"),
                                           ("--length-buckets", "4"), ("--grad-clip", "1.0"), ("--scst-lr", "0.001")])
def test_a_resume_that_changes_the_training_math_is_refused_naming_the_option(shared_cache, run, option, value):
    before = (run / "last.pt").read_bytes()
    line = one_error_line(_train(shared_cache, run, "--epochs", "3", option, value))
    assert f"{option[2:].replace('-', '_')} " in line and "other settings" in line
    assert (run / "last.pt").read_bytes() == before


def test_a_resume_on_another_number_of_torch_threads_says_it_will_not_end_bitwise(cli, shared_cache, run):
    """On another thread count the sums run in another order: the resumed run silently ended unlike an
    uninterrupted one. It goes on (a bigger machine is fair) with one warning line naming the count.
    In processes of their own: more threads in this one would start an OpenMP pool that later forks
    of it cannot use."""
    def resume(epochs, threads):
        p = cli("stage2_decoder.train", *_args(shared_cache, run, "--epochs", epochs),
                env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
        assert p.returncode == 0, p.stderr
        return [ln for ln in p.stderr.splitlines() if "torch threads" in ln]

    threads = str(load_checkpoint(run / "last.pt")["torch_threads"])
    other = "2" if threads == "1" else "1"
    warned = resume("3", other)
    assert len(warned) == 1 and warned[0].startswith("warning:")
    assert f"trained on {threads} torch threads and goes on with {other}" in warned[0]
    assert f"OMP_NUM_THREADS={threads}" in warned[0]
    assert resume("4", other) == []  # last.pt now says `other`, as this process has


def test_fewer_epochs_than_already_ran_are_refused(shared_cache, run):
    before = (run / "last.pt").read_bytes()
    line = one_error_line(_train(shared_cache, run, "--epochs", "1"))
    assert "already ran 2" in line and "--epochs 1" in line
    assert (run / "last.pt").read_bytes() == before


def test_more_epochs_and_patience_apply_and_config_json_says_so(shared_cache, run):
    from stage2_decoder.training.checkpoint import load_checkpoint

    r = _train(shared_cache, run, "--epochs", "3", "--patience", "4")
    assert r.exit_code == 0, r.output
    assert load_checkpoint(run / "last.pt")["epoch"] == 3
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["epochs"] == 3 and cfg["patience"] == 4
    assert cfg["resumed"] == [{"after_epoch": 2, "changed": {"epochs": [2, 3], "patience": [0, 4]}}]
    assert [json.loads(ln)["epoch"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_resume_from_another_working_directory_with_an_absolute_features_path(shared_cache, tmp_path,
                                                                                monkeypatch):
    run = tmp_path / "run"
    monkeypatch.chdir(shared_cache.parent)  # first started with a relative --features
    r = _train(shared_cache.name, run, "--epochs", "1")
    assert r.exit_code == 0, r.output
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = _train(shared_cache.resolve(), run, "--epochs", "2")
    assert r.exit_code == 0, r.output
    from stage2_decoder.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["train_config"]["features"] == str(shared_cache.resolve())


def test_the_optimiser_state_saved_from_the_cpu_resumes_the_same_steps():
    """last.pt's optimiser state goes through cpu_optimizer_state (on a GPU, fused Adam's state and step counts
    are CUDA tensors, which a plain torch.load on a machine without CUDA refuses): every tensor on the CPU, and
    an optimiser loaded from it steps exactly as the one it was taken from."""
    import copy
    import io

    import torch

    from stage2_decoder.training.checkpoint import cpu_optimizer_state

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().sum().backward()
        opt.step()
    state = cpu_optimizer_state(opt)
    tensors = [v for s in state["state"].values() for v in s.values() if torch.is_tensor(v)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    buf = io.BytesIO()  # through a file, as last.pt
    torch.save(state, buf)
    buf.seek(0)
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2, fused=True)
    twin_opt.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(8, 4)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_a_resume_with_or_without_dry_run_is_refused(shared_cache, run):
    """A --dry-run run resumed for real (or the other way) mixed one-batch epochs into a real run, unmarked."""
    from stage2_decoder.train import main

    args = [a for a in _args(shared_cache, run, "--epochs", "3") if a != "--dry-run"]
    line = one_error_line(CliRunner().invoke(main, args))
    assert "dry_run True -> False" in line and "other settings" in line


def test_a_resume_on_another_split_is_refused(shared_cache, run, coco_dir, tmp_path):
    """Another captions file (here without one test image) changed the split: images trained on became test
    images, and split.json no longer said what best.pt's split was."""
    moved = load_checkpoint(run / "last.pt")["split"]["test"][0]
    doc = json.loads((coco_dir / "captions.json").read_text())
    gone = {im["id"] for im in doc["images"] if str(im["id"]) == moved}  # COCO's keys are its image ids
    assert gone
    doc["images"] = [im for im in doc["images"] if im["id"] not in gone]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] not in gone]
    (tmp_path / "fewer.json").write_text(json.dumps(doc))
    line = one_error_line(_train(shared_cache, run, "--epochs", "3", "--captions", tmp_path / "fewer.json"))
    assert "the image split" in line


def test_a_run_whose_last_pt_was_deleted_is_not_overwritten(shared_cache, run):
    """best.pt is all captioning needs, so a user deletes last.pt: the same command then started a new run
    there, silently replacing best.pt and the metrics."""
    (run / "last.pt").unlink()
    before = (run / "best.pt").read_bytes()
    line = one_error_line(_train(shared_cache, run, "--epochs", "2"))
    assert "2 finished epochs" in line and "no last.pt" in line and "new --out" in line
    assert (run / "best.pt").read_bytes() == before
    (run / "best.pt").unlink()  # both checkpoints deleted, to train again: nothing of value is replaced
    assert _train(shared_cache, run, "--epochs", "2").exit_code == 0


def test_a_run_killed_in_its_first_epoch_between_best_and_last_starts_over(shared_cache, tmp_path):
    run = tmp_path / "run"
    assert _train(shared_cache, run, "--epochs", "1").exit_code == 0
    (run / "last.pt").unlink()  # the kill: best.pt of epoch 1 written, last.pt and its metrics line not
    (run / "metrics.jsonl").write_text("")
    r = _train(shared_cache, run, "--epochs", "1")
    assert r.exit_code == 0, r.output
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


def test_a_resume_puts_back_split_json_and_warns_when_config_json_is_unreadable(shared_cache, run):
    (run / "split.json").unlink()
    (run / "config.json").write_text("garbage")
    r = _train(shared_cache, run, "--epochs", "3")
    assert r.exit_code == 0, r.output
    assert json.loads((run / "split.json").read_text())["test"] == load_checkpoint(run / "last.pt")["split"]["test"]
    assert "config.json could not be read" in r.stderr and "earlier resumes is lost" in r.stderr


def test_validating_on_training_images_is_said_also_without_progress(shared_cache, tmp_path):
    """With --no-progress (and in a sweep's runs) nothing said that val CIDEr was a training score."""
    r = _train(shared_cache, tmp_path / "run", "--epochs", "1", "--val-frac", "0")
    assert r.exit_code == 0, r.output
    assert "warning: no validation images with captions (--val-frac 0?): validating on training images" in r.stderr


@pytest.mark.parametrize("features", ["", "folder"])
def test_features_that_name_a_folder_or_nothing_is_one_line_without_advice_to_delete(features, tmp_path):
    from stage2_decoder.train import main

    path = str(tmp_path) if features == "folder" else ""
    line = one_error_line(CliRunner().invoke(main, ["--features", path, "--out", str(tmp_path / "run")]))
    assert ("is a folder, not a feature cache" if features else "--features is empty") in line
    assert "delete" not in line


def test_an_interrupt_before_the_first_epoch_does_not_point_to_a_last_pt(shared_cache, tmp_path, monkeypatch):
    import stage2_decoder.train as train_cli

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "train", interrupted)
    r = CliRunner().invoke(train_cli.main, _args(shared_cache, tmp_path / "run"))
    assert r.exit_code == 130 and "before its first epoch finished: nothing to resume" in r.stderr


@pytest.mark.parametrize("attr, value, says", [("precision", "bfloat16", "cache precision 'float32' -> 'bfloat16'"),
                                               ("weights_sha256", "ab" * 32, "backbone weights_sha256")])
def test_a_resume_on_a_cache_rebuilt_otherwise_at_the_same_path_is_refused(shared_cache, tmp_path, attr, value, says):
    """Stage 1 run again into the same file (on a GPU, with more views, from a weights file of the same name):
    the resume went on silently on other features, unlike the uninterrupted run it claims to finish as."""
    import h5py

    cache, run = tmp_path / "c.h5", tmp_path / "run"
    shutil.copy(shared_cache, cache)
    assert _train(cache, run, "--epochs", "1").exit_code == 0
    before = (run / "last.pt").read_bytes()
    with h5py.File(cache, "r+") as f:
        f.attrs[attr] = value
    line = one_error_line(_train(cache, run, "--epochs", "2"))
    assert says in line and "other settings" in line, line
    assert (run / "last.pt").read_bytes() == before
