"""bench/gpu.py and bench/stage1.py, the device check's own plumbing: what a CPU can show of the ways its one run
on a GPU machine could be wasted (a small /dev/shm, a launcher's workers left running, a timing that takes in
work that is not the forward, a copied checkout without .git)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import small_shm

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu
    import gpu_report
    import stage1

    return SimpleNamespace(gpu=gpu, gpu_report=gpu_report, stage1=stage1)


def test_the_choices_part_starts_only_the_workers_dev_shm_holds(bench, coco_dir, tmp_path, monkeypatch):
    """The choices part ran extract() with default_workers() whatever /dev/shm held: on a machine with Docker's
    64 MB, check_shm refused and the part failed (the stage1 part already cut its workers to fit). A torchvision
    that cannot decode on the device loses that one figure, not the part's others."""
    jpegs = tmp_path / "jpegs"
    (jpegs / "images").mkdir(parents=True)
    with open(jpegs / "captions.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption"])
        for p in sorted((coco_dir / "images").glob("*.jpg"))[:16]:
            shutil.copy(p, jpegs / "images" / p.name)
            w.writerow([p.name, "a photo"])
    small_shm(monkeypatch)

    def no_nvjpeg(*a):
        raise RuntimeError("torchvision was not compiled with nvjpeg | support")

    monkeypatch.setattr(bench.gpu, "_torchvision_decode_rate", no_nvjpeg)
    args = SimpleNamespace(tiny=True, backbone="mobilenet_v2", batch_size=8, jpegs=16)
    ctx = SimpleNamespace(args=args, device=torch.device("cpu"), work=tmp_path, jpegs=jpegs, limits={},
                          stage1_img_s=None)
    out = bench.gpu.part_choices(ctx)
    assert set(out["end_to_end_img_s"]) == {"batch 64, workers 0", "batch 8, workers 0"}
    assert all(v > 0 for v in out["end_to_end_img_s"].values()) and out["note"] == "as many as /dev/shm holds"
    assert out["torchvision_decode_img_s"] == "RuntimeError: torchvision was not compiled with nvjpeg | support"
    assert "not compiled with nvjpeg / support |" in bench.gpu_report.report({"stage1_choices": out})


def test_the_torchrun_part_asks_for_the_workers_dev_shm_holds(bench, tmp_path, monkeypatch):
    small_shm(monkeypatch)
    started = []

    def run(cmd, timeout):
        started.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "stopped here")

    monkeypatch.setattr(bench.gpu, "_run", run)
    args = SimpleNamespace(tiny=False, backbone="resnet152")
    ctx = SimpleNamespace(args=args, device=torch.device("cpu"), work=tmp_path, jpegs=tmp_path)
    assert bench.gpu.part_torchrun(ctx)["_failed"]
    cmd = started[0]
    assert cmd[cmd.index("--workers") + 1] == "0" and cmd[cmd.index("--batch-size") + 1] == "64"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _launcher(pid_file: Path, own_session: bool) -> str:
    """Python code for a launcher that starts a worker (in a session of its own, as torchrun does, if asked),
    writes the worker's pid to `pid_file`, and waits."""
    return ("import subprocess, sys, time\n"
            "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
            f"start_new_session={own_session})\n"
            f"open({str(pid_file)!r}, 'w').write(str(w.pid))\n"
            "time.sleep(120)\n")


def _ended(pid: int) -> bool:
    """Whether `pid` ends within 10 s (killed here if not, so no test leaves it behind)."""
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, 9)
        return False
    return True


def test_a_part_that_times_out_stops_the_launchers_workers_too(bench, tmp_path):
    """A timeout stops the launcher's whole process group, not only the launcher (subprocess.run's kill): the
    torchrun or sweep workers it started would go on holding the GPU through the parts after it."""
    pid_file = tmp_path / "worker.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        bench.gpu._run([sys.executable, "-c", _launcher(pid_file, own_session=False)], timeout=5)
    assert _ended(int(pid_file.read_text()))


