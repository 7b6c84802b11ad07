"""The `folder` captions format: a folder of one's own photos and a CSV or JSON Lines file of
`image, caption[, split]` rows (docs/own-photos.md is the user guide).

    image,caption,split                      {"image": "cats/tom.jpg", "caption": "A cat asleep.", "split": "train"}
    cats/tom.jpg,A grey cat asleep.,train    {"image": "cats/tom.jpg", "caption": "A sleeping cat."}
    "beach.jpg","Two dogs, running.",val

`common.datasets` detects it (`guess_format`) and reads it (`load_dataset(..., "folder")`) here.
"""
from __future__ import annotations

import csv
import os
import warnings
from collections import Counter
from pathlib import Path

from common.records import (SPLITS, DatasetError, DatasetWarning, ImageRecord, CaptionsByImage, clean_captions,
                            record_sort_key, warn_skipped, check_captions_file, open_captions)
from common.jsonio import MAX_LINE_BYTES, JSONFileError, parse_json
from common.text import escape_controls, printable, shortened

JSONL_SUFFIXES = (".jsonl", ".ndjson")
COLUMNS = ("image", "caption", "split")


def is_folder_header(line: str) -> bool:
    """A CSV header line for `folder`: names `image` and `caption` (any case, any order, maybe more), and
    is not exactly Flickr8k's `image,caption`, which its own reader takes."""
    try:
        fields = next(csv.reader([line.rstrip("\r\n")]), [])
    except csv.Error:
        return False
    return {"image", "caption"} <= {n.strip().lower() for n in fields} and fields != ["image", "caption"]


def _rows(captions_file: Path):
    """(line number, {column: value}) of each row of a `folder` CSV or JSON Lines file; unknown
    columns are dropped with one DatasetWarning."""
    unknown: set = set()
    try:
        with open_captions(captions_file) as f:
            if captions_file.suffix.lower() in JSONL_SUFFIXES:
                for line_no, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), ""), start=1):
                    if len(line) > MAX_LINE_BYTES:
                        raise DatasetError(f"{printable(captions_file)}:{line_no}: longer than {MAX_LINE_BYTES:,} "
                                           f"characters; one row is one image and one caption")
                    if not line.strip():
                        continue
                    try:  # bounded in depth: 100,000 nested brackets are one error, not a RecursionError
                        row = parse_json(line, "the row")
                    except JSONFileError as e:
                        raise DatasetError(f"{printable(captions_file)}:{line_no}: not a JSON object: {e}") from None
                    if not isinstance(row, dict):
                        raise DatasetError(f"{printable(captions_file)}:{line_no}: expected a JSON object "
                                           f'{{"image": ..., "caption": ..., "split"?: ...}}, got {row!r:.60}')
                    unknown.update(k for k in row if k not in COLUMNS)
                    yield line_no, row
            else:
                reader = csv.reader(f)
                header = [n.strip().lower() for n in next(reader, [])]
                if not {"image", "caption"} <= set(header) or len(set(header)) != len(header):
                    raise DatasetError(f"{printable(captions_file)}: expected a CSV header naming image and caption once "
                                       f"each (and optionally split), got {escape_controls(shortened(str(header)))}")
                unknown.update(n for n in header if n not in COLUMNS)
                line_no = reader.line_num + 1  # where the next row starts
                for fields in reader:
                    if not any(v.strip() for v in fields):
                        line_no = reader.line_num + 1
                        continue
                    if any("\n" in v or "\r" in v for v in fields):  # a quote left open swallows the lines after it
                        raise DatasetError(f"{printable(captions_file)}:{line_no}: a field runs on over several lines (a double "
                                           f"quote left open?); quote a whole caption, or double a quote inside one")
                    if len(fields) > len(header):
                        raise DatasetError(f"{printable(captions_file)}:{line_no}: {len(fields)} fields, the header "
                                           f"has {len(header)}; put captions that contain commas in double quotes")
                    yield line_no, dict(zip(header, fields))  # fields left out at the end read as absent
                    line_no = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise DatasetError(f"{printable(captions_file)} is not UTF-8 text: {e}") from e
    except csv.Error as e:
        raise DatasetError(f"{printable(captions_file)}: not a readable CSV file: {e}") from e
    if unknown:
        warnings.warn(DatasetWarning(f"{printable(captions_file)}: ignored columns {', '.join(sorted(map(str, unknown)))} "
                                     f"(known: {', '.join(COLUMNS)})"), stacklevel=4)


def load_folder(captions_file: str | os.PathLike, images_dir: str | os.PathLike) -> list[ImageRecord]:
    """Read one's own photos: a CSV (header `image,caption` and optionally `split`, in any order) or a
    JSON Lines file (`.jsonl`: `{"image": ..., "caption": ..., "split"?: ...}` per line), one row per
    caption, any number of rows per image. `image` is the path relative to `images_dir` (also the
    image's key). A `split` (train, val or test) puts the image there (`official_split`); an image's
    rows must not name different splits, and either every image has a split or none has (then
    training splits them by hash). Rows without an image or caption, a row repeated exactly and
    unusable captions (see `_clean_captions`) are skipped with one DatasetWarning, as Flickr8k's
    reader does: an `image,caption` CSV reads the same with either.
    """
    captions_file, images_dir = check_captions_file(captions_file), Path(images_dir)
    by_image = CaptionsByImage()
    splits: dict[str, str] = {}
    skipped: Counter = Counter()
    bad_rows: list[int] = []
    for line_no, row in _rows(captions_file):
        image, caption = row.get("image"), row.get("caption")
        image = image.strip() if isinstance(image, str) else ""
        if not image or caption is None:
            bad_rows.append(line_no)
            continue
        image = by_image.key(image)  # `./a.jpg` and `a.jpg` are one image, in one split
        split = row.get("split")
        split = split.strip().lower() if isinstance(split, str) else split
        if split not in (None, ""):
            if split not in SPLITS:
                raise DatasetError(f"{printable(captions_file)}:{line_no}: split {split!r} of {printable(image)} is "
                                   f"not one of {', '.join(SPLITS)} (or empty)")
            if splits.setdefault(image, split) != split:
                raise DatasetError(f"{printable(captions_file)}:{line_no}: {printable(image)} is put in {split}, "
                                   f"an earlier row puts it in {splits[image]}")
        by_image.add(image, caption)
    by_image.warn(captions_file, skipped)
    if bad_rows:
        skipped[f"rows without an image or caption (e.g. line {bad_rows[0]})"] = len(bad_rows)
    if not by_image.captions:
        raise DatasetError(f"{printable(captions_file)} lists no images")
    if splits and len(splits) < len(by_image.captions):
        missing = next(k for k in by_image.captions if k not in splits)
        raise DatasetError(f"{printable(captions_file)}: {len(splits)} images have a split and "
                           f"{len(by_image.captions) - len(splits)} "
                           f"have none (e.g. {printable(missing)}); give every image a split, or none (then training "
                           f"splits them by --val-frac/--test-frac)")
    records = [ImageRecord(name, name, os.path.abspath(images_dir / name), clean_captions(caps, skipped),
                           splits.get(name)) for name, caps in by_image.items()]
    warn_skipped(captions_file, skipped)
    return sorted(records, key=record_sort_key)

