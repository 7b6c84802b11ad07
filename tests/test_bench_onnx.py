"""bench/onnx_export.py runs end to end in its tiny mode and prints every ratio it owes (no timing asserted)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO, TEST_THREADS

RATIO = re.compile(r"^ratio (?P<name>\S.*?): (?P<value>-?\d+\.\d+)", re.M)
EXPECTED = {"onnx.cold_start pytorch/onnx", "onnx.warm_greedy pytorch/onnx", "onnx.warm_beam3 pytorch/onnx",
            "onnx.captions_equal"}


@pytest.mark.slow
def test_onnx_bench_tiny_mode_prints_its_ratios(data_dir, coco_dir):
    p = subprocess.run([sys.executable, "bench/onnx_export.py", "--tiny", "--data", str(data_dir),
                        "--threads", TEST_THREADS], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    found = {m["name"]: float(m["value"]) for m in RATIO.finditer(p.stdout)}
    assert EXPECTED <= set(found), p.stdout
    assert all(v == v and 0 < v != float("inf") for v in found.values()), found  # measured, not nan/inf/0
    assert found["onnx.captions_equal"] == 1.0, p.stdout  # the export captions as the checkpoint does
    assert "Traceback" not in p.stderr
