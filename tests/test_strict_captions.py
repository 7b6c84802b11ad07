"""Captions files never lose data silently: a caption swallowing the rows after an unmatched quote, a
column the header does not name, NUL bytes in names, COCO ids 139 and "139", and a cache with a key
twice are each a `warning:` (line number, what was done) or an `error:`; columns are read by name."""
from __future__ import annotations

import json
import shutil
import warnings

import h5py
import numpy as np
import pytest

from common.datasets import load_dataset
from common.records import DatasetError, DatasetWarning


def _flickr(tmp_path, text: str):
    (tmp_path / "img").mkdir(exist_ok=True)
    p = tmp_path / "captions.txt"
    p.write_text(text)
    return p


def _load(path, images):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = load_dataset("flickr8k", path, images)
    return recs, [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)]


def test_an_unmatched_quote_is_an_error_naming_its_line(tmp_path):
    rows = "".join(f"{i}.jpg,A dog number {i} runs on the grass\n" for i in range(10))
    p = _flickr(tmp_path, "image,caption\n" + rows.replace("3.jpg,A", '3.jpg,"A', 1))
    with pytest.raises(DatasetError, match=r"captions\.txt:5: this caption runs to line 11 .*quote"):
        load_dataset("flickr8k", p, tmp_path / "img")


def test_an_absurdly_long_caption_is_an_error(tmp_path):
    """Said of one line, not "a quote opened here is never closed?": one line cannot have swallowed others."""
    p = _flickr(tmp_path, "image,caption\na.jpg,ok caption\nb.jpg," + "word " * 400 + "\n")
    with pytest.raises(DatasetError, match=r":3: this caption is one line of 2000 characters, over the 1,000") as e:
        load_dataset("flickr8k", p, tmp_path / "img")
    assert "quote" not in str(e.value)


def test_an_extra_column_on_every_row_is_refused_not_glued(tmp_path):
    p = _flickr(tmp_path, "image,caption\n" + "".join(f"{i}.jpg,a dog runs,en\n" for i in range(6)))
    with pytest.raises(DatasetError, match=r"6 of 6 rows have more fields than the header .*line 2"):
        load_dataset("flickr8k", p, tmp_path / "img")


def test_a_few_unquoted_commas_are_joined_back_with_a_warning_naming_a_line(tmp_path):
    p = _flickr(tmp_path, "image,caption\na.jpg,a dog runs\nb.jpg,a dog, running\nc.jpg,a cat sits\n")
    recs, said = _load(p, tmp_path / "img")
    assert [r.captions for r in recs] == [["a dog runs"], ["a dog, running"], ["a cat sits"]]
    assert any("unquoted commas" in s and "line 3" in s for s in said)


def test_a_reordered_header_is_read_by_name(tmp_path):
    p = _flickr(tmp_path, "caption,image\na dog runs,a.jpg\na cat sits,b.jpg\n")
    recs, _ = _load(p, tmp_path / "img")
    assert [(r.key, r.captions) for r in recs] == [("a.jpg", ["a dog runs"]), ("b.jpg", ["a cat sits"])]


def test_a_nul_byte_in_a_file_name_is_skipped_with_its_line(tmp_path):
    p = _flickr(tmp_path, "image,caption\na.jpg,a dog runs\nb\x00.jpg,a cat sits\nc.jpg,a bird\n")
    recs, said = _load(p, tmp_path / "img")
    assert [r.key for r in recs] == ["a.jpg", "c.jpg"]
    assert any("NUL byte" in s and "line 3" in s for s in said)


def test_a_nul_byte_in_a_coco_file_name_is_skipped(tmp_path):
    (tmp_path / "img").mkdir()
    data = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b\x00.jpg"}],
            "annotations": [{"id": 1, "image_id": 1, "caption": "a dog"}, {"id": 2, "image_id": 2, "caption": "a cat"}]}
    (tmp_path / "c.json").write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = load_dataset("coco", tmp_path / "c.json", tmp_path / "img")
    assert [r.key for r in recs] == ["1"] and any("NUL byte" in str(w.message) for w in caught)


def test_coco_ids_139_and_quoted_139_are_a_duplicate_key(tmp_path):
    (tmp_path / "img").mkdir()
    data = {"images": [{"id": 139, "file_name": "a.jpg"}, {"id": "139", "file_name": "b.jpg"}],
            "annotations": [{"id": 1, "image_id": 139, "caption": "a dog"}, {"id": 2, "image_id": "139",
                                                                           "caption": "a cat"}]}
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"image key '139' is given 2 times \(as 139, '139'\)"):
        load_dataset("coco", tmp_path / "c.json", tmp_path / "img")


def test_a_cache_with_a_key_twice_is_refused_when_loaded(shared_cache, tmp_path):
    from common.feature_cache import CacheError, load_cache

    bad = tmp_path / "dup.h5"
    shutil.copy(shared_cache, bad)
    with h5py.File(bad, "r+") as f:
        keys = f["keys"][:]
        keys[1] = keys[0]
        f["keys"][:] = keys
    with pytest.raises(CacheError, match=r"names more than one row"):
        load_cache(bad)
    assert len(set(load_cache(shared_cache).keys)) == len(np.asarray(load_cache(shared_cache).keys))
