"""Sweep runs: one run, forked runs on CPUs or GPUs, the local and Dask executors (docs/sweeps.md, docs/gpu.md)."""
from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from tqdm import tqdm

# CUDA queries by NVML (is_available, device_count) instead of the driver API, which would create a CUDA
# context in this process and make forking its runs unsafe; torch reads this when first asked
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

from common.bounds import check  # noqa: E402
from common.jsonio import JSONFileError, finite_number, read_json  # noqa: E402
from common.lock import LOCK_NAME, OutputBusy, hold, holder  # noqa: E402
from stage2_decoder.sweeps.grid import RunSpec, effective  # noqa: E402
from stage2_decoder.sweeps.results import write_json  # noqa: E402
from stage2_decoder.training.config import TrainConfig  # noqa: E402
from stage2_decoder.training.loop import train  # noqa: E402
from stage2_decoder.training.resume import recorded_epochs  # noqa: E402

RESULT, PARAMS, LOG = "result.json", "params.json", "train.log"


INTERRUPTED_EXIT = 130  # a run stopped by Ctrl-C / SIGTERM: unfinished, not failed
BUSY_EXIT = 75  # the run's folder is another process's (a `train` started by hand): only train.log gets a line


RUNS_PER_GPU = 2  # default concurrent runs per GPU: small decoders leave a GPU mostly idle, one run at a time


def divergence(history: list[dict]) -> str | None:
    """Why a finished run's history is unusable (a nan/inf loss or reward), or None.

    Only the values an epoch records are checked: self-critical epochs record a reward, no train loss.
    """
    if not history:
        return "no epoch finished"
    for h in history:
        for key in ("train_loss", "val_loss", "train_reward"):
            v = h.get(key, 0.0)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                return f"diverged: {key} is {v} in epoch {h.get('epoch')}"
    return None


def record(spec: RunSpec, status: str, error: str = "", machine: bool = False, **values) -> dict:
    """A run's result.json. `machine`: it failed for the machine, not its settings (a full disk, a killed
    process): the next run of the sweep redoes it (from its last.pt) without --retry-failed."""
    return {"run": spec.name, "status": status, "val_cider": finite_number(values.get("val_cider")),
            "val_loss": finite_number(values.get("val_loss")), "best_epoch": values.get("best_epoch"),
            "epochs_run": values.get("epochs_run"), "seconds": values.get("seconds"),
            "checkpoint": values.get("checkpoint", ""), "error": error, "params": spec.params,
            "machine_failure": machine}


def redone_by_a_rerun(rec: dict) -> bool:
    """A failed run the next sweep tries again by itself (its failure was the machine's)."""
    return rec["status"] == "failed" and rec.get("machine_failure") is True


