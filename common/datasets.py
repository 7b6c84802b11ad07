"""Caption datasets, read into one record type: MS-COCO captions JSON, Flickr8k `captions.txt`,
Karpathy's split files (`dataset_{coco,flickr8k,flickr30k}.json`), Flickr30k's caption files and
the `folder` format for one's own photos (a CSV or JSON Lines file of `image, caption[, split]` rows).

Every image gets a string `key` that names it everywhere else (the feature cache rows, the
split file, evaluation output): the COCO image id as a decimal string, or the Flickr file name
(the image's path relative to the images folder for `folder`). A Karpathy or `folder` file may
also fix each image's split (`ImageRecord.split`; see `official_split`).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path

from common.atomic import atomic_write
from common.jsonio import JSONFileError, open_regular, read_json
from common.text import escape_controls, printable, shortened
from common.records import (DatasetError, DatasetWarning, ImageRecord, CaptionsByImage, clean_captions, record_sort_key,
                            warn_skipped, check_captions_file, image_name, open_captions)
from common.folder_dataset import JSONL_SUFFIXES, is_folder_header, load_folder

FORMATS = ("coco", "flickr8k", "karpathy", "flickr30k", "folder")


def _read_captions_json(captions_file: Path) -> object:
    try:
        return read_json(captions_file, "captions file")
    except FileNotFoundError:
        raise DatasetError(f"captions file not found: {printable(captions_file)}") from None
    except JSONFileError as e:
        raise DatasetError(str(e)) from None


def _head(path: str | os.PathLike, n: int) -> str:
    try:
        fd = open_regular(path, "captions file")
    except (OSError, JSONFileError):
        return ""  # missing or not a regular file: the reader will say so
    with os.fdopen(fd, "rb") as f:
        return f.read(n).decode("utf-8", errors="replace")


_TOKEN_LINE = re.compile(r"^[^\t#]+#\d+\t")  # `1000092795.jpg#0<TAB>caption` (Flickr30k/Flickr8k .token)


def guess_format(captions_file: str | os.PathLike) -> str:
    """From the extension, and the first bytes where they tell formats apart.

    .json: 'karpathy' if its images carry "sentences", else 'coco'; .token: 'flickr30k';
    .jsonl/.ndjson: 'folder'; .txt/.csv: 'flickr30k' for `NAME#N<TAB>caption` lines or an
    `image_name| comment_number| comment` header, 'folder' for a CSV header naming `image` and
    `caption` other than exactly Flickr8k's `image,caption` (with `split`, other columns, another
    order), else 'flickr8k' (which reads an `image,caption` file as `folder` would).
    """

    suffix = Path(captions_file).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "folder"
    if suffix == ".json":
        # Karpathy's files start with the first image and its sentences; COCO's have no "sentences"
        return "karpathy" if re.search(r'"sentences"\s*:', _head(captions_file, 1 << 16)) else "coco"
    if suffix == ".token":
        return "flickr30k"
    if suffix in (".txt", ".csv"):
        first = _head(captions_file, 4096).lstrip("\ufeff").split("\n", 1)[0]
        if _TOKEN_LINE.match(first) or first.replace(" ", "").startswith("image_name|"):
            return "flickr30k"
        return "folder" if is_folder_header(first) else "flickr8k"
    raise DatasetError(f"cannot tell the dataset format of {captions_file}; pass --dataset "
                       f"{'|'.join(FORMATS)}")


def load_coco(captions_file: str | os.PathLike, images_dir: str | os.PathLike) -> list[ImageRecord]:
    """Read an official MS-COCO captions JSON (indexed by pycocotools).

    A file of the wrong shape is a DatasetError; unusable entries in a usable file (captions
    that are empty or punctuation only, annotations of image ids the file does not list, an
    annotation id or an identical image entry given twice) are skipped with one DatasetWarning.
    """
    from pycocotools.coco import COCO

    captions_file, images_dir = check_captions_file(captions_file), Path(images_dir)
    # read it here, not in COCO(): bounded (size, depth), UTF-8 whatever the locale, a BOM tolerated
    data = _read_captions_json(captions_file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"{printable(captions_file)} is not a COCO captions file (needs 'images' and "
                           f"'annotations' lists)")
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex() prints progress chatter
            coco.createIndex()
    except (KeyError, TypeError, AttributeError) as e:
        raise DatasetError(f"{printable(captions_file)} is not a COCO captions file (each image needs an 'id', each "
                           f"annotation an 'id' and 'image_id'): {e!r}") from e
    if not coco.imgs:
        raise DatasetError(f"{printable(captions_file)} lists no images")
    skipped: Counter = Counter()
    names: dict = {}
    for img in data["images"]:  # createIndex keeps the last of repeated ids: refuse conflicting ones
        first = names.setdefault(img["id"], img.get("file_name"))
        if first != img.get("file_name"):
            raise DatasetError(f"{printable(captions_file)}: image id {img['id']!r} is listed twice, as {first!r} "
                               f"and {img.get('file_name')!r}")
    if len(data["images"]) > len(coco.imgs):
        skipped["repeated image entries"] += len(data["images"]) - len(coco.imgs)
    orphans = [i for i in coco.imgToAnns if i not in coco.imgs]
    if orphans:
        skipped[f"annotations of image ids not in 'images' (e.g. {orphans[0]!r})"] += \
            sum(len(coco.imgToAnns[i]) for i in orphans)
    seen_ann: set = set()
    records = []
    for img_id, img in coco.imgs.items():
        anns = []
        for a in coco.imgToAnns.get(img_id, []):
            if a["id"] in seen_ann:
                skipped["repeated annotations (same id)"] += 1
            else:
                seen_ann.add(a["id"])
                anns.append(a)
        try:
            caps = clean_captions([a.get("caption") for a in anns], skipped)
            records.append(ImageRecord(str(img_id), img_id, os.path.abspath(images_dir / img["file_name"]),
                                       caps))
        except (KeyError, TypeError, AttributeError) as e:
            raise DatasetError(f"{printable(captions_file)}: malformed image entry {img!r}: {e!r}") from e
    warn_skipped(captions_file, skipped)
    return sorted(records, key=record_sort_key)


NUMBERED = re.compile(r"(.+)#\d+")  # an image name with its caption's number after it


def load_flickr8k(captions_file: str | os.PathLike, images_dir: str | os.PathLike) -> list[ImageRecord]:
    """Read a Flickr8k `captions.txt`: CSV with header `image,caption`, one row per caption.

    Columns are read by their header names, in any order. A file without that header is a
    DatasetError, and so is a quote that is never closed (a caption running over several lines or
    absurdly long: it would swallow the rows after it) and a column the header does not name (more
    fields than the header on most rows). Rows without an image or caption, an image name with a NUL
    byte, a row repeated exactly, and unusable captions (see `_clean_captions`) are skipped with one
    DatasetWarning; a few captions with unquoted commas are joined back, with a warning naming a line.
    """
    captions_file, images_dir = check_captions_file(captions_file), Path(images_dir)
    by_image = CaptionsByImage()
    skipped: Counter = Counter()
    bad_rows: list[int] = []
    nul_rows: list[int] = []
    glued: list[int] = []  # rows with more fields than the header
    renumbered: list[int] = []  # rows whose image name carried its caption's number
    n_rows = 0
    try:
        with open_captions(captions_file) as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
                raise DatasetError(f"{printable(captions_file)}: expected a CSV header 'image,caption', "
                                   f"got {escape_controls(shortened(str(reader.fieldnames)))}")
            end = reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num  # the lines this row spans
                n_rows += 1
                image, caption = (row.get("image") or "").strip(), row.get("caption")
                if not image or caption is None:
                    bad_rows.append(start)
                    continue
                if "\x00" in image:  # no file system can hold such a name: the final cache could not be written
                    nul_rows.append(start)
                    continue
                if "\n" in caption or "\r" in caption:
                    span = f"runs to line {end}" if end > start else "spans lines"
                    raise DatasetError(f"{printable(captions_file)}:{start}: this caption {span} ({len(caption)} "
                                       f"characters): a quote opened here is never closed? Close it or remove it")
                if len(caption) > MAX_CAPTION_CHARS:  # no quote question: one line cannot have swallowed rows
                    raise DatasetError(f"{printable(captions_file)}:{start}: this caption is one line of "
                                       f"{len(caption)} characters, over the {MAX_CAPTION_CHARS:,} a caption may "
                                       f"have: shorten it, or split it into several captions")
                if row.get(None):  # `a.jpg,A dog, running` -> caption "A dog, running"
                    glued.append(start)
                    caption = ",".join([caption, *row[None]])
                numbered = NUMBERED.fullmatch(image)  # Flickr8k.token.txt's `NAME.jpg#0`, made into a CSV
                if numbered:  # by the name alone: training reads this file where the images may not be
                    image = numbered.group(1)
                    renumbered.append(start)
                by_image.add(by_image.key(image), caption)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{printable(captions_file)} is not UTF-8 text: {e}") from e
    except csv.Error as e:
        raise DatasetError(f"{printable(captions_file)}: not a readable CSV file: {e}") from e
    by_image.warn(captions_file, skipped)
    if bad_rows:
        skipped[f"rows without an image or caption (e.g. line {bad_rows[0]})"] = len(bad_rows)
    if nul_rows:
        skipped[f"rows whose image name holds a NUL byte (e.g. line {nul_rows[0]})"] = len(nul_rows)
    if glued and 2 * len(glued) > n_rows:
        raise DatasetError(f"{printable(captions_file)}: {len(glued)} of {n_rows} rows have more fields than the header "
                           f"names (e.g. line {glued[0]}): name the extra column in the header, or quote the captions")
    if renumbered:
        warnings.warn(DatasetWarning(f"{printable(captions_file)}: {len(renumbered)} image names ended in a caption number "
                                     f"(`NAME#0`, as in Flickr8k.token.txt; e.g. line {renumbered[0]}): read as NAME"),
                      stacklevel=2)
    if glued:
        warnings.warn(DatasetWarning(f"{printable(captions_file)}: {len(glued)} captions had unquoted commas (more fields than "
                                     f"the header, e.g. line {glued[0]}): joined back with commas"), stacklevel=2)
    records = [ImageRecord(name, name, os.path.abspath(images_dir / name), clean_captions(caps, skipped))
               for name, caps in by_image.items()]
    if not records:
        raise DatasetError(f"{printable(captions_file)} lists no images")
    warn_skipped(captions_file, skipped)
    return sorted(records, key=record_sort_key)


MAX_CAPTION_CHARS = 1000  # longer is no caption: a field that swallowed the rows after an unmatched quote
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}  # restval trains


def load_karpathy(captions_file: str | os.PathLike, images_dir: str | os.PathLike) -> list[ImageRecord]:
    """Read a Karpathy split file: `{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}],
    "cocoid"?}, ...]}` (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json).

    The image is images_dir/filepath/filename (COCO: images_dir holds train2014/ and val2014/; Flickr
    files have no filepath). Keys match the other readers: the COCO id where there is one, else the
    file name. Each record carries its split, "restval" counted as "train" (the usual 113k/5k/5k).
    Unusable captions are skipped with one DatasetWarning, as by the other readers.
    """
    captions_file, images_dir = check_captions_file(captions_file), Path(images_dir)
    data = _read_captions_json(captions_file)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not images:
        raise DatasetError(f"{printable(captions_file)} is not a Karpathy split file (needs a non-empty 'images' list)")
    records, seen, skipped = [], set(), Counter()
    for i, img in enumerate(images):
        try:
            name, split = image_name(img["filename"]), KARPATHY_SPLITS[img["split"]]
            image_id = int(img["cocoid"]) if "cocoid" in img else name
            path = images_dir / img.get("filepath", "") / name
            caps = clean_captions([s.get("raw") for s in img["sentences"]], skipped)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DatasetError(f"{printable(captions_file)}: malformed image entry #{i} ({e!r}); needs filename, "
                               f"split (train|val|test|restval) and sentences[].raw") from e
        key = str(image_id)
        if key in seen:
            raise DatasetError(f"{printable(captions_file)}: image {printable(key)} is listed twice")
        seen.add(key)
        records.append(ImageRecord(key, image_id, os.path.abspath(path), caps, split))
    warn_skipped(captions_file, skipped)
    return sorted(records, key=record_sort_key)


def load_flickr30k(captions_file: str | os.PathLike, images_dir: str | os.PathLike) -> list[ImageRecord]:
    """Read Flickr30k captions: `results_20130124.token` (`NAME.jpg#N<TAB>caption`, also Flickr8k's
    `Flickr8k.token.txt`) or Kaggle's `results.csv` (`image_name| comment_number| comment`).
    A line of neither shape is a DatasetError; unusable captions are skipped with one DatasetWarning."""
    captions_file, images_dir = check_captions_file(captions_file), Path(images_dir)
    by_image: dict[str, list[tuple[int, str]]] = {}  # name -> [(caption number, caption)]
    names = CaptionsByImage()  # only for its one spelling per image
    try:
        with open_captions(captions_file) as f:
            # lines end at \n, \r\n or \r alone, not at what str.splitlines also breaks on (U+2028, NEL, form
            # feed): those are inside a caption, and the file's line numbers would be off after them
            lines = re.split(r"\r\n|\r|\n", f.read())
    except UnicodeDecodeError as e:
        raise DatasetError(f"{printable(captions_file)} is not UTF-8 text: {e}") from e
    seen: set[tuple[str, int, str]] = set()
    piped = bool(lines) and lines[0].replace(" ", "").startswith("image_name|")
    for line_no, line in enumerate(lines[1:] if piped else lines, start=2 if piped else 1):
        if not line.strip():
            continue
        if piped:
            parts = [p.strip() for p in line.split("|", 2)]
            if len(parts) == 2:  # Kaggle's copy has a row or two with the second '|' missing: "name| 4 text"
                m = re.match(r"(\d+)\s+(.*)", parts[1])
                parts = [parts[0], *m.groups()] if m else parts
            if len(parts) != 3 or not parts[0] or not parts[1].isdigit():
                raise DatasetError(f"{printable(captions_file)}:{line_no}: expected 'image_name| comment_number| comment'")
            image, number, caption = parts
        else:
            head, tab, caption = line.partition("\t")
            image, _, number = head.strip().rpartition("#")
            if not tab or not image or not number.isdigit():
                raise DatasetError(f"{printable(captions_file)}:{line_no}: expected 'IMAGE#N<TAB>caption'")
        key, caption = names.key(image), caption.strip()
        # a repeated line (its number too), counted as the CSV readers count theirs; two annotators who wrote
        # the same sentence (two numbers) are two references
        line_id = (key, int(number), caption)
        if line_id in seen:
            names.repeats += 1
            continue
        seen.add(line_id)
        by_image.setdefault(key, []).append(line_id[1:])
    skipped: Counter = Counter()
    names.warn(captions_file, skipped)
    # captions in their numbered order, whatever the order of the lines
    records = [ImageRecord(name, name, os.path.abspath(images_dir / name),
                           clean_captions([c for _, c in sorted(caps)], skipped))
               for name, caps in by_image.items()]
    if not records:
        raise DatasetError(f"{printable(captions_file)} lists no images")
    warn_skipped(captions_file, skipped)
    return sorted(records, key=record_sort_key)


OUTSIDE_FLAG = "--allow-outside-images"
_LISTED_OUTSIDE = 20  # entries named one by one; the rest are counted


def inside_folder(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` resolves (symlinks, `..`) to somewhere under `folder` (resolved too)."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def _drop_outside(records: list[ImageRecord], real: dict[int, str], captions_file, images_dir) -> list[ImageRecord]:
    """Entries whose image resolves outside the images folder (an absolute path, `../`, a symlink out) are
    not read: one warning per entry (the first few, then a count) and a total. `real`: id(record) -> its
    resolved path."""
    folder = Path(os.path.realpath(images_dir))
    kept, outside = [], []
    for r in records:
        (kept if Path(real[id(r)]).is_relative_to(folder) else outside).append(r)
    for r in outside[:_LISTED_OUTSIDE]:
        warnings.warn(DatasetWarning(f"{printable(captions_file)}: image {printable(r.key)} resolves outside the "
                                     f"images folder {printable(images_dir)} ({printable(r.path)}): skipped"),
                      stacklevel=3)
    if outside:
        warnings.warn(DatasetWarning(f"{printable(captions_file)}: skipped {len(outside)} entries whose image is "
                                     f"outside {printable(images_dir)} (pass {OUTSIDE_FLAG} if your layout needs "
                                     f"them)"), stacklevel=3)
    return kept


def _drop_unusable_names(records: list[ImageRecord], captions_file) -> list[ImageRecord]:
    """Every key once (COCO ids 139 and "139" would share one: one photo's captions on another's features);
    no NUL byte in a name (no file system holds one: the cache could never be written)."""
    counts = Counter(r.key for r in records)
    twice = [k for k, n in counts.items() if n > 1]
    if twice:
        ids = [repr(r.image_id) for r in records if r.key == twice[0]]
        raise DatasetError(f"{printable(captions_file)}: image key {twice[0]!r} is given {counts[twice[0]]} times "
                           f"(as {', '.join(ids)}): make the image ids unique")
    bad = [r for r in records if "\x00" in r.path or "\x00" in r.key]
    for r in bad:
        warnings.warn(DatasetWarning(f"{printable(captions_file)}: image {r.key!r}: its name holds a NUL byte: "
                                     f"skipped"), stacklevel=3)
    bad_ids = {id(r) for r in bad}
    return [r for r in records if id(r) not in bad_ids]


def _merge_same_photo(records: list[ImageRecord], real: dict[int, str], captions_file,
                      images_dir) -> list[ImageRecord]:
    """One record per photo file of the images folder: entries whose paths resolve to the same file (a
    symlink beside its target, one file under two COCO ids) are merged into the first (in key order), their
    captions joined, so one photo never lands in two splits. Entries the file puts in different splits are
    a DatasetError. Entries outside the folder (read only with --allow-outside-images) are left as listed."""
    folder = Path(os.path.realpath(images_dir))
    first: dict[str, ImageRecord] = {}
    merged: list[tuple[ImageRecord, ImageRecord]] = []
    for r in records:  # sorted: the survivor is the same whatever the file's order
        if not Path(real[id(r)]).is_relative_to(folder):
            continue
        keep = first.setdefault(real[id(r)], r)
        if keep is r:
            continue
        if r.split != keep.split:
            raise DatasetError(f"{printable(captions_file)}: images {printable(keep.key)} and {printable(r.key)} "
                               f"are the same file ({printable(real[id(r)])}) but are put in {keep.split} and "
                               f"{r.split}: the test split would hold a training photo")
        have = set(keep.captions)
        keep.captions.extend(c for c in r.captions if c not in have)
        merged.append((keep, r))
    if not merged:
        return records
    keep, r = merged[0]
    warnings.warn(DatasetWarning(f"{printable(captions_file)}: {len(merged)} entries name a photo another entry "
                                 f"names too (e.g. {printable(r.key)} is {printable(keep.key)}, "
                                 f"{printable(real[id(r)])}): their captions are read as one image's"), stacklevel=3)
    gone = {id(r) for _, r in merged}
    return [r for r in records if id(r) not in gone]


def load_dataset(fmt: str, captions_file: str | os.PathLike, images_dir: str | os.PathLike,
                 limit: int | None = None, allow_outside_images: bool = False,
                 images_needed: bool = True) -> list[ImageRecord]:
    """Records of a dataset in stable order (by image id / name); the first `limit` if given.

    Entries whose image resolves outside `images_dir` are skipped with a warning unless
    `allow_outside_images` (readers that open no image, like training, pass it). Entries naming one
    photo file (`./a.jpg` and `a.jpg`, a link and its target) are read as one image. `images_needed`
    False: the folder may be gone (training from a cache made on another machine reads captions only)."""
    check_captions_file(captions_file)  # before anything opens it: a FIFO would hang the format check
    if fmt == "auto":
        fmt = guess_format(captions_file)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; choose from {', '.join(FORMATS)}")
    if images_needed and not Path(images_dir).is_dir():
        raise DatasetError(f"images folder not found: {printable(images_dir)}")

    loaders = {"coco": load_coco, "flickr8k": load_flickr8k, "karpathy": load_karpathy, "flickr30k": load_flickr30k,
               "folder": load_folder}
    records = _drop_unusable_names(loaders[fmt](captions_file, images_dir), captions_file)
    real = {id(r): os.path.realpath(r.path) for r in records}
    records = _merge_same_photo(records, real, captions_file, images_dir)
    if not allow_outside_images:
        records = _drop_outside(records, real, captions_file, images_dir)
        if not records:
            raise DatasetError(f"{printable(captions_file)}: no image lies inside the images folder "
                               f"{printable(images_dir)}")
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
        raise ValueError(f"bad split fractions val={val_frac} test={test_frac}: each at least 0, and together "
                         f"less than 1 (the rest trains)")
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


def official_split(records: list[ImageRecord]) -> dict[str, list[str]] | None:
    """The split the dataset file prescribes (Karpathy's), shaped as `split_keys` returns it; None if it has none."""
    if not records or any(r.split is None for r in records):
        return None
    split: dict[str, list[str]] = {"val": [], "test": [], "train": []}
    for r in records:
        split[r.split].append(r.key)
    if not split["train"]:
        raise DatasetError("the dataset file's own split puts none of these images in train")
    return {name: sorted(keys) for name, keys in split.items()}


def write_split(split: dict[str, list[str]], path: str | os.PathLike) -> None:
    atomic_write(path, json.dumps(split, indent=0), what="split")
