"""Caption dataset readers on the real files, split_keys, and malformed inputs."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.datasets import guess_format, load_coco, load_dataset, load_flickr8k, split_keys
from common.records import DatasetError


@pytest.fixture(scope="module")
def flickr_records(flickr_dir):
    return load_flickr8k(flickr_dir / "captions.txt", flickr_dir / "Images")


def _check_records(records, n, images_dir: Path):
    assert len(records) == n
    keys = [r.key for r in records]
    assert len(set(keys)) == n
    assert all(4 <= len(r.captions) <= 6 for r in records)
    assert all(isinstance(c, str) and c.strip() for r in records for c in r.captions)
    assert all(Path(r.path).is_absolute() and Path(r.path).parent == Path(os.path.abspath(images_dir)) for r in records)


def test_load_coco_real(coco_dir, coco_records):
    _check_records(coco_records, 2511, coco_dir / "images")
    assert sum(len(r.captions) for r in coco_records) == 12562
    ids = [r.image_id for r in coco_records]
    assert all(isinstance(i, int) for i in ids)
    assert ids == sorted(ids)  # numeric order, not text order
    assert [r.key for r in coco_records] == [str(i) for i in ids]
    first = coco_records[0]
    assert Path(first.path).name == f"{first.image_id:012d}.jpg" and Path(first.path).is_file()


def test_load_flickr8k_real(flickr_dir, flickr_records):
    _check_records(flickr_records, 5000, flickr_dir / "Images")
    assert sum(len(r.captions) for r in flickr_records) == 24994
    keys = [r.key for r in flickr_records]
    assert keys == sorted(keys)
    assert all(r.key == r.image_id == Path(r.path).name for r in flickr_records)
    assert all(Path(r.path).is_file() for r in flickr_records[:20])


def test_limit_takes_the_first_n(coco_dir, flickr_dir, coco_records, flickr_records):
    got = load_dataset("auto", coco_dir / "captions.json", coco_dir / "images", limit=7)
    assert [r.key for r in got] == [r.key for r in coco_records[:7]]
    assert [r.captions for r in got] == [r.captions for r in coco_records[:7]]
    got = load_dataset("flickr8k", flickr_dir / "captions.txt", flickr_dir / "Images", limit=3)
    assert [r.key for r in got] == [r.key for r in flickr_records[:3]]
    with pytest.raises(DatasetError):
        load_dataset("coco", coco_dir / "captions.json", coco_dir / "images", limit=0)


def test_guess_format():
    assert guess_format("x/captions.json") == "coco"
    assert guess_format("captions.TXT") == "flickr8k"
    assert guess_format("c.csv") == "flickr8k"
    with pytest.raises(DatasetError):
        guess_format("captions.xml")


def test_load_dataset_errors(tmp_path, coco_dir):
    with pytest.raises(DatasetError, match="images folder not found"):
        load_dataset("coco", coco_dir / "captions.json", tmp_path / "nope")
    with pytest.raises(DatasetError, match="captions file not found"):
        load_dataset("coco", tmp_path / "nope.json", coco_dir / "images")
    with pytest.raises(DatasetError, match="unknown dataset format"):
        load_dataset("voc", coco_dir / "captions.json", coco_dir / "images")


# --- malformed inputs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    "{ this is not json",
    "",
    "[1, 2, 3]",
    json.dumps({"images": 5, "annotations": []}),
    json.dumps({"info": {}}),  # no images at all
    json.dumps({"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1, "caption": "a dog"}]}),
    json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": "x"}]}),
])
def test_malformed_coco_raises(tmp_path, content):
    p = tmp_path / "captions.json"
    p.write_text(content)
    with pytest.raises(DatasetError) as ei:
        load_coco(p, tmp_path)
    assert str(p) in str(ei.value)


def test_binary_coco_file_raises_dataset_error(tmp_path):
    p = tmp_path / "captions.json"
    p.write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    with pytest.raises(DatasetError):
        load_coco(p, tmp_path)


def test_minimal_coco_file(tmp_path):
    p = tmp_path / "captions.json"
    p.write_text(json.dumps({
        "images": [{"id": 10, "file_name": "b.jpg"}, {"id": 9, "file_name": "a.jpg"}],
        "annotations": [{"id": 1, "image_id": 10, "caption": "A cat."}, {"id": 2, "image_id": 9, "caption": "A dog."},
                        {"id": 3, "image_id": 10, "caption": "A kitten."}]}))
    recs = load_coco(p, tmp_path / "imgs")
    assert [r.key for r in recs] == ["9", "10"]
    assert recs[1].captions == ["A cat.", "A kitten."]
    assert recs[0].path == os.path.abspath(tmp_path / "imgs" / "a.jpg")


@pytest.mark.parametrize("content", [
    "image,text\na.jpg,a dog\n",  # no caption column
    "a.jpg,a dog\n",  # no header
    "",  # empty
    "image,caption\n",  # header only: no images
    "image,caption\na.jpg\n",  # row without caption
    "image,caption\n,a dog\n",  # row without image
])
def test_malformed_flickr_raises(tmp_path, content):
    p = tmp_path / "captions.txt"
    p.write_text(content)
    with pytest.raises(DatasetError) as ei:
        load_flickr8k(p, tmp_path)
    assert str(p) in str(ei.value)


def test_non_utf8_flickr_raises(tmp_path):
    p = tmp_path / "captions.txt"
    p.write_bytes(b"image,caption\na.jpg,caf\xe9 \xff\n")
    with pytest.raises(DatasetError):
        load_flickr8k(p, tmp_path)


def test_minimal_flickr_file_groups_and_sorts(tmp_path):
    p = tmp_path / "captions.txt"
    p.write_text('image,caption\nb.jpg,"A dog, running ."\na.jpg,A cat\nb.jpg,Another dog\n')
    recs = load_flickr8k(p, tmp_path)
    assert [r.key for r in recs] == ["a.jpg", "b.jpg"]
    assert recs[1].captions == ["A dog, running .", "Another dog"]


def test_flickr_csv_names_with_a_caption_number_are_read_as_the_image(tmp_path):
    """A CSV made from Flickr8k.token.txt (`b.jpg#0,...`) made each caption an image of its own, none of them
    readable. By the name alone: training reads the file where the images may not be, and must find the keys
    stage 1 found."""
    from common.records import DatasetWarning

    p = tmp_path / "captions.txt"
    p.write_text("image,caption\nb.jpg#0,A dog\nb.jpg#1,Another dog\nc.jpg#1,A cat\n")
    for images in (tmp_path, tmp_path / "gone"):
        with pytest.warns(DatasetWarning, match=r"3 image names ended in a caption number .* line 2\)"):
            recs = load_flickr8k(p, images)
        assert [(r.key, r.captions) for r in recs] == [("b.jpg", ["A dog", "Another dog"]), ("c.jpg", ["A cat"])]


# --- split_keys --------------------------------------------------------------------------------------------

KEYS = [str(i) for i in range(1000)]


def test_split_deterministic_disjoint_and_complete():
    a = split_keys(KEYS, 0.1, 0.05, seed=0)
    b = split_keys(list(KEYS), 0.1, 0.05, seed=0)
    assert a == b
    sets = {k: set(v) for k, v in a.items()}
    assert set(a) == {"train", "val", "test"}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(KEYS)
    assert all(v == sorted(v) for v in a.values())
    assert (len(a["val"]), len(a["test"]), len(a["train"])) == (100, 50, 850)


def test_split_depends_on_seed_and_not_on_order():
    ref = split_keys(KEYS, 0.05, 0.05, seed=0)
    shuffled = list(KEYS)
    random.Random(1).shuffle(shuffled)
    assert split_keys(shuffled, 0.05, 0.05, seed=0) == ref
    assert split_keys(KEYS + KEYS[:10], 0.05, 0.05, seed=0) == ref  # duplicates do not matter
    assert split_keys(KEYS, 0.05, 0.05, seed=1)["val"] != ref["val"]


def test_split_zero_fractions():
    s = split_keys(KEYS[:10], 0.0, 0.0)
    assert s["val"] == [] and s["test"] == [] and sorted(s["train"]) == sorted(KEYS[:10])


@pytest.mark.parametrize("val,test", [(-0.1, 0.1), (1.0, 0.0), (0.6, 0.5), (0.5, 0.5)])
def test_split_bad_fractions(val, test):
    with pytest.raises(ValueError):
        split_keys(KEYS, val, test)


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=3, max_value=400), st.floats(min_value=0.0, max_value=0.3),
       st.floats(min_value=0.0, max_value=0.3), st.integers(min_value=0, max_value=3))
def test_split_properties(n, val, test, seed):
    keys = [f"img{i:04d}.jpg" for i in range(n)]
    s = split_keys(keys, val, test, seed)
    sizes = {k: len(v) for k, v in s.items()}
    assert sum(sizes.values()) == n
    assert set().union(*map(set, s.values())) == set(keys)
    assert sizes["train"] >= 1
    for name, frac in (("val", val), ("test", test)):
        if frac > 0:
            assert sizes[name] >= 1
            assert abs(sizes[name] - n * frac) <= 1  # rounding, or the at-least-one rule
        else:
            assert sizes[name] == 0
    rev = split_keys(keys[::-1], val, test, seed)
    assert rev == s


@pytest.mark.parametrize("val,test", [(0.9, 0.05), (0.5, 0.4)])
def test_split_every_part_nonempty_for_large_fractions(val, test):
    s = split_keys(["a", "b", "c"], val, test)
    assert all(len(v) >= 1 for v in s.values()), s
