"""Caption datasets: MS-COCO captions JSON and Flickr8k `captions.txt`, read into one record type.

Every image gets a string `key` that names it everywhere else (the feature cache rows, the
split file, evaluation output): the COCO image id as a decimal string, or the Flickr8k file name.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("coco", "flickr8k")
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A captions file or images folder that cannot be read as the stated format."""


@dataclass
class ImageRecord:
    key: str  # stable unique name of the image (COCO id as text, or Flickr8k file name)
    image_id: int | str
    path: str  # absolute path of the image file
    captions: list[str] = field(default_factory=list)


def guess_format(captions_file: str | os.PathLike) -> str:
    """'coco' for a .json captions file, 'flickr8k' for .txt/.csv."""
    suffix = Path(captions_file).suffix.lower()
    if suffix == ".json":
        return "coco"
    if suffix in (".txt", ".csv"):
        return "flickr8k"
    raise DatasetError(f"cannot tell the dataset format of {captions_file}; pass --dataset coco|flickr8k")


def _sort_key(rec: ImageRecord):
    # numeric ids in numeric order, then names in text order: the stable order `--limit` uses
    return (0, rec.image_id, "") if isinstance(rec.image_id, int) else (1, 0, str(rec.image_id))


def load_coco(captions_file: str | os.PathLike, images_dir: str | os.PathLike) -> list[ImageRecord]:
    """Read an official MS-COCO captions JSON (through pycocotools)."""
    from pycocotools.coco import COCO

    captions_file, images_dir = Path(captions_file), Path(images_dir)
    if not captions_file.is_file():
        raise DatasetError(f"captions file not found: {captions_file}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress chatter
            coco = COCO(str(captions_file))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{captions_file} is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{captions_file} is not UTF-8 text: {e}") from e
    except (KeyError, TypeError, AttributeError, AssertionError) as e:
        raise DatasetError(f"{captions_file} is not a COCO captions file (needs 'images' and "
                           f"'annotations' lists): {e!r}") from e
    if not coco.imgs:
        raise DatasetError(f"{captions_file} lists no images")
    records = []
    for img_id, img in coco.imgs.items():
        try:
            caps = [a["caption"] for a in coco.imgToAnns.get(img_id, []) if isinstance(a.get("caption"), str)]
            records.append(ImageRecord(str(img_id), img_id, os.path.abspath(images_dir / img["file_name"]),
                                       caps))
        except (KeyError, TypeError) as e:
            raise DatasetError(f"{captions_file}: malformed image entry {img!r}: {e!r}") from e
    return sorted(records, key=_sort_key)


def load_flickr8k(captions_file: str | os.PathLike, images_dir: str | os.PathLike) -> list[ImageRecord]:
    """Read a Flickr8k `captions.txt`: CSV with header `image,caption`, one row per caption."""
    captions_file, images_dir = Path(captions_file), Path(images_dir)
    if not captions_file.is_file():
        raise DatasetError(f"captions file not found: {captions_file}")
    by_image: OrderedDict[str, list[str]] = OrderedDict()
    try:
        with open(captions_file, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
                raise DatasetError(f"{captions_file}: expected a CSV header 'image,caption', "
                                   f"got {reader.fieldnames}")
            for line_no, row in enumerate(reader, start=2):
                image, caption = row.get("image"), row.get("caption")
                if not image or caption is None:
                    raise DatasetError(f"{captions_file}:{line_no}: row without image or caption")
                by_image.setdefault(image.strip(), []).append(caption)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{captions_file} is not UTF-8 text: {e}") from e
    records = [ImageRecord(name, name, os.path.abspath(images_dir / name), caps) for name, caps in by_image.items()]
    if not records:
        raise DatasetError(f"{captions_file} lists no images")
    return sorted(records, key=_sort_key)


def load_dataset(fmt: str, captions_file: str | os.PathLike, images_dir: str | os.PathLike,
                 limit: int | None = None) -> list[ImageRecord]:
    """Records of a dataset in stable order (by image id / name); the first `limit` if given."""
    if fmt == "auto":
        fmt = guess_format(captions_file)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; choose from {', '.join(FORMATS)}")
    if not Path(images_dir).is_dir():
        raise DatasetError(f"images folder not found: {images_dir}")
    records = (load_coco if fmt == "coco" else load_flickr8k)(captions_file, images_dir)
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"--limit must be at least 1, got {limit}")
        records = records[:limit]
    return records


def _unit_hash(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def split_keys(keys: list[str], val_frac: float = 0.05, test_frac: float = 0.05, seed: int = 0) -> dict[str, list[str]]:
    """Split image keys into train/val/test, deterministically.

    Images are ranked by a SHA-256 of (seed, key), which is the same on every machine and
    Python version (unlike `hash()`), and cut by the fractions. Each non-zero fraction gets at
    least one image when there are at least three. Each list is returned sorted.
    """
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"bad split fractions val={val_frac} test={test_frac}")
    ranked = sorted(set(keys), key=lambda k: (_unit_hash(k, seed), k))
    n = len(ranked)

    def count(frac: float) -> int:
        return max(1, round(n * frac)) if frac > 0 and n >= 3 else int(n * frac)

    n_val, n_test = count(val_frac), count(test_frac)
    while n_val + n_test > max(n - 1, 0) and n_val + n_test > 0:  # always leave a training image
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return {"val": sorted(ranked[:n_val]), "test": sorted(ranked[n_val:n_val + n_test]),
            "train": sorted(ranked[n_val + n_test:])}


def write_split(split: dict[str, list[str]], path: str | os.PathLike) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(split, indent=0))
    os.replace(tmp, path)
