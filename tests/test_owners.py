"""One owner per output: a run folder, a sweep folder and a cache in progress are locked (common.lock).

A second process gets one `error:` line naming the holder's pid and changes nothing; the lock goes
with its holder (SIGKILL included); sweep runs die with their sweep. The holder here is a small
Python process taking the same flock the commands take, so no second training has to run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from reliability_helpers import TINY, one_error_line

REPO = Path(__file__).resolve().parents[1]

_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("held", flush=True)
time.sleep(120)
"""


class Holder:
    """Another live process holding the lock file `path` (as a running command would)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"
        self.pid = self.proc.pid

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def holder():
    made = []

    def make(path: Path) -> Holder:
        made.append(Holder(path))
        return made[-1]

    yield make
    for h in made:
        if h.proc.poll() is None:
            h.kill()


def _train(features: Path, out: Path):
    from stage2_decoder.train import main

    return CliRunner().invoke(main, ["--features", str(features), "--out", str(out), "--epochs", "1",
                                     "--scst-epochs", "0", "--dry-run", "--no-progress", "--batch-size", "16",
                                     "--embed-size", str(TINY["embed_size"]), "--hidden-size", str(TINY["hidden_size"]),
                                     "--vocab-threshold", str(TINY["vocab_threshold"]), "--device", "cpu"])


def test_a_second_training_into_a_busy_run_folder_is_refused_naming_the_holder(shared_cache, tmp_path, holder):
    run = tmp_path / "run"
    h = holder(run / ".lock")
    line = one_error_line(_train(shared_cache, run))
    assert f"process {h.pid}" in line and str(run) in line
    assert sorted(os.listdir(run)) == [".lock"]  # nothing written beside the owner's work
    h.kill()  # the kernel releases a dead holder's lock: the same command now runs
    r = _train(shared_cache, run)
    assert r.exit_code == 0, r.output
    assert (run / "last.pt").is_file() and (run / ".lock").read_text().strip() != str(h.pid)


def test_a_second_sweep_into_a_busy_sweep_folder_is_refused(shared_cache, tmp_path, holder):
    from stage2_decoder.sweep import main

    out = tmp_path / "sweep"
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"lr": [1e-3, 2e-3], "epochs": [1]}))
    h = holder(out / ".lock")
    (out / "sweep.json").write_text("the running sweep's own")
    line = one_error_line(CliRunner().invoke(main, ["--features", str(shared_cache), "--out", str(out), "--grid",
                                                    str(grid), "--n-jobs", "1", "--dry-run", "--no-progress"]))
    assert f"process {h.pid}" in line and "sweep folder" in line
    assert (out / "sweep.json").read_text() == "the running sweep's own"
    assert sorted(os.listdir(out)) == [".lock", "sweep.json"]


def test_a_second_extraction_of_a_cache_in_progress_is_refused(coco_dir, tmp_path, holder):
    from stage1_extract.__main__ import main

    out = tmp_path / "c.h5"
    h = holder(tmp_path / "c.h5.parts" / ".lock")
    r = CliRunner().invoke(main, ["--images", str(coco_dir / "images"), "--captions", str(coco_dir / "captions.json"),
                                  "--out", str(out), "--backbone", "mobilenet_v2", "--weights", "default",
                                  "--limit", "4", "--batch-size", "4", "--workers", "0", "--device", "cpu",
                                  "--no-progress"])
    line = one_error_line(r)
    assert f"process {h.pid}" in line and "re-run" not in r.output
    assert not out.exists() and os.listdir(tmp_path / "c.h5.parts") == [".lock"]


def test_a_lock_file_a_full_disk_cannot_take_names_its_folder(tmp_path, monkeypatch):
    """Only the open was said with the folder; the pid write failed as a bare "[Errno 28] No space left"."""
    import errno

    from common import lock

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock.os, "write", full)
    with pytest.raises(OSError, match=f"cannot lock sweep {tmp_path}: No space left on device"):
        with lock.hold(tmp_path / ".lock", "sweep"):
            pass


def test_a_sweep_plot_that_cannot_be_drawn_is_a_warning_not_the_sweeps_failure(shared_cache, tmp_path,
                                                                                 monkeypatch, capsys):
    """A run's curves that cannot be drawn are a warning; a sweep's failed the whole sweep after its runs."""
    import stage2_decoder.sweeps.sweep as sweep_mod
    from stage2_decoder.sweeps.sweep import SweepConfig, run_sweep

    def no_room(out):
        raise OSError(28, f"cannot write sweep plot {out}/sweep.png: No space left on device")

    monkeypatch.setattr(sweep_mod, "plot_sweep", no_room)
    r = run_sweep(SweepConfig(features=str(shared_cache), out=str(tmp_path / "s"),
                              grid={"lr": [0.001], "embed_size": 16, "epochs": 1, "val_images": 8, "scst_epochs": 0},
                              n_jobs=1, threads=1, dry_run=True, progress=False))
    assert r.plot is None and [x["status"] for x in r.rows] == ["ok"] and (tmp_path / "s" / "results.md").is_file()
    err = capsys.readouterr().err
    assert "warning: sweep plot not drawn: " in err and "sweep.png: No space left on device" in err


def test_a_forked_child_does_not_keep_its_parents_lock(tmp_path):
    from common.lock import OutputBusy, hold

    lock = tmp_path / ".lock"
    with hold(lock, "run folder"):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child outlives the parent's hold
            os.write(w, b"up")  # its at-fork handler has run: the inherited descriptor is closed
            time.sleep(5)
            os._exit(0)
        os.close(w)
        assert os.read(r, 2) == b"up"
        os.close(r)
        with pytest.raises(OutputBusy):  # the same process, another open file: still refused
            with hold(lock, "run folder"):
                pass
    try:
        with hold(lock, "run folder"):  # released although the child still has the descriptor it inherited
            assert lock.read_text().strip() == str(os.getpid())
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


_SWEEP_PARENT = """
import sys, time
import stage2_decoder.sweeps.run as sweep
sweep._run_one = lambda spec, threads: time.sleep(120)  # a long run
getattr(sweep, "_SWEEP_PID", [])[:] = [__import__("os").getpid()]  # what run_sweep records
spec = sweep.RunSpec("r", sys.argv[1], "f.h5", {})
p = sweep._FORK.Process(target=sweep._child_main, args=(spec, 1))
p.start()
print(p.pid, flush=True)
p.join()
"""


def _alive(pid: int) -> bool:
    """Running (a zombie nobody has reaped yet counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_sweep_runs_die_with_a_killed_sweep(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", _SWEEP_PARENT, str(run)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(parent.stdout.readline())
    time.sleep(0.5)
    parent.kill()  # kill -9 of the sweep
    parent.wait(timeout=10)
    end = time.monotonic() + 10
    while time.monotonic() < end and _alive(child):
        time.sleep(0.1)
    if not _alive(child):
        return
    os.kill(child, signal.SIGKILL)
    pytest.fail("the sweep's run outlived the sweep")
