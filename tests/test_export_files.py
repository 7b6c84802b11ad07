"""An export folder from elsewhere: every file the manifest names is verified, nothing outside it is read,
and a hostile manifest (huge, deeply nested, unbounded numbers) is one OnnxExportError naming it."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

MANIFEST = "capcache-onnx.json"


@pytest.fixture(scope="module")
def export_dir(shared_cache, tmp_path_factory) -> Path:
    from stage2_decoder.serving.onnx_export import ExportConfig, export
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    run = tmp_path_factory.mktemp("files_run")
    train(TrainConfig(features=str(shared_cache), out=str(run), epochs=1, scst_epochs=0, batch_size=16, embed_size=16,
                      hidden_size=32, vocab_threshold=2, ema_decay=0.0, dropout=0.0, val_images=10, device="cpu",
                      progress=False))
    out = tmp_path_factory.mktemp("files") / "onnx"
    export(ExportConfig(checkpoint=str(run / "best.pt"), out=str(out)))
    return out


@pytest.fixture
def copy(export_dir, tmp_path) -> Path:
    d = tmp_path / "export"
    shutil.copytree(export_dir, d)
    return d


def _edit(d: Path, fn) -> None:
    m = json.loads((d / MANIFEST).read_text())
    fn(m)
    (d / MANIFEST).write_text(json.dumps(m))


def _with_external_data(d: Path, name: str = "decoder_step.onnx", listed: bool = True) -> Path:
    """Re-save one graph with its weights in `NAME.data` (as onnx does for graphs over 2 GB)."""
    import onnx

    from stage2_decoder.serving.onnx_captioner import sha256_file

    model = onnx.load(str(d / name))
    onnx.save_model(model, str(d / name), save_as_external_data=True, location=name + ".data", size_threshold=0)
    data = d / (name + ".data")
    assert data.stat().st_size > 1000

    def fix(m):
        m["files"][name].update(sha256=sha256_file(d / name), bytes=(d / name).stat().st_size,
                                external_data=[data.name] if listed else [])
        if listed:
            m["files"][data.name] = {"sha256": sha256_file(data), "bytes": data.stat().st_size, "external_data": []}
    _edit(d, fix)
    return data


def _captions(d: Path, photos: list[str]) -> list[str]:
    from stage2_decoder.serving.onnx_captioner import OnnxCaptioner

    return [r["caption"] for r in OnnxCaptioner.load(d, threads=1).caption(photos, beam_size=1)]


@pytest.fixture(scope="module")
def photos(coco_dir) -> list[str]:
    return [str(p) for p in sorted((coco_dir / "images").iterdir())[100:103]]


def test_external_data_listed_in_the_manifest_is_verified_and_used(export_dir, copy, photos):
    from stage2_decoder.serving.onnx_captioner import OnnxExportError

    data = _with_external_data(copy)
    assert _captions(copy, photos) == _captions(export_dir, photos)  # the same weights, from the .data file
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 16] = np.full(16, 0x3F, dtype=np.uint8).tobytes()  # other weights
    data.write_bytes(bytes(raw))
    with pytest.raises(OnnxExportError, match=r"decoder_step\.onnx\.data differs from the file exported"):
        _captions(copy, photos)


def test_external_data_the_manifest_does_not_list_is_refused(copy, photos, monkeypatch):
    from stage2_decoder.serving.onnx_captioner import OnnxExportError

    data = _with_external_data(copy, listed=False)
    monkeypatch.chdir(copy)  # onnxruntime would look in the working directory for a graph loaded from bytes
    with pytest.raises(OnnxExportError, match=r"decoder_step\.onnx uses external data that .* does not list"):
        _captions(copy, photos)
    assert data.exists()


@pytest.mark.parametrize("listed", [[["a"]], [{"a": 1}], [3]])
def test_external_data_names_that_are_not_strings_are_refused(copy, photos, listed):
    """A list as a name was "unhashable type: 'list'" from the lookup in the manifest's files."""
    from stage2_decoder.serving.onnx_captioner import OnnxExportError

    _edit(copy, lambda m: m["files"]["encoder.onnx"].update(external_data=listed))
    with pytest.raises(OnnxExportError, match=r"files\.encoder\.onnx\.external_data must be a list of file names"):
        _captions(copy, photos)