def _machine_error(e: BaseException) -> bool:
    """An OSError (disk full, a folder that cannot be written) anywhere in the error's causes."""
    while e is not None:
        if isinstance(e, OSError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _threads_of_the_run(run_dir: Path, threads: int | None) -> int:
    """Torch threads for a run: one resumed from its last.pt goes on with those it started with (params.json),
    since another count sums in another order and the run would not end as an uninterrupted one (a rerun
    with fewer runs left gives each more cores); a fresh run takes `threads` (None: torch's count)."""
    import torch

    if (run_dir / "last.pt").exists():
        try:
            before = read_json(run_dir / PARAMS, "run params", expect=dict).get("threads")
            check("threads", before)  # a hand-edited file's value is not used
            return before
        except (OSError, JSONFileError, ValueError):
            pass
    return threads or torch.get_num_threads()


class RunBusy(Exception):
    """The run's folder is locked by another process: the run is neither done nor failed, and its folder is left
    as it is."""


def busy_record(spec: RunSpec) -> dict:
    """What the sweep reports for a run whose folder another process holds (not written into that folder); the
    next sweep redoes it."""
    why = (f"OutputBusy: run folder {spec.run_dir} is in use by process {holder(Path(spec.run_dir) / LOCK_NAME)}; "
           f"rerun the sweep once it is done")
    return record(spec, "failed", why, machine=True)


def _run_one(spec: RunSpec, threads: int | None) -> dict:
    """Train one configuration and write its result.json. Never raises for a failure of the run itself;
    RunBusy (nothing written in its folder) if another process holds the folder."""
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        try:  # before params.json: a `train` by hand in this folder owns it, and a resume would read those threads
            held.enter_context(hold(run_dir / LOCK_NAME, "run folder"))
        except OutputBusy as e:
            print(f"not run: {e}", file=sys.stderr)
            raise RunBusy(str(e)) from None
        return _run_held(spec, run_dir, threads)


def _run_held(spec: RunSpec, run_dir: Path, threads: int | None) -> dict:
    import torch

    threads = _threads_of_the_run(run_dir, threads)
    torch.set_num_threads(threads)
    write_json(run_dir / PARAMS, {"run": spec.name, "features": spec.features, "params": spec.params,
                                  "threads": threads})
    t0, started = time.perf_counter(), time.time()
    try:
        r = train(TrainConfig(features=spec.features, out=spec.run_dir, progress=False, **spec.params))
        seconds = round(time.perf_counter() - t0, 2)
        why = divergence(r.history)
        ckpt = str(Path(r.run_dir) / "best.pt")
        rec = record(spec, "failed" if why else "ok", why or "", val_cider=r.best_val_cider,
                      val_loss=r.best_val_loss, best_epoch=r.best_epoch, epochs_run=r.epochs_run, seconds=seconds,
                      checkpoint=ckpt if not why and os.path.exists(ckpt) else "")
    except Exception as e:  # noqa: BLE001 - any error of one run is that run's failure, not the sweep's
        traceback.print_exc(file=sys.stderr)  # into train.log for the full story
        msg = (str(e).strip().splitlines() or [""])[0]
        rec = record(spec, "failed", f"{type(e).__name__}: {msg}" if msg else type(e).__name__,
                      machine=_machine_error(e), seconds=round(time.perf_counter() - t0, 2))
    rec.update(started_at=started, host=socket.gethostname(), pid=os.getpid())  # where and when it ran
    write_json(run_dir / RESULT, rec)
    return rec


def read_result(spec: RunSpec) -> dict | None:
    """The run's result.json if it records this run's settings and every field has its type; None (the run
    is redone, resuming from its last.pt) if it is missing, damaged, hostile, of other settings, or of fewer or
    more epochs than the folder's metrics.jsonl."""
    path = Path(spec.run_dir) / RESULT
    try:
        rec = read_json(path, "run result", expect=dict)
    except (OSError, JSONFileError):
        return None
    # same name = same settings (the hash), unless the directory was edited by hand
    params = rec.get("params")
    if not isinstance(params, dict) or effective(params) != effective(spec.params) \
            or rec.get("status") not in ("ok", "failed"):
        return None
    number, count = (int, float, type(None)), (int, type(None))
    typed = all(isinstance(rec.get(k), kinds) and not isinstance(rec.get(k), bool) for k, kinds in (
        ("val_cider", number), ("val_loss", number), ("seconds", number), ("best_epoch", count),
        ("epochs_run", count), ("checkpoint", str), ("error", str), ("run", str)))
    if not typed:
        return None
    finite = all(rec[k] is None or finite_number(rec[k]) is not None for k in ("val_cider", "val_loss", "seconds"))
    return rec if finite and not _trained_since(spec, rec) else None


def _trained_since(spec: RunSpec, rec: dict) -> bool:
    """The run folder holds other epochs than its result records (`train` went on in it by hand): the result
    would report numbers its best.pt no longer holds."""
    if rec["status"] != "ok":
        return False
    epochs = recorded_epochs(Path(spec.run_dir))
    return epochs is not None and epochs != rec["epochs_run"]  # an unreadable file tells nothing


# Forked runs. Forks come from joblib's threads; these locks keep the main thread from printing (tqdm)
# while a fork happens, so no child inherits a held stdout lock, and let an interrupt stop new forks.
_FORK = mp.get_context("fork")

_LIVE: set = set()

_LIVE_LOCK = threading.Lock()

_STOP = threading.Event()


SWEEP_PID: list[int] = []  # the sweep process, as its forked runs see it
SWEEP_PID_VAR = "CAPCACHE_SWEEP_PID"  # ... and as a run in a fresh interpreter is told it


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(INTERRUPTED_EXIT)


def _die_with_parent() -> None:
    """A run never outlives its sweep (kill -9 included): an orphan would go on training and collide with the
    re-run. Linux: PR_SET_PDEATHSIG; elsewhere a thread watching the parent's pid."""
    parent = SWEEP_PID[0] if SWEEP_PID else os.getppid()
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the sweep died before the signal was armed
        os._exit(INTERRUPTED_EXIT)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _child_main(spec: RunSpec, threads: int | None, gpu: str | None = None) -> None:
    _die_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's click handler: just stop (SIGINT as inherited)
    if gpu is not None:  # before anything touches CUDA in this process: the run sees its one GPU as cuda:0
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    log = open(Path(spec.run_dir) / LOG, "a")
    os.dup2(log.fileno(), 1)  # whatever the run prints goes to its own log, not over the progress bar
    os.dup2(log.fileno(), 2)
    try:
        _run_one(spec, threads)
    except KeyboardInterrupt:
        sys.stdout.flush()
        os._exit(INTERRUPTED_EXIT)
    except RunBusy:
        sys.stderr.flush()
        os._exit(BUSY_EXIT)


def exit_record(spec: RunSpec, code: int | None) -> dict:
    """The failed record of a run whose process ended without writing one; killed by a signal, it is the
    machine's failure (the next sweep resumes it), any other exit the run's."""
    if code is not None and code < 0:
        sig = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return record(spec, "failed", f"the run's process was killed by {sig}{hint}", machine=True)
    return record(spec, "failed", f"the run's process exited with code {code} without a result")


TORCH_OWN_THREADS = 1  # native threads `import torch` starts (2.11 and 2.14 on Linux), before any op runs


def native_threads() -> int:
    """Threads of this process that Python did not start: a pool of OpenMP (torch's CPU ops), MKL or CUDA.
    A forked child that uses such a pool hangs (GNU OpenMP and CUDA are not fork-safe): a sweep started from
    Python after torch work in the same process (a notebook that trained a model first)."""
    try:
        return max(0, len(os.listdir("/proc/self/task")) - threading.active_count())
    except OSError:  # no /proc (not Linux): no count
        return 0


def _may_fork(threads: int) -> bool:
    """Whether this process may fork a run of `threads` torch threads: no CUDA context, and no native thread
    pool unless the run keeps to one thread (a forked child cannot use its parent's pool; one thread never
    enters it)."""
    import torch

    return not torch.cuda.is_initialized() and (threads == 1 or native_threads() <= TORCH_OWN_THREADS)


class _FreshRun:
    """A run in a fresh interpreter (`_process_main`, through `_fresh_command`), started and awaited as a forked
    one is (start, join, exitcode, terminate). Not multiprocessing's spawn: that imports the caller's
    script again in every run, and a script without a `__main__` guard would start its sweep again."""

    def __init__(self, spec: RunSpec, threads: int | None, gpu: str | None):
        self.spec, self.threads, self.gpu, self.proc = spec, threads, gpu, None

    def start(self) -> None:
        import subprocess

        cmd, env = _fresh_command(self.spec, self.threads)
        env[SWEEP_PID_VAR] = str(os.getpid())  # the run dies with this process, also if it dies while the run starts
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        with open(Path(self.spec.run_dir) / LOG, "a") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)

    def join(self) -> None:
        self.proc.wait()

    @property
    def exitcode(self) -> int | None:
        return self.proc.returncode

    def terminate(self) -> None:
        self.proc.terminate()


