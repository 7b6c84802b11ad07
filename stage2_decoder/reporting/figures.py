"""Captioned figures: the photo with its generated caption, and the beam's alternatives underneath.

    python -m stage2_decoder.caption photo.jpg --checkpoint best.pt --beam-size 3 --save-figure figs/

One PNG per image, FIGURE_WIDTH pixels wide; its height is the photo's (scaled to that width, at
most MAX_PHOTO_HEIGHT) plus a text band whose height follows from the number of text lines, so
`figure_size` tells the exact pixel size in advance. matplotlib is imported only when a figure is
drawn (headless Agg canvas, no pyplot, no display): `caption` without --save-figure never loads it.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from common.atomic import atomic_path
from common.preprocess import ImageError, open_image_file, refuse_too_many_pixels, to_rgb
from common.text import surrogates_shown

FIGURE_WIDTH = 640  # px
MAX_PHOTO_HEIGHT = 640  # px; a taller photo is scaled down further and centred
DPI = 100
PAD = 12  # px around the text band
CAPTION_LINE, SMALL_LINE = 24, 18  # px per text line: the caption (13 pt) and the rest (10 pt)


class FigureError(ValueError):
    """An image that cannot be drawn (unreadable file)."""

def load_display_image(path: str | os.PathLike, max_side: int | None = None) -> Image.Image:
    """An image file as an upright RGB PIL image, optionally shrunk to fit max_side. Raises FigureError, for a
    FIFO or device too (without waiting on it), and for an image over Pillow's decompression-bomb limit, as the
    captioner does."""
    try:
        with open_image_file(path) as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, as the captioner does
            with Image.open(f) as im:
                if Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS and im.format == "JPEG":
                    side = max_side or FIGURE_WIDTH  # a huge JPEG decoded nearer the size it is shown
                    im.draft("RGB", (side, side))
                refuse_too_many_pixels(im)
                im = to_rgb(ImageOps.exif_transpose(im))  # as the captioner saw it (16-bit, float, transparency)
                if max_side:
                    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                return im
    except ImageError as e:
        raise FigureError(f"cannot read image {e}") from e
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds (SyntaxError, NotImplementedError...)
        raise FigureError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


@dataclass
class _Line:
    text: str
    height: int
    size: float
    weight: str = "normal"
    color: str = "black"


def _wrap(text: str, size: float, weight: str, prefix: str = "", indent: str = "") -> list[str]:
    """Greedy word wrap by the rendered width (Agg's font metrics), so no line runs off the figure.
    `prefix` starts the first line verbatim, `indent` the others."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    renderer = RendererAgg(FIGURE_WIDTH, CAPTION_LINE, DPI)
    font = FontProperties(size=size, weight=weight)

    def fits(line: str) -> bool:
        return renderer.get_text_width_height_descent(line, font, ismath=False)[0] <= FIGURE_WIDTH - 2 * PAD

    lines, current = [], prefix
    for word in text.split():
        trial = current + ("" if not current.strip() or current.endswith(" ") else " ") + word
        if current.strip() and not fits(trial):
            lines.append(current)
            trial = indent + word
        while not fits(trial) and len(trial) > len(indent) + 1:  # a word wider than the figure: cut it
            cut = len(trial) - 1
            while cut > len(indent) + 1 and not fits(trial[:cut]):
                cut -= 1
            lines.append(trial[:cut])
            trial = indent + trial[cut:]
        current = trial
    return lines + ([current] if current.strip() else [])


def _text_lines(caption: str, alternatives: list[tuple[str, float]] | None, label: str | None) -> list[_Line]:
    lines = [_Line(t, CAPTION_LINE, 13, "bold") for t in _wrap(caption or "(empty caption)", 13, "bold")]
    if alternatives and len(alternatives) > 1:
        lines.append(_Line(f"beam search, {len(alternatives)} best (score = length-normalised log-probability):",
                           SMALL_LINE, 10, color="#555555"))
        for i, (text, score) in enumerate(alternatives, 1):
            weight = "bold" if i == 1 else "normal"
            lines += [_Line(t, SMALL_LINE, 10, weight)
                      for t in _wrap(text or "(empty)", 10, weight, f"{i}.  {score:7.3f}   ", " " * 16)]
    if label:  # a file name's bytes that are not UTF-8 shown as \xNN (matplotlib cannot draw them)
        label = surrogates_shown(label)
        lines += [_Line(t, SMALL_LINE, 10, color="#777777") for t in _wrap(label, 10, "normal")]
    return lines


def _photo_height(image_size: tuple[int, int]) -> int:
    w, h = image_size
    return max(1, min(MAX_PHOTO_HEIGHT, round(FIGURE_WIDTH * h / max(w, 1))))


def figure_size(image_size: tuple[int, int], caption: str, alternatives: list[tuple[str, float]] | None = None,
                label: str | None = None) -> tuple[int, int]:
    """(width, height) in pixels of the PNG `save_caption_figure` writes for these inputs."""
    return _size(image_size, _text_lines(caption, alternatives, label))


def _size(image_size: tuple[int, int], lines: list[_Line]) -> tuple[int, int]:
    return FIGURE_WIDTH, _photo_height(image_size) + 2 * PAD + sum(ln.height for ln in lines)


def save_caption_figure(image: str | os.PathLike, caption: str, out: str | os.PathLike,
                        alternatives: list[tuple[str, float]] | None = None, label: str | None = None) -> Path:
    """Write a PNG of the photo with `caption` under it; `alternatives` = the beam's [(caption, score)],
    best first, listed with their scores when there is more than one; `label` (e.g. the file name) last."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    photo = load_display_image(image)
    lines = _text_lines(caption, alternatives, label)
    w, h = _size(photo.size, lines)
    ph = _photo_height(photo.size)
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 1 - ph / h, 1, ph / h))  # the photo band at the top, full width
    ax.imshow(photo, interpolation="antialiased")  # aspect kept: a tall photo is centred
    ax.set_axis_off()
    y = ph + PAD
    for ln in lines:
        # parse_math=False: a caption with '$' is text, not mathtext
        fig.text(PAD / w, 1 - y / h, ln.text, va="top", ha="left", fontsize=ln.size, fontweight=ln.weight,
                 color=ln.color, parse_math=False)
        y += ln.height
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, what="figure") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
    return out


def figure_path(out_dir: str | os.PathLike, image: str | os.PathLike, taken: set[str]) -> Path:
    """OUT_DIR/<image stem>.png, with -2, -3, ... when two inputs share a stem; records the name in `taken`."""
    # imported on use, as the module's other imports
    from common.atomic import clipped

    stem = clipped(Path(image).stem, 200) or "image"  # a name of 255 bytes has no room for ".png"
    name, n = f"{stem}.png", 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}.png"
    taken.add(name)
    return Path(out_dir) / name
