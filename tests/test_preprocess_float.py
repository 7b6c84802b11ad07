"""Float (mode F) images are read by their range, not as black; plain RGB photos are untouched by that rule."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.preprocess import Preprocess, load_views

PP = Preprocess(256, 224)


@pytest.fixture(scope="module")
def photo_gray(coco_dir) -> np.ndarray:
    """A real photo as 8-bit grayscale, (H, W) uint8."""
    return np.asarray(Image.open(sorted((coco_dir / "images").iterdir())[100]).convert("L"))


def _features(backbone, batch: np.ndarray) -> np.ndarray:
    import torch

    return backbone.encode(torch.from_numpy(np.ascontiguousarray(batch))).numpy()


@pytest.mark.parametrize("scale", [1 / 255, 1.0, 4000 / 255], ids=["0..1", "0..255", "0..4000"])
def test_a_float_tiff_gives_the_features_of_the_8bit_photo(photo_gray, mobilenet, tmp_path, scale):
    Image.fromarray(photo_gray).save(tmp_path / "gray.png")
    Image.fromarray(photo_gray.astype(np.float32) * np.float32(scale)).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    want = load_views(tmp_path / "gray.png", PP)
    got = load_views(tmp_path / "float.tif", PP)
    assert got.mean() > 50  # not the all-black image Pillow's own F -> RGB conversion gives for 0..1
    # float32 rounding may move a pixel by one level at most; the features then agree to ~1e-3
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    f_got, f_want = _features(mobilenet, np.concatenate([got, want]))
    np.testing.assert_allclose(f_got, f_want, atol=2e-3, rtol=0)
    assert np.abs(f_want).max() > 0.5  # features of substance, so agreement means something


def test_float_nan_and_inf_pixels_are_black_and_the_top(tmp_path):
    a = np.full((300, 300), 0.5, dtype=np.float32)
    a[:100], a[100:150], a[150:200] = np.nan, -np.inf, np.inf
    Image.fromarray(a).save(tmp_path / "odd.tif")
    Image.fromarray(np.full((300, 300), np.nan, dtype=np.float32)).save(tmp_path / "nan.tif")
    x = load_views(tmp_path / "odd.tif", Preprocess(300, 300))[0, 0]  # no resize, no crop
    assert (x[:150] == 0).all() and (x[150:200] == 128).all() and (x[200:] == 128).all()  # inf -> top = 0.5
    assert (load_views(tmp_path / "nan.tif", PP) == 0).all()


def test_rgb_jpeg_features_equal_the_torchvision_path(coco_dir, flickr_dir, mobilenet):
    """The float rule leaves 8-bit photos alone: the features of real JPEGs equal those of torchvision's own
    transforms (the path stage 1 used before common.preprocess), to float32 summation noise."""
    from torchvision.transforms import functional as F

    paths = sorted((coco_dir / "images").iterdir())[100:103] + sorted((flickr_dir / "Images").iterdir())[:3]
    ref = []
    for p in paths:
        im = Image.open(p)
        im.draft("RGB", (PP.resize, PP.resize))
        im = F.resize(im.convert("RGB"), PP.resize, interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        ref.append(F.pil_to_tensor(F.center_crop(im, PP.crop)).numpy())
    ours = np.stack([load_views(p, PP)[0] for p in paths])
    assert np.array_equal(ours, np.stack(ref))
    np.testing.assert_allclose(_features(mobilenet, ours), _features(mobilenet, np.stack(ref)), atol=1e-5, rtol=0)
