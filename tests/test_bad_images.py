"""Bad image files through the real CLIs (Bad input: images).

One folder holds two real COCO photos and every awkward case the issue lists, each made here
with Pillow/numpy: zero-byte, truncated JPEG, random bytes named .jpg, RGBA PNG, palette PNG,
grayscale, 16-bit grayscale, CMYK JPEG, EXIF-rotated JPEG, 1x1, a decompression bomb (a PNG
whose header claims 30000x30000 pixels, 100 bytes on disk), a directory named x.jpg, a file the
captions list but the folder lacks, and a symlink loop.

Policy (see tests/RELIABILITY.md):
- stage 1 (`python -m stage1_extract`) skips and reports each unreadable image: the row is
  marked failed in the cache with its reason, the summary names it, the exit code is 0 (a few
  bad files in 120k are normal; the cache is complete and usable);
- `python -m stage2_decoder.caption` prints one `error: PATH: reason` line per unreadable file,
  captions the others, and exits 1 at the end;
- neither prints a traceback, and the readable odd formats (alpha, palette, gray, 16-bit, CMYK,
  EXIF, 1x1) give real features.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.backbones import load_image_u8, preprocess_for
from common.preprocess import ImageError
from reliability_helpers import no_traceback, tiny_run

MB_PP = preprocess_for("mobilenet_v2")
N_GOOD_REAL = 2


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height RGB pixels (the pixel data is a stub)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _two_halves(h: int, w: int) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[: h // 2] = (255, 0, 0)  # top half red
    arr[h // 2:] = (0, 0, 255)  # bottom half blue
    return Image.fromarray(arr)


def make_cases(d: Path, rng_seed: int = 0) -> dict[str, tuple[str, bool]]:
    """Write every case into folder d. Returns case -> (file name, readable?)."""
    rng = np.random.default_rng(rng_seed)
    rgb = Image.fromarray(rng.integers(0, 255, (180, 300, 3), dtype=np.uint8))
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    cases = {}

    def case(name, fname, readable, write):
        write(d / fname)
        cases[name] = (fname, readable)

    case("zero-byte", "zero.jpg", False, lambda p: p.write_bytes(b""))
    case("truncated JPEG", "truncated.jpg", False, lambda p: p.write_bytes(jpeg[: len(jpeg) // 2]))
    case("random bytes .jpg", "noise.jpg", False, lambda p: p.write_bytes(rng.bytes(4096)))
    case("RGBA PNG", "rgba.png", True, lambda p: rgb.convert("RGBA").save(p))
    case("palette PNG", "palette.png", True, lambda p: rgb.quantize(16).save(p))
    case("grayscale", "gray.png", True, lambda p: rgb.convert("L").save(p))
    case("16-bit grayscale", "gray16.png", True,
         lambda p: Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 200).save(p))
    case("CMYK JPEG", "cmyk.jpg", True, lambda p: rgb.convert("CMYK").save(p, "JPEG"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    case("EXIF-rotated JPEG", "exif6.jpg", True, lambda p: _two_halves(600, 400).save(p, "JPEG", exif=exif))
    case("1x1", "one.png", True, lambda p: Image.new("RGB", (1, 1), (10, 200, 30)).save(p))
    case("decompression bomb", "bomb.png", False, lambda p: p.write_bytes(_png_claiming(30000, 30000)))
    case("directory named x.jpg", "x.jpg", False, lambda p: p.mkdir())
    case("missing file", "missing.jpg", False, lambda p: None)

    def loop(p):
        os.symlink(d / "loop_b.jpg", p)
        os.symlink(p, d / "loop_b.jpg")

    case("symlink loop", "loop.jpg", False, loop)
    return cases


# what each unreadable case's reason must mention
REASONS = {"zero-byte": "cannot identify", "truncated JPEG": "truncated", "random bytes .jpg": "cannot identify",
           "decompression bomb": "decompression", "directory named x.jpg": "directory",
           "missing file": "No such file", "symlink loop": "symbolic links"}


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory, coco_records):
    """images/ with the cases + 2 real photos, and a COCO captions file listing them all."""
    root = tmp_path_factory.mktemp("bad_images")
    images = root / "images"
    images.mkdir()
    cases = make_cases(images)
    good = []
    for rec in coco_records[:N_GOOD_REAL]:
        shutil.copy(rec.path, images / Path(rec.path).name)  # copies: a link out of the folder is not read
        good.append(Path(rec.path).name)
    names = good + [fname for fname, _ in cases.values()]
    coco = {"images": [{"id": i + 1, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "caption": f"a photo of thing {i}"}
                            for i in range(len(names))]}
    (root / "captions.json").write_text(json.dumps(coco))
    keys = {n: str(i + 1) for i, n in enumerate(names)}
    return root, images, cases, good, keys


@pytest.fixture(scope="module")
def extracted(bad_folder, cli):
    root, images, *_ = bad_folder
    out = root / "cache.h5"
    proc = cli("stage1_extract", "--images", images, "--captions", root / "captions.json", "--out", out,
               "--backbone", "mobilenet_v2", "--workers", 1, "--batch-size", 8, "--no-progress")
    return proc, out


def test_extraction_skips_and_reports_each_bad_image(extracted, bad_folder):
    from common.feature_cache import DONE, FAILED, load_cache

    proc, out = extracted
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr  # documented: skipped images do not fail the run
    _, images, cases, good, keys = bad_folder
    cache = load_cache(out, backbone="mobilenet_v2")
    row = {k: i for i, k in enumerate(cache.keys)}
    assert sorted(cache.keys) == sorted(keys.values())  # every listed image has a row, exactly once
    report = proc.stdout + proc.stderr
    for name, (fname, readable) in cases.items():
        i = row[keys[fname]]
        if readable:
            assert cache.status[i] == DONE, (name, cache.errors.get(keys[fname]))
            assert np.isfinite(cache.features[i]).all() and np.abs(cache.features[i]).sum() > 0, name
        else:
            assert cache.status[i] == FAILED, name
            reason = cache.errors[keys[fname]]
            assert fname in reason and REASONS[name].lower() in reason.lower(), (name, reason)
            assert f"skipped {keys[fname]}" in report, name  # the summary names it
    for fname in good:
        assert cache.status[row[keys[fname]]] == DONE


def test_extraction_output_has_no_warning_noise(extracted):
    """Pillow's two-line DecompressionBombWarning (or any Python warning format) must not leak."""
    proc, _ = extracted
    assert "warnings.warn(" not in proc.stderr and "Warning:" not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def tiny_checkpoint(shared_cache, tmp_path_factory):
    return tiny_run(shared_cache, tmp_path_factory) / "best.pt"