def _fresh_command(spec: RunSpec, threads: int | None) -> tuple[list[str], dict]:
    """The command and environment that train `spec` in a fresh interpreter, on the code of this checkout."""
    root = str(Path(__file__).resolve().parents[2])  # the code this process runs, not another installed copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    spec_json = json.dumps({"name": spec.name, "run_dir": spec.run_dir, "features": spec.features,
                            "params": spec.params})
    # -c, not -m: `python -m` puts the current folder first on sys.path, and a notebook's folder may hold a
    # common/ or tqdm.py of its own; the checkout's root goes first instead
    boot = (f"import sys; sys.path[0] = {root!r}; from stage2_decoder.sweeps.run import _process_main; "
            f"_process_main(*sys.argv[1:])")
    return [sys.executable, "-c", boot, spec_json, str(threads or 0)], env


def _run_forked(spec: RunSpec, threads: int | None, gpus: "queue.Queue | None" = None) -> dict | None:
    """Run `spec` in a forked child and wait; None if the sweep was interrupted meanwhile. With `gpus`
    (a pool of CUDA_VISIBLE_DEVICES ids, one entry per concurrent run) the child gets one of them."""
    Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
    gpu = gpus.get() if gpus is not None and _spreads(spec) else None
    try:
        p = _FORK.Process(target=_child_main, args=(spec, threads, gpu), name=f"sweep-run {spec.name}",
                          daemon=True) if _may_fork(_threads_of_the_run(Path(spec.run_dir), threads)) \
            else _FreshRun(spec, threads, gpu)
        with _LIVE_LOCK:
            if _STOP.is_set():
                return None
            p.start()
            _LIVE.add(p)
        p.join()
        with _LIVE_LOCK:
            _LIVE.discard(p)
    finally:
        if gpu is not None:
            gpus.put(gpu)
    if p.exitcode == BUSY_EXIT:  # its folder is another process's: report it, write nothing there
        return busy_record(spec)
    rec = read_result(spec)
    if rec is not None:
        return rec
    if _STOP.is_set() or p.exitcode in (INTERRUPTED_EXIT, -signal.SIGINT, -signal.SIGTERM):
        return None  # interrupted, not failed: a rerun redoes it
    rec = exit_record(spec, p.exitcode)
    write_json(Path(spec.run_dir) / RESULT, rec)
    return rec


