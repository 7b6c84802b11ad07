"""Where outputs may go: never inside the images folder a dataset is read from.

A cache, a run or a sweep written among the photos would be read as photos by the next extraction (and
a user's photo folder is not ours to fill). The check resolves symlinks and `..` on both sides: an
`--out` that reaches the images folder through a link is inside it.
"""
from __future__ import annotations

import os
from pathlib import Path

from common.text import printable


class OutputInsideImages(ValueError):
    """An output path that resolves to somewhere inside the images folder."""


def refuse_inside(out: str | os.PathLike, images: str | os.PathLike, what: str = "the output") -> Path:
    """The absolute `out`, after checking that neither it nor any link on its way leads into `images`."""
    out_abs = Path(os.path.abspath(out))
    real_out, real_images = Path(os.path.realpath(out)), Path(os.path.realpath(images))
    if out_abs.is_relative_to(os.path.abspath(images)) or real_out.is_relative_to(real_images):
        via = "" if out_abs == real_out else f" (it resolves to {printable(real_out)})"
        raise OutputInsideImages(f"--out {printable(out)} is inside the images folder {printable(images)}{via}; "
                                 f"write {what} elsewhere")
    return out_abs


def refuse_overwriting(outputs: dict[str, str | os.PathLike | None], inputs: dict[str, str | os.PathLike | None]
                       ) -> None:
    """ValueError if an output option names one of the inputs, or two outputs name one file (resolved): the
    report would replace the checkpoint it was made from, or one report the other."""
    named = [(option, os.path.realpath(p)) for option, p in outputs.items() if p]
    for i, (option, path) in enumerate(named):
        for other, other_path in named[i + 1:]:
            if path == other_path:
                raise ValueError(f"{option} and {other} name one file, {printable(path)}: name two")
        for source, p in inputs.items():
            if p and os.path.realpath(p) == path:
                raise ValueError(f"{option} {printable(path)} is the {source} it is made from: name another file")
