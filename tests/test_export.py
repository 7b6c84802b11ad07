"""ONNX export: checked graphs, the very captions of the PyTorch model, a torch-free captioner, clear errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TEST_THREADS

N_PHOTOS = 8


@pytest.fixture(scope="module")
def tiny_checkpoint(shared_cache, tmp_path_factory) -> Path:
    """A small decoder trained for a few seconds on the shared mobilenet_v2 cache (image-dependent captions)."""
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    out = tmp_path_factory.mktemp("export_run")
    train(TrainConfig(features=str(shared_cache), out=str(out), epochs=8, scst_epochs=0, batch_size=16, embed_size=32,
                      hidden_size=64, vocab_threshold=2, ema_decay=0.0, dropout=0.0, lr=3e-3, val_images=10,
                      device="cpu", progress=False))
    return out / "best.pt"


@pytest.fixture(scope="module")
def export_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    from stage2_decoder.serving.onnx_export import ExportConfig, export

    out = tmp_path_factory.mktemp("export") / "onnx"
    manifest = export(ExportConfig(checkpoint=str(tiny_checkpoint), out=str(out)))
    assert manifest == out / "capcache-onnx.json"
    return out


@pytest.fixture(scope="module")
def photos(coco_dir, flickr_dir) -> list[str]:
    coco = sorted((coco_dir / "images").iterdir())[100:100 + N_PHOTOS // 2]  # not the 48 it was trained on
    flickr = sorted((flickr_dir / "Images").iterdir())[: N_PHOTOS - len(coco)]
    return [str(p) for p in coco + flickr]


def test_export_writes_checked_graphs_and_a_manifest(export_dir, tiny_checkpoint):
    import onnx

    from common.vocab import Vocabulary
    from stage2_decoder.serving.onnx_captioner import sha256_file
    from stage2_decoder.training.checkpoint import load_checkpoint

    m = json.loads((export_dir / "capcache-onnx.json").read_text())
    ckpt = load_checkpoint(tiny_checkpoint)
    assert (m["format"], m["version"], m["checkpoint"]) == ("capcache-onnx", 2, "best.pt")
    assert Vocabulary(m["vocab"]["words"]) == Vocabulary.from_dict(ckpt["vocab"])
    assert m["backbone"]["name"] == "mobilenet_v2" and m["preprocess"]["resize"] == 256
    assert m["decode"]["beam_size"] == 3 and m["decoder"] == ckpt["decoder_config"]
    for name in ("encoder.onnx", "decoder_init.onnx", "decoder_step.onnx"):
        onnx.checker.check_model(str(export_dir / name), full_check=True)
        assert m["files"][name]["sha256"] == sha256_file(export_dir / name)
        assert m["files"][name]["bytes"] == (export_dir / name).stat().st_size
        model = onnx.load(str(export_dir / name))
        assert model.opset_import[0].version >= 17
        assert all(i.type.tensor_type.shape.dim[0 if i.name in ("images", "features", "tokens") else 1].dim_param
                   for i in model.graph.input)  # the batch axis of every input is dynamic
    assert not list(export_dir.glob("*.tmp")) and not list(export_dir.glob(".*"))


def test_graphs_compute_what_the_torch_modules_do_at_any_batch(export_dir, tiny_checkpoint, photos):
    import torch

    from common.backbones import load_image_u8
    from stage2_decoder.api import Captioner
    from stage2_decoder.serving.onnx_captioner import OnnxCaptioner

    cap = Captioner.load(tiny_checkpoint, device="cpu")
    oc = OnnxCaptioner.load(export_dir, threads=1)
    for n in (1, 3):
        x = torch.stack([load_image_u8(p, cap.backbone.preprocess) for p in photos[:n]])
        feats = cap.backbone.encode(x)
        np.testing.assert_allclose(oc.features(x.numpy()), feats.numpy(), atol=1e-4, rtol=1e-4)
        with torch.inference_mode():
            h, c = cap.decoder.init_state(feats)
            logp, (h2, _) = cap.decoder.step(torch.tensor([4, 5, 6][:n]), (h, c))
        oh, ocs = oc.init.run(None, {"features": feats.numpy()})
        np.testing.assert_allclose(oh, h.numpy(), atol=1e-5)
        np.testing.assert_allclose(ocs, c.numpy(), atol=1e-5)
        ologp, oh2, _ = oc.step_session.run(None, {"tokens": np.array([4, 5, 6][:n]), "h_in": h.numpy(), "c_in": c.numpy()})
        assert np.array_equal(np.isinf(ologp), torch.isinf(logp).numpy())  # the same words masked
        np.testing.assert_allclose(ologp[~np.isinf(ologp)], logp[~torch.isinf(logp)].numpy(), atol=1e-4)
        np.testing.assert_allclose(oh2, h2.numpy(), atol=1e-5)


@pytest.mark.parametrize("settings", [dict(beam_size=1), dict(), dict(num_captions=3, beam_size=4),
                                      dict(no_repeat_ngram=2, min_len=3, max_len=8)], ids=str)
def test_onnx_captions_equal_the_pytorch_captions(export_dir, tiny_checkpoint, photos, settings):
    from stage2_decoder.api import Captioner
    from stage2_decoder.serving.onnx_captioner import OnnxCaptioner

    want = Captioner.load(tiny_checkpoint, device="cpu").caption(photos, **settings)
    got = OnnxCaptioner.load(export_dir, threads=1).caption(photos, batch_size=3, **settings)
    assert len({r["caption"] for r in want}) > 1  # image-dependent captions, or agreement proves little
    assert [r["image"] for r in got] == [r["image"] for r in want] == photos
    for g, w in zip(got, want):
        assert [c["caption"] for c in g["captions"]] == [c["caption"] for c in w["captions"]]
        assert g["caption"] == w["caption"]
        np.testing.assert_allclose([c["score"] for c in g["captions"]], [c["score"] for c in w["captions"]],
                                   atol=1e-4)


def test_numpy_greedy_ids_equal_torch_greedy(export_dir, tiny_checkpoint, photos):
    import torch

    from common.backbones import load_image_u8
    from stage2_decoder.api import Captioner
    from stage2_decoder.decoding.beam import greedy
    from stage2_decoder.decoding.numpy_decode import greedy_scored
    from stage2_decoder.serving.onnx_captioner import OnnxCaptioner

    cap = Captioner.load(tiny_checkpoint, device="cpu")
    oc = OnnxCaptioner.load(export_dir, threads=1)
    feats = cap.backbone.encode(torch.stack([load_image_u8(p, cap.backbone.preprocess) for p in photos]))
    h, c = oc.init.run(None, {"features": feats.numpy()})
    for min_len in (0, 4):
        want = greedy(cap.decoder, feats, max_len=12, min_len=min_len)
        got = greedy_scored(oc._step, h, c, oc.vocab.start_id, oc.vocab.end_id, 12, min_len)
        assert [row[0][0] for row in got] == want
    assert len({tuple(s) for s in want}) > 1


def test_unreadable_images_are_returned_or_raised(export_dir, photos, tmp_path):
    from PIL import Image

    from common.preprocess import ImageError
    from stage2_decoder.serving.onnx_captioner import OnnxCaptioner

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    oc = OnnxCaptioner.load(export_dir, threads=1)
    out = oc.caption([photos[0], str(bad), np.asarray(Image.open(photos[1]).convert("RGB")), str(fifo)],
                     beam_size=1, on_error="return")
    assert out[0]["caption"] and out[2]["caption"] and out[2]["image"] is None
    assert out[1]["image"] == str(bad) and "broken.jpg" in out[1]["error"] and "caption" not in out[1]
    assert "fifo.jpg: a FIFO, not a regular file" in out[3]["error"]
    with pytest.raises(ImageError, match="broken.jpg"):
        oc.caption([str(bad)])
    with pytest.raises(ValueError, match="sampling"):
        oc.caption(photos[:1], sample=True)


def _torchless_env(tmp_path: Path) -> dict:
    """PYTHONPATH with stand-ins first that make `import torch` / `import torchvision` fail."""
    fake = tmp_path / "no_torch"
    for name in ("torch", "torchvision"):
        (fake / name).mkdir(parents=True, exist_ok=True)
        (fake / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    env = dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{REPO}", OMP_NUM_THREADS=TEST_THREADS)
    return env


# what docs/deploy.md says to ship beside the export folder
SHIP_FILES = ("common/__init__.py", "common/atomic.py", "common/bounds.py", "common/jsonio.py", "common/preprocess.py",
              "common/tokenizer.py", "common/vocab.py", "stage2_decoder/__init__.py", "stage2_decoder/api.py",
              "stage2_decoder/decoding/__init__.py", "stage2_decoder/decoding/config.py",
              "stage2_decoder/decoding/ngram_block.py", "stage2_decoder/decoding/numpy_decode.py",
              "stage2_decoder/serving/__init__.py", "stage2_decoder/serving/onnx_captioner.py")


def test_onnx_caption_refuses_a_misspelt_setting_and_accepts_the_ones_it_ignores(export_dir, photos):
    """A typo (num_caption=3) gave one caption with no word said; Captioner.caption raises TypeError."""
    from stage2_decoder.serving.onnx_captioner import OnnxCaptioner

    oc = OnnxCaptioner.load(export_dir, threads=1)
    with pytest.raises(TypeError, match="num_caption"):
        oc.caption([photos[0]], num_caption=3)
    out = oc.caption([photos[0]], beam_size=1, device="cpu", seed=3, temperature=0.5, top_p=0.9)
    assert out[0]["caption"]


def test_onnx_captioner_runs_from_the_shipped_files_where_torch_cannot_be_imported(export_dir, photos, tmp_path):
    shipped = tmp_path / "shipped"
    for f in SHIP_FILES:
        (shipped / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / f, shipped / f)
    env = _torchless_env(tmp_path)
    env["PYTHONPATH"] = env["PYTHONPATH"].replace(str(REPO), str(shipped))
    env["SHIPPED"] = str(shipped)  # every project module must come from the shipped copy, not an installed one
    code = ("import json, sys\n"
            "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    sys.exit('torch imported')\n"
            "from stage2_decoder.serving.onnx_captioner import OnnxCaptioner\n"
            "out = OnnxCaptioner.load(sys.argv[1], threads=1).caption(sys.argv[2:], beam_size=1)\n"
            "assert not any(m.split('.')[0] in ('torch', 'torchvision') for m in sys.modules if sys.modules[m])\n"
            "ours = [m for m in sys.modules if m.split('.')[0] in ('common', 'stage2_decoder')]\n"
            "import os\n"
            "stray = [m for m in ours if not sys.modules[m].__file__.startswith(os.environ['SHIPPED'])]\n"
            "assert not stray, stray\n"
            "print(json.dumps([r['caption'] for r in out]))\n")
    p = subprocess.run([sys.executable, "-c", code, str(export_dir), *photos[:3]], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    from stage2_decoder.serving.onnx_captioner import OnnxCaptioner

    assert json.loads(p.stdout) == [r["caption"] for r in OnnxCaptioner.load(export_dir).caption(photos[:3],
                                                                                                 beam_size=1)]


def test_caption_cli_with_onnx_needs_no_torch(export_dir, tiny_checkpoint, photos, tmp_path):
    from stage2_decoder.api import Captioner

    p = subprocess.run([sys.executable, "-m", "stage2_decoder.caption", "--onnx", str(export_dir), "--json",
                        *photos[:4]], cwd=REPO, env=_torchless_env(tmp_path), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout)
    want = Captioner.load(tiny_checkpoint, device="cpu").caption(photos[:4])  # what caption --checkpoint prints
    assert [r["caption"] for r in got] == [r["caption"] for r in want]
    assert [r["image"] for r in got] == photos[:4]
    assert p.stderr == ""
    cuda = subprocess.run([sys.executable, "-m", "stage2_decoder.caption", "--onnx", str(export_dir), "--device", "cuda",
                           photos[0]], cwd=REPO, env=_torchless_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert cuda.returncode == 0 and cuda.stderr.startswith("warning: --device cuda is not used with --onnx"), cuda.stderr


def _broken(export_dir: Path, tmp_path: Path, how: str) -> Path:
    d = tmp_path / how
    shutil.copytree(export_dir, d)
    manifest = d / "capcache-onnx.json"
    m = json.loads(manifest.read_text())
    if how == "corrupted_onnx":
        data = bytearray((d / "decoder_step.onnx").read_bytes())
        data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
        (d / "decoder_step.onnx").write_bytes(bytes(data))
    elif how == "missing_json":
        manifest.unlink()
    elif how == "other_version":
        m["version"] = 99
        manifest.write_text(json.dumps(m))
    elif how == "wrong_vocab":
        m["vocab"]["words"] = m["vocab"]["words"][:-1]
        manifest.write_text(json.dumps(m))
    return d


BROKEN = {"corrupted_onnx": r"decoder_step\.onnx.*sha256", "missing_json": r"capcache-onnx\.json is missing",
          "other_version": r"capcache-onnx\.json has capcache-onnx version 99",
          "wrong_vocab": r"capcache-onnx\.json has \d+ words but .*decoder_step\.onnx scores"}


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_a_broken_export_is_one_clear_error(export_dir, tmp_path, how):
    from stage2_decoder.serving.onnx_captioner import OnnxCaptioner, OnnxExportError

    with pytest.raises(OnnxExportError, match=BROKEN[how]):
        OnnxCaptioner.load(_broken(export_dir, tmp_path, how))


def test_a_corrupted_graph_with_a_matching_checksum_is_still_named(export_dir, tmp_path):
    from stage2_decoder.serving.onnx_captioner import sha256_file
    from stage2_decoder.serving.onnx_captioner import OnnxCaptioner, OnnxExportError

    d = _broken(export_dir, tmp_path, "corrupted_onnx")
    m = json.loads((d / "capcache-onnx.json").read_text())
    (d / "decoder_step.onnx").write_bytes(b"\x08\x07garbage")
    m["files"]["decoder_step.onnx"].update(sha256=sha256_file(d / "decoder_step.onnx"),
                                           bytes=(d / "decoder_step.onnx").stat().st_size)
    (d / "capcache-onnx.json").write_text(json.dumps(m))
    with pytest.raises(OnnxExportError, match=r"decoder_step\.onnx is not a loadable ONNX model"):
        OnnxCaptioner.load(d)


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_caption_cli_on_a_broken_export_prints_one_error_line(export_dir, photos, tmp_path, how, cli):
    p = cli("stage2_decoder.caption", "--onnx", _broken(export_dir, tmp_path, how), photos[0])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("case", ["missing checkpoint", "out is a file"])
def test_export_cli_errors_are_one_line(tiny_checkpoint, tmp_path, case):
    from click.testing import CliRunner

    from stage2_decoder.export import main

    (tmp_path / "taken").write_text("")
    args = {"missing checkpoint": ["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")],
            "out is a file": ["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "taken")]}[case]
    r = CliRunner().invoke(main, args)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert ("missing.pt" if case == "missing checkpoint" else "taken") in lines[0]


def test_export_refuses_a_graph_that_computes_something_else(export_dir, tiny_checkpoint):
    import torch

    from stage2_decoder.api import Captioner
    from stage2_decoder.serving.onnx_export import check_outputs, export_modules

    cap = Captioner.load(tiny_checkpoint, device="cpu")
    _, _, step = export_modules(cap)
    h = torch.rand(1, 2, cap.decoder.cfg.hidden_size) - 0.5
    args, inputs = (torch.tensor([1, 7]), h, h.clone()), ["tokens", "h_in", "c_in"]
    check_outputs("decoder_step.onnx", export_dir / "decoder_step.onnx", step, args, inputs)  # the real one passes

    class Shifted(torch.nn.Module):  # what a wrong export would compute
        def forward(self, *a):
            logp, h, c = step(*a)
            return logp + 0.01, h, c

    with pytest.raises(ValueError, match="decoder_step.onnx does not compute what the PyTorch model does"):
        check_outputs("decoder_step.onnx", export_dir / "decoder_step.onnx", Shifted(), args, inputs)


def test_a_failed_export_leaves_the_earlier_export_in_its_folder_whole(export_dir, tiny_checkpoint, photos,
                                                                        tmp_path, monkeypatch):
    """The manifest was removed first and each graph overwritten as it was made: an export that failed at its
    third graph left a folder that no longer captioned (docs/deploy.md: export is all or nothing)."""
    import stage2_decoder.serving.onnx_export as onnx_export
    from stage2_decoder.serving.onnx_captioner import OnnxCaptioner

    out = tmp_path / "onnx"
    shutil.copytree(export_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = onnx_export.check_outputs

    def third_graph_fails(name, *args):
        if name == "decoder_step.onnx":
            raise ValueError("the exported decoder_step.onnx does not compute what the PyTorch model does")
        return real(name, *args)

    monkeypatch.setattr(onnx_export, "check_outputs", third_graph_fails)
    with pytest.raises(ValueError, match="decoder_step.onnx"):
        onnx_export.export(onnx_export.ExportConfig(checkpoint=str(tiny_checkpoint), out=str(out)))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing left behind, nothing changed
    assert OnnxCaptioner.load(out).caption(photos[:1])[0]["caption"]


@pytest.mark.parametrize("case", ["empty", "a file, dry run"])
def test_export_out_must_be_a_folder_also_in_a_dry_run(tiny_checkpoint, tmp_path, monkeypatch, case):
    """--out "" exported into the current folder; --dry-run said yes to an --out the export then refused."""
    from click.testing import CliRunner

    from stage2_decoder.export import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("")
    args = ["--out", ""] if case == "empty" else ["--out", "taken", "--dry-run"]
    r = CliRunner().invoke(main, ["--checkpoint", str(tiny_checkpoint), *args])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: --out"), r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export(export_dir, tiny_checkpoint, tmp_path):
    """A graph set per killed export piled up in --out."""
    import subprocess as sp

    from stage2_decoder.serving.onnx_export import STAGE_PREFIX, ExportConfig, export

    out = tmp_path / "onnx"
    shutil.copytree(export_dir, out)
    gone = sp.Popen(["true"])
    gone.wait()
    stale, live = out / f"{STAGE_PREFIX}{gone.pid}-abc", out / f"{STAGE_PREFIX}{os.getpid()}-xyz"
    for d in (stale, live):
        d.mkdir()
        (d / "encoder.onnx").write_bytes(b"x" * 100)
    export(ExportConfig(checkpoint=str(tiny_checkpoint), out=str(out)))
    assert not stale.exists() and live.exists()  # a live process's staging folder is left alone
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(STAGE_PREFIX)) == sorted(
        p.name for p in export_dir.iterdir())


def test_a_second_export_into_a_folder_being_exported_is_refused(export_dir, tiny_checkpoint, tmp_path):
    """Two exports into one folder interleaved their graphs under the manifest of one of them."""
    from click.testing import CliRunner

    from common.lock import hold_folder
    from stage2_decoder.export import main

    out = tmp_path / "onnx"
    shutil.copytree(export_dir, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with hold_folder(out, "ONNX folder"):  # an export in progress
        r = CliRunner().invoke(main, ["--checkpoint", str(tiny_checkpoint), "--out", str(out)])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "in use by another process" in lines[0], r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_folder_the_file_system_cannot_lock_is_exported_into_with_a_warning(tmp_path, monkeypatch):
    """On NFS a folder cannot take flock's exclusive lock (EBADF): export failed there with a bare
    '[Errno 9] Bad file descriptor'."""
    import errno
    import fcntl

    from common import lock

    def nfs(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", nfs)
    with pytest.warns(UserWarning, match=r"cannot lock ONNX folder .* \(Bad file descriptor\)"):
        with lock.hold_folder(tmp_path, "ONNX folder") as held:
            assert held == tmp_path


def test_an_export_that_cannot_load_its_captioner_makes_no_folder(tiny_checkpoint, tmp_path):
    from stage2_decoder.serving.onnx_export import ExportConfig, export

    with pytest.raises(Exception, match="weights"):
        export(ExportConfig(checkpoint=str(tiny_checkpoint), out=str(tmp_path / "onnx"),
                            weights=str(tmp_path / "gone.pth")))
    assert not (tmp_path / "onnx").exists()
