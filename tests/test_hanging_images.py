"""Images that hang or escape: only regular files are opened (a FIFO named .jpg is that file's error,
not a hang), any exception from decoding one file is that file's error (the others are kept), and a
DataLoader worker killed from outside (the OOM killer) is one error line and a resumable run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reliability_helpers import no_traceback, one_error_line, tiny_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(coco_records, tmp_path) -> dict:
    """images/ with 2 real photos and a FIFO named fifo.jpg; a COCO captions file naming all three."""
    images = tmp_path / "images"
    images.mkdir()
    names = []
    for r in coco_records[:2]:
        shutil.copy(r.path, images / Path(r.path).name)
        names.append(Path(r.path).name)
    os.mkfifo(images / "fifo.jpg")
    names.append("fifo.jpg")
    data = {"images": [{"id": i + 1, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "caption": "a photo of a thing"} for i in range(3)]}
    (tmp_path / "captions.json").write_text(json.dumps(data))
    return {"images": images, "captions": tmp_path / "captions.json", "good": names[:2]}


def test_load_image_views_refuses_a_fifo_without_opening_it(folder):
    from common.backbones import load_backbone, load_image_views
    from common.preprocess import ImageError

    pp = load_backbone("mobilenet_v2", "none", "cpu").preprocess
    with pytest.raises(ImageError, match=r"fifo\.jpg: .*not a regular file"):
        load_image_views(folder["images"] / "fifo.jpg", pp)  # would block in open() forever


def test_a_decoder_raising_not_implemented_is_that_files_error(folder, monkeypatch):
    from PIL import ImageFile

    from common.backbones import load_backbone, load_image_views
    from common.preprocess import ImageError

    pp = load_backbone("mobilenet_v2", "none", "cpu").preprocess

    def unsupported(self):
        raise NotImplementedError("this codec variant is not supported")

    monkeypatch.setattr(ImageFile.ImageFile, "load", unsupported)
    with pytest.raises(ImageError, match=r"NotImplementedError: this codec variant"):
        load_image_views(folder["images"] / folder["good"][0], pp)


@pytest.mark.slow  # the caption CLI in a subprocess (a hang must end in its timeout, not the suite's)
def test_caption_keeps_the_good_images_beside_a_fifo(folder, shared_cache, tmp_path_factory):
    run = tiny_run(shared_cache, tmp_path_factory)
    code = ("import sys; from stage2_decoder.caption import main; "
            "main([sys.argv[1], '--checkpoint', sys.argv[2], '--device', 'cpu', '--json'])")
    proc = subprocess.run([sys.executable, "-c", code, str(folder["images"]), str(run / "best.pt")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # a hang fails here, not forever
    no_traceback(proc)
    out = json.loads(proc.stdout)
    assert sorted(Path(o["image"]).name for o in out) == sorted(folder["good"])
    assert "fifo.jpg" in proc.stderr and "not a regular file" in proc.stderr


@pytest.mark.slow  # the stage 1 CLI in a subprocess, with DataLoader workers
def test_stage1_with_a_fifo_finishes_with_that_files_error(folder, tmp_path):
    out = tmp_path / "c.h5"
    proc = subprocess.run([sys.executable, "-m", "stage1_extract", "--images", str(folder["images"]), "--captions",
                           str(folder["captions"]), "--out", str(out), "--backbone", "mobilenet_v2", "--weights",
                           "none", "--workers", "2", "--device", "cpu", "--no-progress"], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "1 skipped" in proc.stdout and "not a regular file" in proc.stdout


@pytest.mark.slow  # a real DataLoader worker SIGKILLed mid-extraction
def test_a_killed_dataloader_worker_is_one_error_line_and_resumable(coco_dir, tmp_path):
    out = tmp_path / "k.h5"
    prelude = """
import os, signal, common.backbones as b
_load, _n = b.load_image_views, [0]
def load(*a, **k):
    _n[0] += 1
    if _n[0] == 6 and os.environ.get("KILL_WORKER"):
        os.kill(os.getpid(), signal.SIGKILL)  # in the worker: what the OOM killer does
    return _load(*a, **k)
b.load_image_views = load
from stage1_extract.__main__ import main
main(prog_name="stage1_extract")
"""
    args = ["--images", str(coco_dir / "images"), "--captions", str(coco_dir / "captions.json"), "--out", str(out),
            "--backbone", "mobilenet_v2", "--weights", "none", "--limit", "24", "--batch-size", "4", "--workers", "1",
            "--device", "cpu", "--no-progress"]
    env = {**os.environ, "KILL_WORKER": "1"}
    proc = subprocess.run([sys.executable, "-c", prelude, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env=env)
    line = one_error_line(proc)
    assert "DataLoader worker" in line and "re-run the same command" in line
    env.pop("KILL_WORKER")
    proc = subprocess.run([sys.executable, "-c", prelude, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0 and "24 images" in proc.stdout, proc.stderr
