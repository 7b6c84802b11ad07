"""Stage 1 under faults: SIGKILL at many points, Ctrl-C / SIGTERM, a full disk, a blocked output path.

Each fault hits the real CLI in a subprocess; the rerun must give a cache equal to an
uninterrupted run's (same backbone, same device, same thread count: MobileNetV2 features on
one CPU thread do not depend on which images share a batch, so equality is exact), with every
image exactly once. Kill points are of two kinds: a SIGKILL from outside once some shards
exist (the realistic one, timing-dependent), and a SIGKILL the child sends itself at an exact
instant (a shard written but not yet renamed, half a shard's bytes written, in the middle of
assembling, after the final rename but before the clean-up), set up by a tiny wrapper that
patches one function of stage1_extract.cache_writer before running the unchanged CLI.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.feature_cache import DONE, CacheError, load_cache, parts_dir
from conftest import REPO, TEST_THREADS
from stage1_extract.cache_writer import CacheWriter
from stage1_extract.extract import ExtractConfig, extract

LIMIT = 24
BATCH = 4  # 6 shards of 4 images


def _cfg(coco_dir, out, **over) -> ExtractConfig:
    kw = dict(images=str(coco_dir / "images"), captions=str(coco_dir / "captions.json"), out=str(out),
              backbone="mobilenet_v2", weights="default", batch_size=BATCH, workers=0, device="cpu", limit=LIMIT,
              progress=False)
    kw.update(over)
    return ExtractConfig(**kw)


def _args(coco_dir, out, workers=0) -> list[str]:
    return ["--images", coco_dir / "images", "--captions", coco_dir / "captions.json", "--out", out,
            "--backbone", "mobilenet_v2", "--limit", LIMIT, "--batch-size", BATCH, "--workers", workers,
            "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def reference(coco_dir, tmp_path_factory):
    """An uninterrupted extraction of the same images: what every interrupted run must end up equal to."""
    out = tmp_path_factory.mktemp("faults_ref") / "ref.h5"
    extract(_cfg(coco_dir, out))
    return load_cache(out)


def _env() -> dict:
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS=TEST_THREADS, MKL_NUM_THREADS=TEST_THREADS)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _spawn(args, prelude: str | None = None) -> subprocess.Popen:
    """The stage-1 CLI in its own process group (so a signal can reach its DataLoader workers too)."""
    code = ["-m", "stage1_extract"] if prelude is None else ["-c", prelude + _RUN_CLI]
    return subprocess.Popen([sys.executable, *code, *map(str, args)], cwd=REPO, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


_RUN_CLI = """
from stage1_extract.__main__ import main
main(prog_name="stage1_extract")
"""

# the self-kill wrappers: each patches one function so the process SIGKILLs itself at one exact instant
_DIE = "import os, signal\ndef die(): os.kill(os.getpid(), signal.SIGKILL)\n"
KILL_POINTS = {
    # a shard fully written under its temp name, killed before the rename that makes it count
    "shard_before_rename": _DIE + """
_replace, _n = os.replace, [0]
def replace(src, dst):
    if str(dst).endswith(".npz"):
        _n[0] += 1
        if _n[0] == 3: die()
    return _replace(src, dst)
os.replace = replace
""",
    # killed with half of a shard's bytes on disk (a torn temp file)
    "shard_half_written": _DIE + """
