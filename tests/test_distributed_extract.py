"""`torchrun --nproc_per_node=2 -m stage1_extract` on CPU (gloo): one cache, identical to a one-process run.

Equality is exact (float32 cache, array_equal): each image is encoded by the same network on
one CPU thread whichever rank has it and whichever images share its batch (MobileNetV2 on CPU
computes every image of a batch independently), so there is no float-order difference to allow for.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.feature_cache import DONE, load_cache, parts_dir
from conftest import REPO
from stage1_extract.extract import ExtractConfig, extract

LIMIT = 12
BATCH = 3  # 2 shards per rank


def _cfg(coco_dir, out) -> ExtractConfig:
    return ExtractConfig(images=str(coco_dir / "images"), captions=str(coco_dir / "captions.json"), out=str(out),
                         backbone="mobilenet_v2", weights="default", batch_size=BATCH, workers=0, device="cpu",
                         limit=LIMIT, dtype="float32", progress=False)


def _args(coco_dir, out, *more, batch: int = BATCH) -> list[str]:
    return ["--images", coco_dir / "images", "--captions", coco_dir / "captions.json", "--out", out,
            "--backbone", "mobilenet_v2", "--limit", LIMIT, "--batch-size", batch, "--workers", 0,
            "--device", "cpu", "--dtype", "float32", "--no-progress", *more]


def _env(**more) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONHASHSEED="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **more)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _counts(stdout: str) -> str:
    wrote = [ln for ln in stdout.splitlines() if ln.startswith("wrote ")]
    assert len(wrote) == 1, stdout  # rank 0 alone reports
    return wrote[0].split(": ", 1)[1].rsplit(", ", 1)[0]


def _torchrun(*args, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "stage1_extract", *map(str, args)]


@pytest.fixture(scope="module")
def one_process(coco_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_ref") / "one.h5"
    extract(_cfg(coco_dir, out))
    return load_cache(out)


def _assert_same(out: Path, ref) -> None:
    c = load_cache(out)
    assert c.keys == ref.keys and (c.status == DONE).all()
    assert c.features.dtype == np.float32 and (np.abs(c.features).sum(axis=1) > 0).all()
    np.testing.assert_array_equal(c.features, ref.features)
    assert not parts_dir(out).exists()


def test_ranks_split_the_work_left_evenly_and_together_take_all_of_it():
    from stage1_extract.distributed import Dist

    # rank 0 finished its rows, rank 1 was killed early: by row number all of the rest fell to rank 1 again
    pending = list(range(1, 181, 2))
    for n in (2, 3):
        shares = [Dist(r, n).mine(pending) for r in range(n)]
        assert sorted(sum(shares, [])) == pending and max(map(len, shares)) - min(map(len, shares)) <= 1
    # a fresh run: the same round-robin as ever
    assert Dist(1, 2).mine(range(7)) == [1, 3, 5]


def test_torchrun_two_processes_equal_one(coco_dir, tmp_path, one_process):
    out = tmp_path / "two.h5"
    proc = subprocess.run(_torchrun(*_args(coco_dir, out)), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith(f"wrote {out}: ")
    assert _counts(proc.stdout) == f"{LIMIT} images, {LIMIT} extracted now, 0 resumed, 0 skipped"
    _assert_same(out, one_process)


def _shard_rows(out: Path) -> int:
    n = 0
    for p in parts_dir(out).glob("rank*.npz"):
        with np.load(p) as z:
            n += len(z["rows"])
    return n


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    """SIGKILL the launched command and every process under it once `ready()`."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    from gpu import _descendants  # bench/gpu.py: torchrun starts its workers in sessions of their own

    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


