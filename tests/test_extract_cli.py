"""Stage 1's command line: one option per ExtractConfig field, --dry-run, the one --workers default, and the
layout rule that stage 2 never imports stage 1."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

import stage1_extract.__main__ as cli
import stage1_extract.extract as ex
from common.backbones import default_workers
from conftest import REPO
from reliability_helpers import one_error_line
from stage1_extract.extract import ExtractConfig


def _required(coco_dir: Path, out: Path) -> list[str]:
    return ["--images", str(coco_dir / "images"), "--captions", str(coco_dir / "captions.json"), "--out", str(out)]


@pytest.fixture
def captured(monkeypatch) -> list[ExtractConfig]:
    """The configs the CLI hands to extract(), which does nothing here."""
    seen: list[ExtractConfig] = []

    def fake(cfg):
        seen.append(cfg)
        return ex.ExtractSummary(cfg.out, 0, 0, 0, 0, {}, 1.0)

    monkeypatch.setattr(cli, "extract", fake)
    return seen


def test_the_options_are_the_config_fields_with_their_defaults(coco_dir, tmp_path, captured):
    flags = {o for p in cli.main.params for o in p.opts} - {"--help", "-h", "--dry-run"}
    want = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(ExtractConfig)}
    want = want - {"--progress", "--dist-timeout-s"} | {"--no-progress", "--dist-timeout"}
    assert flags == want
    paths = _required(coco_dir, tmp_path / "c.h5")
    result = CliRunner().invoke(cli.main, paths)
    assert result.exit_code == 0, result.output
    assert captured == [ExtractConfig(images=paths[1], captions=paths[3], out=paths[5])]


def test_every_option_reaches_its_field(coco_dir, tmp_path, captured):
    paths = _required(coco_dir, tmp_path / "c.h5")
    result = CliRunner().invoke(cli.main, [*paths, "--dataset", "coco", "--backbone", "mobilenet_v2", "--weights",
                                           "none", "--batch-size", "3", "--workers", "0", "--device", "cpu",
                                           "--limit", "7", "--dtype", "float32", "--views", "2",
                                           "--allow-outside-images", "--no-progress", "--dist-timeout", "5"])
    assert result.exit_code == 0, result.output
    assert captured == [ExtractConfig(images=paths[1], captions=paths[3], out=paths[5], dataset="coco",
                                      backbone="mobilenet_v2", weights="none", batch_size=3, workers=0, device="cpu",
                                      limit=7, dtype="float32", views=2, allow_outside_images=True, progress=False,
                                      dist_timeout_s=5.0)]


@pytest.mark.parametrize("bad, option", [(["--views", "5"], "--views"), (["--dtype", "int8"], "--dtype"),
                                         (["--workers", "-1"], "--workers"), (["--dist-timeout", "0"], "--dist-timeout")])
def test_bounds_and_choices_come_from_the_field_metadata(coco_dir, tmp_path, captured, bad, option):
    result = CliRunner().invoke(cli.main, [*_required(coco_dir, tmp_path / "c.h5"), *bad])
    assert result.exit_code == 2 and option in result.stderr, result.output
    assert captured == []


def test_dry_run_checks_and_plans_without_loading_the_cnn(coco_dir, tmp_path, monkeypatch, captured):
    def no_cnn(*a, **k):
        raise AssertionError("--dry-run loaded the CNN")

    monkeypatch.setattr(ex, "load_backbone", no_cnn)
    out = tmp_path / "c.h5"
    result = CliRunner().invoke(cli.main, [*_required(coco_dir, out), "--backbone", "mobilenet_v2", "--limit", "5",
                                           "--device", "cpu", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("dry run: 5 images") and "mobilenet_v2" in result.stdout, result.stdout
    assert str(out) in result.stdout and "(new)" in result.stdout
    assert captured == [] and not out.exists() and not Path(f"{out}.parts").exists()


def test_dry_run_under_torchrun_is_said_once(coco_dir, tmp_path, monkeypatch):
    # each rank checks (no process group is made), and each printed the same line
    args = [*_required(coco_dir, tmp_path / "c.h5"), "--backbone", "mobilenet_v2", "--limit", "5", "--dry-run"]
    said = {}
    for rank in ("0", "1", "2"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "3")
        result = CliRunner().invoke(cli.main, args)
        assert result.exit_code == 0, result.output
        said[rank] = result.stdout
    assert said["0"].startswith("dry run: 5 images") and said["1"] == said["2"] == ""


@pytest.mark.parametrize("case", ["captions", "images", "weights"])
def test_dry_run_refuses_what_a_real_run_would(coco_dir, tmp_path, case):
    args = _required(coco_dir, tmp_path / "c.h5")
    if case == "captions":
        args[3] = str(tmp_path / "missing.json")
    elif case == "images":
        args[1] = str(tmp_path / "no-such-folder")
    else:
        args += ["--weights", str(tmp_path / "missing.pt")]
    line = one_error_line(CliRunner().invoke(cli.main, [*args, "--dry-run"]))
    assert "missing" in line or "no-such-folder" in line, line


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_folder_as_the_output_is_named_so(coco_dir, tmp_path, dry_run):
    """--out DIR: the dry run said "already exists: checked against these settings", the real run that the file
    was not readable HDF5, with a line of h5py's C detail and "re-run stage 1 to rebuild it"."""
    args = [*_required(coco_dir, tmp_path), "--backbone", "mobilenet_v2", "--limit", "2", "--workers", "0",
            "--device", "cpu", "--no-progress"]
    line = one_error_line(CliRunner().invoke(cli.main, args + (["--dry-run"] if dry_run else [])))
    assert line == f"error: --out {tmp_path} is a folder: give the cache file's path, e.g. {tmp_path / 'captions.h5'}"