def test_a_check_stopped_by_sigterm_stops_a_launchers_workers_in_sessions_of_their_own(tmp_path):
    """gpu_device.sh's time limit sends SIGTERM: the check used to die at once, leaving the launcher it had started
    in a session of its own, and the launcher's workers (torchrun starts each rank in a new session), running."""
    pid_file = tmp_path / "worker.pid"
    launcher = _launcher(pid_file, own_session=True)
    check = ("import sys\n"
             f"sys.path.insert(0, {str(BENCH)!r})\n"
             "import gpu\n"
             "with gpu._exit_on_sigterm():\n"
             f"    gpu._run([sys.executable, '-c', {launcher!r}], timeout=120)\n")
    p = subprocess.Popen([sys.executable, "-c", check], cwd=BENCH.parent)
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)  # the pid written whole
    worker = int(pid_file.read_text())
    p.terminate()
    assert p.wait(60) == 143
    assert _ended(worker)


def test_a_finished_command_comes_back_as_from_subprocess_run(bench):
    p = bench.gpu._run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                       timeout=60)
    assert (p.returncode, p.stdout, p.stderr) == (3, "out\n", "err\n")


def test_a_checkout_without_git_is_named_by_capcache_commit(bench, monkeypatch):
    monkeypatch.setenv("CAPCACHE_COMMIT", "0123abc")
    assert bench.gpu._commit() == "0123abc"


class _Clocked(nn.Module):
    """A model on a fake clock: a forward takes 1 s, a memory-format change 100 s."""

    def __init__(self, clock: list[float]):
        super().__init__()
        self.clock = clock
        self.lin = nn.Linear(1, 1)

    def forward(self, x):
        self.clock[0] += 1.0
        return x.mean()

    def to(self, *a, **kw):
        self.clock[0] += 100.0
        return super().to(*a, **kw)


def test_the_bare_forward_rate_times_the_forwards_alone(bench, monkeypatch):
    """bench/stage1.py's bare forward put the model back to channels_last before reading its clock, so the
    re-layout counted as forward time (in every choices row on the GPU too)."""
    clock = [0.0]
    monkeypatch.setattr(bench.stage1.time, "perf_counter", lambda: clock[0])
    rate = bench.stage1.bare_images_per_s(_Clocked(clock), batch=2, n_batches=3, device=torch.device("cpu"))
    assert rate == pytest.approx(2 * 3 / 3.0)


def _carried_photos(coco_dir, folder: Path, n: int = 4) -> Path:
    """A bench/gpu-photos/ of n COCO-mini photos and their captions.json."""
    (folder / "images").mkdir(parents=True)
    doc = json.loads((coco_dir / "captions.json").read_text())
    images = doc["images"][:n]
    for im in images:
        shutil.copy(coco_dir / "images" / im["file_name"], folder / "images")
    ids = {im["id"] for im in images}
    (folder / "captions.json").write_text(json.dumps(
        {"images": images, "annotations": [a for a in doc["annotations"] if a["image_id"] in ids]}))
    return folder


def test_the_jpegs_are_made_once_and_reused_while_their_recipe_holds(bench, coco_dir, tmp_path):
    """A second device call on a still-warm machine (the --compile run, a rerun) does not pay for the 20,000 JPEGs
    again; another count is made afresh."""
    photos = _carried_photos(coco_dir, tmp_path / "photos")

    def ctx(n):
        return SimpleNamespace(args=SimpleNamespace(jpegs=n), photos=photos, work=tmp_path / "work", jpegs=None,
                               limits={"jpegs": None})

    first = bench.gpu.part_jpegs(ctx(6))
    made = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "work" / "jpegs" / "images").iterdir()}
    again = bench.gpu.part_jpegs(c := ctx(6))
    assert again == {**first, "reused": True} and c.jpegs == tmp_path / "work" / "jpegs"
    assert {p.name: p.stat().st_mtime_ns for p in (c.jpegs / "images").iterdir()} == made
    other = bench.gpu.part_jpegs(ctx(5))
    assert "reused" not in other and other["images"] == 5 and len(list((c.jpegs / "images").iterdir())) == 5
    (c.jpegs / "made.json").write_text('{"recipe": {"jpe')  # a stamp cut short: made again, not an error
    assert "reused" not in bench.gpu.part_jpegs(ctx(5))


