"""What every captions reader shares: ImageRecord, the split names, the dataset errors and
warnings, caption cleaning (common.datasets and common.folder_dataset both build on it).
"""
from __future__ import annotations

import os
import re
import stat
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from common.jsonio import JSONFileError, open_regular
from common.text import printable


SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A captions file or images folder that cannot be read as the stated format."""


@dataclass
class ImageRecord:
    key: str  # stable unique name of the image (COCO id as text, or Flickr8k file name)
    image_id: int | str
    path: str  # absolute path of the image file
    captions: list[str] = field(default_factory=list)
    split: str | None = None  # train | val | test when the dataset file prescribes it (Karpathy's), else None


def check_captions_file(captions_file: str | os.PathLike) -> Path:
    """`captions_file` as a Path if it is a regular file; a DatasetError if it is missing or anything else
    (a FIFO would block the first read forever, a device never end)."""
    try:
        mode = os.stat(captions_file).st_mode
    except FileNotFoundError:
        raise DatasetError(f"captions file not found: {printable(captions_file)}") from None
    except OSError as e:
        raise DatasetError(f"cannot read captions file {printable(captions_file)}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
        raise DatasetError(f"captions file {printable(captions_file)} is {kind}, not a regular file")
    return Path(captions_file)


def open_captions(captions_file: str | os.PathLike) -> TextIO:
    """The captions file as UTF-8 text (a BOM skipped, newlines as written for the csv module), opened only
    if it is a regular file, without blocking (see `check_captions_file`)."""
    try:
        fd = open_regular(captions_file, "captions file")
    except FileNotFoundError:
        raise DatasetError(f"captions file not found: {printable(captions_file)}") from None
    except JSONFileError as e:
        raise DatasetError(str(e)) from None
    except OSError as e:
        raise DatasetError(f"cannot read captions file {printable(captions_file)}: {e.strerror or e}") from None
    return open(fd, encoding="utf-8-sig", newline="")  # -sig: spreadsheets write a BOM


def image_name(name: str) -> str:
    """One spelling per image path, so `a.jpg`, `./a.jpg` and `sub/../a.jpg` are one image (one key, one
    split) and never a copy in train and another in test: the path with `.`, `..` and doubled slashes
    folded. A name that leaves the folder (`../x.jpg`, `/x.jpg`) keeps its `..` / root and is refused later."""
    return os.path.normpath(name) if name else name


class CaptionsByImage:
    """Captions gathered row by row under their image's `image_name`: a repeated row and an image named
    two ways are counted, in time linear in the rows (a dict per image, not a list scanned per row)."""

    def __init__(self):
        self.captions: dict[str, dict[str, None]] = {}  # key -> its captions, in order, each once
        self.spelling: dict[str, str] = {}  # key -> the first spelling met
        self.repeats = 0
        self.aliases = 0
        self.alias_example: tuple[str, str] | None = None

    def key(self, name: str) -> str:
        key = image_name(name)
        first = self.spelling.setdefault(key, name)
        if first != name:
            self.aliases += 1
            self.alias_example = self.alias_example or (first, name)
        return key

    def add(self, key: str, caption) -> None:
        caps = self.captions.setdefault(key, {})
        if not isinstance(caption, str):  # not hashable maybe: kept for `_clean_captions` to count
            caps[_Unhashable(caption)] = None
        elif caption in caps:
            self.repeats += 1
        else:
            caps[caption] = None

    def items(self):
        return ((k, [c.value if isinstance(c, _Unhashable) else c for c in caps]) for k, caps in self.captions.items())

    def warn(self, captions_file, skipped: Counter) -> None:
        if self.repeats:
            skipped["repeated rows"] += self.repeats
        if self.aliases:
            a, b = self.alias_example
            warnings.warn(DatasetWarning(f"{printable(captions_file)}: {self.aliases} rows name an image another row "
                                         f"names differently (e.g. {printable(b)} is {printable(a)}): read as one "
                                         f"image, {image_name(a)!r}"), stacklevel=3)


class _Unhashable:
    """A non-text caption value (a number, a list) held in a caption set by identity."""

    def __init__(self, value):
        self.value = value


def record_sort_key(rec: ImageRecord):
    # numeric ids in numeric order, then names in text order: the stable order `--limit` uses
    return (0, rec.image_id, "") if isinstance(rec.image_id, int) else (1, 0, str(rec.image_id))


class DatasetWarning(UserWarning):
    """Entries of a captions file that were skipped; the rest of the file is used."""


_HAS_WORD = re.compile(r"[^\W_]")  # a letter or digit: what `tokenize` needs to keep a token
_SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair, as JSON's "\ud83d" gives: not text


def clean_captions(captions: list, skipped: Counter) -> list[str]:
    """One image's captions without the unusable ones, counted into `skipped` by reason: non-text
    values, captions without a letter or digit (empty, punctuation only: they tokenise to nothing) and
    captions with a lone surrogate (no UTF-8 writer, the PTB tokenizer's file included, can carry one).
    Two annotators writing the same sentence is not a repeat: both stay references."""
    kept = []
    for c in captions:
        if not isinstance(c, str):
            skipped["captions that are not text"] += 1
        elif _SURROGATE.search(c):
            skipped["captions with a lone UTF-16 surrogate (not Unicode text)"] += 1
        elif not _HAS_WORD.search(c):
            skipped["captions without a word (empty or punctuation only)"] += 1
        else:
            kept.append(c)
    return kept


def warn_skipped(captions_file, skipped: Counter) -> None:
    if skipped:
        warnings.warn(DatasetWarning(f"{printable(captions_file)}: skipped " +
                                     "; ".join(f"{n} {why}" for why, n in skipped.items())), stacklevel=3)
