"""Outputs are never written through a link planted at a scratch name.

Every output goes through common.atomic (a fresh exclusive temporary, then a rename): a symlink
someone placed at `NAME.tmp` or `.NAME.tmp` beside an output (the names older writers used) is
never opened, so the file it points to keeps its bytes. Through the real click commands, in process.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from reliability_helpers import TINY, tiny_run

PRECIOUS = "precious, must not change"


@pytest.fixture(scope="module")
def run_dir(shared_cache, tmp_path_factory) -> Path:
    return tiny_run(shared_cache, tmp_path_factory)


def _plant(folder: Path, names: list[str]) -> list[Path]:
    """A victim file per output name, and links to it at both old scratch names; returns the victims."""
    folder.mkdir(parents=True, exist_ok=True)
    victims = []
    for i, name in enumerate(names):
        victim = folder.parent / f"victim-{folder.name}-{i}.txt"
        victim.write_text(PRECIOUS)
        for scratch in (f"{name}.tmp", f".{name}.tmp"):
            (folder / scratch).symlink_to(victim)
        victims.append(victim)
    return victims


def _untouched(victims: list[Path]) -> None:
    assert [v.read_text() for v in victims] == [PRECIOUS] * len(victims)


def test_train_writes_no_output_through_a_planted_link(shared_cache, tmp_path):
    from stage2_decoder.train import main

    run = tmp_path / "run"
    names = ["config.json", "split.json", "vocab.json", "metrics.jsonl", "best.pt", "last.pt"]
    victims = _plant(run, names)
    r = CliRunner().invoke(main, ["--features", str(shared_cache), "--out", str(run), "--epochs", "1",
                                  "--scst-epochs", "0", "--dry-run", "--no-progress", "--batch-size", "16",
                                  "--embed-size", str(TINY["embed_size"]), "--hidden-size", str(TINY["hidden_size"]),
                                  "--vocab-threshold", str(TINY["vocab_threshold"]), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    _untouched(victims)
    assert json.loads((run / "config.json").read_text())["epochs"] == 1
    assert all((run / n).is_file() and not (run / n).is_symlink() for n in names)


def test_evaluate_json_and_html_are_not_written_through_planted_links(run_dir, shared_cache, tmp_path, monkeypatch):
    import stage2_decoder.reporting.metrics
    from stage2_decoder.evaluate import main

    # the writers are under test, not the scorers (METEOR's Java start-up alone takes seconds)
    monkeypatch.setattr(stage2_decoder.reporting.metrics, "score_captions", lambda gts, res, spice=False, **how: ({"CIDEr": 0.5}, {}, []))

    out = tmp_path / "eval"
    victims = _plant(out, ["e.json", "e.html"])
    r = CliRunner().invoke(main, ["--checkpoint", str(run_dir / "best.pt"), "--features", str(shared_cache),
                                  "--split", "val", "--beam-size", "1", "--device", "cpu", "--workers", "0",
                                  "--json-out", str(out / "e.json"), "--html", str(out / "e.html")])
    assert r.exit_code == 0, r.output
    _untouched(victims)
    assert json.loads((out / "e.json").read_text())["source"] == "cache:val"
    assert (out / "e.html").read_text().startswith("<!")


def test_curves_and_sweep_tables_are_not_written_through_planted_links(run_dir, tmp_path):
    import shutil

    from stage2_decoder.plot import main
    from stage2_decoder.sweeps.results import write_results

    run = tmp_path / "copy"
    shutil.copytree(run_dir, run)
    victims = _plant(run, ["curves.png"])
    r = CliRunner().invoke(main, [str(run)])
    assert r.exit_code == 0, r.output
    sweep = tmp_path / "sweep"
    victims += _plant(sweep, ["results.csv", "results.md", "results.json"])
    rows = [{"run": "r0", "status": "ok", "params": {"lr": 1e-3}, "val_cider": 0.5}]
    write_results(sweep, rows, {"lr": [1e-3]}, ["lr"], "cider")
    _untouched(victims)
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((sweep / "results.json").read_text())["rows"][0]["run"] == "r0"


def test_stage1_cache_is_not_assembled_through_a_planted_link(coco_dir, tmp_path):
    from stage1_extract.__main__ import main

    out = tmp_path / "c.h5"
    parts = tmp_path / "c.h5.parts"
    victims = _plant(parts, ["meta.json", "assembling.h5"])
    victim = tmp_path / "victim-assembling.txt"
    victim.write_text(PRECIOUS)
    (parts / "assembling.h5").symlink_to(victim)  # the name the cache used to be assembled under
    victims.append(victim)
    victims += _plant(tmp_path, ["c.h5"])
    r = CliRunner().invoke(main, ["--images", str(coco_dir / "images"), "--captions", str(coco_dir / "captions.json"),
                                  "--out", str(out), "--backbone", "mobilenet_v2", "--weights", "default",
                                  "--limit", "4", "--batch-size", "4", "--workers", "0", "--device", "cpu",
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    _untouched(victims)
    from common.feature_cache import load_cache

    assert len(load_cache(out).keys) == 4


from test_data_download import server, tiny  # noqa: E402,F401 - the local HTTP server and its dataset spec


def test_downloads_write_no_partial_file_or_record_through_a_planted_link(tmp_path, server, tiny):  # noqa: F811
    from common.data import download_dataset

    archives = tmp_path / "archives"
    victims = _plant(archives, ["manifest.json"])
    victim = tmp_path / "victim-part.txt"
    victim.write_text(PRECIOUS)
    (archives / "train2014.zip.part").symlink_to(victim)  # the name a download is resumed from
    victims.append(victim)
    download_dataset(tiny, tmp_path, mirror=server.url, progress=False)
    _untouched(victims)
    assert (archives / "train2014.zip").read_bytes() == server.files["train2014.zip"]
    assert set(json.loads((archives / "manifest.json").read_text())) == set(server.files)