def test_a_cpu_too_slow_for_the_jpegs_limit_leaves_the_jpegs_it_made_and_their_captions(bench, coco_dir, tmp_path):
    """Timed out, the part would leave no captions file, and stage1, choices, train, sweep, torchrun and caption
    would all be skipped: the device run wasted but for stage 2."""
    from common.datasets import load_dataset
    from common.preprocess import Preprocess, load_views

    ctx = SimpleNamespace(args=SimpleNamespace(jpegs=2000), photos=_carried_photos(coco_dir, tmp_path / "photos"),
                          work=tmp_path / "work", jpegs=None, limits={"jpegs": 0.5})
    got = bench.gpu.part_jpegs(ctx)  # 2,000 JPEGs take this CPU many seconds; 80 % of 0.5 s makes a few
    n = got["images"]
    assert 1 <= n < 2000 and got["note"] == f"{n} of 2000 made in 80% of the part's 0.5 s"
    files = sorted((ctx.jpegs / "images").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.jpg" for i in range(n)]  # none the stopped workers left half-written
    records = load_dataset("auto", str(ctx.jpegs / "captions.csv"), str(ctx.jpegs / "images"))
    assert sorted({r.path for r in records}) == [str(f) for f in files]
    for f in files:
        assert load_views(f, Preprocess(256, 224)).shape == (1, 3, 224, 224)
    stamp = json.loads((ctx.jpegs / "made.json").read_text())
    assert stamp["result"] == got  # a second call reuses what was made
    doc = bench.gpu.summary({"jpegs": {"part": "jpegs", "status": "ok", **got}}, torch.device("cpu"))
    assert doc["stage1"]["images"] == n and f"jpegs: {got['note']}" in doc["notes"]  # gpu.json says so too


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")
def test_a_cpu_too_slow_for_the_stage1_and_choices_limits_times_fewer_images(bench, coco_dir, tmp_path, monkeypatch):
    """The train, sweep and caption parts need stage1's cache: a slow machine gets a smaller one, not none; and
    the choices part sizes its three end-to-end runs by stage1's rate."""
    import h5py

    photos = _carried_photos(coco_dir, tmp_path / "photos")
    ctx = SimpleNamespace(args=SimpleNamespace(jpegs=120, backbone="mobilenet_v2", batch_size=8, tiny=True,
                                               compile=False),
                          device=torch.device("cpu"), photos=photos, work=tmp_path / "work", jpegs=None,
                          cache=None, stage1_img_s=None, limits={"jpegs": None, "stage1": 0.2, "choices": 2})
    bench.gpu.part_jpegs(ctx)
    got = bench.gpu.part_stage1(ctx)  # decoding alone stops after 25 % of 0.2 s; end to end gets what 35 % allows
    n, whole = got["images"], got["end_to_end_images"]
    assert 8 <= n < 120 and 8 <= whole < 120, got
    assert f"of the 120 JPEGs, {n} decoded alone and {whole} end to end" in got["note"]
    with h5py.File(ctx.cache, "r") as f:
        assert len(f["features"]) == whole
    assert round(ctx.stage1_img_s, 1) == got["end_to_end_img_s"] < 240  # mobilenet_v2 on a CPU: far below
    # 50 % of 2 s over its two runs (1 worker: no run with one fewer) at that rate, and at least a batch of 64;
    # at full size (not tiny: up to 8,000 JPEGs), with the bare forwards at batch 64-512 skipped
    monkeypatch.setattr(bench.stage1, "bare_images_per_s", lambda *a, **k: 1.0)
    ctx.args.tiny = False
    choices = bench.gpu.part_choices(ctx)
    assert choices["end_to_end_images"] == max(64, int(ctx.stage1_img_s * 0.5 * 2 / 2)) < 120


def test_a_profiled_section_that_fails_keeps_the_others_and_a_timeout_still_stops_the_part(bench):
    def fails():
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")

    def hangs():
        raise bench.gpu.PartTimeout

    cpu = torch.device("cpu")
    assert bench.gpu._profiled(cpu, fails, steps=1) == {"error": "RuntimeError: CUPTI_ERROR_NOT_INITIALIZED"}
    with pytest.raises(bench.gpu.PartTimeout):
        bench.gpu._profiled(cpu, hangs, steps=1)
    ok = bench.gpu._profiled(cpu, lambda: torch.ones(64, 64) @ torch.ones(64, 64), steps=2)
    assert ok["wall_ms_per_step"] > 0 and ok["gpu_busy"] is None and ok["top"]
    table = bench.gpu_report.report({"profile": {"xe_step": ok, "scst_step": {"error": "RuntimeError: CUPTI"}}})
    assert "| scst_step | - | - | RuntimeError: CUPTI |" in table and "| xe_step | " in table


def test_a_check_stopped_from_outside_still_leaves_gpu_json_with_the_parts_done(bench, data_dir, tmp_path,
                                                                              monkeypatch):
    """gpu.json was written once, at the end: the wrapper's time limit (or any kill) left only gpu.jsonl, and
    gpu_report.py had nothing to read. It is now rewritten after every part."""
    monkeypatch.setitem(bench.gpu.RUNNERS, "jpegs", lambda ctx: {"images": 7, "jpeg_size": [640, 480]})

    def killed(ctx):
        raise KeyboardInterrupt  # what no part catches: the process is going

    monkeypatch.setitem(bench.gpu.RUNNERS, "stage1", killed)
    with pytest.raises(KeyboardInterrupt):
        bench.gpu.main(["--device", "cpu", "--tiny", "--data", str(data_dir), "--work", str(tmp_path),
                        "--parts", "jpegs,stage1,train"])
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["stage1"]["images"] == 7 and doc["parts"] == {"jpegs": "ok", "stage1": "not run", "train": "not run"}
    assert "- train: not run (the check stopped before it)" in bench.gpu_report.report(doc)


def test_the_caption_parts_folder_timing_cannot_cost_its_cold_start(bench, tmp_path, monkeypatch):
    """The warm folder timing runs after the cold start within the same part's limit: on a slow machine the limit
    came in the middle of it, and the part "timed out" with the cold start measured (the check then exits 1)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"")
    monkeypatch.setattr(bench.gpu, "_run", lambda cmd, timeout: subprocess.CompletedProcess(cmd, 0, "a.jpg\ta cat\n", ""))

    def slow_folder(ctx, n, out):
        out.update(images=n, read_threads=1, img_s_read_threads_0=10.0)  # one pass done, then the alarm
        raise bench.gpu.PartTimeout

    monkeypatch.setattr(bench.gpu, "_caption_folder", slow_folder)
    ctx = SimpleNamespace(args=SimpleNamespace(tiny=False), device=torch.device("cpu"), jpegs=tmp_path, run=tmp_path,
                          limits={"caption": 15})
    out = bench.gpu.part_caption(ctx)
    assert out["caption_cold_start_s"] is not None and not out["_failed"] and out["output"] == "a.jpg\ta cat"
    assert out["caption_folder"] == {"images": 256, "read_threads": 1, "img_s_read_threads_0": 10.0}
    assert "limit" in out["note"]
    ctx.limits["caption"] = 0.001  # no time left after the cold start: the folder is not started
    out = bench.gpu.part_caption(ctx)
    assert "caption_folder" not in out and "cold start left" in out["note"] and not out["_failed"]


def test_the_parts_limits_and_two_tries_fit_a_device_lease(bench):
    """The check is run once and, if it fails, once more on a lease of 15 minutes that its machine's start
    (a few minutes) also spends: parts' limits that added up to 380 s under a 400 s outer limit left no rerun."""
    import re

    outer = re.search(r"timeout -k (\d+) (\d+) ", (BENCH / "gpu_device.sh").read_text())
    kill_after, limit = int(outer.group(1)), int(outer.group(2))
    total = sum(bench.gpu.LIMITS.values())
    assert set(bench.gpu.LIMITS) == set(bench.gpu.PARTS)
    assert total < limit  # each part's own limit fires before the wrapper's
    setup = 20  # the wheels installed, the imports checked, the report written: outside the outer limit
    assert 2 * (limit + kill_after + setup) + 180 <= 15 * 60  # two tries and a 3-minute start
