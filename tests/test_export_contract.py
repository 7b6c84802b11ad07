"""The export contract: a captioner written from capcache-onnx.json alone gives `caption --onnx`'s captions.

`Outsider` below is what a deployer writes from the manifest and docs/deploy.md: onnxruntime, numpy
and Pillow, none of the project's code (no common.preprocess, no onnx_captioner, no vocabulary class).
It is checked on the inputs the special rules exist for (transparency, 16-bit and float grayscale, a
panorama, EXIF rotation, a large JPEG decoded in draft mode) and on plain photos.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import REPO


class Outsider:
    """A greedy captioner built only from an export folder's manifest (the contract under test)."""

    def __init__(self, folder: Path):
        import onnxruntime as ort

        self.m = json.loads((folder / "capcache-onnx.json").read_text(encoding="utf-8"))
        self.sessions = {}
        for name in ("encoder.onnx", "decoder_init.onnx", "decoder_step.onnx"):
            data = (folder / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == self.m["files"][name]["sha256"]
            assert len(data) == self.m["files"][name]["bytes"] and not self.m["files"][name]["external_data"]
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            self.sessions[name] = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])

    def pixels(self, path) -> np.ndarray:
        """A file -> (3, crop, crop) uint8, following manifest["image"]."""
        c = self.m["image"]
        im = Image.open(path)
        if im.format == "JPEG" and c["jpeg_draft_size"]:
            im.draft("RGB", tuple(c["jpeg_draft_size"]))
        if c["exif_transpose"]:
            im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im, dtype=np.float32)
            im = Image.fromarray(np.clip(a / (np.float32(a.max()) or np.float32(1)) * np.float32(255), 0, 255)
                                 .astype(np.uint8))
        elif im.mode == "F":
            a = np.asarray(im, dtype=np.float32)
            finite = a[np.isfinite(a)]
            top = np.float32(finite.max()) if finite.size else np.float32(0)
            a = np.where(np.isnan(a) | (a == -np.inf), 0, np.where(a == np.inf, top, a)).astype(np.float32)
            scale = np.float32(255) if top <= 1 else np.float32(1) if top <= 255 else np.float32(255) / top
            im = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8))
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", im.size, (*c["transparency_background"], 255)), im)
        im = im.convert("RGB")
        w, h = im.size
        short, long = min(w, h), max(w, h)
        if long > short * c["max_aspect"]:
            keep = int(short * c["max_aspect"])
            off = (long - keep) // 2
            im = im.crop((off, 0, off + keep, h) if w > h else (0, off, w, off + keep))
            w, h = im.size
            short, long = min(w, h), max(w, h)
        size = (c["resize"], int(c["resize"] * long / short))
        size = size if w <= h else size[::-1]
        if im.size != size:
            im = im.resize(size, Image.BILINEAR)
        w, h, crop = *im.size, c["crop"]
        assert w >= crop and h >= crop  # resize >= crop: the padding rule never applies here
        top, left = round((h - crop) / 2), round((w - crop) / 2)
        return np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.uint8).transpose(2, 0, 1)

    def features(self, paths) -> np.ndarray:
        x = np.stack([self.pixels(p) for p in paths])
        return self.sessions["encoder.onnx"].run(None, {"images": x})[0]

    def captions(self, paths) -> list[str]:
        """Greedy (beam 1) with the manifest's min_len and max_len."""
        d, ids, words = self.m["decode"], self.m["special_ids"], self.m["vocab"]["words"]
        h, c = self.sessions["decoder_init.onnx"].run(None, {"features": self.features(paths)})
        tokens = np.full(len(paths), ids["start"], dtype=np.int64)
        out = [[] for _ in paths]
        done = np.zeros(len(paths), dtype=bool)
        for t in range(d["max_len"]):
            logp, h, c = self.sessions["decoder_step.onnx"].run(None, {"tokens": tokens, "h_in": h, "c_in": c})
            if t < d["min_len"]:
                logp[:, ids["end"]] = -np.inf
            tokens = logp.argmax(-1).astype(np.int64)
            for i, tok in enumerate(tokens.tolist()):
                done[i] |= tok == ids["end"]
                if not done[i] and tok not in (ids["pad"], ids["start"]):
                    out[i].append(words[tok])
            if done.all():
                break
        return [self.m["text"]["join"].join(ws) for ws in out]


@pytest.fixture(scope="module")
def export_dir(shared_cache, tmp_path_factory) -> Path:
    from stage2_decoder.serving.onnx_export import ExportConfig, export
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    run = tmp_path_factory.mktemp("contract_run")
    train(TrainConfig(features=str(shared_cache), out=str(run), epochs=8, scst_epochs=0, batch_size=16, embed_size=32,
                      hidden_size=64, vocab_threshold=2, ema_decay=0.0, dropout=0.0, lr=3e-3, val_images=10,
                      device="cpu", progress=False))
    out = tmp_path_factory.mktemp("contract") / "onnx"
    export(ExportConfig(checkpoint=str(run / "best.pt"), out=str(out)))
    return out


