"""Helpers shared by the reliability tests (test_bad_*.py, test_train_faults.py): not collected itself."""
from __future__ import annotations

import subprocess
from pathlib import Path

TINY = {"embed_size": 16, "hidden_size": 16, "vocab_threshold": 2, "device": "cpu", "progress": False}


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr


def one_error_line(proc) -> str:
    """A user error: non-zero exit, no traceback, exactly one 'error:' line (and nothing else) on stderr.

    Works for a subprocess result and for click's CliRunner result (its exception must be the
    SystemExit of the exit code, not a crash)."""
    code = getattr(proc, "returncode", getattr(proc, "exit_code", None))
    assert code not in (0, None), (code, proc.stdout, proc.stderr)
    exc = getattr(proc, "exception", None)
    assert exc is None or isinstance(exc, SystemExit), repr(exc)
    no_traceback(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


def tiny_run(shared_cache: Path, tmp_path_factory) -> Path:
    """A one-batch (dry-run) decoder run on the shared mobilenet cache, made once per test session:
    RUN/best.pt and RUN/last.pt are enough to caption and evaluate through the real CLIs."""
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    run = tmp_path_factory.getbasetemp() / "reliability-tiny-run"
    if not (run / "last.pt").is_file():
        train(TrainConfig(features=str(shared_cache), out=str(run), epochs=1, scst_epochs=0, batch_size=16,
                          dry_run=True, **TINY))
    return run


def in_forked_child(work, timeout: float = 300) -> int:
    """Run work() -> int in a forked child (torch already imported: no start-up cost) and wait.

    Returns the child's exit code, or minus the signal that ended it. The child never returns
    into pytest (os._exit); a child still running after `timeout` seconds is killed and fails
    the test (a fork while another thread held a lock could otherwise hang the suite)."""
    import os
    import sys
    import time

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 98
        try:
            code = work()
        except BaseException:  # noqa: BLE001 - reported as exit 99
            code = 99
        finally:
            os._exit(code if isinstance(code, int) else 0)
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > end:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError(f"forked child still running after {timeout}s: killed")
        time.sleep(0.02)
