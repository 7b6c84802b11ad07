"""The torch-free image path (common.preprocess) gives exactly the bytes of the torchvision-based one.

`_reference_views` is the implementation stage 1 used before the path moved to numpy + Pillow
(torchvision's F.resize / F.center_crop / F.pil_to_tensor); it stays here as the yardstick.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps, PngImagePlugin

from common.preprocess import MAX_ASPECT, ImageError, Preprocess, trim_long_side, load_views
from conftest import REPO


def _reference_to_rgb(im):
    import torch

    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = torch.from_numpy(np.asarray(im, dtype="float32"))
        hi = float(arr.max()) or 1.0
        im = Image.fromarray((arr / hi * 255).clamp(0, 255).byte().numpy(), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def _reference_views(path, pp: Preprocess, views: int) -> np.ndarray:
    import torch
    from torchvision.transforms import functional as F

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(path)
    with im:
        if pp.jpeg_draft and im.format == "JPEG":
            im.draft("RGB", (pp.resize, pp.resize))
        if pp.exif_transpose:
            im = ImageOps.exif_transpose(im)
        im = trim_long_side(_reference_to_rgb(im), MAX_ASPECT)
        centre = F.pil_to_tensor(F.center_crop(
            F.resize(im, pp.resize, interpolation=F.InterpolationMode.BILINEAR, antialias=True), pp.crop))
        out = [centre, centre.flip(-1)]
        if views > 2:
            whole = F.pil_to_tensor(F.resize(im, [pp.crop, pp.crop], interpolation=F.InterpolationMode.BILINEAR,
                                             antialias=True))
            out += [whole, whole.flip(-1)]
        return torch.stack(out[:views]).numpy()


def _real_photos(coco_dir, flickr_dir, n_each: int = 16) -> list:
    """Photos of many sizes and aspect ratios: every k-th file of each set, sorted."""
    coco = sorted((coco_dir / "images").iterdir())
    flickr = sorted((flickr_dir / "Images").iterdir())
    return coco[:: max(1, len(coco) // n_each)][:n_each] + flickr[:: max(1, len(flickr) // n_each)][:n_each]


def _variants(photo, folder) -> list:
    """The same real photo in other modes, formats, orientations and sizes, as files."""
    src = Image.open(photo).convert("RGB")
    out = []

    def save(name, im, **kw):
        p = folder / name
        im.save(p, **kw)
        out.append(p)

    save("grey.png", src.convert("L"))
    save("palette.png", src.convert("P"))
    pal = src.convert("P")
    pal.info["transparency"] = 0
    save("palette_transparent.png", pal, transparency=0)
    rgba = src.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(src.size))
    save("rgba.png", rgba)
    save("la.png", rgba.convert("LA"))
    save("grey16.png", Image.fromarray((np.asarray(src.convert("L"), dtype=np.uint16) * 193).astype(np.uint16)))
    save("cmyk.jpg", src.convert("CMYK"), quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    save("exif_rotated.jpg", src, exif=exif, quality=90)
    save("tiny.png", src.resize((37, 23)))
    save("strip.jpg", src.resize((src.width, max(1, src.height // 9))), quality=85)
    save("tall.bmp", src.resize((max(1, src.width // 5), src.height)))
    save("odd.webp", src.resize((301, 199)))
    return out


def test_views_are_byte_identical_to_the_torchvision_path_on_real_photos(coco_dir, flickr_dir, tmp_path):
    photos = _real_photos(coco_dir, flickr_dir) + _variants(_real_photos(coco_dir, flickr_dir, 1)[0], tmp_path)
    sizes = set()
    for p in photos:
        pp = Preprocess(256, 224)
        got = load_views(p, pp, 4)
        want = _reference_views(p, pp, 4)
        assert got.dtype == np.uint8 and got.shape == (4, 3, 224, 224), p
        assert np.array_equal(got, want), p
        with Image.open(p) as im:
            sizes.add(im.size)
    assert len(sizes) >= 15  # the photos do cover many sizes


@pytest.mark.parametrize("pp", [Preprocess(232, 224), Preprocess(100, 120), Preprocess(64, 63, jpeg_draft=False),
                                Preprocess(31, 45, exif_transpose=False)],
                         ids=lambda pp: f"resize{pp.resize}-crop{pp.crop}")
def test_other_sizes_and_the_padding_rule_match_too(pp, coco_dir, flickr_dir, tmp_path):
    # crop > resize: torchvision pads the resized image with black before cropping
    photos = _real_photos(coco_dir, flickr_dir, 3) + _variants(_real_photos(coco_dir, flickr_dir, 1)[-1], tmp_path)[6:]
    for p in photos:
        assert np.array_equal(load_views(p, pp, 4), _reference_views(p, pp, 4)), (p, pp)


def test_every_exif_orientation_matches_and_only_a_turned_photo_is_transposed(coco_dir, tmp_path, monkeypatch):
    import common.preprocess as pre

    src = Image.open(sorted((coco_dir / "images").iterdir())[2]).convert("RGB").crop((0, 0, 300, 200))
    photos = [tmp_path / "plain.jpg", tmp_path / "plain.png"]
    src.save(photos[0], quality=90)
    src.save(photos[1])
    for orientation in range(0, 10):  # 0 and 9 are not orientations: shown as they are, like 1
        exif = Image.Exif()
        exif[0x0112] = orientation
        for ext, kw in (("jpg", {"quality": 90}), ("png", {})):
            photos.append(tmp_path / f"o{orientation}.{ext}")
            src.save(photos[-1], exif=exif, **kw)
    transposed = []
    real = ImageOps.exif_transpose
    monkeypatch.setattr(pre.ImageOps, "exif_transpose", lambda im, **kw: transposed.append(1) or real(im, **kw))
    pp = Preprocess(120, 100)
    for p in photos:
        before = len(transposed)
        got = load_views(p, pp, 4)
        turned = p.stem in {f"o{k}" for k in range(2, 9)}
        assert len(transposed) - before == turned, p  # without a turn, exif_transpose would only copy the pixels
        assert np.array_equal(got, _reference_views(p, pp, 4)), p
    with Image.open(tmp_path / "o6.jpg") as im:  # a turned PIL image handed over is left as it was
        want = _reference_views(tmp_path / "o6.jpg", Preprocess(120, 100, jpeg_draft=False), 2)
        assert np.array_equal(load_views(im, pp, 2), want)
        assert im.size == (300, 200) and im.getexif()[0x0112] == 6


def test_pil_images_and_encoded_bytes_take_the_same_path(coco_dir, tmp_path):
    pp = Preprocess(256, 224)
    photo = sorted((coco_dir / "images").iterdir())[3]
    from_file = load_views(photo, pp, 2)
    assert np.array_equal(load_views(photo.read_bytes(), pp, 2), from_file)  # an upload decodes as its file
    png = tmp_path / "photo.png"
    Image.open(photo).save(png)
    with Image.open(png) as im:
        size = im.size
        assert np.array_equal(load_views(im, pp, 2), load_views(png, pp, 2))
        assert im.size == size  # the caller's image is left as it was
    with Image.open(photo) as im:  # a JPEG handed over as an image is not draft-decoded
        assert np.array_equal(load_views(im, Preprocess(256, 224, jpeg_draft=False), 2),
                              load_views(photo, Preprocess(256, 224, jpeg_draft=False), 2))


def test_the_torch_wrappers_return_the_same_bytes(coco_dir):
    from common.backbones import load_image_u8, load_image_views, preprocess_for

    pp = preprocess_for("mobilenet_v2")
    photo = sorted((coco_dir / "images").iterdir())[5]
    views = load_views(photo, pp, 4)
    assert np.array_equal(load_image_views(photo, pp, 4).numpy(), views)
    assert np.array_equal(load_image_u8(photo, pp).numpy(), views[0])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_named_jpg_is_an_image_error_not_a_hang(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    # in a subprocess with a timeout: a regression would hang forever, not fail
    code = ("import sys; from common.preprocess import load_views, Preprocess, ImageError\n"
            "try:\n    load_views(sys.argv[1], Preprocess(256, 224))\n"
            "except ImageError as e:\n    print('ImageError', e)\n")
    p = subprocess.run([sys.executable, "-c", code, str(fifo)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.stdout.startswith("ImageError") and "not a regular file" in p.stdout, p.stdout + p.stderr


def test_folders_and_devices_are_image_errors(tmp_path):
    folder = tmp_path / "album.jpg"
    folder.mkdir()
    for bad in (folder, "/dev/null", tmp_path / "missing.jpg"):
        with pytest.raises(ImageError, match=str(bad).replace(".", r"\.")):
            load_views(bad, Preprocess(256, 224))


def test_any_decoder_exception_is_that_files_image_error(tmp_path, monkeypatch):
    # a format Pillow recognises but cannot decode raises NotImplementedError from load()
    photo = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(photo)

    def not_implemented(self, *a, **k):
        raise NotImplementedError("no decoder for this variant")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", not_implemented)
    with pytest.raises(ImageError, match=r"x\.png: NotImplementedError"):
        load_views(photo, Preprocess(32, 32))
    with pytest.raises(ImageError, match=r"upload: NotImplementedError"):
        load_views(io.BytesIO(photo.read_bytes()).getvalue(), Preprocess(32, 32))


def test_a_file_that_is_no_image_is_named_without_its_file_objects_repr(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    for source, label in ((junk, str(junk)), (junk.read_bytes(), "upload")):
        with pytest.raises(ImageError) as e:
            load_views(source, Preprocess(256, 224))
        # not "<_io.BufferedReader name=15>" (a descriptor number) nor "<_io.BytesIO object at 0x7f...>"
        assert str(e.value) == f"{label}: UnidentifiedImageError: cannot identify image file"


def test_the_module_imports_no_torch():
    code = "import sys, common.preprocess; print(any(m.split('.')[0] in ('torch', 'torchvision') for m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "False", p.stdout + p.stderr


@pytest.mark.skipif(not hasattr(signal, "SIGALRM") or not hasattr(os, "mkfifo"), reason="no FIFOs or alarms here")
def test_stage1_rows_report_a_fifo_and_keep_the_good_image(tmp_path, coco_dir):
    from common.backbones import ImageRows, preprocess_for

    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    photo = sorted((coco_dir / "images").iterdir())[0]
    rows = ImageRows([(0, str(fifo)), (1, str(photo))], preprocess_for("mobilenet_v2"))

    def hung(signum, frame):
        raise TimeoutError("opening a FIFO hung")

    old = signal.signal(signal.SIGALRM, hung)  # a regression blocks in open(): the alarm turns it into a failure
    signal.alarm(20)
    try:
        (r0, x0, e0), (r1, x1, e1) = rows[0], rows[1]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert (r0, int(x0.sum())) == (0, 0) and "photo.jpg: a FIFO, not a regular file" in e0
    assert (r1, e1) == (1, "") and int(x1.sum()) > 0
