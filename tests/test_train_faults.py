"""Training under faults (Interruptions for stage 2): SIGKILL at exact points and at a
random instant, Ctrl-C / SIGTERM, a full disk, an unwritable run folder, checkpoint writes that die.

The promise: a rerun with the same command resumes from the last complete checkpoint with the
same optimizer state and RNG position, so the finished run is *bitwise* equal to an
uninterrupted one (CPU, one thread: the same float operations in the same order; dropout is on,
so a wrong RNG position would show). A `.pt` at its final name is never truncated.

Exact kill points run `train()` in a forked child (cheap: torch is already imported) that patches
one function to SIGKILL itself at that instant; a SIGKILL really ends the process, with no
`finally` and no clean-up, as `kill -9` would. The random-instant kill and the signals go to the
real CLI in a subprocess.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import REPO, TEST_THREADS
from reliability_helpers import in_forked_child, one_error_line
import stage2_decoder.training.loop as loop_mod
from stage2_decoder.training import checkpoint as ckpt_mod
from stage2_decoder.training import epochs as epochs_mod
from stage2_decoder.training import run_files as run_files_mod
from stage2_decoder.training.checkpoint import CheckpointError, load_checkpoint
from stage2_decoder.training.config import TrainConfig
from stage2_decoder.training.loop import train

XE_EPOCHS, SCST_EPOCHS = 3, 1  # the default pipeline: cross-entropy epochs, then self-critical ones
EPOCHS = XE_EPOCHS + SCST_EPOCHS
# the real-CLI tests: cross-entropy only (cheaper; the exact kill points cover the SCST phase)
CLI_ARGS = ["--epochs", EPOCHS, "--scst-epochs", 0, "--batch-size", 32, "--embed-size", 16, "--hidden-size", 32,
            "--vocab-threshold", 2, "--dropout", 0.3, "--select-by", "loss", "--seed", 3, "--val-images", 8,
            "--device", "cpu", "--no-progress"]


def _cfg(features, out, **over) -> TrainConfig:
    kw = dict(features=str(features), out=str(out), epochs=XE_EPOCHS, scst_epochs=SCST_EPOCHS, batch_size=32,
              embed_size=16, hidden_size=32, vocab_threshold=2, dropout=0.3, select_by="loss", seed=3, val_images=8,
              device="cpu", progress=False)
    kw.update(over)
    return TrainConfig(**kw)


@pytest.fixture(scope="module")
def baseline(shared_cache, tmp_path_factory) -> Path:
    """An uninterrupted run: what every interrupted-then-resumed run must equal."""
    run = tmp_path_factory.mktemp("train_faults") / "baseline"
    train(_cfg(shared_cache, run))
    return run


# --- comparing runs ----------------------------------------------------------------------------------------

def _same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _no_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def assert_same_run(run: Path, ref: Path) -> None:
    """Same weights, optimizer, scheduler, RNG, history and best.pt as the reference run, bitwise."""
    got, want = load_checkpoint(run / "last.pt"), load_checkpoint(ref / "last.pt")
    assert got["epoch"] == want["epoch"] == EPOCHS
    for key in ("model_state", "optimizer_state", "scheduler_state", "rng_state", "best", "vocab", "split"):
        _same(got[key], want[key], key)
    assert _no_seconds(got["history"]) == _no_seconds(want["history"])
    _same(load_checkpoint(run / "best.pt")["model_state"], load_checkpoint(ref / "best.pt")["model_state"], "best")
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert _no_seconds(lines) == _no_seconds(want["history"])  # one line per epoch, none repeated or lost
    assert not list(run.glob("*.tmp"))


def assert_consistent_after_kill(run: Path) -> int:
    """What a kill may leave: last.pt loads (never truncated) or is absent; metrics.jsonl no longer than it."""
    if not (run / "last.pt").exists():
        return 0
    last = load_checkpoint(run / "last.pt")
    if (run / "best.pt").exists():
        load_checkpoint(run / "best.pt")
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    assert len(lines) <= last["epoch"]
    return last["epoch"]


# --- exact kill points (forked child kills itself) ---------------------------------------------------------

def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_mid_epoch(epoch: int, after_steps: int):
    """After `after_steps` optimizer steps of `epoch` (1-based; counted from where a resume starts)."""
    def inject():
        st = {"resumed": 0, "epochs_done": 0, "steps": 0}
        orig_loss, orig_val, orig_resume = epochs_mod.batch_loss, epochs_mod.validation_cider, loop_mod.resume_run

        def resume(*a, **k):
            out = orig_resume(*a, **k)
            st["resumed"] = out[1]
            return out

        def validating(*a, **k):  # the end of an epoch's training steps
            st["epochs_done"] += 1
            st["steps"] = 0
            return orig_val(*a, **k)

        def counting(model, b, *a, **k):
            if model.training:
                st["steps"] += 1
                if st["resumed"] + st["epochs_done"] + 1 == epoch and st["steps"] == after_steps:
                    _die()
            return orig_loss(model, b, *a, **k)

        epochs_mod.batch_loss, epochs_mod.validation_cider, loop_mod.resume_run = counting, validating, resume
    return inject


def _kill_in_validation(epoch: int):
    def inject():
        orig = epochs_mod.validation_cider
        calls = {"n": 0}

        def validating(*a, **k):
            calls["n"] += 1
            if calls["n"] == epoch:
                _die()
            return orig(*a, **k)

        epochs_mod.validation_cider = validating
    return inject


def _kill_after_save(name: str, epoch: int):
    """After `name` (best.pt / last.pt) of `epoch` landed: between best.pt and last.pt, or between
    last.pt and the metrics.jsonl line."""
    def inject():
        orig = run_files_mod.save_checkpoint

        def saving(path, *a, **extra):
            orig(path, *a, **extra)
            if Path(path).name == name and extra["epoch"] == epoch:
                _die()

        run_files_mod.save_checkpoint = saving
    return inject


def _kill_in_scst(after_steps: int):
    """After `after_steps` optimizer steps of the self-critical phase."""
    def inject():
        st = {"on": False, "steps": 0}
        orig_start, orig_step = loop_mod.start_scst, torch.optim.Adam.step

        def start(*a, **k):
            st["on"] = True
            return orig_start(*a, **k)

        def step(self, *a, **k):
            out = orig_step(self, *a, **k)
            if st["on"]:
                st["steps"] += 1
                if st["steps"] == after_steps:
                    _die()
            return out

        loop_mod.start_scst, torch.optim.Adam.step = start, step
    return inject


def _kill_while_writing(name: str, epoch: int):
    """Halfway through writing `name` of `epoch`: part of the bytes are on disk, then SIGKILL."""
    def inject():
        orig_save, orig_fsync, current = run_files_mod.save_checkpoint, os.fsync, {}

        def saving(path, *a, **extra):
            current["hit"] = Path(path).name == name and extra["epoch"] == epoch
            orig_save(path, *a, **extra)

        def fsync(fd):
            if current.get("hit"):
                os.truncate(f"/proc/self/fd/{fd}", os.fstat(fd).st_size // 2)  # the fd may be read-only
                _die()
            orig_fsync(fd)

        run_files_mod.save_checkpoint = saving
        ckpt_mod.os.fsync = fsync  # the same os module object: patched in this child only
    return inject


KILL_POINTS = {  # name -> (injection, the epoch last.pt holds after the kill)
    "mid-epoch 2, after 3 of 7 steps": (_kill_mid_epoch(2, 3), 1),
    "mid-epoch 3, after 5 of 7 steps": (_kill_mid_epoch(3, 5), 2),
    "in validation of epoch 2": (_kill_in_validation(2), 1),
    "between best.pt and last.pt of epoch 2": (_kill_after_save("best.pt", 2), 1),
    "between last.pt and metrics.jsonl of epoch 2": (_kill_after_save("last.pt", 2), 2),
    # SCST starts from best.pt: were best.pt written after last.pt, it would start from a stale one
    "after last.pt of the last cross-entropy epoch": (_kill_after_save("last.pt", XE_EPOCHS), XE_EPOCHS),
    "in the self-critical epoch, after its first step": (_kill_in_scst(1), XE_EPOCHS),
    "after last.pt of the final epoch": (_kill_after_save("last.pt", EPOCHS), EPOCHS),
    "halfway through writing last.pt of epoch 3": (_kill_while_writing("last.pt", 3), 2),
    "halfway through writing best.pt of epoch 1": (_kill_while_writing("best.pt", 1), 0),
}


def _run_in_child(cfg: TrainConfig, inject) -> int:
    """train(cfg) in a forked child with `inject` applied; returns the signal that ended it."""
    def work():
        inject()
        train(cfg)
        return 0  # the kill point was never reached

    return -in_forked_child(work)


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_at_an_exact_point_then_rerun_equals_an_uninterrupted_run(shared_cache, baseline, tmp_path, point):
    run = tmp_path / "run"
    cfg = _cfg(shared_cache, run)
    inject, last_epoch = KILL_POINTS[point]
    assert _run_in_child(cfg, inject) == signal.SIGKILL, "the kill point was never reached"
    assert assert_consistent_after_kill(run) == last_epoch
    if point == "after last.pt of the last cross-entropy epoch":  # meaningful only if it is also the best
        assert load_checkpoint(run / "last.pt")["best"]["epoch"] == XE_EPOCHS
    if "writing" in point:  # the torn write is a .tmp beside an intact (or absent) final file
        assert list(run.glob(".*.pt.*.tmp"))
    train(cfg)  # the same command again
    assert_same_run(run, baseline)


def test_two_kills_in_a_row_then_rerun(shared_cache, baseline, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(shared_cache, run)
    assert _run_in_child(cfg, _kill_after_save("best.pt", 2)) == signal.SIGKILL
    assert _run_in_child(cfg, _kill_while_writing("last.pt", 3)) == signal.SIGKILL
    assert assert_consistent_after_kill(run) == 2
    train(cfg)
    assert_same_run(run, baseline)


# --- the real CLI: a SIGKILL at a random instant, Ctrl-C and SIGTERM ---------------------------------------

def _env() -> dict:
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS=TEST_THREADS, MKL_NUM_THREADS=TEST_THREADS)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _popen(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stage2_decoder.train", *map(str, args)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_epoch(run: Path, proc: subprocess.Popen, epoch: int, timeout: float = 180) -> None:
    """Until last.pt of at least `epoch` exists (os.replace makes it safe to read at any time)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()}")
        with contextlib.suppress(CheckpointError):
            if (run / "last.pt").exists() and load_checkpoint(run / "last.pt")["epoch"] >= epoch:
                return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint in time")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_real_cli_sigkill_at_a_random_instant_then_rerun_equals_uninterrupted(shared_cache, tmp_path, seed):
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "stage2_decoder.train", "--features", str(shared_cache), "--out",
                           str(ref), *map(str, CLI_ARGS)], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    proc = _popen("--features", shared_cache, "--out", run, *CLI_ARGS)
    _wait_for_epoch(run, proc, 1)
    time.sleep(random.Random(seed).uniform(0, 0.5))  # somewhere in epochs 2..4, or in a save
    proc.kill()
    proc.communicate()
    assert_consistent_after_kill(run)
    again = subprocess.run([sys.executable, "-m", "stage2_decoder.train", "--features", str(shared_cache), "--out",
                            str(run), *map(str, CLI_ARGS)], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert_same_run(run, ref)


class _ForkedCli:
    """The click command in a forked child (torch already imported: no start-up cost), reporting its
    exit code and stderr through a file; `poll`/`send_signal` like a Popen."""

    def __init__(self, args: list, report: Path):
        self.report, self.returncode = report, None
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                r = _train_cli(args)
                report.write_text(json.dumps({"code": r.exit_code, "stderr": r.stderr}))
            finally:
                os._exit(0)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = json.loads(self.report.read_text())["code"] if self.report.exists() else -1
        return self.returncode

    def send_signal(self, sig):
        os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout=None):
        end = time.monotonic() + (timeout or 600)
        while self.poll() is None:
            if time.monotonic() > end:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise AssertionError("forked training did not stop in time: killed")
            time.sleep(0.05)
        return "", json.loads(self.report.read_text())["stderr"]


