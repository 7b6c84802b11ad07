"""Every entry point has the cheap mode tests use (--dry-run) and a quiet mode (--no-progress)."""
from __future__ import annotations

import importlib
import json

import pytest
from click.testing import CliRunner

ENTRY_POINTS = ["stage1_extract.__main__", "stage2_decoder.train", "stage2_decoder.caption", "stage2_decoder.evaluate",
                "stage2_decoder.sweep", "stage2_decoder.serve", "stage2_decoder.export", "stage2_decoder.report",
                "stage2_decoder.plot"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_has_dry_run_and_no_progress(module):
    flags = {o for p in importlib.import_module(module).main.params for o in (*p.opts, *p.secondary_opts)}
    assert {"--dry-run", "--no-progress"} <= flags, f"{module} lacks {({'--dry-run', '--no-progress'} - flags)}"


def test_every_command_takes_dash_h_as_the_readme_says():
    """`samples -h` was "No such option: -h"."""
    import click

    from conftest import REPO

    modules = ["stage1_extract.__main__"] + [f"stage2_decoder.{p.stem}" for p in (REPO / "stage2_decoder").glob("*.py")]
    commands = {m: getattr(importlib.import_module(m), "main", None) for m in modules}
    commands = {m: c for m, c in commands.items() if isinstance(c, click.Command)}
    assert set(ENTRY_POINTS) <= set(commands) and "stage2_decoder.samples" in commands
    for module, command in commands.items():
        r = CliRunner().invoke(command, ["-h"])
        assert r.exit_code == 0 and "Usage:" in r.output, (module, r.output)


def test_plot_and_report_dry_runs_write_nothing(tmp_path):
    from stage2_decoder import plot, report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 3.0, "val_loss": 3.1}) + "\n")
    r = CliRunner().invoke(plot.main, [str(run), "--dry-run"])
    assert r.exit_code == 0 and "1 epochs" in r.output and not (run / "curves.png").exists()
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"metrics": {"CIDEr": 0.5}, "images": [{"key": "a", "image": "", "caption": "x",
                                                                     "references": ["y"], "cider": 0.5}]}))
    r = CliRunner().invoke(report.main, [str(ev), "--out", str(tmp_path / "p.html"), "--dry-run"])
    assert r.exit_code == 0 and "1 of 1 images" in r.output and not (tmp_path / "p.html").exists()
    r = CliRunner().invoke(plot.main, [str(tmp_path / "nothing"), "--dry-run"])
    assert r.exit_code == 1


def test_every_option_marked_required_is_asked_for():
    """stage 1's --images, --captions and --out said "[required]" in --help, yet a run without them went on
    with None and ended in a TypeError traceback (click 8.2+ takes default=None as a value given)."""
    import click

    for module in ENTRY_POINTS:
        command = importlib.import_module(module).main
        required = [p for p in command.params if isinstance(p, click.Option) and p.required]
        for p in required:
            arguments = ["x" for q in command.params if isinstance(q, click.Argument) and q.required]
            others = [a for q in required if q is not p for a in (q.opts[0], "x")]
            r = CliRunner().invoke(command, [*others, *arguments])
            assert r.exit_code == 2 and f"Missing option '{p.opts[0]}'" in r.output, (module, p.name, r.output)
