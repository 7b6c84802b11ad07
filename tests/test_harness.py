"""The test run's own set-up (conftest.py): what it makes, it removes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_the_token_cache_folder_a_run_makes_is_gone_when_it_ends(tmp_path: Path):
    seen = tmp_path / "seen.txt"
    (tmp_path / "test_inner.py").write_text(
        "import os\n"
        "def test_records_it():\n"
        f"    open({str(seen)!r}, 'w').write(os.environ['CAPCACHE_TOKEN_CACHE'])\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "CAPCACHE_TOKEN_CACHE"}
    env["PYTHONPATH"] = str(TESTS)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_inner.py")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    folder = Path(seen.read_text())
    assert folder.name.startswith("capcache-test-tokens-")
    assert not folder.exists()


def test_a_token_cache_folder_given_in_the_environment_is_kept(tmp_path: Path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (tmp_path / "test_inner.py").write_text("def test_nothing():\n    assert True\n")
    env = {**os.environ, "CAPCACHE_TOKEN_CACHE": str(keep), "PYTHONPATH": str(TESTS)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_inner.py")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert keep.is_dir()
