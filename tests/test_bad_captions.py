"""Bad captions files (Bad input: captions): the loaders and the CLIs on top of them.

Policy (documented in common/datasets.py and tests/RELIABILITY.md):
- a file that is not the stated format (not JSON / not UTF-8, the wrong shape, a CSV header
  without `image,caption`, an image id given twice with different files) is a DatasetError:
  one `error:` line naming the file, exit 1, nothing written;
- unusable entries in a usable file are skipped, and one `warning:` line per file says how
  many and why: empty or punctuation-only captions, captions that are not text, annotations of
  image ids the file does not list, an annotation id / identical image entry / CSV row given
  twice, CSV rows without an image or caption;
- odd but valid text is kept as written: very long captions (training truncates them to
  --max-caption-len tokens), non-ASCII and emoji (vocabulary files are UTF-8), quoted commas
  in a CSV (and unquoted ones: the extra fields are joined back into the caption).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from common.datasets import load_coco, load_dataset, load_flickr8k, split_keys
from common.records import DatasetError, DatasetWarning
from common.tokenizer import tokenize
from reliability_helpers import TINY, no_traceback, one_error_line


def _coco(path: Path, images, annotations) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": annotations}, ensure_ascii=False),
                    encoding="utf-8")
    return path


def _imgs(*ids):
    return [{"id": i, "file_name": f"{i}.jpg"} for i in ids]


def _anns(*pairs):
    return [{"id": n + 1, "image_id": i, "caption": c} for n, (i, c) in enumerate(pairs)]


def _load_quietly(loader, *args):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        recs = loader(*args)
    return {r.key: r for r in recs}, [str(x.message) for x in w if issubclass(x.category, DatasetWarning)]


# --- structure errors: one DatasetError naming the file ----------------------------------------------------

_COCO_SHAPES = [
    '{"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": [',  # malformed JSON
    "null",
    '[{"id": 1, "file_name": "1.jpg"}]',  # a list at the top
    '{"images": {"1": "1.jpg"}, "annotations": []}',  # images as a dict
    '{"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": "a dog"}',
    '{"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": [{"id": 1, "caption": "a dog"}]}',  # no image_id
    '{"images": [{"file_name": "1.jpg"}], "annotations": []}',  # image without id
    '{"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 1, "file_name": "2.jpg"}], "annotations": []}',
    '{"images": [], "annotations": []}',
]
_CSV_SHAPES = [  # more in test_datasets.py
    "image\n1.jpg\n",  # the caption column is missing
    "image;caption\n1.jpg;a dog\n",  # another delimiter
    "image,caption\n1.jpg\n,a cat\n",  # rows, but no usable one
]


@pytest.mark.parametrize("loader, content", [(load_coco, c) for c in _COCO_SHAPES] +
                         [(load_flickr8k, c) for c in _CSV_SHAPES])
def test_file_of_the_wrong_shape_is_a_dataset_error(tmp_path, loader, content):
    p = tmp_path / ("captions.json" if loader is load_coco else "captions.txt")
    p.write_text(content)
    with pytest.raises(DatasetError) as ei:
        loader(p, tmp_path)
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)


# --- entries skipped with one warning -----------------------------------------------------------------------

def test_coco_annotations_of_unknown_image_ids_are_skipped_with_a_warning(tmp_path):
    p = _coco(tmp_path / "c.json", _imgs(1, 2), _anns((1, "a dog"), (999, "a ghost"), (2, "a cat"), (999, "boo")))
    recs, warned = _load_quietly(load_coco, p, tmp_path)
    assert sorted(recs) == ["1", "2"] and recs["1"].captions == ["a dog"] and recs["2"].captions == ["a cat"]
    assert len(warned) == 1 and "2 annotations of image ids not in 'images' (e.g. 999)" in warned[0]
    assert str(p) in warned[0]


@pytest.mark.parametrize("fmt", ["coco", "flickr8k"])
def test_empty_and_punctuation_only_captions_are_dropped_with_a_warning(tmp_path, fmt):
    caps = [(1, "A dog runs."), (1, ""), (1, "   "), (1, "..."), (1, "?! --"), (2, "“…”"), (2, "!")]
    if fmt == "coco":
        p = _coco(tmp_path / "c.json", _imgs(1, 2), _anns(*caps))
        recs, warned = _load_quietly(load_coco, p, tmp_path)
        one, two = recs["1"], recs["2"]
    else:
        p = tmp_path / "c.txt"
        p.write_text("image,caption\n" + "".join(f'{i}.jpg,"{c}"\n' for i, c in caps), encoding="utf-8")
        recs, warned = _load_quietly(load_flickr8k, p, tmp_path)
        one, two = recs["1.jpg"], recs["2.jpg"]
    assert one.captions == ["A dog runs."]
    assert two.captions == []  # the image stays (stage 1 still extracts it), without references
    assert len(warned) == 1 and "6 captions without a word" in warned[0]


def test_coco_repeated_entries_are_skipped_with_a_warning(tmp_path):
    anns = _anns((1, "a dog"), (1, "a brown dog"))
    anns.append(dict(anns[0]))  # the same annotation (same id) twice
    anns.append({"id": 50, "image_id": 1, "caption": "a dog"})  # another annotator, same words: kept
    p = _coco(tmp_path / "c.json", _imgs(1, 2) + _imgs(2), anns)
    recs, warned = _load_quietly(load_coco, p, tmp_path)
    assert sorted(recs) == ["1", "2"]
    assert recs["1"].captions == ["a dog", "a brown dog", "a dog"]
    assert len(warned) == 1
    assert "1 repeated image entries" in warned[0] and "1 repeated annotations (same id)" in warned[0]


def test_coco_non_text_captions_are_skipped(tmp_path):
    anns = [{"id": 1, "image_id": 1, "caption": 42}, {"id": 2, "image_id": 1},
            {"id": 3, "image_id": 1, "caption": "a dog"}]
    recs, warned = _load_quietly(load_coco, _coco(tmp_path / "c.json", _imgs(1), anns), tmp_path)
    assert recs["1"].captions == ["a dog"] and "2 captions that are not text" in warned[0]


def test_coco_captions_with_a_lone_surrogate_are_skipped(tmp_path):
    # JSON's "\ud83d" alone is no Unicode text: it trained, then `evaluate` failed writing its references
    p = tmp_path / "c.json"
    p.write_text('{"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": [{"id": 1, "image_id": 1, '
                 '"caption": "a dog \\ud83d"}, {"id": 2, "image_id": 1, "caption": "a dog \\ud83d\\udc36"}]}',
                 encoding="utf-8")
    recs, warned = _load_quietly(load_coco, p, tmp_path)
    assert recs["1"].captions == ["a dog \U0001f436"]  # a whole pair is an emoji, and stays
    assert len(warned) == 1 and "1 captions with a lone UTF-16 surrogate" in warned[0]


def test_csv_repeated_rows_and_rows_without_caption_are_skipped(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("image,caption\na.jpg,A dog .\na.jpg,A dog .\na.jpg\nb.jpg,A cat .\n,orphan caption\n")
    recs, warned = _load_quietly(load_flickr8k, p, tmp_path)
    assert recs["a.jpg"].captions == ["A dog ."] and recs["b.jpg"].captions == ["A cat ."]
    assert len(warned) == 1
    assert "1 repeated rows" in warned[0] and "2 rows without an image or caption (e.g. line 4)" in warned[0]


def test_real_files_load_without_warnings(coco_dir, flickr_dir):
    for loader, d, f, img in ((load_coco, coco_dir, "captions.json", "images"),
                              (load_flickr8k, flickr_dir, "captions.txt", "Images")):
        _, warned = _load_quietly(loader, d / f, d / img)
        assert warned == [], warned


# --- odd but valid text is kept -----------------------------------------------------------------------------

def test_csv_with_quoted_and_unquoted_commas(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text('image,caption\na.jpg,"A dog, a cat, and a bird ."\nb.jpg,A man, smiling, waves .\n')
    recs, warned = _load_quietly(load_flickr8k, p, tmp_path)
    assert recs["a.jpg"].captions == ["A dog, a cat, and a bird ."]
    assert recs["b.jpg"].captions == ["A man, smiling, waves ."]  # joined back, not cut at the first comma
    assert len(warned) == 1 and "unquoted commas" in warned[0] and "line 3" in warned[0]  # and said so


@pytest.mark.parametrize("fmt", ["coco", "flickr8k"])
def test_non_ascii_emoji_and_a_byte_order_mark(tmp_path, fmt):
    text = "Un café près de la tour Eiffel 🗼, très jolie"
    if fmt == "coco":
        p = tmp_path / "c.json"
        p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"images": _imgs(1), "annotations": _anns((1, text))},
                                                    ensure_ascii=False).encode("utf-8"))
        recs, _ = _load_quietly(load_coco, p, tmp_path)
        rec = recs["1"]
    else:
        p = tmp_path / "c.txt"
        p.write_bytes(b"\xef\xbb\xbf" + f'image,caption\n1.jpg,"{text}"\n'.encode("utf-8"))  # spreadsheet export
        recs, _ = _load_quietly(load_flickr8k, p, tmp_path)
        rec = recs["1.jpg"]
    assert rec.captions == [text]
    assert tokenize(text) == ["un", "café", "près", "de", "la", "tour", "eiffel", "très", "jolie"]


def test_very_long_caption_is_kept_and_truncated_for_training(tmp_path):
    from common.vocab import build_vocab
    from stage2_decoder.training.pairs import CaptionPairs

    long = " ".join(["a dog"] * 5000) + " ."
    recs, warned = _load_quietly(load_coco, _coco(tmp_path / "c.json", _imgs(1), _anns((1, long))), tmp_path)
    assert recs["1"].captions == [long] and warned == []
    vocab = build_vocab([tokenize(long)], threshold=1)
    pairs = CaptionPairs(list(recs.values()), {"1": 0}, vocab, max_len=30)
    assert pairs.tokens.shape == (1, 32)  # <start> + 30 words + <end>


def test_vocabulary_file_is_utf8_whatever_the_words(tmp_path):
    from common.vocab import Vocabulary, build_vocab

    v = build_vocab([["café", "🐶", "naïve", "東京"]], threshold=1)
    v.save(tmp_path / "vocab.json")
    raw = (tmp_path / "vocab.json").read_bytes().decode("utf-8")
    assert "café" in raw and "東京" in raw
    assert Vocabulary.load(tmp_path / "vocab.json") == v


# --- through the CLIs ---------------------------------------------------------------------------------------

def test_extract_cli_malformed_captions_is_one_error_line_and_writes_nothing(cli, coco_dir, tmp_path):
    bad = tmp_path / "captions.json"
    bad.write_text('{"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [')
    out = tmp_path / "out" / "cache.h5"
    proc = cli("stage1_extract", "--images", coco_dir / "images", "--captions", bad, "--out", out,
               "--backbone", "mobilenet_v2", "--workers", 0, "--no-progress")
    line = one_error_line(proc)
    assert str(bad) in line and "not valid JSON" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("content, says", [
    ("image\n1.jpg\n", "expected a CSV header 'image,caption'"),
    ('{"images": 5}', "not a COCO captions file"),
])
def test_extract_in_process_cli_wrong_shapes(coco_dir, tmp_path, content, says):
    from stage1_extract.__main__ import main

    p = tmp_path / ("captions.txt" if content.startswith("image") else "captions.json")
    p.write_text(content)
    result = CliRunner().invoke(main, ["--images", str(coco_dir / "images"), "--captions", str(p), "--out",
                                       str(tmp_path / "c.h5"), "--backbone", "mobilenet_v2", "--no-progress"])
    assert says in one_error_line(result)
    assert not list(tmp_path.glob("c.h5*"))


@pytest.mark.parametrize("dataset", ["flickr8k", "folder"])
def test_a_json_file_read_as_csv_is_a_short_error_line(coco_dir, tmp_path, dataset):
    """The COCO JSON file given with --dataset flickr8k (or folder): its whole first line, 1.7 MB, was the
    "header" the error line quoted."""
    from stage1_extract.__main__ import main

    result = CliRunner().invoke(main, ["--images", str(coco_dir / "images"), "--captions",
                                       str(coco_dir / "captions.json"), "--dataset", dataset, "--out",
                                       str(tmp_path / "c.h5"), "--backbone", "mobilenet_v2", "--dry-run"])
    line = one_error_line(result)
    assert "expected a CSV header" in line and "more characters)" in line and len(line) < 400, line[:500]


@pytest.fixture(scope="module")
def messy_coco(shared_cache, coco_records, tmp_path_factory) -> Path:
    """The shared cache's 48 images with a messy captions file: 3 validation images have only
    unusable captions, others gain empty, punctuation-only, very long, emoji and repeated ones,
    plus annotations of images that do not exist."""
    from common.feature_cache import load_cache

    keys = load_cache(shared_cache).keys
    recs = [r for r in coco_records if r.key in set(keys)]
    val = set(split_keys(keys, 0.1, 0.1, 0)["val"][:3])  # 3 of the 5 validation images
    images, anns = [], []

    def ann(image_id, caption):
        anns.append({"id": len(anns) + 1, "image_id": image_id, "caption": caption})

    for i, r in enumerate(recs):
        images.append({"id": r.image_id, "file_name": Path(r.path).name})
        if r.key in val:
            for c in ("", "...", "   "):
                ann(r.image_id, c)
            continue
        for c in r.captions:
            ann(r.image_id, c)
        if i % 3 == 0:
            ann(r.image_id, "Un café très chaud ☕ à côté d'un café 🐶")
            ann(r.image_id, " ".join(["a very long caption"] * 500))
            anns.append(dict(anns[-1]))  # the same annotation twice
    ann(987654321, "an image that is not listed")
    path = tmp_path_factory.mktemp("messy") / "messy.json"
    return _coco(path, images, anns)


def test_train_cli_on_a_messy_captions_file_warns_once_and_trains(shared_cache, messy_coco, tmp_path):
    from stage2_decoder.train import main

    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["--features", str(shared_cache), "--captions", str(messy_coco),
                                       "--out", str(run), "--epochs", "1", "--dry-run", "--no-progress",
                                       "--val-frac", "0.1", "--test-frac", "0.1", "--vocab-threshold", "1",
                                       "--embed-size", str(TINY["embed_size"]),
                                       "--hidden-size", str(TINY["hidden_size"]), "--max-caption-len", "20"])
    assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    no_traceback(result)
    warned = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and str(messy_coco) in warned[0], result.stderr
    for why in ("captions without a word", "repeated annotations (same id)", "annotations of image ids not in"):
        assert why in warned[0]
    words = json.loads((run / "vocab.json").read_text(encoding="utf-8"))["words"]
    assert "café" in words and "très" in words and "" not in words
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and metrics[0]["val_cider"] >= 0  # scored on the 2 images with references


def test_evaluation_skips_images_without_references(monkeypatch):
    """pycocoevalcap asserts on an empty reference list: such images are left out, with a note."""
    from common.records import ImageRecord
    from stage2_decoder.reporting import metrics
    from stage2_decoder.reporting.evaluation import evaluate_captions

    monkeypatch.setattr(metrics, "java_available", lambda: False)  # the in-process scorers suffice here
    records = [ImageRecord("1", 1, "/x/1.jpg", ["a dog on a bench", "a brown dog sits"]),
               ImageRecord("2", 2, "/x/2.jpg", []),
               ImageRecord("3", 3, "/x/3.jpg", ["a cat on a sofa"])]
    res = {"1": "a dog on a bench", "2": "a bird", "3": "a cat"}
    report = evaluate_captions(res, records)
    assert report["n_images"] == 2 and [im["key"] for im in report["images"]] == ["1", "3"]
    assert any("without reference captions" in n for n in report["notes"])
    assert report["metrics"]["CIDEr"] > 0
    with pytest.raises(ValueError, match="reference caption"):
        evaluate_captions({"2": "a bird"}, [records[1]])


def test_load_dataset_limit_zero_is_refused(coco_dir):
    with pytest.raises(DatasetError, match="at least 1"):
        load_dataset("coco", coco_dir / "captions.json", coco_dir / "images", limit=0)


@pytest.mark.parametrize("text", ["a.jpg#0\tA dog runs .\na.jpg#1\tA dog runs .\na.jpg#1\tA dog runs .\n",
                                  "image_name| comment_number| comment\na.jpg| 0| A dog runs .\na.jpg| 1| A dog runs ."
                                  "\na.jpg| 1| A dog runs .\n"])
def test_flickr30k_keeps_two_annotators_same_sentence_and_skips_a_repeated_line(tmp_path, text):
    """Captions #0 and #1 alike are two references (tests/RELIABILITY.md); the reader kept one."""
    from common.datasets import load_flickr30k

    p = tmp_path / ("results.csv" if text.startswith("image_name") else "results_20130124.token")
    p.write_text(text)
    recs, warned = _load_quietly(load_flickr30k, p, tmp_path)
    assert recs["a.jpg"].captions == ["A dog runs .", "A dog runs ."]
    assert len(warned) == 1 and "1 repeated rows" in warned[0]