def test_features_float16_cannot_hold_are_refused_not_written_as_zeros(coco_dir, tmp_path):
    """Weights whose pooled features are ~1e-9, under float16's smallest value (a random MobileNetV2's were, before
    its random init kept them near 1): every image was written as the same all-zero vector."""
    import h5py
    import torch
    import torchvision.models as tvm

    sd = tvm.mobilenet_v2(weights=None).state_dict()
    sd["features.18.1.weight"] *= 1e-9  # the last BatchNorm: every pooled feature ~1e-9
    sd["features.18.1.bias"] *= 1e-9
    torch.save(sd, tmp_path / "tiny.pth")
    more = ["--backbone", "mobilenet_v2", "--weights", str(tmp_path / "tiny.pth"), "--limit", "2", "--workers", "0",
            "--device", "cpu", "--no-progress"]
    line = one_error_line(CliRunner().invoke(cli.main, [*_required(coco_dir, tmp_path / "c.h5"), *more]))
    assert "float16 cannot hold these features" in line and "--dtype float32" in line, line
    assert not (tmp_path / "c.h5").exists()
    ok = CliRunner().invoke(cli.main, [*_required(coco_dir, tmp_path / "d.h5"), *more, "--dtype", "float32"])
    assert ok.exit_code == 0, ok.output
    with h5py.File(tmp_path / "d.h5") as f:
        assert 0 < abs(f["features"][:]).max() < 6e-8  # what float16 would have flushed to zero


def test_random_mobilenet_features_fit_float16_and_differ_per_image():
    """`--weights none` is for plumbing tests: its features should be ordinary numbers, one vector per image."""
    import torch

    from common.backbones import load_backbone

    bb = load_backbone("mobilenet_v2", "none", "cpu")
    photos = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = bb.encode(photos)
    assert 0.01 < float(feats.abs().max()) < 1000 and float((feats[0] - feats[1]).abs().mean()) > 1e-3


def test_one_default_for_workers():
    from stage2_decoder.evaluate import main as evaluate_main

    assert ExtractConfig.workers == default_workers()
    assert next(p for p in evaluate_main.params if p.name == "workers").default == default_workers()


def test_stage2_never_imports_stage1():
    offenders = []
    for path in sorted((REPO / "stage2_decoder").rglob("*.py")) + sorted((REPO / "common").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == "stage1_extract"]
    assert offenders == []
