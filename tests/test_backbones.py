"""Backbone registry, weights handling, feature sizes and the one image-preprocessing path."""
from __future__ import annotations

import hashlib
import io
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from common.backbones import (REGISTRY, BackboneError, WeightsNotFound, get_spec, hub_checkpoint_dir, load_backbone,
                              load_image_u8, preprocess_for)
from common.preprocess import ImageError

MB_PP = preprocess_for("mobilenet_v2")


@pytest.fixture(scope="module")
def coco_image(coco_records) -> str:
    return coco_records[0].path


@pytest.fixture(scope="module")
def flickr_image(flickr_dir) -> str:
    return str(sorted((flickr_dir / "Images").glob("*.jpg"))[0])


# --- registry and transforms -------------------------------------------------------------------------------

def test_unknown_backbone_raises():
    with pytest.raises(BackboneError) as ei:
        get_spec("vgg16")
    assert "vgg16" in str(ei.value) and "mobilenet_v2" in str(ei.value)
    with pytest.raises(BackboneError):
        load_backbone("vgg16", "none")


def test_registry_feature_dims():
    assert get_spec("mobilenet_v2").feature_dim == 1280
    assert get_spec("resnet152").feature_dim == 2048
    assert {"resnet152", "mobilenet_v2"} <= set(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_preprocess_matches_the_weights_own_transforms(name):
    """Resize/crop/mean/std come from torchvision's transforms() for exactly these weights."""
    import torchvision.models as tvm

    spec = get_spec(name)
    cls_name, member = spec.weights.split(".")
    t = getattr(getattr(tvm, cls_name), member).transforms()
    pp = preprocess_for(name)
    assert (pp.resize, pp.crop) == (t.resize_size[0], t.crop_size[0])
    assert tuple(pp.mean) == tuple(t.mean) and tuple(pp.std) == tuple(t.std)
    assert pp.describe() == preprocess_for(name).describe()  # canonical


def test_resolve_device():
    from common.device import DeviceError, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA"):
            resolve_device("cuda")
    for bad in ("meta", "xla", "mps", "gpu"):
        with pytest.raises(DeviceError, match="--device"):
            resolve_device(bad)


# --- features ----------------------------------------------------------------------------------------------

def test_mobilenet_real_weights_features(mobilenet, coco_image, flickr_image):
    assert mobilenet.feature_dim == 1280
    info = mobilenet.describe()
    assert info["name"] == "mobilenet_v2" and info["weights"] == "IMAGENET1K_V1" and info["feature_dim"] == 1280
    x = torch.stack([load_image_u8(coco_image, mobilenet.preprocess), load_image_u8(flickr_image, MB_PP)])
    f = mobilenet.encode(x)
    assert f.shape == (2, 1280) and f.dtype == torch.float32
    assert torch.isfinite(f).all() and (f >= 0).all()  # pooled ReLU6 activations
    assert f.abs().sum() > 0 and not torch.allclose(f[0], f[1], atol=1e-3)
    assert not mobilenet.model.training
    assert not any(p.requires_grad for p in mobilenet.model.parameters())


def test_mobilenet_real_weights_recognise_real_photos(mobilenet, coco_dir):
    """Real (not random) weights and the right preprocessing: ImageNet's own head on our pooled
    features names what is in two COCO photos (a brown bear's face, an upside-down stop sign)."""
    import torchvision.models as tvm

    weights = tvm.MobileNet_V2_Weights.IMAGENET1K_V1
    head = weights.get_state_dict(progress=False, weights_only=True)
    categories = weights.meta["categories"]
    paths = [coco_dir / "images" / "000000000285.jpg", coco_dir / "images" / "000000000724.jpg"]
    x = torch.stack([load_image_u8(p, mobilenet.preprocess) for p in paths])
    probs = torch.softmax(mobilenet.encode(x) @ head["classifier.1.weight"].T + head["classifier.1.bias"], -1)
    top = [[categories[i] for i in row.topk(3).indices] for row in probs]
    assert top[0][0] == "brown bear" and probs[0].max() > 0.5, top
    assert "street sign" in top[1], top


def test_resnet152_random_weights_deterministic(coco_image, flickr_image):
    x = torch.stack([load_image_u8(coco_image, preprocess_for("resnet152")),
                     load_image_u8(flickr_image, preprocess_for("resnet152"))])
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = load_backbone("resnet152", "none")
    assert torch.equal(torch.rand(3), expected_next)  # building it leaves the global RNG alone
    fa = a.encode(x)
    del a
    b = load_backbone("resnet152", "none")
    fb = b.encode(x)
    assert fa.shape == (2, 2048) and b.feature_dim == 2048
    assert b.describe()["weights"] == "none"
    assert torch.equal(fa, fb)
    assert torch.isfinite(fa).all() and not torch.allclose(fa[0], fa[1])
    # the default float16 cache holds them: a random ResNet's features once reached ~1e8 (inf in float16)
    assert torch.isfinite(fa.half()).all() and 1e-3 < float(fa.abs().max()) < 1e3


def test_random_weights_leave_the_cuda_generators_alone(monkeypatch):
    """torch.manual_seed also reseeds every CUDA generator (queued until CUDA starts, on a machine with none yet),
    and fork_rng(devices=[]) restores only the CPU's: building a random backbone reset the GPU's dropout and
    sampling streams to seed 0."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    a = load_backbone("mobilenet_v2", "none")
    b = load_backbone("mobilenet_v2", "none")
    assert reseeded == []
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))  # still seeded


def test_the_encoder_is_folded_and_cast_before_it_moves_to_its_device(monkeypatch):
    """On a GPU the weights were moved first, then folded and cast there: three copies of ResNet-152's weights on
    the device at once. Here the "meta" device stands in for the GPU (nothing is computed on it)."""
    import common.backbones as backbones

    seen = []
    fold = backbones.fold_batchnorm
    monkeypatch.setattr(backbones, "fold_batchnorm",
                        lambda m: seen.append({(p.device.type, p.dtype) for p in m.parameters()}) or fold(m))
    monkeypatch.setattr(backbones.Backbone, "precision", property(lambda self: "bfloat16"))
    bb = load_backbone("mobilenet_v2", "none", "meta")
    assert seen == [{("cpu", torch.float32)}]  # folded in fp32, where the model was built
    assert {(p.device.type, p.dtype) for p in bb.model.parameters()} == {("meta", torch.bfloat16)}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.model.modules())


# --- weights files -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mobilenet_state_dict(mobilenet):
    import torchvision.models as tvm

    sd = tvm.MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False, weights_only=True)
    assert any(k.startswith("classifier.") for k in sd)  # the full model, head included
    return sd


def test_weights_file_gives_same_features_as_default(tmp_path, mobilenet, mobilenet_state_dict, coco_image):
    path = tmp_path / "mbv2.pth"
    torch.save(mobilenet_state_dict, path)
    bb = load_backbone("mobilenet_v2", str(path))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert bb.weights == str(path.absolute()) and bb.weights_sha256 == sha
    x = torch.stack([load_image_u8(coco_image, MB_PP)] * 2)
    torch.testing.assert_close(bb.encode(x), mobilenet.encode(x), atol=0, rtol=0)
    # a checkpoint-style wrapper is unwrapped
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": mobilenet_state_dict, "epoch": 90}, wrapped)
    torch.testing.assert_close(load_backbone("mobilenet_v2", str(wrapped)).encode(x), mobilenet.encode(x),
                               atol=0, rtol=0)
    # the digest recorded at extraction time is checked
    assert load_backbone("mobilenet_v2", str(path), expected_sha256=sha).weights_sha256 == sha
    with pytest.raises(BackboneError, match="differs"):
        load_backbone("mobilenet_v2", str(path), expected_sha256="0" * 64)


def test_weights_other_than_the_features_were_made_with_are_refused(tmp_path, mobilenet, mobilenet_state_dict):
    """`caption --weights none` on a checkpoint trained on ImageNet features captioned every photo wrongly, with
    no word said; --weights may only point to the same weights elsewhere."""
    import torchvision.models as tvm

    with pytest.raises(BackboneError, match="made with torchvision's IMAGENET1K_V1 weights, not random"):
        load_backbone("mobilenet_v2", "none", made_with="IMAGENET1K_V1")
    with pytest.raises(BackboneError, match=r"made with random weights \(none\), not torchvision's"):
        load_backbone("mobilenet_v2", "default", made_with="none")
    assert load_backbone("mobilenet_v2", "none", made_with="none").weights == "none"
    # torchvision's own file kept elsewhere (its name carries its sha256's first digits) is the default weights
    url = tvm.MobileNet_V2_Weights.IMAGENET1K_V1.url
    own = tmp_path / os.path.basename(url)
    shutil.copyfile(hub_checkpoint_dir() / os.path.basename(url), own)
    assert load_backbone("mobilenet_v2", str(own), made_with="IMAGENET1K_V1").weights == str(own)
    # the same tensors saved again are another file: not torchvision's, so not what the features were made with
    resaved = tmp_path / "resaved.pth"
    torch.save(mobilenet_state_dict, resaved)
    with pytest.raises(BackboneError, match="not the weights file"):
        load_backbone("mobilenet_v2", str(resaved), made_with="IMAGENET1K_V1")
    # a file recorded at extraction, moved: known by its sha256
    sha = hashlib.sha256(resaved.read_bytes()).hexdigest()
    assert load_backbone("mobilenet_v2", str(resaved), expected_sha256=sha, made_with="/then/w.pth").weights_sha256 == sha


def test_bad_weights_files(tmp_path, mobilenet_state_dict):
    with pytest.raises(WeightsNotFound, match="not found"):
        load_backbone("mobilenet_v2", str(tmp_path / "absent.pth"))
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in mobilenet_state_dict.items() if not k.startswith("features.0.")}, partial)
    with pytest.raises(BackboneError, match="do not fit mobilenet_v2: 5 missing keys, e.g. 'features.0.0.weight'"):
        load_backbone("mobilenet_v2", str(partial))  # not torch's first line alone ("Error(s) in loading ...:")
    text = tmp_path / "text.pth"
    text.write_text("not weights")
    with pytest.raises(BackboneError):
        load_backbone("mobilenet_v2", str(text))
    lst = tmp_path / "list.pth"
    torch.save([1, 2, 3], lst)
    with pytest.raises(BackboneError, match="state_dict"):
        load_backbone("mobilenet_v2", str(lst))


def test_missing_default_weights_raise_weights_not_found(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    with pytest.raises(WeightsNotFound) as ei:
        load_backbone("resnet152", "default")
    msg = str(ei.value)
    assert "resnet152-f82ba261.pth" in msg
    assert str(home) in msg  # says where to put it
    assert not list(home.rglob("*.pth"))  # no half-downloaded file left that would look like weights


# --- images ------------------------------------------------------------------------------------------------

def _u8_ok(t: torch.Tensor, crop: int = 224):
    assert t.shape == (3, crop, crop) and t.dtype == torch.uint8


def test_load_real_images(coco_image, flickr_image):
    for p in (coco_image, flickr_image):
        _u8_ok(load_image_u8(p, MB_PP))
        _u8_ok(load_image_u8(p, preprocess_for("resnet152")))
    assert not torch.equal(load_image_u8(coco_image, MB_PP), load_image_u8(flickr_image, MB_PP))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16", "CMYK", "1"])
def test_load_other_modes(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (180, 300, 3), dtype=np.uint8))
    if mode == "I;16":
        im = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 200))
        assert im.mode.startswith("I;16")
    elif mode == "P":
        im = rgb.quantize(16)
    else:
        im = rgb.convert(mode)
    p = tmp_path / f"img.{'jpg' if mode == 'CMYK' else 'png'}"
    im.save(p)
    t = load_image_u8(p, MB_PP)
    _u8_ok(t)
    if mode in ("L", "I;16", "LA", "1"):
        assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])  # gray stays gray
    assert t.float().std() > 5  # content survived


def test_transparent_pixels_become_white(tmp_path):
    im = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    p = tmp_path / "clear.png"
    im.save(p)
    assert (load_image_u8(p, MB_PP) == 255).all()
    pal = Image.new("P", (256, 256), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    q = tmp_path / "clear_p.png"
    pal.save(q, transparency=0)
    assert (load_image_u8(q, MB_PP) == 255).all()


def test_small_and_wide_images_are_resized_and_cropped(tmp_path):
    for size in [(10, 5), (1000, 200), (224, 224)]:
        p = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (10, 200, 30)).save(p)
        t = load_image_u8(p, MB_PP)
        _u8_ok(t)
        assert t[:, 112, 112].tolist() == [10, 200, 30]


def test_png_preprocessing_equals_torchvision_transforms(tmp_path):
    """For a non-JPEG file our uint8 path + normalisation is torchvision's own weights transform."""
    import torchvision.models as tvm

    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    p = tmp_path / "x.png"
    rgb.save(p)
    ours = load_image_u8(p, MB_PP).float().div(255)
    ours = (ours - torch.tensor(MB_PP.mean).view(3, 1, 1)) / torch.tensor(MB_PP.std).view(3, 1, 1)
    with Image.open(p) as im:
        ref = tvm.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()(im.convert("RGB"))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((200, 300, 3), dtype=np.uint8)
    arr[:100] = (255, 0, 0)  # top half red
    arr[100:] = (0, 0, 255)  # bottom half blue
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    tagged = tmp_path / "tagged.png"
    im.save(tagged, exif=exif)
    upright = tmp_path / "upright.png"
    im.transpose(Image.Transpose.ROTATE_270).save(upright)
    t = load_image_u8(tagged, MB_PP)
    assert torch.equal(t, load_image_u8(upright, MB_PP))
    assert t[0, 112, 10] < 50 < t[2, 112, 10]  # left side now blue, right side red
    assert t[0, 112, 210] > 200


def test_unreadable_files_raise_image_error(tmp_path, coco_image):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.jpg"
    noise.write_bytes(os.urandom(4096))
    truncated = tmp_path / "truncated.jpg"
    data = open(coco_image, "rb").read()
    truncated.write_bytes(data[: len(data) // 3])
    text = tmp_path / "notes.png"
    text.write_text("hello")
    for p in (empty, noise, truncated, text, tmp_path / "missing.jpg", tmp_path):
        with pytest.raises(ImageError) as ei:
            load_image_u8(p, MB_PP)
        assert str(p) in str(ei.value)


def test_decoded_bytes_equal_regardless_of_container(tmp_path):
    """The same pixels as PNG and BMP give the same tensor (no format-specific path but JPEG's draft)."""
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    a, b = tmp_path / "a.png", tmp_path / "b.bmp"
    rgb.save(a)
    buf = io.BytesIO()
    rgb.save(buf, format="BMP")
    b.write_bytes(buf.getvalue())
    assert torch.equal(load_image_u8(a, MB_PP), load_image_u8(b, MB_PP))


class _ShapesSeen(torch.nn.Module):
    """Stands in for torch.compile's wrapper: runs the model and records each input's shape and layout."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append((tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last)))
        return self.model(x)


def test_a_compiled_backbone_sees_one_batch_shape_and_gives_the_same_features(coco_dir, tmp_path, monkeypatch):
    """stage 1 --compile: the last, smaller batch (or one with unreadable images) compiled the CNN a second time,
    for its new shape, a compile counted against the images it speeds up; it is now padded to the batch."""
    from common.feature_cache import load_cache
    from stage1_extract.extract import ExtractConfig, extract

    wrappers = []

    def fake_compile(model, **kw):
        wrappers.append(_ShapesSeen(model))
        return wrappers[-1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    common = dict(images=str(coco_dir / "images"), captions=str(coco_dir / "captions.json"), backbone="mobilenet_v2",
                  weights="default", batch_size=8, workers=0, device="cpu", limit=19, progress=False)
    compiled = load_cache(str(extract(ExtractConfig(out=str(tmp_path / "c.h5"), compile=True, **common)).out))
    plain = load_cache(str(extract(ExtractConfig(out=str(tmp_path / "p.h5"), **common)).out))
    assert wrappers[0].seen == [((8, 3, 224, 224), True)] * 3  # 19 images: 8 + 8 + 3 padded to 8
    assert compiled.keys == plain.keys
    np.testing.assert_allclose(compiled.features, plain.features, rtol=1e-4, atol=1e-4)


def test_a_compiled_backbone_pads_to_the_batch_size_even_when_the_first_batch_is_smaller(monkeypatch):
    """The first batch, short of images that did not decode, set the padding size: the first full batch then
    compiled the CNN a second time."""
    wrappers = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: wrappers.append(_ShapesSeen(model)) or wrappers[-1])
    bb = load_backbone("mobilenet_v2", "none", torch.device("cpu"))
    bb.compile(8)
    for b in (6, 8, 3):
        assert bb.encode(torch.zeros(b, 3, 64, 64, dtype=torch.uint8)).shape == (b, bb.feature_dim)
    assert [shape[0] for shape, _ in wrappers[0].seen] == [8, 8, 8]
