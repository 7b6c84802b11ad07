"""Karpathy split files and Flickr30k caption files, written here from the real shared photos and captions."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from common.datasets import guess_format, load_dataset, load_flickr8k, load_karpathy, official_split
from common.records import DatasetError, DatasetWarning

SPLIT_CYCLE = ("train", "val", "train", "test", "restval", "train")  # 30 images: 15 train, 5 restval, 5+5


def _karpathy_coco(records, path: Path, splits) -> Path:
    """A dataset_coco.json for the given COCO records, images under `images/` (as filepath), shuffled order."""
    entries = [{"filepath": "images", "filename": Path(r.path).name, "imgid": i, "split": split,
                "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": i, "sentid": 10 * i + j}
                              for j, c in enumerate(r.captions)],
                "sentids": [10 * i + j for j in range(len(r.captions))], "cocoid": r.image_id}
               for i, (r, split) in enumerate(zip(records, splits))]
    random.Random(0).shuffle(entries)
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


@pytest.fixture(scope="module")
def coco30(coco_records):
    return coco_records[:30]


@pytest.fixture
def coco30_file(tmp_path, coco30):
    return _karpathy_coco(coco30, tmp_path / "dataset_coco.json", [SPLIT_CYCLE[i % 6] for i in range(30)])


def test_coco_karpathy_reader_matches_the_coco_reader(coco_dir, coco30, coco30_file):
    assert guess_format(coco30_file) == "karpathy"
    recs = load_dataset("auto", coco30_file, coco_dir)
    assert [r.key for r in recs] == [r.key for r in coco30]  # same keys (COCO ids), same stable order
    assert [r.image_id for r in recs] == [r.image_id for r in coco30]
    assert [r.captions for r in recs] == [r.captions for r in coco30]
    assert [r.path for r in recs] == [r.path for r in coco30] and all(Path(r.path).is_file() for r in recs)
    assert [r.key for r in load_dataset("karpathy", coco30_file, coco_dir, limit=4)] == [r.key for r in coco30[:4]]


def test_official_split_respected_restval_trains(coco_dir, coco30, coco30_file):
    recs = load_karpathy(coco30_file, coco_dir)
    want = {name: sorted(r.key for i, r in enumerate(coco30) if SPLIT_CYCLE[i % 6] in names)
            for name, names in (("train", ("train", "restval")), ("val", ("val",)), ("test", ("test",)))}
    split = official_split(recs)
    assert split == want
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (20, 5, 5)
    assert official_split(load_dataset("coco", coco_dir / "captions.json", coco_dir / "images", limit=5)) is None


def test_training_uses_the_official_split(tmp_path, coco_dir, coco_records, shared_cache):
    from common.feature_cache import load_cache
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    n = len(load_cache(shared_cache).rows_by_key())
    recs = coco_records[:n]
    splits = ["val" if i % 8 == 1 else "test" if i % 8 == 2 else "restval" if i % 8 == 3 else "train"
              for i in range(n)]
    file = _karpathy_coco(recs, tmp_path / "dataset_coco.json", splits)
    cfg = TrainConfig(features=str(shared_cache), out=str(tmp_path / "run"), captions=str(file),
                      images=str(coco_dir), dataset="karpathy", epochs=1, dry_run=True, progress=False,
                      device="cpu", vocab_threshold=1)
    train(cfg)
    got = json.loads((tmp_path / "run/split.json").read_text())
    assert got["val"] == sorted(r.key for r, s in zip(recs, splits) if s == "val")
    assert got["test"] == sorted(r.key for r, s in zip(recs, splits) if s == "test")
    assert got["train"] == sorted(r.key for r, s in zip(recs, splits) if s in ("train", "restval"))


def test_flickr_karpathy_file(tmp_path, flickr_dir):
    f8k = load_flickr8k(flickr_dir / "captions.txt", flickr_dir / "Images")[:12]
    entries = [{"filename": r.key, "imgid": i, "split": ("train", "val", "test")[i % 3],
                "sentences": [{"raw": c, "tokens": c.split()} for c in r.captions]} for i, r in enumerate(f8k)]
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr8k"}))
    recs = load_dataset("auto", path, flickr_dir / "Images")
    assert [(r.key, r.image_id, r.path, r.captions) for r in recs] == \
        [(r.key, r.image_id, r.path, r.captions) for r in f8k]
    assert [len(v) for v in official_split(recs).values()] == [4, 4, 4]


@pytest.mark.parametrize("entry, match", [
    ({"filename": "a.jpg", "split": "dev", "sentences": []}, "malformed image entry #0"),
    ({"filename": "a.jpg", "split": "train"}, "malformed image entry #0"),
    ({"split": "train", "sentences": []}, "malformed image entry #0"),
    ({"filename": "a.jpg", "split": "train", "sentences": [], "cocoid": "x"}, "malformed image entry #0"),
    ("not an object", "malformed image entry #0"),
])
def test_malformed_karpathy_entries(tmp_path, entry, match):
    path = tmp_path / "dataset_x.json"
    path.write_text(json.dumps({"images": [entry]}))
    with pytest.raises(DatasetError, match=match):
        load_karpathy(path, tmp_path)


def test_malformed_karpathy_files(tmp_path, coco_dir):
    path = tmp_path / "d.json"
    path.write_text('{"images": {}}')
    with pytest.raises(DatasetError, match="not a Karpathy split file"):
        load_karpathy(path, tmp_path)
    dup = {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "a cat"}]}
    path.write_text(json.dumps({"images": [dup, dup]}))
    with pytest.raises(DatasetError, match="listed twice"):
        load_karpathy(path, tmp_path)
    with pytest.raises(DatasetError, match="malformed image entry"):  # a COCO file read as Karpathy's
        load_karpathy(coco_dir / "captions.json", coco_dir)
    path.write_text(json.dumps({"images": [{**dup, "sentences": [{"raw": "a cat"}, {"raw": " . "}, {"raw": 3}]}]}))
    with pytest.warns(DatasetWarning, match="skipped"):  # unusable captions go, the image stays
        assert load_karpathy(path, tmp_path)[0].captions == ["a cat"]
    path.write_text(json.dumps({"images": [{**dup, "split": "test"}]}))
    with pytest.raises(DatasetError, match="none of these images in train"):
        official_split(load_karpathy(path, tmp_path))


# --- Flickr30k caption files ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def f8k10(flickr_dir):
    return load_flickr8k(flickr_dir / "captions.txt", flickr_dir / "Images")[:10]


def _same(recs, ref):
    assert [r.key for r in recs] == [r.key for r in ref]
    assert [r.path for r in recs] == [r.path for r in ref]
    assert [r.captions for r in recs] == [[c.strip() for c in r.captions] for r in ref]
    assert all(r.split is None for r in recs)


def test_flickr30k_token_file(tmp_path, flickr_dir, f8k10):
    lines = [f"{r.key}#{i}\t{c}" for r in f8k10 for i, c in enumerate(r.captions)]
    random.Random(1).shuffle(lines)  # the order of the lines does not matter: captions come back by number
    for name in ("results_20130124.token", "Flickr8k.token.txt"):
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n")
        assert guess_format(path) == "flickr30k"
        _same(load_dataset("auto", path, flickr_dir / "Images"), f8k10)
    path.write_text(f"{f8k10[0].key}#0\tfine\nno tab here\n")
    with pytest.raises(DatasetError, match=r":2: expected 'IMAGE#N<TAB>caption'"):
        load_dataset("flickr30k", path, flickr_dir / "Images")


def test_flickr30k_token_lines_break_at_newlines_only_and_a_repeated_line_counts_once(tmp_path, flickr_dir, f8k10):
    """str.splitlines also broke at U+2028, NEL and form feed inside a caption (then ':2: expected ...' for line
    1); a repeated line was kept twice, where the CSV readers skip it with a warning."""
    a, b = f8k10[0].key, f8k10[1].key
    path = tmp_path / "results_20130124.token"
    path.write_bytes(f"{a}#0\tA dog\u2028runs\x85far.\r\n{a}#1\tA dog\fsits.\n{b}#0\tA car.\n{b}#0\tA car.\n"
                     .encode())
    with pytest.warns(DatasetWarning, match="skipped 1 repeated rows"):
        recs = load_dataset("flickr30k", path, flickr_dir / "Images")
    assert {r.key: r.captions for r in recs} == {a: ["A dog\u2028runs\x85far.", "A dog\fsits."], b: ["A car."]}


def test_flickr30k_kaggle_csv(tmp_path, flickr_dir, f8k10):
    rows = [f"{r.key}| {i}| {c}" for r in f8k10 for i, c in enumerate(r.captions)]
    rows[7] = rows[7].replace("| 2|", "| 2", 1)  # Kaggle's copy has such a row: the second '|' is missing
    path = tmp_path / "results.csv"
    path.write_text("image_name| comment_number| comment\n" + "\n".join(rows) + "\n")
    assert guess_format(path) == "flickr30k"
    _same(load_dataset("auto", path, flickr_dir / "Images"), f8k10)
    path.write_text("image_name| comment_number| comment\njust one field\n")
    with pytest.raises(DatasetError, match=":2: expected"):
        load_dataset("flickr30k", path, flickr_dir / "Images")


def test_guess_format_sniffs_without_breaking_old_cases(coco_dir, flickr_dir):
    assert guess_format(coco_dir / "captions.json") == "coco"
    assert guess_format(flickr_dir / "captions.txt") == "flickr8k"
    assert guess_format("missing/dataset_coco.json") == "coco"  # unreadable: the reader will say it is missing
    assert guess_format("missing/results_20130124.token") == "flickr30k"


def test_cli_choices_offer_the_new_formats():
    from stage1_extract.__main__ import main as extract_main
    from stage2_decoder.evaluate import main as evaluate_main
    from stage2_decoder.train import main as train_main

    for cmd in (extract_main, train_main, evaluate_main):
        choices = next(p for p in cmd.params if p.name == "dataset").type.choices
        assert {"coco", "flickr8k", "karpathy", "flickr30k"} <= set(choices), cmd.name