@pytest.mark.parametrize("sig, code, how", [(signal.SIGINT, 130, "subprocess"), (signal.SIGTERM, 143, "fork")])
def test_ctrl_c_and_sigterm_stop_cleanly_and_keep_the_last_epoch(shared_cache, tmp_path, sig, code, how):
    """Ctrl-C to the real `python -m stage2_decoder.train`; SIGTERM to the same click command in a
    forked child (the handler is run_guarded's either way)."""
    run = tmp_path / "run"
    args = ["--features", shared_cache, "--out", run, *CLI_ARGS]
    args[args.index("--epochs") + 1] = 500  # far more than it will get to
    proc = _popen(*args) if how == "subprocess" else _ForkedCli(args, tmp_path / "report.json")
    _wait_for_epoch(run, proc, 1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err
    assert "training interrupted" in err and str(run / "last.pt") in err and "re-run" in err
    epoch = assert_consistent_after_kill(run)
    assert epoch >= 1 and not list(run.glob("*.tmp"))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == epoch
    args[args.index("--epochs") + 1] = epoch + 1  # and the same command resumes (one more epoch, to be quick)
    result = _train_cli(args)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(run / "last.pt")["epoch"] == epoch + 1


# --- full disk, unwritable folder, torn checkpoint writes --------------------------------------------------

@contextlib.contextmanager
def _tmpfs(path: Path, size: str, *options: str):
    """A small tmpfs at `path` (needs root and a mount-capable container; skips otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    opts = ",".join([f"size={size}", *options])
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _train_cli(cfg_args: list):
    from click.testing import CliRunner

    from stage2_decoder.train import main

    return CliRunner().invoke(main, [str(a) for a in cfg_args])


def test_disk_full_mid_run_is_one_error_line_and_loses_nothing(shared_cache, tmp_path):
    """A real ENOSPC (a 4 MB tmpfs, filled up after epoch 1): a one-line error naming the file, the
    epoch-1 checkpoints intact, no temporary left; once space is back the same command finishes."""
    with _tmpfs(tmp_path / "small", "4m") as disk:
        run = disk / "run"
        args = ["--features", shared_cache, "--out", run, *CLI_ARGS]
        args[args.index("--epochs") + 1] = 1
        assert _train_cli(args).exit_code == 0
        before = (run / "last.pt").read_bytes()
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        filler = disk / "filler"
        filler.write_bytes(b"\0" * max(free - 4096, 0))
        args[args.index("--epochs") + 1] = 3
        line = one_error_line(_train_cli(args))
        assert "No space left on device" in line and str(run) in line and ".pt" in line
        assert (run / "last.pt").read_bytes() == before and load_checkpoint(run / "best.pt")["epoch"] == 1
        assert not list(run.glob("*.tmp"))
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
        filler.unlink()
        again = _train_cli(args)
        assert again.exit_code == 0, again.stderr
        assert load_checkpoint(run / "last.pt")["epoch"] == 3


def test_file_size_limit_is_one_error_line_without_root(shared_cache, tmp_path):
    """The same failure without root: RLIMIT_FSIZE makes a checkpoint write fail (EFBIG) in a
    forked child running the real click command."""
    import resource

    run, report = tmp_path / "run", tmp_path / "report.json"
    args = ["--features", shared_cache, "--out", run, *CLI_ARGS]
    args[args.index("--epochs") + 1] = 1

    def work():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))
        r = _train_cli(args)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        report.write_text(json.dumps({"code": r.exit_code, "stderr": r.stderr, "exc": repr(r.exception)}))
        return 0

    assert in_forked_child(work) == 0
    r = json.loads(report.read_text())
    assert r["code"] == 1 and "Traceback" not in r["stderr"], r
    errors = [ln for ln in r["stderr"].splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write checkpoint"), r
    assert str(run) in errors[0] and "File too large" in errors[0]
    assert not list(run.glob("*.pt")) and not list(run.glob("*.tmp"))


def test_unwritable_run_folder_is_one_error_line(shared_cache, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    if os.geteuid() != 0:
        parent.chmod(0o500)
        ctx = contextlib.nullcontext(parent)
    else:  # root ignores permissions: a read-only file system instead
        ctx = _tmpfs(parent, "64k", "ro")
    with ctx:
        run = parent / "run"
        line = one_error_line(_train_cli(["--features", shared_cache, "--out", run, *CLI_ARGS]))
        assert str(run) in line
        assert not run.exists()


BB = {"name": "mobilenet_v2", "weights": "none", "feature_dim": 8, "preprocess": "{}"}


def test_save_checkpoint_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    from common.vocab import build_vocab
    from stage2_decoder.model import CaptionDecoder, DecoderConfig

    vocab = build_vocab([["a", "dog"]], threshold=1)
    model = CaptionDecoder(DecoderConfig(8, len(vocab), 4, 4))
    path = tmp_path / "last.pt"
    ckpt_mod.save_checkpoint(path, model, vocab, BB, epoch=1)
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {path}: No space left on device"):
        ckpt_mod.save_checkpoint(path, model, vocab, BB, epoch=2)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_save_checkpoint_never_follows_a_planted_link(tmp_path):
    """`last.pt.tmp` planted as a symlink to another file: the save replaces the link, the target is untouched."""
    from common.vocab import build_vocab
    from stage2_decoder.model import CaptionDecoder, DecoderConfig

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "last.pt.tmp")
    vocab = build_vocab([["a"]], threshold=1)
    ckpt_mod.save_checkpoint(tmp_path / "last.pt", CaptionDecoder(DecoderConfig(8, len(vocab), 4, 4)), vocab, BB)
    assert victim.read_text() == "precious"
    assert load_checkpoint(tmp_path / "last.pt")["format"] == "capcache-checkpoint"
    assert (tmp_path / "last.pt.tmp").is_symlink()  # left alone: never opened, never followed


def test_config_replace_keeps_fields():  # guards _cfg against TrainConfig changes (a renamed field)
    cfg = _cfg("f.h5", "out")
    assert replace(cfg, epochs=2).epochs == 2 and cfg.dropout == 0.3


def test_progress_bars_count_epochs_as_the_epoch_lines_do(shared_cache, tmp_path, capsys):
    """With 1 + 1 epochs, the cross-entropy bar says "epoch 1/2" as its epoch line does (it said 1/1 while
    the line said 1/2), and the SCST bar "scst 2/2"."""
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    train(TrainConfig(features=str(shared_cache), out=str(tmp_path / "run"), epochs=1, scst_epochs=1, dry_run=True,
                      embed_size=16, hidden_size=16, vocab_threshold=2, device="cpu", progress=True))
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "scst 2/2" in err and "epoch 1/1" not in err, err[-2000:]