@pytest.fixture(scope="module")
def captioned(bad_folder, tiny_checkpoint, cli):
    root, images, *_ = bad_folder
    # the folder (expanded by the CLI) plus the missing file named explicitly
    return cli("stage2_decoder.caption", images, images / "missing.jpg", "--checkpoint", tiny_checkpoint,
               "--beam-size", 1)


def test_caption_cli_one_error_line_per_bad_file_and_captions_the_rest(captioned, bad_folder):
    proc = captioned
    no_traceback(proc)
    assert proc.returncode == 1, proc.stderr  # some files failed: non-zero at the end
    _, images, cases, good, _ = bad_folder
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    captions = dict(ln.split("\t", 1) for ln in proc.stdout.splitlines())
    bad = [fname for fname, readable in cases.values() if not readable]
    for fname in bad:
        mine = [ln for ln in errors if f"{images / fname}:" in ln]
        assert len(mine) == 1, (fname, errors)  # exactly one line, naming the file
    readable = [fname for fname, ok in cases.values() if ok] + good
    assert sorted(Path(p).name for p in captions) == sorted(readable)
    assert all(c.strip() for c in captions.values())
    # the loop's second link is in the folder too (named .jpg): one more error line, nothing else
    assert len(errors) == len(bad) + 1
    assert f"{len(bad) + 1} of {len(bad) + 1 + len(readable)} images could not be read" in proc.stderr


def test_caption_cli_stderr_is_only_error_and_summary_lines(captioned):
    for ln in captioned.stderr.splitlines():
        assert not ln.strip() or ln.startswith(("error:", "warning:")) or "could not be read" in ln, ln


def test_evaluate_raw_images_skips_bad_files(bad_folder, tiny_checkpoint):
    """Raw-image evaluation's encoder path (DataLoader workers) skips the same files and names them."""
    from common.datasets import load_dataset
    from stage2_decoder import Captioner
    from stage2_decoder.reporting.evaluation import captions_from_images

    root, images, cases, good, keys = bad_folder
    cap = Captioner.load(tiny_checkpoint, "cpu")
    records = load_dataset("coco", root / "captions.json", images)
    res, kept, errors = captions_from_images(cap, records, workers=0, progress=False)
    bad = {keys[f] for f, ok in cases.values() if not ok}
    assert set(errors) == bad and set(res) == set(keys.values()) - bad
    assert [r.key for r in kept] == [r.key for r in records if r.key not in bad]