@pytest.mark.parametrize("name", ["encoder.onnx", MANIFEST])
def test_a_symlink_out_of_the_export_folder_is_refused(copy, tmp_path, photos, name):
    from stage2_decoder.serving.onnx_captioner import OnnxExportError

    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    shutil.move(copy / name, outside)
    (copy / name).symlink_to(outside)
    with pytest.raises(OnnxExportError, match=rf"{name} points outside the export folder"):
        _captions(copy, photos)


def test_a_symlink_inside_the_export_folder_is_followed(copy, photos, export_dir):
    (copy / "encoder.onnx").rename(copy / "encoder-v1.onnx")
    (copy / "encoder.onnx").symlink_to("encoder-v1.onnx")
    assert _captions(copy, photos) == _captions(export_dir, photos)


@pytest.mark.parametrize("name", ["../encoder.onnx", "/etc/passwd", "sub/x.onnx", ""])
def test_external_data_names_must_be_file_names_in_the_folder(copy, photos, name):
    from stage2_decoder.serving.onnx_captioner import OnnxExportError

    def plant(m):
        m["files"]["decoder_step.onnx"]["external_data"] = [name]
        m["files"][name] = {"sha256": "0" * 64, "bytes": 10, "external_data": []}
    _edit(copy, plant)
    with pytest.raises(OnnxExportError, match="not a file name in|has no entry"):
        _captions(copy, photos)


BAD_NUMBERS = [("preprocess", "resize", 10**9), ("preprocess", "resize", 1e308), ("preprocess", "crop", -1),
               ("preprocess", "resize", "256"), ("preprocess", "resize", True), ("decode", "max_len", 10**8),
               ("decode", "beam_size", 0), ("decode", "length_penalty", 1e308), ("preprocess", "mean", [0.5, 0.5]),
               ("preprocess", "std", [0, 1, 1])]


@pytest.mark.parametrize("section,key,value", BAD_NUMBERS, ids=[f"{s}.{k}={v!r}" for s, k, v in BAD_NUMBERS])
def test_unbounded_numbers_in_the_manifest_are_one_error(copy, photos, section, key, value):
    from stage2_decoder.serving.onnx_captioner import OnnxExportError

    _edit(copy, lambda m: m[section].__setitem__(key, value))
    with pytest.raises(OnnxExportError, match=rf"{MANIFEST}: {section}\.{key} must be"):
        _captions(copy, photos)


def test_a_huge_manifest_is_refused_before_it_is_read(copy, photos):
    from stage2_decoder.serving.onnx_captioner import MANIFEST_MAX_BYTES, OnnxExportError

    with open(copy / MANIFEST, "r+b") as f:  # a sparse file: huge on paper, nothing to read into memory
        f.truncate(64 * 2**30)
    with pytest.raises(OnnxExportError, match=rf"larger than {MANIFEST_MAX_BYTES:,} bytes"):
        _captions(copy, photos)


def test_a_deeply_nested_manifest_is_one_error(copy, photos):
    from stage2_decoder.serving.onnx_captioner import OnnxExportError

    (copy / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(OnnxExportError, match="nested deeper than"):
        _captions(copy, photos)


def test_caption_cli_on_a_hostile_manifest_prints_one_error_line(copy, photos, cli):
    _edit(copy, lambda m: m["preprocess"].__setitem__("resize", 10**12))
    p = cli("stage2_decoder.caption", "--onnx", copy, photos[0])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert "preprocess.resize must be an integer in 1..2048" in lines[0]


def test_a_fifo_named_as_a_graph_is_refused_without_blocking(copy, photos):
    from stage2_decoder.serving.onnx_captioner import OnnxExportError

    os.unlink(copy / "decoder_init.onnx")
    os.mkfifo(copy / "decoder_init.onnx")
    with pytest.raises(OnnxExportError, match=r"decoder_init\.onnx is not a regular file"):
        _captions(copy, photos)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["text"].__setitem__("join", ""), "text.tokenizer and text.join do not match"),
    (lambda m: m["special_ids"].__setitem__("end", 5), "special_ids must be"),
    (lambda m: m["image"].__setitem__("max_aspect", 4), "other image rules"),
], ids=["join", "special_ids", "max_aspect"])
def test_a_manifest_that_states_other_rules_than_the_captioner_applies_is_refused(copy, photos, edit, message):
    from stage2_decoder.serving.onnx_captioner import OnnxExportError

    _edit(copy, edit)
    with pytest.raises(OnnxExportError, match=message):
        _captions(copy, photos)


