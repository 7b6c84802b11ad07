"""Round three of the reliability cases on the data side (tests/RELIABILITY.md): captions files that hang or
take quadratic time, one photo under several names, token caches that lie or inflate, lock files and
outputs that reach other files, and file names that would drive a terminal."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import common.datasets as datasets_mod
import common.folder_dataset as folder_mod
from common.datasets import load_dataset, split_keys
from common.folder_dataset import load_folder
from common.lock import LockFileError, hold
from common.paths import OutputInsideImages, refuse_inside
from common.records import DatasetError, DatasetWarning
from common.text import printable
from common.tokenizer import TOKENIZERS, tokenize

REPO = Path(__file__).resolve().parents[1]


# --- 1. hangs and quadratic time ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["x.json", "x.csv", "x.jsonl"])
def test_a_fifo_as_captions_file_is_one_error_not_a_hang(tmp_path, name):
    """The format check used to open the FIFO and wait for a writer forever: run in a child with a timeout."""
    fifo = tmp_path / name
    os.mkfifo(fifo)
    (tmp_path / "images").mkdir()
    code = ("import sys; from common.datasets import load_dataset, DatasetError\n"
            f"try: load_dataset('auto', {str(fifo)!r}, {str(tmp_path / 'images')!r})\n"
            "except DatasetError as e: print(e); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 3, proc.stderr
    assert "is a FIFO, device or socket, not a regular file" in proc.stdout


class _Counted(str):
    """A caption that counts how often it is compared for equality: a per-image list scanned for repeats
    compares each new caption with every earlier one (n^2/2 for n rows of one photo); a dict does not."""
    compared = 0

    def __eq__(self, other):
        type(self).compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


N_ROWS = 3000  # 4.5 million comparisons for a list: far above the bound, yet the test stays fast


def test_own_photos_reader_is_linear_in_captions_per_image(tmp_path, monkeypatch):
    """Counted, not timed: comparisons per row stay bounded (a timing test would depend on the machine)."""
    rows = [(i + 2, {"image": "a.jpg", "caption": _Counted(f"a dog number {i}")}) for i in range(N_ROWS)]
    monkeypatch.setattr(folder_mod, "_rows", lambda f: iter(rows))
    f = tmp_path / "c.csv"
    f.write_text("image,caption\n")
    _Counted.compared = 0
    (rec,) = load_folder(f, tmp_path)
    assert len(rec.captions) == N_ROWS
    assert _Counted.compared <= 4 * N_ROWS


def test_flickr8k_reader_is_linear_in_captions_per_image(tmp_path, monkeypatch):
    real = csv.DictReader

    class CountingReader(real):
        def __next__(self):
            row = super().__next__()
            row["caption"] = _Counted(row["caption"])
            return row

    monkeypatch.setattr(datasets_mod.csv, "DictReader", CountingReader)
    f = tmp_path / "captions.txt"
    f.write_text("image,caption\n" + "".join(f"a.jpg,a dog number {i}\n" for i in range(N_ROWS)))
    _Counted.compared = 0
    (rec,) = datasets_mod.load_flickr8k(f, tmp_path)
    assert len(rec.captions) == N_ROWS
    assert _Counted.compared <= 4 * N_ROWS


# --- 2. data integrity ------------------------------------------------------------------------------------------

def test_one_photo_under_three_names_is_one_image_in_one_split(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for n in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        (images / n).write_bytes(b"photo " + n.encode())
    f = tmp_path / "c.csv"
    f.write_text("image,caption\na.jpg,a dog\n./a.jpg,a brown dog\nsub/../a.jpg,a dog on grass\n"
                 "b.jpg,a cat\nc.jpg,a cow\nd.jpg,a hen\n")
    with pytest.warns(DatasetWarning, match=r"2 rows name an image another row names differently"):
        recs = load_dataset("folder", f, images)
    keys = [r.key for r in recs]
    assert keys == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert recs[0].captions == ["a dog", "a brown dog", "a dog on grass"]
    split = split_keys(keys, 0.3, 0.3)
    assert sum("a.jpg" in part for part in split.values()) == 1


def test_an_image_named_two_ways_in_two_splits_is_refused(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("image,caption,split\na.jpg,a dog,train\n./a.jpg,a dog,test\n")
    with pytest.raises(DatasetError, match=r"c\.csv:3: a\.jpg is put in test, an earlier row puts it in train"):
        load_folder(f, tmp_path)


def test_a_symlink_beside_its_target_is_one_image(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"photo")
    (images / "b.jpg").write_bytes(b"other photo")
    (images / "alias.jpg").symlink_to("a.jpg")
    f = tmp_path / "c.csv"
    f.write_text("image,caption\na.jpg,a dog\nalias.jpg,a brown dog\nb.jpg,a cat\n")
    with pytest.warns(DatasetWarning, match=r"1 entries name a photo another entry names too"):
        recs = load_dataset("folder", f, images)
    assert [(r.key, r.captions) for r in recs] == [("a.jpg", ["a dog", "a brown dog"]), ("b.jpg", ["a cat"])]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_bidi_and_control_characters_never_stay_inside_words(name):
    text = "a d\u202eog\u200b and a c\u2066at\u2069 \x1b[31mred\ufeff"
    tokens = tokenize(text, name)
    assert tokens == tokenize("a dog and a cat [31mred", name)
    assert not any(ch in t for t in tokens for ch in "\u202e\u200b\u2066\u2069\x1b\ufeff")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab 1.,'\"-\u00e9\u0301\u202e\u200c\u3001\u00c5\x1b\t()!?nt")),
               max_size=30),
       st.sampled_from(TOKENIZERS))
def test_the_token_cache_check_accepts_whatever_the_tokenizer_makes(text, name):
    """`tokens_fit` must never refuse real tokens (it would warn on a good cache): every token of a caption
    occurs, in order, in its normalised text."""
    from common.token_cache import tokens_fit

    assert tokens_fit([tokenize(text, name)], [text], name)


@pytest.fixture
def token_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPCACHE_TOKEN_CACHE", str(tmp_path / "tokens"))
    images = tmp_path / "images"
    images.mkdir()
    f = tmp_path / "c.csv"
    f.write_text("image,caption\n" + "".join(f"{n}.jpg,a {w} on the grass\n"
                                             for n, w in enumerate(["dog", "cat", "cow", "hen"])))
    return f, load_dataset("folder", f, images, allow_outside_images=True)


def test_a_planted_token_cache_entry_with_the_right_digest_is_not_believed(token_env, capsys):
    from common.token_cache import cache_file, tokenize_records

    f, records = token_env
    want = tokenize_records(f, records)
    path = cache_file(f)
    with np.load(path, allow_pickle=False) as z:
        arrays = dict(z)
    words = json.loads(str(arrays["words"]))
    arrays["words"] = np.array(json.dumps(["planted" + w for w in words]))  # same shape, same lengths, other words
    with open(path, "wb") as out:
        np.savez(out, **arrays)
    assert tokenize_records(f, records) == want
    assert "4 images' cached tokens do not match their captions" in capsys.readouterr().err
    assert tokenize_records(f, records) == want and capsys.readouterr().err == ""  # rewritten, good again


def test_the_token_cache_key_covers_python_unicode_and_this_module(monkeypatch):
    import unicodedata

    import common.token_cache as tc

    before = tc.tokenizer_version("nltk")
    monkeypatch.setattr(unicodedata, "unidata_version", "0.0.1")
    assert tc.tokenizer_version("nltk") != before


def test_a_token_cache_entry_that_would_inflate_past_its_captions_is_ignored_and_rebuilt(token_env, capsys):
    """A few kB of zip that declares MBs: refused from the zip directory before anything is inflated."""
    from common.token_cache import cache_file, tokenize_records

    f, records = token_env
    want = tokenize_records(f, records)
    path = cache_file(f)
    with np.load(path, allow_pickle=False) as z:
        arrays = dict(z)
    arrays["ids"] = np.zeros(4 * 2**20, dtype=np.int32)  # 16 MiB of zeros, a few kB compressed
    with open(path, "wb") as out:
        np.savez_compressed(out, **arrays)
    assert path.stat().st_size < 100_000
    assert tokenize_records(f, records) == want
    err = capsys.readouterr().err
    assert "ignored (declares 16,7" in err and "tokenising again" in err
    tokenize_records(f, records)
    assert capsys.readouterr().err == ""


# --- 3. outside reads and writes -------------------------------------------------------------------------------

def test_a_lock_file_hard_linked_to_another_file_is_refused_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    os.link(victim, run / ".lock")
    with pytest.raises(LockFileError, match=r"has 2 hard links"):
        with hold(run / ".lock", "run folder"):
            pass
    assert victim.read_text() == "precious\n"


def test_a_fifo_lock_file_is_one_clear_error(tmp_path):
    os.mkfifo(tmp_path / ".lock")
    with pytest.raises(LockFileError, match=r"is not a regular file \(a FIFO"):
        with hold(tmp_path / ".lock", "run folder"):
            pass


def test_an_output_reaching_the_images_folder_through_a_symlink_is_refused(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "link").symlink_to(images)
    with pytest.raises(OutputInsideImages, match=r"is inside the images folder .* \(it resolves to"):
        refuse_inside(tmp_path / "link" / "cache.h5", images)
    assert refuse_inside(tmp_path / "elsewhere.h5", images) == tmp_path / "elsewhere.h5"


def test_stage1_out_through_a_symlink_into_the_images_folder_is_refused(tmp_path, coco_dir):
    from stage1_extract.extract import ExtractConfig, plan

    (tmp_path / "link").symlink_to(coco_dir / "images")
    cfg = ExtractConfig(images=str(coco_dir / "images"), captions=str(coco_dir / "captions.json"),
                        out=str(tmp_path / "link" / "cache.h5"), weights="none", limit=2)
    with pytest.raises(ValueError, match="inside the images folder"):
        plan(cfg)


def test_a_sweep_inside_the_images_folder_writes_nothing(tmp_path, shared_cache):
    from common.feature_cache import read_meta
    from stage2_decoder.sweeps.sweep import SweepConfig, run_sweep

    images = Path(read_meta(shared_cache).images_dir)
    before = sorted(p.name for p in images.iterdir())
    (tmp_path / "link").symlink_to(images)
    for out in (images / "sweep", tmp_path / "link" / "sweep"):
        with pytest.raises(OutputInsideImages):
            run_sweep(SweepConfig(features=str(shared_cache), out=str(out), grid={"lr": [1e-3, 2e-3]},
                                  progress=False, plot=False))
    assert sorted(p.name for p in images.iterdir()) == before


# --- 5. tracebacks --------------------------------------------------------------------------------------------

def test_deeply_nested_coco_captions_are_one_error(tmp_path):
    f = tmp_path / "captions.json"
    f.write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DatasetError, match="nested deeper than"):
        load_dataset("coco", f, tmp_path)


def test_a_deeply_nested_jsonl_row_is_one_error_with_its_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"image": "a.jpg", "caption": "a dog"}\n{"image": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DatasetError, match=r"c\.jsonl:2: .*nested deeper than"):
        load_folder(f, tmp_path)


# --- 6. names that drive a terminal ---------------------------------------------------------------------------

def test_printable_escapes_control_and_bidi_characters_only():
    assert printable("photos/a dog.jpg") == "photos/a dog.jpg"
    assert printable("caf\u00e9.jpg") == "caf\u00e9.jpg"
    assert printable("a\nb.jpg") == "'a\\nb.jpg'"
    assert printable("\x1b[2Jx.jpg") == "'\\x1b[2Jx.jpg'"
    assert printable("gpj\u202e.exe") == "'gpj\\u202e.exe'"


def test_dataset_warnings_escape_file_names(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "b.jpg").write_bytes(b"photo")
    f = tmp_path / "c.jsonl"
    f.write_text('{"image": "../x\\n\\u001b[2J.jpg", "caption": "a dog"}\n{"image": "b.jpg", "caption": "a cat"}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_dataset("folder", f, images)
    said = [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)]
    assert said and all("\x1b" not in s and "\n" not in s for s in said)
    assert any("\\x1b[2J" in s for s in said)


def test_caption_output_escapes_the_path():
    from stage2_decoder.caption import text_lines

    line, = text_lines({"image": "a\tb\n\x1b[31m.jpg", "caption": "a dog", "captions": [{"caption": "a dog",
                                                                                          "score": 0.0}]})
    assert "\n" not in line and "\x1b" not in line and line.count("\t") == 1
    assert line.endswith("\ta dog")


def test_a_deeply_nested_or_fifo_vocabulary_is_one_error(tmp_path):
    from common.vocab import Vocabulary, VocabError

    f = tmp_path / "vocab.json"
    f.write_text('{"words": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(VocabError, match="nested deeper than"):
        Vocabulary.load(f)
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(VocabError, match="not a regular file"):
        Vocabulary.load(tmp_path / "fifo.json")


def test_train_out_through_a_symlink_into_the_images_folder_is_refused(tmp_path, shared_cache):
    from common.feature_cache import read_meta
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.data import load_train_data

    images = Path(read_meta(shared_cache).images_dir)
    (tmp_path / "link").symlink_to(images)
    with pytest.raises(OutputInsideImages, match="write the run elsewhere"):
        load_train_data(TrainConfig(features=str(shared_cache), out=str(tmp_path / "link" / "run"), progress=False),
                        "cpu")
    assert not (images / "run").exists()