@pytest.fixture(scope="module")
def inputs(coco_dir, flickr_dir, tmp_path_factory) -> dict[str, Path]:
    """Real photos, and files made from them for every special rule of the image path."""
    d = tmp_path_factory.mktemp("contract_inputs")
    coco = sorted((coco_dir / "images").iterdir())[100:104]
    flickr = sorted((flickr_dir / "Images").iterdir())[:2]
    out = {f"plain{i}": p for i, p in enumerate(coco + flickr)}
    rgb = Image.open(coco[0]).convert("RGB")
    w, h = rgb.size
    big = rgb.resize((w * 3, h * 3), Image.BICUBIC)  # a camera-sized JPEG: decoded at 1/4 scale in draft mode
    big.save(d / "large.jpg", quality=92)
    out["large_jpeg"] = d / "large.jpg"
    rgba = rgb.copy()
    alpha = np.zeros((h, w), dtype=np.uint8)
    alpha[:, w // 3:] = np.linspace(0, 255, w - w // 3, dtype=np.uint8)[None, :]  # a third clear, then a ramp
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(d / "rgba.png")
    out["rgba"] = d / "rgba.png"
    gray = np.asarray(Image.open(coco[1]).convert("L"), dtype=np.uint16)
    Image.fromarray((gray * 150).astype(np.uint16)).save(d / "gray16.png")  # 16-bit, max ~38000, not 65535
    out["gray16"] = d / "gray16.png"
    Image.fromarray(gray.astype(np.float32) / 255).save(d / "float.tif")  # float32 in 0..1
    out["float_tiff"] = d / "float.tif"
    pano = Image.open(coco[2]).convert("RGB")
    pano = pano.resize((pano.width * 2, pano.height * 2 // 3), Image.BICUBIC)  # wider than 3:1
    assert pano.width > 3 * pano.height
    pano.save(d / "pano.jpg", quality=92)
    out["panorama"] = d / "pano.jpg"
    tall = Image.open(coco[3]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    tall.save(d / "rotated.jpg", exif=exif, quality=92)
    out["exif_rotated"] = d / "rotated.jpg"
    return out


def test_the_manifest_states_the_whole_image_and_text_contract(export_dir):
    m = json.loads((export_dir / "capcache-onnx.json").read_text())
    image = m["image"]
    assert image["input"]["shape"] == ["batch", 3, 224, 224] and image["input"]["dtype"] == "uint8"
    assert (image["resize"], image["crop"], image["jpeg_draft_size"]) == (256, 224, [256, 256])
    assert image["max_aspect"] == 3 and image["transparency_background"] == [255, 255, 255]
    steps = " ".join(image["steps"])
    for rule in ("draft", "exif_transpose", "I;16", "mode F", "alpha_composite", "max_aspect", "BILINEAR",
                 "half to even", "pad"):
        assert rule in steps, rule
    assert m["text"]["join"] == " " and m["text"]["tokenizer"] == "nltk"


def test_weights_sha256_is_the_weights_file_digest(export_dir):
    import torchvision

    from common.backbones import hub_checkpoint_dir

    m = json.loads((export_dir / "capcache-onnx.json").read_text())
    url = torchvision.models.get_weight("MobileNet_V2_Weights.IMAGENET1K_V1").url
    name = url.rsplit("/", 1)[-1]  # torchvision names its files after the first hex digits of their sha256
    sha = m["backbone"]["weights_sha256"]
    assert isinstance(sha, str) and len(sha) == 64 and sha.startswith(name.rsplit("-", 1)[1].split(".")[0])
    assert sha == hashlib.sha256((hub_checkpoint_dir() / name).read_bytes()).hexdigest()


@pytest.mark.parametrize("tokenizer", ["nltk", "whitespace", "chars"])
def test_the_text_rule_joins_as_the_vocabulary_does(tokenizer):
    from common.vocab import Vocabulary
    from stage2_decoder.serving.onnx_export import text_rule

    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "犬", "が"], tokenizer=tokenizer)
    ids = [1, 4, 0, 5, 6, 7, 2, 4]
    rule = text_rule(tokenizer)
    words = [vocab.itos[i] for i in ids[:ids.index(2)] if i not in (0, 1)]
    assert rule["join"].join(words) == vocab.caption(ids)


def test_a_captioner_written_from_the_manifest_matches_caption_onnx(export_dir, inputs):
    from stage2_decoder.serving.onnx_captioner import OnnxCaptioner

    names, paths = list(inputs), [str(p) for p in inputs.values()]
    outsider = Outsider(export_dir)
    ours = OnnxCaptioner.load(export_dir, threads=1)
    want = ours.features(np.stack([ours._load(p, i) for i, p in enumerate(paths)]))
    got = outsider.features(paths)
    # the same graph on the same pixels: equal up to onnxruntime's batch-dependent summation (~1e-6); one pixel
    # off by one level moves a mobilenet feature by ~1e-3, a missed rule by up to ~3
    for name, g, w in zip(names, got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=0, err_msg=name)
    p = subprocess.run([sys.executable, "-m", "stage2_decoder.caption", "--onnx", str(export_dir), "--beam-size", "1",
                        "--json", *paths], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    cli = [r["caption"] for r in json.loads(p.stdout)]
    assert outsider.captions(paths) == cli
    assert len(set(cli)) > 1  # image-dependent captions, or agreement proves little
