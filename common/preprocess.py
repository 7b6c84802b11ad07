"""The one image path of extraction and captioning, in numpy and Pillow alone (no torch).

open (regular files only) -> JPEG draft -> decompression-bomb check -> EXIF transpose -> RGB ->
trim an extreme long side -> resize the shorter side (Pillow bilinear, antialiased) -> centre crop
-> uint8 views. It reproduces, byte for byte, what torchvision's `F.resize` / `F.center_crop` /
`F.pil_to_tensor` do on a PIL image, so the ONNX captioner (no torch installed) sees exactly the
pixels stage 1 cached features from. `common.backbones` wraps it into torch tensors.

Rules for images that are not plain 8-bit RGB (also written into every ONNX export's manifest by
`image_contract`, so a deployer can reproduce them without this file):
- transparency (RGBA, LA, PA, P with a transparent colour) is composited onto white;
- 16-bit and 32-bit integer grayscale (I;16*, I) is scaled by the image's own maximum:
  x / max * 255 in float32, truncated to uint8 (an all-zero image stays black);
- 32-bit float grayscale (F, e.g. a float TIFF) is read by its range: values up to 1.0 as 0..1, up to
  255 as 0..255, larger ones scaled by the image's own maximum; then rounded to the nearest integer
  (half to even) and clipped to 0..255; NaN and -inf count as 0, +inf as the top;
- a side longer than MAX_ASPECT x the other is centre-trimmed to that ratio before resizing.
"""
from __future__ import annotations

import io
import json
import os
import stat
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIEWS = ("centre", "centre-flip", "whole", "whole-flip")  # the cached views of an image, in cache order
MAX_ASPECT = 3  # longer side kept at most this many times the shorter one before resizing
EXIF_ORIENTATION = 0x0112
ORIENTED = range(2, 9)  # the EXIF orientations exif_transpose turns or flips; 1 and unknown values are left as they are


class ImageError(ValueError):
    """An image file that cannot be read or decoded."""


@dataclass(frozen=True)
class Preprocess:
    """Decode -> RGB -> resize shorter side (bilinear, antialiased) -> centre crop -> normalise."""
    resize: int
    crop: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    jpeg_draft: bool = True  # JPEGs decode at a reduced DCT scale that still covers `resize`
    exif_transpose: bool = True

    def describe(self) -> str:
        """Canonical JSON, stored in caches and checkpoints and compared for equality."""
        return json.dumps(asdict(self), sort_keys=True)


def load_views(source, pp: Preprocess, views: int = 1, name: str | None = None) -> np.ndarray:
    """An image -> (views, 3, crop, crop) uint8: the first `views` of VIEWS. Raises ImageError.

    `source` is a file path, the encoded bytes of an image (an upload: decoded exactly as the same
    file would be), or a PIL image (never modified: no JPEG draft, so pass bytes to match files). View 0
    ("centre") is the one preprocessing path of extraction and captioning; the others are the
    training-time augmentations stage 1 can cache beside it: the centre crop mirrored, and the
    whole image squeezed to crop x crop (nothing cut off), plain and mirrored. `name` labels errors.
    """
    if not 1 <= views <= len(VIEWS):
        raise ValueError(f"views must be 1..{len(VIEWS)}, got {views}")
    if isinstance(source, Image.Image):
        return _guarded(name or "image", lambda: _views(source, pp, views, draft=False))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _guarded(name or "upload", lambda: _views_of_file(io.BytesIO(bytes(source)), pp, views))
    path = os.fspath(source)
    return _guarded(name or path, lambda: _views_of_path(path, pp, views))


def _guarded(label: str, work) -> np.ndarray:
    # any failure while decoding one image is that image's error (Pillow raises OSError, ValueError,
    # SyntaxError, DecompressionBombError, but also NotImplementedError for formats it knows yet cannot decode)
    try:
        return work()
    except ImageError:
        raise
    except Image.UnidentifiedImageError as e:  # its text ends with the file object's repr: an fd or an address
        raise ImageError(f"{label}: {type(e).__name__}: cannot identify image file") from e
    except Exception as e:
        raise ImageError(f"{label}: {type(e).__name__}: {e}") from e


def _views_of_path(path: str, pp: Preprocess, views: int) -> np.ndarray:
    with open_image_file(path) as f:
        return _views_of_file(f, pp, views)


