"""One upload -> the model's input: checked from its header, decoded and preprocessed in a worker thread.

`decode_upload` is what the service's decode pool runs for each file, off the event loop and off the
model thread. Its pixels go through the one preprocessing path (`common.preprocess.load_views` on the
upload's bytes, exactly as on the same file), so a photo gets the caption `caption` gives its file.
Only one image per worker is ever decoded at full size, so decoded pixels in flight are at most
`decode_workers x max_pixels`; what a request keeps is its (3, crop, crop) uint8 arrays. A large
non-JPEG (a JPEG is already decoded at a reduced DCT scale) is box-reduced towards the model's input
scale before the resize, so its intermediates stay small.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import io
import warnings

import numpy as np

from stage2_decoder.serving.settings import MB

TRIM_ABOVE = 4_000_000  # pixels: after a decode this large, free memory goes back to the system


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}, a plain sentence."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def megabytes(n: int) -> str:
    """A byte count as a person reads it: "10.5 MB" (MiB, as the settings are), "12 KB", "300 bytes"."""
    if n < 1024:  # a stalled upload's few bytes read "0 KB"
        return f"{n} byte{'' if n == 1 else 's'}"
    return f"{n / MB:.1f} MB" if n >= MB // 10 else f"{n / 1024:.0f} KB"


MAX_JPEG_SCANS = 100  # an EXIF thumbnail's scans count too


def open_upload(name: str, data: bytes, max_upload_bytes: int, max_pixels: int):
    """Upload bytes -> a PIL image opened from memory (not yet decoded), its size checked from the header."""
    from PIL import Image

    if len(data) > max_upload_bytes:
        raise RequestError(413, f"{name} is {megabytes(len(data))}, over the limit of "
                                f"{megabytes(max_upload_bytes)} per file.")
    if not data:
        raise RequestError(422, f"{name} is empty.")
    if data[:4] == b"\x00\x00\x01\x00":  # an ICO: Pillow decodes its largest frame while opening it
        _check_icon_frames(name, data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise RequestError(413, f"{name} has more pixels than this server accepts ({max_pixels:,} at most).") \
            from None
    except Exception:  # noqa: BLE001 - whatever Pillow raises, an unreadable format is the client's
        raise RequestError(415, f"{name}: not an image this server can read (send a JPEG, PNG, WebP, ...).") \
            from None
    if im.width * im.height > max_pixels:
        im.close()
        raise RequestError(413, f"{name} is {im.width}x{im.height} pixels, over the limit of {max_pixels:,} "
                                f"pixels per image.")
    # each scan of a progressive JPEG is a pass over all its pixels: a small file repeating its last scan
    # held the decode threads for minutes, every other request waiting behind it
    scans = data.count(b"\xff\xda") if im.format in ("JPEG", "MPO") else 0  # SOS markers (not in coded data)
    if scans > MAX_JPEG_SCANS:
        im.close()
        raise RequestError(422, f"{name} is a JPEG of {scans} scans, over the {MAX_JPEG_SCANS} this server decodes "
                                f"(a progressive JPEG has about 10).")
    return im


def _check_icon_frames(name: str, data: bytes, max_pixels: int) -> None:
    """413 for an ICO with a frame over `max_pixels`, read from the frames' own headers: its directory says at
    most 256x256, but a PNG or BMP frame may declare any size, and all of it is decoded while the file opens."""
    for i in range(int.from_bytes(data[4:6], "little")):
        entry = data[6 + 16 * i:22 + 16 * i]
        if len(entry) < 16:
            break
        at = int.from_bytes(entry[12:16], "little")
        head = data[at:at + 24]
        if head[:8] == b"\x89PNG\r\n\x1a\n":
            w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        elif len(head) >= 12:  # a BMP without its file header: width, then height counted twice (the mask)
            w = abs(int.from_bytes(head[4:8], "little", signed=True))
            h = abs(int.from_bytes(head[8:12], "little", signed=True)) // 2
        else:
            continue
        if w * h > max_pixels:
            raise RequestError(413, f"{name} holds an icon of {w}x{h} pixels, over the limit of {max_pixels:,} "
                                    f"pixels per image.")


def decode_upload(name: str, data: bytes, pp, max_upload_bytes: int, max_pixels: int) -> np.ndarray:
    """Upload bytes -> (3, crop, crop) uint8, as `common.preprocess.load_views` makes it from the file.

    RequestError: 413 over a limit, 415 not an image (or a format Pillow knows but cannot decode), 422
    an image whose data is damaged or incomplete.
    """
    # imported on use: importing this module stays free of PIL
    from common.preprocess import ImageError, load_views

    im = open_upload(name, data, max_upload_bytes, max_pixels)
    pixels = im.width * im.height
    try:
        # the bytes, decoded exactly as the caption CLI decodes the file: the same pixels, the same caption
        return load_views(data, pp, 1, name)[0]
    except ImageError as e:
        if isinstance(e.__cause__, NotImplementedError):  # e.g. a DDS with an unknown pixel format
            raise RequestError(415, f"{name}: an image format this server cannot decode.") from None
        raise RequestError(422, f"{name}: not a readable image (its data is damaged or incomplete).") from None
    except NotImplementedError:
        raise RequestError(415, f"{name}: an image format this server cannot decode.") from None
    except Exception:  # noqa: BLE001 - a decoder error that is not an ImageError (struct.error, ...)
        raise RequestError(422, f"{name}: not a readable image (its data is damaged or incomplete).") from None
    finally:
        im.close()
        if pixels > TRIM_ABOVE:
            _trim()


_libc = None


def _trim() -> None:
    """Hand freed heap pages back to the system (glibc keeps them per thread arena otherwise)."""
    global _libc
    if _libc is None:
        path = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(path) if path else False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