def _stop_children() -> None:
    with _LIVE_LOCK:
        _STOP.set()
        for p in list(_LIVE):
            p.terminate()


def warm_page_cache(path: str) -> None:
    """Read the cache file once so the runs, starting together, load it from the OS page cache."""
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def _preload() -> None:
    """Import in this process what every run imports later, so forked runs share it instead of each
    importing its own copy (matplotlib for train's curves.png, the CIDEr scorer, the decoder search)."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401
    import pycocoevalcap.cider.cider  # noqa: F401

    import stage2_decoder.decoding.beam  # noqa: F401
    import stage2_decoder.reporting.curves  # noqa: F401
    import stage2_decoder.reporting.metrics  # noqa: F401


def _cpu_count() -> int:
    import joblib

    return max(1, joblib.cpu_count())


def _spreads(spec: RunSpec) -> bool:
    """Whether a run's device lets the sweep pick its GPU ("auto" or "cuda"; an explicit cuda:N stays as asked)."""
    return str(spec.params.get("device", "auto")) in ("auto", "cuda")


def visible_gpus(pending: list[RunSpec]) -> list[str]:
    """The GPU ids (CUDA_VISIBLE_DEVICES entries) the runs are spread over; [] when they train on the CPU.
    Asks NVML, so this process still has no CUDA context afterwards."""
    import torch

    if not any(_spreads(s) for s in pending) or not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def default_jobs(gpus: list[str]) -> int:
    """Concurrent runs when --n-jobs is not given: RUNS_PER_GPU per GPU (at most one per core), else one per core."""
    return min(_cpu_count(), RUNS_PER_GPU * len(gpus)) if gpus else _cpu_count()


