"""Shared fixtures: where the real data lives, a small shared feature cache, and a CLI runner.

The data is read in place (never copied into the repo): $CAPCACHE_DATA, defaulting to
`../shared/data` next to the repository. Tests that need it skip with a clear reason if absent.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the package is not installed; import it from the checkout
    sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO / ".." / "shared" / "data"
SHARED_CACHE_IMAGES = 48

# One intra-op thread, in-process and in CLI subprocesses: on a small, shared CPU box OpenMP's spinning
# threads make the tiny decoder (and even the backbones) many times slower with 2 threads than with 1.
# Override with CAPCACHE_TEST_THREADS.
TEST_THREADS = os.environ.get("CAPCACHE_TEST_THREADS", "1")


def small_shm(monkeypatch, free: int = 2**20) -> None:
    """/dev/shm with `free` bytes left (Docker's default is 64 MB); other paths as they are."""
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: real(path)._replace(free=free) if str(path) == "/dev/shm" else real(path))


_OWN_TOKEN_CACHE: str | None = None  # the token-cache folder this run made, removed when it ends


def pytest_configure(config):
    import tempfile

    import torch

    global _OWN_TOKEN_CACHE
    # training's token cache (common/token_cache.py) in a folder of the test run's own, also for CLI subprocesses
    if "CAPCACHE_TOKEN_CACHE" not in os.environ:
        _OWN_TOKEN_CACHE = os.environ["CAPCACHE_TOKEN_CACHE"] = tempfile.mkdtemp(prefix="capcache-test-tokens-")

    torch.set_num_threads(int(TEST_THREADS))


def pytest_unconfigure(config):
    import shutil

    if _OWN_TOKEN_CACHE is not None:  # a folder given in the environment is the caller's to keep
        shutil.rmtree(_OWN_TOKEN_CACHE, ignore_errors=True)


def _data_root() -> Path:
    return Path(os.environ.get("CAPCACHE_DATA", str(DEFAULT_DATA))).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = _data_root()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set CAPCACHE_DATA to the folder holding "
                    f"coco2017-mini/ and flickr8k-mini/)")
    return root


@pytest.fixture(scope="session")
def coco_dir(data_dir: Path) -> Path:
    d = data_dir / "coco2017-mini"
    if not (d / "captions.json").is_file() or not (d / "images").is_dir():
        pytest.skip(f"COCO mini data not found under {d} (needs captions.json and images/)")
    return d


@pytest.fixture(scope="session")
def flickr_dir(data_dir: Path) -> Path:
    d = data_dir / "flickr8k-mini"
    if not (d / "captions.txt").is_file() or not (d / "Images").is_dir():
        pytest.skip(f"Flickr8k mini data not found under {d} (needs captions.txt and Images/)")
    return d


@pytest.fixture(scope="session")
def coco_records(coco_dir: Path):
    """All COCO records, in the library's stable order."""
    from common.datasets import load_coco

    return load_coco(coco_dir / "captions.json", coco_dir / "images")


@pytest.fixture(scope="session")
def shared_cache(coco_dir: Path, tmp_path_factory) -> Path:
    """A complete mobilenet_v2 (real weights) cache of the first 48 COCO images, made once per session."""
    from stage1_extract.extract import ExtractConfig, extract

    out = tmp_path_factory.mktemp("shared_cache") / "coco48_mobilenet_v2.h5"
    summary = extract(ExtractConfig(images=str(coco_dir / "images"), captions=str(coco_dir / "captions.json"),
                                    out=str(out), backbone="mobilenet_v2", weights="default",
                                    batch_size=16, workers=0, device="cpu", limit=SHARED_CACHE_IMAGES,
                                    progress=False))
    assert summary.total == SHARED_CACHE_IMAGES and summary.done_now == SHARED_CACHE_IMAGES, summary
    assert out.is_file()
    return out


@pytest.fixture(scope="session")
def mobilenet():
    """The real-weights mobilenet_v2 backbone on CPU, built once."""
    from common.backbones import load_backbone

    return load_backbone("mobilenet_v2", "default", "cpu")


def run_cli(module: str, *args, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module args...` in a subprocess from the repo root; text output captured."""
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONHASHSEED", "0")
    full_env.setdefault("OMP_NUM_THREADS", TEST_THREADS)
    full_env.setdefault("MKL_NUM_THREADS", TEST_THREADS)
    full_env.setdefault("PYTHONIOENCODING", "utf-8")  # read back as UTF-8 below, whatever the locale
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, encoding="utf-8", timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def cli():
    """The CLI runner as a fixture: cli("stage1_extract", "--help") -> CompletedProcess."""
    return run_cli
