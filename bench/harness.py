"""What the performance benchmarks share: thread pinning, the data location, medians of repeats,
the machine line and the PASS/FAIL ratio lines that `tests/test_bench_smoke.py` looks for.

Machines here are shared and noisy, so every script measures a ratio of two things in one run,
alternating them and taking medians of repeats; absolute times are printed for context only.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/x.py` from a checkout
    sys.path.insert(0, str(REPO))


# ImageNet weights for the ResNets cannot be had offline: they run with random weights (the same compute), and
# their caches are float32, as a random ResNet-152's features (~1e8) overflow float16
WEIGHTS = {"resnet152": "none", "resnet101": "none", "resnet50": "none", "mobilenet_v2": "default"}


def cache_dtype(backbone: str) -> str:
    return "float32" if WEIGHTS[backbone] == "none" else "float16"


def default_data() -> Path:
    """$CAPCACHE_DATA, else ../shared/data next to the repository (as the tests use)."""
    return Path(os.environ.get("CAPCACHE_DATA", REPO / ".." / "shared" / "data")).resolve()


def pin_threads(n: int) -> None:
    """Use n intra-op threads here and in child processes (the OpenMP variables are read at start-up)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def machine() -> str:
    """One line naming the machine, torch and the load while the benchmark ran."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, {torch.get_num_threads()} "
            f"torch thread(s); load average {load}")


class Report:
    """Collects `ratio` lines: `ratio NAME: VALUE (target OP TARGET) PASS|FAIL`."""

    def __init__(self, title: str):
        self.title = title
        self.failed: list[str] = []
        print(f"== {title}  [{machine()}]", flush=True)

    def ratio(self, name: str, value: float, target: float | None = None, higher_is_better: bool = True,
              unit: str = "x", note: str = "") -> bool:
        ok = True
        verdict = ""
        if target is not None:
            ok = value >= target if higher_is_better else value <= target
            verdict = f" (target {'>=' if higher_is_better else '<='} {target:g}{unit}) {'PASS' if ok else 'FAIL'}"
            if not ok:
                self.failed.append(name)
        print(f"ratio {name}: {value:.3f}{unit}{verdict}{'  ' + note if note else ''}", flush=True)
        return ok

    def table(self, header: list[str], rows: list[list[object]]) -> None:
        cells = [header] + [[_fmt(c) for c in r] for r in rows]
        widths = [max(len(str(r[i])) for r in cells) for i in range(len(header))]
        for i, r in enumerate(cells):
            print("  " + "  ".join(str(c).rjust(w) if j else str(c).ljust(w) for j, (c, w) in
                                   enumerate(zip(r, widths))))
            if i == 0:
                print("  " + "  ".join("-" * w for w in widths))
        sys.stdout.flush()

    def done(self, strict: bool = False) -> int:
        """Exit status: 1 for a missed target only when `strict` (the scripts' --check)."""
        print(f"== {self.title}: {'all targets met' if not self.failed else 'missed: ' + ', '.join(self.failed)}",
              flush=True)
        return 1 if strict and self.failed else 0


def _fmt(c: object) -> str:
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 100 else f"{c:.0f}"
    return str(c)