@pytest.mark.slow
def test_killed_two_rank_run_resumes_per_rank(coco_dir, tmp_path, one_process):
    out = tmp_path / "r.h5"
    # batches of one (6 shards per rank) leave time to kill mid-run; features do not depend on the batch
    proc = subprocess.Popen(_torchrun(*_args(coco_dir, out, batch=1)), cwd=REPO, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    ranks = lambda: {p.name[:7] for p in parts_dir(out).glob("rank*.npz")}  # noqa: E731
    _kill_when(proc, lambda: ranks() == {"rank000", "rank001"})  # both ranks have written a shard of their own
    for p in parts_dir(out).glob("rank*.npz"):  # each rank wrote only its share: rows i % 2 == rank
        with np.load(p) as z:
            assert (z["rows"] % 2 == int(p.name[4:7])).all()
    _finish_with_two_ranks(coco_dir, out, one_process)


@pytest.mark.slow
def test_one_process_run_killed_then_finished_by_two_ranks(coco_dir, tmp_path, one_process):
    out = tmp_path / "w.h5"
    proc = subprocess.Popen([sys.executable, "-m", "stage1_extract", *map(str, _args(coco_dir, out, batch=1))], cwd=REPO,
                            env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    _kill_when(proc, lambda: len(list(parts_dir(out).glob("rank*.npz"))) >= 1)
    _finish_with_two_ranks(coco_dir, out, one_process)


def _finish_with_two_ranks(coco_dir, out, one_process):
    """Resume an interrupted extraction with 2 torchrun ranks: the kept shards are reused, the cache
    equals the 1-process run's."""
    kept = _shard_rows(out)
    proc = subprocess.run(_torchrun(*_args(coco_dir, out)), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert _counts(proc.stdout) == f"{LIMIT} images, {LIMIT - kept} extracted now, {kept} resumed, 0 skipped"
    _assert_same(out, one_process)


_THREADS_LEFT = """
import os, sys
from stage1_extract.__main__ import main
try:
    main(prog_name="stage1_extract")
except SystemExit as e:
    left = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    print("threads left:", ",".join(t for t in left if "gloo" in t), file=sys.stderr)
    raise
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names from /proc")
def test_a_finished_rank_leaves_no_gloo_thread_to_race_the_exit(coco_dir, tmp_path):
    """Modules imported after init_process_group (torchvision's import of torch._dynamo) kept references to the
    default group, so destroy_process_group could not free it: its gloo threads lived on into Python's exit,
    where one of them, dropping the last all_reduce's tensors, now and then took the GIL from a finalising
    interpreter: SIGABRT, "terminate called without an active exception" (1 run in ~10 under load)."""
    out = tmp_path / "t.h5"
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _THREADS_LEFT, *map(str, _args(coco_dir, out))], cwd=REPO,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port))
             for r in range(2)]
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    for err in errs:  # the group freed: its threads joined before the interpreter finalises
        assert "threads left: \n" in err, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RANK1_DISK_FAILS = """
import errno, os
if os.environ["RANK"] == "1":
    import numpy as np
    def savez(*a, **k): raise OSError(errno.ENOSPC, "No space left on device")
    np.savez = savez
from stage1_extract.__main__ import main
main(prog_name="stage1_extract")
"""


@pytest.mark.slow
def test_a_failing_rank_stops_the_others_without_torchrun(coco_dir, tmp_path):
    """Ranks started by hand (as a batch system would, no torchrun to tear them down): rank 1 fails,
    rank 0 learns it at the next sync point and exits with an error instead of waiting for the timeout."""
    out = tmp_path / "f.h5"
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _RANK1_DISK_FAILS, *map(str, _args(coco_dir, out,
                                                                                       "--dist-timeout", 600))],
                              cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port))
             for r in range(2)]
    # a hang guard, not a timing: ranks that waited out --dist-timeout 600 would overrun it
    (_, err0), (_, err1) = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [1, 1], (err0, err1)
    assert "Traceback" not in err0 + err1
    assert "error: cannot write" in err1 and "No space left on device" in err1
    assert "error: extracting failed on another rank" in err0
    assert not out.exists() and (parts_dir(out) / "meta.json").is_file()