@pytest.mark.parametrize("edit", [lambda m: m["image"].__setitem__("crop", 256),
                                  lambda m: m["image"].__setitem__("jpeg_draft_size", None),
                                  lambda m: m["image"]["input"].__setitem__("dtype", "float32"),
                                  lambda m: m["preprocess"].__setitem__("resize", 300)],
                         ids=["crop", "jpeg_draft_size", "input dtype", "preprocess resize"])
def test_image_rules_that_contradict_the_preprocessing_are_refused(copy, photos, edit):
    """A deployer implements `image`, this captioner `preprocess`: a manifest where they differed was taken
    (preprocess.resize 300 changed the captions, and a deployer following `image` would get others)."""
    from stage2_decoder.serving.onnx_captioner import OnnxExportError

    _edit(copy, edit)
    with pytest.raises(OnnxExportError, match="image rules .* are not its preprocessing's"):
        _captions(copy, photos)


def _swap_graph(d: Path, name: str, change) -> None:
    """Re-save graph `name` changed by `change(model)`, its sha256 and size updated in the manifest."""
    import onnx

    from stage2_decoder.serving.onnx_captioner import sha256_file

    model = onnx.load(str(d / name))
    change(model)
    onnx.save_model(model, str(d / name))
    _edit(d, lambda m: m["files"][name].update(sha256=sha256_file(d / name), bytes=(d / name).stat().st_size))


def _int32_tokens(model):
    model.graph.input[0].type.tensor_type.elem_type = 6  # int32


def _renamed_input(model):
    old = model.graph.input[1].name
    model.graph.input[1].name = "input_ids"
    for node in model.graph.node:
        node.input[:] = ["input_ids" if i == old else i for i in node.input]


def _extra_output(model):
    model.graph.output.append(model.graph.output[1])


@pytest.mark.parametrize("name, change, says", [
    ("decoder_step.onnx", _int32_tokens, "tokens int32 of rank 1"),
    ("decoder_step.onnx", _renamed_input, "inputs tokens int64 of rank 1, input_ids float of rank 3"),
    ("decoder_step.onnx", _extra_output, "outputs logp float of rank 2, h float of rank 3, c float of rank 3, h"),
], ids=["int32 tokens", "renamed input", "extra output"])
def test_a_graph_with_another_interface_is_refused_at_load(copy, photos, name, change, says):
    """Graphs whose inputs or outputs were not the export's loaded, then failed while captioning: tracebacks
    from onnxruntime, an IndexError in load, or 'too many values to unpack'."""
    from stage2_decoder.serving.onnx_captioner import OnnxExportError

    _swap_graph(copy, name, change)
    with pytest.raises(OnnxExportError, match=f"{name} has .*{says}.*not the export's"):
        _captions(copy, photos)


def test_a_graph_that_fails_to_run_is_one_error_naming_it(copy, photos, monkeypatch):
    """onnxruntime's run-time errors (InvalidArgument, Fail) are not ValueErrors: caption --onnx printed them
    as a traceback."""
    from stage2_decoder.serving.onnx_captioner import OnnxCaptioner, OnnxExportError

    cap = OnnxCaptioner.load(copy, threads=1)

    class Broken(Exception):
        pass

    def fail(*a, **k):
        raise Broken("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Unexpected input data type")

    monkeypatch.setattr(cap, "encoder", type("S", (), {"run": staticmethod(fail)})())
    with pytest.raises(OnnxExportError, match=r"encoder\.onnx failed to run: Broken: \[ONNXRuntimeError\]"):
        cap.caption(photos[:1])


def test_a_symlink_loop_in_the_export_folder_is_an_export_error(copy, photos):
    from stage2_decoder.serving.onnx_captioner import OnnxExportError

    (copy / "encoder.onnx").unlink()
    (copy / "loop").symlink_to(copy / "encoder.onnx")
    (copy / "encoder.onnx").symlink_to(copy / "loop")
    with pytest.raises(OnnxExportError, match="encoder.onnx"):
        _captions(copy, photos)


def test_caption_onnx_given_a_file_is_one_error_line(copy, photos, cli):
    p = cli("stage2_decoder.caption", "--onnx", copy / MANIFEST, photos[0])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and lines == [f"error: {copy / MANIFEST} is not a folder"], p.stderr