import io, numpy as np
_savez, _n = np.savez, [0]
def savez(fh, **arrays):
    _n[0] += 1
    if _n[0] == 4:
        buf = io.BytesIO(); _savez(buf, **arrays); fh.write(buf.getvalue()[: len(buf.getvalue()) // 2]); fh.flush()
        die()
    return _savez(fh, **arrays)
np.savez = savez
""",
    # killed in the middle of assembling OUT from the shards
    "mid_assembly": _DIE + """
import stage1_extract.cache_writer as fc
_copy, _n = fc._copy_shard, [0]
def copy(*a):
    _n[0] += 1
    if _n[0] == 3: die()
    return _copy(*a)
fc._copy_shard = copy
""",
    # OUT renamed into place, killed before OUT.parts/ is removed
    "after_final_rename": _DIE + """
import stage1_extract.cache_writer as fc
fc.remove_parts = lambda out: die()
""",
    # OUT.parts/meta.json written, killed before any shard
    "before_first_shard": _DIE + """
import stage1_extract.cache_writer as fc
_atomic = fc._atomic_write_bytes
def atomic(path, write):
    _atomic(path, write)
    if path.name == "meta.json": die()
fc._atomic_write_bytes = atomic
""",
}
FAST_KILL_POINTS = ("shard_before_rename", "mid_assembly")


def _shard_rows(out: Path) -> list[np.ndarray]:
    rows = []
    for p in sorted(parts_dir(out).glob("rank*.npz")):
        with np.load(p, allow_pickle=False) as z:
            rows.append(np.concatenate([z["rows"], z["failed_rows"]]))
    return rows


def _assert_no_duplicates(out: Path) -> int:
    """Rows recorded by the shards a kill left behind: each at most once. Returns how many."""
    rows = np.concatenate(_shard_rows(out) or [np.zeros(0, np.int64)])
    assert len(rows) == len(set(rows.tolist())), f"a row is in two shards: {sorted(rows.tolist())}"
    assert set(rows.tolist()) <= set(range(LIMIT))
    return len(rows)


def _assert_same_as_reference(out: Path, reference) -> None:
    c = load_cache(out)
    assert c.keys == reference.keys and len(set(c.keys)) == LIMIT  # every image, exactly once
    assert (c.status == DONE).all() and c.errors == {}
    assert (np.abs(c.features.astype(np.float32)).sum(axis=1) > 0).all(), "a row of zeros"
    np.testing.assert_array_equal(c.features, reference.features)
    assert not parts_dir(out).exists()


def _killed(proc: subprocess.Popen, timeout: float = 180) -> None:
    proc.wait(timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.communicate())


def _kill_after_shards(proc: subprocess.Popen, out: Path, n: int, timeout: float = 180) -> None:
    """SIGKILL the CLI (and its workers) from outside as soon as `n` shards exist."""
    deadline = time.monotonic() + timeout
    while len(list(parts_dir(out).glob("rank*.npz"))) < n:
        assert proc.poll() is None, f"finished before {n} shards appeared: {proc.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    _killed(proc)


def _summary_counts(stdout: str) -> tuple[int, int, int]:
    m = re.search(r": (\d+) images, (\d+) extracted now, (\d+) resumed", stdout)
    assert m, stdout
    return tuple(map(int, m.groups()))


def test_sigkill_from_outside_then_rerun(coco_dir, tmp_path, reference):
    out = tmp_path / "k.h5"
    _kill_after_shards(_spawn(_args(coco_dir, out)), out, 2)
    assert not out.exists()
    kept = _assert_no_duplicates(out)
    assert kept >= 2 * BATCH
    s = extract(_cfg(coco_dir, out))
    assert (s.total, s.done_now, s.already_done) == (LIMIT, LIMIT - kept, kept)  # nothing lost, nothing twice
    _assert_same_as_reference(out, reference)


@pytest.mark.slow
def test_sigkill_during_cli_rerun_then_cli_rerun(cli, coco_dir, tmp_path, reference):
    """Killed twice (the second time while resuming), finished by the CLI: its summary counts add up."""
    out = tmp_path / "k.h5"
    _kill_after_shards(_spawn(_args(coco_dir, out)), out, 1)
    first = _assert_no_duplicates(out)
    _kill_after_shards(_spawn(_args(coco_dir, out)), out, len(_shard_rows(out)) + 2)
    kept = _assert_no_duplicates(out)
    assert kept > first
    proc = cli("stage1_extract", *_args(coco_dir, out))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert _summary_counts(proc.stdout) == (LIMIT, LIMIT - kept, kept)
    _assert_same_as_reference(out, reference)


@pytest.mark.parametrize("point", [pytest.param(p, marks=() if p in FAST_KILL_POINTS else pytest.mark.slow)
                                   for p in KILL_POINTS])
def test_sigkill_at_exact_point_then_rerun(coco_dir, tmp_path, reference, point):
    out = tmp_path / "k.h5"
    _killed(_spawn(_args(coco_dir, out), prelude=KILL_POINTS[point]))
    if point == "after_final_rename":
        assert out.is_file() and parts_dir(out).is_dir()
    else:
        assert not out.exists() and (parts_dir(out) / "meta.json").is_file()
    kept = _assert_no_duplicates(out)
    if point == "mid_assembly":
        assert kept == LIMIT and list(parts_dir(out).glob(f".{out.name}.*.tmp"))  # the torn file being assembled
    s = extract(_cfg(coco_dir, out))
    if point == "after_final_rename":
        assert s.was_complete
    else:
        assert (s.done_now, s.already_done) == (LIMIT - kept, kept)
    _assert_same_as_reference(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_sigkill_at_random_times(coco_dir, tmp_path, reference, seed):
    """From outside, at a random instant (start-up, extraction, assembly: wherever it falls), twice in a row."""
    out = tmp_path / "k.h5"
    rng = random.Random(seed)
    for _ in range(2):
        proc = _spawn(_args(coco_dir, out, workers=1))
        time.sleep(rng.uniform(2.0, 12.0))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=180)
        if parts_dir(out).exists():
            _assert_no_duplicates(out)
    extract(_cfg(coco_dir, out))
    _assert_same_as_reference(out, reference)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_stop_cleanly_and_keep_work(coco_dir, tmp_path, reference, sig, code):
    out = tmp_path / "i.h5"
    proc = _spawn(_args(coco_dir, out, workers=1))
    while len(list(parts_dir(out).glob("rank*.npz"))) < 2:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    # Ctrl-C in a terminal reaches the whole process group (workers too); `kill` reaches the main process only
    os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    assert f"extraction interrupted; finished batches are kept in {out}.parts/" in err
    with pytest.raises(ProcessLookupError):  # no DataLoader worker left behind
        os.killpg(proc.pid, 0)
    kept = _assert_no_duplicates(out)
    assert kept >= 2 * BATCH
    s = extract(_cfg(coco_dir, out))
    assert (s.done_now, s.already_done) == (LIMIT - kept, kept)
    _assert_same_as_reference(out, reference)


@pytest.fixture
def tiny_disk(tmp_path):
    """tiny_disk(kib) -> a folder on a tmpfs that small (needs root and mount rights; skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = []

    def make(kib: int) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(mnt)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tiny tmpfs to fill up: {r.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield make
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], check=False)


def _grow(mnt: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=4m", str(mnt)], check=True)


def test_disk_full_during_extraction(cli, coco_dir, tiny_disk, reference):
    disk = tiny_disk(40)  # meta.json and about 3 of the 6 shards (12 KiB each)
    out = disk / "full.h5"
    proc = cli("stage1_extract", *_args(coco_dir, out))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "No space left on device" in errors[0] and str(parts_dir(out)) in errors[0]
    kept = _assert_no_duplicates(out)  # the shards finished before the disk filled up are intact
    assert 0 < kept < LIMIT
    _grow(disk)
    s = extract(_cfg(coco_dir, out))
    assert (s.done_now, s.already_done) == (LIMIT - kept, kept)
    _assert_same_as_reference(out, reference)


def test_a_decoding_worker_that_fails_is_one_error_line_and_the_run_ends(coco_dir, tmp_path):
    """A worker that raised (here its batch outgrew the file-size limit: /dev/shm full behaves the same) printed
    torch's whole traceback flattened into the error line, then the run never ended: the worker, alive and
    ignoring SIGTERM (the main process stops workers in order), was joined forever at exit."""
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60 * 1024, 60 * 1024))  # a batch of 4 images is 600 KB

    out = tmp_path / "c.h5"
    proc = subprocess.run([sys.executable, "-m", "stage1_extract", *map(str, _args(coco_dir, out, workers=1))],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert line.startswith("error: an image-decoding worker failed: RuntimeError: ") and "File too large" in line


def test_disk_full_during_assembly(coco_dir, tiny_disk, reference, tmp_path):
    """Every shard fits, the assembled file does not: a clear error, no scratch file left, nothing lost."""
    disk = tiny_disk(96)  # the 6 shards (72 KiB) and meta.json fit, the 60 KiB cache does not
    out = disk / "full.h5"
    # build the shards elsewhere, then move them onto the tiny disk (only assembling is left to do)
    elsewhere = tmp_path / "full.h5"
    w = CacheWriter(elsewhere, reference.keys, reference.meta)
    for i in range(0, LIMIT, BATCH):
        w.write(np.arange(i, i + BATCH), reference.features[i:i + BATCH])
    w.close()
    subprocess.run(["cp", "-r", str(parts_dir(elsewhere)), str(parts_dir(out))], check=True)
    with pytest.raises(CacheError) as ei:
        extract(_cfg(coco_dir, out))
    assert str(out) in str(ei.value) and "free" in str(ei.value)
    assert not out.exists() and not list(parts_dir(out).glob(f".{out.name}.*.tmp"))
    assert _assert_no_duplicates(out) == LIMIT
    _grow(disk)
    s = extract(_cfg(coco_dir, out))
    assert (s.done_now, s.already_done) == (0, LIMIT)
    _assert_same_as_reference(out, reference)


def test_output_path_blocked_by_a_file(coco_dir, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    out = blocker / "c.h5"
    with pytest.raises(CacheError, match=re.escape(str(parts_dir(out)))):
        extract(_cfg(coco_dir, out))
    parts_file = tmp_path / "c.h5.parts"
    parts_file.write_text("x")
    with pytest.raises(CacheError, match=re.escape(f"{parts_file} is in the way")):
        extract(_cfg(coco_dir, tmp_path / "c.h5"))
    assert blocker.read_text() == "x" and parts_file.read_text() == "x"


# --- the shard layout itself (no subprocess) ---------------------------------------------------------------

def test_torn_and_unreadable_shards_are_recomputed(tmp_path, reference):
    out = tmp_path / "t.h5"
    keys, meta, feats = reference.keys, reference.meta, reference.features
    w = CacheWriter(out, keys, meta)
    w.write(np.arange(0, 4), feats[0:4])
    w.write(np.arange(4, 8), feats[4:8])
    w.close()
    parts = parts_dir(out)
    (parts / ".rank000-000002.npz.tmp").write_bytes(b"PK\x03\x04 torn")  # a kill while writing shard 2
    (parts / "rank000-000001.npz").write_bytes(b"garbage")  # a shard the disk lost (never written so by us)
    w = CacheWriter(out, keys, meta)
    assert w.resumed and not (parts / ".rank000-000002.npz.tmp").exists()
    assert (w.status() == DONE).nonzero()[0].tolist() == [0, 1, 2, 3]
    pending = np.flatnonzero(w.status() != DONE)
    w.write(pending, feats[pending])
    w.finish()
    _assert_same_as_reference(out, reference)


def test_a_row_in_two_shards_is_taken_once(tmp_path, reference):
    out = tmp_path / "d.h5"
    w = CacheWriter(out, reference.keys, reference.meta)
    w.write(np.arange(LIMIT), reference.features)
    w.write(np.array([5, 2]), np.zeros((2, reference.meta.feature_dim), np.float16))  # e.g. two runs at once
    w.finish()
    _assert_same_as_reference(out, reference)  # the first shard's rows win


def test_scratch_name_links_are_not_followed(tmp_path, reference):
    """Shards are created with O_EXCL: a link planted at the scratch name cannot redirect a write."""
    out = tmp_path / "s.h5"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    w = CacheWriter(out, reference.keys, reference.meta)
    (parts_dir(out) / ".rank000-000000.npz.tmp").symlink_to(victim)
    w.write(np.arange(LIMIT), reference.features)
    w.finish()
    assert victim.read_text() == "keep me"
    _assert_same_as_reference(out, reference)


def test_shards_without_meta_are_refused(tmp_path, reference):
    out = tmp_path / "m.h5"
    w = CacheWriter(out, reference.keys, reference.meta)
    w.write(np.arange(4), reference.features[:4])
    w.close()
    (parts_dir(out) / "meta.json").unlink()
    with pytest.raises(CacheError, match="no meta.json"):
        CacheWriter(out, reference.keys, reference.meta)