# --- the preprocessing itself on the odd-but-readable cases ------------------------------------------------

@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("image_cases")
    return d, make_cases(d)


def test_exif_rotated_jpeg_is_displayed_upright(case_dir):
    """A tall JPEG (600x400, red top / blue bottom) tagged orientation 6 is shown rotated 90 degrees
    clockwise: wide, blue on the left, red on the right. Draft decoding must not lose the tag."""
    d, cases = case_dir
    t = load_image_u8(d / cases["EXIF-rotated JPEG"][0], MB_PP)
    assert t.shape == (3, 224, 224)
    left, right = t[:, 112, 5].tolist(), t[:, 112, 218].tolist()
    assert left[2] > 200 and left[0] < 50, left  # blue
    assert right[0] > 200 and right[2] < 50, right  # red
    with Image.open(d / cases["EXIF-rotated JPEG"][0]) as im:  # the file really is stored tall
        assert im.size == (400, 600)


@pytest.mark.parametrize("case", ["RGBA PNG", "palette PNG", "grayscale", "16-bit grayscale", "CMYK JPEG", "1x1"])
def test_odd_formats_become_rgb_crops(case_dir, case):
    d, cases = case_dir
    fname, readable = cases[case]
    assert readable
    t = load_image_u8(d / fname, MB_PP)
    assert t.shape == (3, 224, 224) and t.dtype == torch.uint8
    if case == "1x1":
        assert t[:, 0, 0].tolist() == [10, 200, 30] and (t == t[:, :1, :1]).all()
    else:
        assert t.float().std() > 5  # the picture survived the mode conversion
    if case in ("grayscale", "16-bit grayscale"):
        assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])


@pytest.mark.parametrize("case", sorted(REASONS))
def test_unreadable_cases_raise_image_error_naming_the_file(case_dir, case):
    d, cases = case_dir
    fname, readable = cases[case]
    assert not readable
    with pytest.raises(ImageError) as ei:
        load_image_u8(d / fname, MB_PP)
    assert str(d / fname) in str(ei.value) and REASONS[case].lower() in str(ei.value).lower()


def test_images_between_one_and_two_bomb_limits_are_refused_unless_draft_shrinks_them(tmp_path, monkeypatch,
                                                                                       recwarn):
    """Pillow only *warns* between MAX_IMAGE_PIXELS and twice that, then decodes the whole image;
    we refuse it (no warning printed), except a JPEG that draft mode decodes below the limit."""
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1000, 1200, 3), dtype=np.uint8))
    png, jpg = tmp_path / "big.png", tmp_path / "big.jpg"
    big.save(png)
    big.save(jpg, quality=80)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 800_000)  # 1.2 MP is between 1x and 2x of it
    with pytest.raises(ImageError, match="decompression-bomb limit"):
        load_image_u8(png, MB_PP)
    t = load_image_u8(jpg, MB_PP)  # decoded at 1/2 scale (600x500 pixels): under the limit
    assert t.shape == (3, 224, 224)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


@pytest.mark.parametrize("size", [(20000, 1), (3, 9000)])
def test_extreme_strips_are_trimmed_before_resizing(tmp_path, monkeypatch, size):
    """Resizing a 20000 x 1 strip's short side to 256 would make a ~4 GB intermediate (5 GB, 18 s
    measured): the long side is centre-cropped to 3x the short one first."""
    import common.preprocess as pre

    path = tmp_path / "strip.png"
    Image.new("RGB", size, (10, 200, 30)).save(path)
    seen, real = [], pre.resize_shorter
    monkeypatch.setattr(pre, "resize_shorter", lambda im, *a, **k: seen.append(im.size) or real(im, *a, **k))
    x = load_image_u8(path, preprocess_for("mobilenet_v2"))
    assert x.shape == (3, 224, 224) and (x[:, 112, 112] == torch.tensor([10, 200, 30], dtype=torch.uint8)).all()
    (w, h), = seen
    assert max(w, h) <= pre.MAX_ASPECT * min(w, h) and min(w, h) == min(size)


def test_ordinary_shapes_are_not_trimmed():
    from common.preprocess import MAX_ASPECT, trim_long_side

    for size in [(640, 480), (480, 640), (300, 100), (100, 300)]:
        im = Image.new("RGB", size)
        assert trim_long_side(im, MAX_ASPECT) is im