def _run_in_process(spec: RunSpec, threads: int) -> dict:
    """A Dask task: train `spec` in a Python process of its own and return its record.

    A worker runs its tasks as threads of one process, and a run seeds torch's global generators (dropout,
    SCST sampling, the RNG state last.pt saves) and sets its thread count: runs side by side in one process
    would draw from each other's generators. Its own process makes a run's result depend on its settings
    alone. A subprocess, not multiprocessing: Dask's worker processes are daemons, which may not fork children
    of that kind."""
    import subprocess

    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd, env = _fresh_command(spec, threads)
    with open(run_dir / LOG, "a") as log:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, check=False)
    if proc.returncode == BUSY_EXIT:
        return {**busy_record(spec), "worker_pid": os.getpid()}
    rec = read_result(spec) or exit_record(spec, proc.returncode)
    rec = {**rec, "worker_pid": os.getpid()}  # pid: the run's own process
    write_json(run_dir / RESULT, rec)
    return rec


def _process_main(spec_json: str, threads: str) -> None:
    """One run in a fresh interpreter (`_fresh_command`: SPEC_JSON THREADS), dying with the sweep (or Dask
    worker) that started it."""
    if os.environ.get(SWEEP_PID_VAR, "").isdigit():
        SWEEP_PID[:] = [int(os.environ[SWEEP_PID_VAR])]
    _die_with_parent()
    try:
        _run_one(RunSpec(**json.loads(spec_json)), int(threads) or None)
    except RunBusy:
        sys.exit(BUSY_EXIT)


def run_dask(pending: list[RunSpec], bar, scheduler: str, threads: int) -> dict[str, dict]:
    """Run the specs on the Dask cluster at `scheduler`, each in its own process on a worker; their records by
    name (a run the cluster lost has none)."""
    from distributed import Client
    from joblib import Parallel, delayed, parallel_config

    done: dict[str, dict] = {}
    with Client(scheduler, timeout="30s") as client, parallel_config(backend="dask", client=client):
        try:
            # batch_size=1: one run per Dask task, so a long run never holds others hostage
            for rec in Parallel(batch_size=1, return_as="generator_unordered")(
                    delayed(_run_in_process)(s, threads) for s in pending):
                done[rec["run"]] = rec
                bar.update()
        except Exception as e:  # noqa: BLE001 - e.g. KilledWorker: keep what finished, report the rest
            tqdm.write(f"warning: the Dask cluster lost runs ({type(e).__name__}: {e}); "
                       f"rerun the sweep to redo them", file=sys.stderr)
    return done


def run_local(pending: list[RunSpec], bar, n_jobs: int | None, threads: int | None) -> dict[str, dict]:
    """Run the specs as forked children, `n_jobs` at once (default: default_jobs), `threads` torch threads each
    (default: cores // n_jobs); their records by name (an interrupted run has none)."""
    from joblib import Parallel, delayed, parallel_config

    done: dict[str, dict] = {}
    _preload()
    gpu_ids = visible_gpus(pending)
    n_jobs = min(n_jobs or default_jobs(gpu_ids), len(pending))
    threads = threads or max(1, _cpu_count() // n_jobs)
    gpus = None
    if gpu_ids:  # one pool entry per concurrent run, GPUs in turn: runs spread evenly over them
        gpus = queue.Queue()
        for i in range(n_jobs):
            gpus.put(gpu_ids[i % len(gpu_ids)])
    _STOP.clear()
    try:
        with parallel_config(backend="threading", n_jobs=n_jobs):
            for rec in Parallel(batch_size=1, return_as="generator_unordered")(
                    delayed(_run_forked)(s, threads, gpus) for s in pending):
                if rec is not None:
                    done[rec["run"]] = rec
                with _LIVE_LOCK:
                    bar.update()
    except BaseException:
        _stop_children()  # Ctrl-C / SIGTERM: the running runs stop now and are redone by a rerun
        raise
    return done


if __name__ == "__main__":
    _process_main(*sys.argv[1:])