def open_image_file(path: str | os.PathLike):
    """`path` opened for reading in binary if it is a regular file; ImageError for a FIFO, device, socket or
    folder, without blocking on a FIFO (OSError when it cannot be opened at all)."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ImageError(f"{path}: {_kind(mode)}, not a regular file")
    # O_NONBLOCK: if the path became a FIFO after the stat, opening it must not wait for a writer
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageError(f"{path}: {_kind(mode)}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def _views_of_file(f, pp: Preprocess, views: int) -> np.ndarray:
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that (and raises above); `_views`
        # refuses such images instead, unless JPEG draft mode shrinks them enough
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(f)
    with im:
        return _views(im, pp, views)


def _views(im: Image.Image, pp: Preprocess, views: int, draft: bool = True) -> np.ndarray:
    if draft and pp.jpeg_draft and im.format == "JPEG":
        # ask for a decode at least resize x resize: both sides stay >= the target (a no-op once loaded)
        im.draft("RGB", (pp.resize, pp.resize))
    if not im.width or not im.height:  # else a division by zero in the resize
        raise ValueError(f"the image has no pixels ({im.width}x{im.height})")
    refuse_too_many_pixels(im)
    if pp.exif_transpose and _exif_orientation(im) in ORIENTED:
        # only then: without a turn, exif_transpose returns a copy of the pixels, a third of a photo's time
        im = ImageOps.exif_transpose(im)
    im = trim_long_side(to_rgb(im), MAX_ASPECT)
    centre = _to_chw(center_crop(resize_shorter(im, pp.resize), pp.crop))  # (3, crop, crop)
    out = [centre, centre[:, :, ::-1]]
    if views > 2:
        whole = _to_chw(_resize_to(im, pp.crop, pp.crop))
        out += [whole, whole[:, :, ::-1]]
    return np.ascontiguousarray(np.stack(out[:views]))


def refuse_too_many_pixels(im: Image.Image) -> None:
    """DecompressionBombError for an image over Pillow's limit: Pillow only warns up to twice that, then decodes
    it whole (call after any draft, which may bring it under)."""
    if Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(
            f"{im.width}x{im.height} pixels exceed the decompression-bomb limit of "
            f"{Image.MAX_IMAGE_PIXELS} pixels")


def _exif_orientation(im: Image.Image) -> int:
    im.load()  # as exif_transpose does first: some formats (PNG) may carry their EXIF after the pixels
    return im.getexif().get(EXIF_ORIENTATION, 1)


def _to_chw(im: Image.Image) -> np.ndarray:
    """An RGB PIL image -> (3, H, W) uint8 (torchvision's `pil_to_tensor`)."""
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def _resize_to(im: Image.Image, w: int, h: int) -> Image.Image:
    # torchvision returns the image itself when the size already matches
    return im if im.size == (w, h) else im.resize((w, h), Image.BILINEAR)


def resize_shorter(im: Image.Image, size: int) -> Image.Image:
    """The shorter side to `size`, the longer one scaled and truncated (torchvision's `F.resize(im, size)`)."""
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return _resize_to(im, *((size, new_long) if w <= h else (new_long, size)))


def center_crop(im: Image.Image, size: int) -> Image.Image:
    """A size x size centre crop with torchvision's rounding; a smaller image is first padded with black."""
    w, h = im.size
    if size > w or size > h:
        pad_l, pad_t = max(size - w, 0) // 2, max(size - h, 0) // 2
        pad_r, pad_b = (max(size - w, 0) + 1) // 2, (max(size - h, 0) + 1) // 2
        padded = Image.new(im.mode, (w + pad_l + pad_r, h + pad_t + pad_b), 0)
        padded.paste(im, (pad_l, pad_t))
        im, (w, h) = padded, padded.size
        if (w, h) == (size, size):
            return im
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def trim_long_side(im: Image.Image, max_aspect: float) -> Image.Image:
    """Centre-crop the longer side to `max_aspect` x the shorter one.

    The final centre crop only ever sees (crop / resize) x the shorter side of the longer one, so
    this drops pixels it would never use; it keeps resizing a 1 x 20000 strip from making a
    256 x 5,120,000 intermediate (~4 GB) on the way.
    """
    w, h = im.size
    short, long = min(w, h), max(w, h)
    if long <= short * max_aspect:
        return im
    keep = int(short * max_aspect)
    off = (long - keep) // 2
    return im.crop((off, 0, off + keep, h) if w > h else (0, off, w, off + keep))


def image_contract(pp: Preprocess) -> dict:
    """The image path as plain values and exact rules, for a deployer who reimplements it (the ONNX manifest)."""
    return {
        "input": {"name": "images", "shape": ["batch", 3, pp.crop, pp.crop], "dtype": "uint8",
                  "layout": "RGB, channels first (C, H, W), rows top to bottom",
                  "normalisation": "inside encoder.onnx: (x / 255 - mean) / std"},
        "jpeg_draft_size": [pp.resize, pp.resize] if pp.jpeg_draft else None,
        "exif_transpose": pp.exif_transpose,
        "transparency_background": [255, 255, 255],
        "max_aspect": MAX_ASPECT,
        "resize": pp.resize, "crop": pp.crop, "interpolation": pp.interpolation,
        "steps": [
            "open the file with Pillow (Image.open); for a JPEG call im.draft('RGB', (jpeg_draft_size)) before "
            "anything reads its pixels: libjpeg decodes at the largest reduction 1/2, 1/4 or 1/8 that keeps "
            "both sides >= jpeg_draft_size (skip for other formats, or when jpeg_draft_size is null)",
            "if exif_transpose: PIL.ImageOps.exif_transpose(im)",
            "mode I;16, I;16B, I;16L or I: a = float32 pixels; a = a / max(a) * 255 (max 0 counts as 1), "
            "clipped to 0..255, truncated to uint8, mode L",
            "mode F: a = float32 pixels, NaN and -inf -> 0, +inf -> the largest finite value; m = largest finite "
            "value (0 if none); scale = 255 if m <= 1, else 1 if m <= 255, else 255 / m; "
            "a = clip(rint(a * scale), 0, 255) (half to even), uint8, mode L",
            "mode RGBA, LA, PA, or P with 'transparency' in im.info: convert to RGBA and alpha_composite onto an "
            "opaque transparency_background image of the same size",
            "im.convert('RGB') (any other mode: Pillow's conversion)",
            "if the longer side > max_aspect x the shorter: keep = int(shorter * max_aspect), "
            "off = (longer - keep) // 2, crop the longer side to [off, off + keep)",
            "resize so the shorter side is `resize` and the longer one int(resize * longer / shorter) "
            "(truncated), with im.resize((w, h), Image.BILINEAR) (Pillow's bilinear widens its filter when "
            "shrinking: antialiased); skip when the size already matches",
            "centre crop crop x crop: if a side is shorter than crop, first pad it with black, "
            "(crop - side) // 2 before and the rest after; then top = round((h - crop) / 2), "
            "left = round((w - crop) / 2) with Python's round (half to even)",
            "np.asarray(im, uint8) is (H, W, 3): transpose to (3, H, W) and stack a batch",
        ],
    }


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode as the RGB the model sees: float and 16-bit images scaled by their range, transparency on white
    (also what a figure of the photo shows)."""
    if im.mode == "RGB":
        return im
    if im.mode == "F":  # 32-bit float (a float TIFF): Pillow's own conversion would read 0..1 as black
        im = Image.fromarray(_float_to_u8(np.asarray(im, dtype=np.float32)))  # (H, W) uint8: mode L
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits
        arr = np.asarray(im, dtype=np.float32)
        hi = np.float32(arr.max()) or np.float32(1.0)
        # float32 throughout, truncated to uint8 as torch's .byte() does
        im = Image.fromarray(np.clip(arr / hi * np.float32(255), 0, 255).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))  # transparent -> white
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def _float_to_u8(arr: np.ndarray) -> np.ndarray:
    """Float pixels -> uint8 by their range (see the module docstring): 0..1, 0..255, or by their own maximum."""
    finite = np.isfinite(arr)
    hi = np.float32(arr[finite].max()) if finite.any() else np.float32(0)
    arr = np.nan_to_num(arr, nan=0.0, posinf=float(hi), neginf=0.0)
    scale = np.float32(255) if hi <= 1 else np.float32(1) if hi <= 255 else np.float32(255) / hi
    return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
