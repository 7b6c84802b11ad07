"""One's own photos: the `folder` captions format (CSV or JSON Lines), its detection, its split rule,
and the four commands of docs/own-photos.md followed on a temporary folder of real photos."""
from __future__ import annotations

import csv
import json
import shutil
import warnings

import pytest

from common.datasets import guess_format, load_dataset, official_split
from common.folder_dataset import load_folder
from common.records import DatasetError, DatasetWarning

N_PHOTOS = 30
SPLIT_OF = {**{i: "val" for i in (3, 13, 23)}, **{i: "test" for i in (7, 17, 27)}}  # photo index -> split


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


def _write_csv(path, rows, header=("image", "caption", "split")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def own_folder(coco_records, tmp_path_factory):
    """~30 real COCO photos copied into two subfolders of a temporary folder, with a captions CSV that
    gives every photo a split; returns (folder, captions file, {relative path: record})."""
    root = tmp_path_factory.mktemp("own")
    photos = root / "photos"
    rows, by_rel = [], {}
    for i, rec in enumerate(coco_records[:N_PHOTOS]):
        rel = f"{'garden' if i % 2 else 'trip'}/{i:02d}.jpg"
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(rec.path, photos / rel)
        by_rel[rel] = rec
        rows += [(rel, c, SPLIT_OF.get(i, "train")) for c in rec.captions]
    return photos, _write_csv(root / "captions.csv", rows), by_rel


# --- the format ---------------------------------------------------------------------------------------------

def test_auto_detection_tells_folder_files_from_flickr8k(tmp_path, flickr_dir):
    assert guess_format(_write_jsonl(tmp_path / "c.jsonl", [{"image": "a.jpg", "caption": "a dog"}])) == "folder"
    assert guess_format(_write_csv(tmp_path / "split.csv", [("a.jpg", "a dog", "train")])) == "folder"
    assert guess_format(_write_csv(tmp_path / "order.csv", [("a dog", "a.jpg")], ("caption", "image"))) == "folder"
    assert guess_format(_write_csv(tmp_path / "case.txt", [("a.jpg", "a dog")], ("Image", "Caption"))) == "folder"
    assert guess_format(_write_csv(tmp_path / "plain.csv", [("a.jpg", "a dog")], ("image", "caption"))) == "flickr8k"
    assert guess_format(flickr_dir / "captions.txt") == "flickr8k"  # the real Flickr8k file is still Flickr8k's


def test_an_image_caption_csv_reads_the_same_as_flickr8k_and_as_folder(flickr_dir):
    f = flickr_dir / "captions.txt"  # the real Flickr8k file: exactly `image,caption`, five captions a photo
    as_flickr = load_dataset("flickr8k", f, flickr_dir / "Images")
    as_folder = load_dataset("folder", f, flickr_dir / "Images")
    assert len(as_flickr) > 1000 and as_folder == as_flickr
    assert load_dataset("auto", f, flickr_dir / "Images") == as_flickr


def test_rows_gather_into_images_with_relative_paths_and_their_split(own_folder):
    photos, captions, by_rel = own_folder
    records = load_dataset("auto", captions, photos)
    assert [r.key for r in records] == sorted(by_rel)
    for r in records:
        assert r.path == str((photos / r.key).resolve()) and r.captions == by_rel[r.key].captions
    split = official_split(records)
    want_val = sorted(rel for rel in by_rel if SPLIT_OF.get(int(rel[-6:-4])) == "val")
    assert split["val"] == want_val and len(split["test"]) == 3 and len(split["train"]) == N_PHOTOS - 6


def test_jsonl_without_splits_leaves_the_split_to_training(tmp_path):
    rows = [{"image": "x/a.jpg", "caption": "A dog runs."}, {"image": "x/a.jpg", "caption": "A brown dog."},
            {"image": "b.jpg", "caption": "犬が走っている。"}, {"image": "x/a.jpg", "caption": "A dog runs."}]
    with pytest.warns(DatasetWarning, match="1 repeated rows"):
        records = load_folder(_write_jsonl(tmp_path / "c.jsonl", rows), tmp_path)
    assert [(r.key, r.captions, r.split) for r in records] == \
        [("b.jpg", ["犬が走っている。"], None), ("x/a.jpg", ["A dog runs.", "A brown dog."], None)]
    assert official_split(records) is None


def test_mixed_splits_are_refused_naming_an_image_without_one(tmp_path):
    f = _write_csv(tmp_path / "c.csv", [("a.jpg", "a dog", "train"), ("b.jpg", "a cat", ""), ("c.jpg", "a cow", "val")])
    with pytest.raises(DatasetError, match=r"2 images have a split and 1 have none \(e\.g\. b\.jpg\)"):
        load_folder(f, tmp_path)


def test_an_image_put_in_two_splits_is_refused_with_its_line(tmp_path):
    f = _write_csv(tmp_path / "c.csv", [("a.jpg", "a dog", "train"), ("a.jpg", "a brown dog", "test")])
    with pytest.raises(DatasetError, match=r"c\.csv:3: a\.jpg is put in test, an earlier row puts it in train"):
        load_folder(f, tmp_path)


@pytest.mark.parametrize("text, match", [
    ("image,caption,split\na.jpg,a dog,training\n", r"c\.csv:2: split 'training' of a\.jpg is not one of"),
    ("image,caption,split\na.jpg,a dog, running,train\n", r"c\.csv:2: 4 fields, the header has 3; put captions"),
    ("image,split\na.jpg,train\n", r"expected a CSV header naming image and caption"),
    ("image,caption,split\n", r"lists no images"),
    ('image,caption,split\na.jpg,"a big dog,train\nb.jpg,a cat,val\n', r"c\.csv:2: a field runs on over several lines"),
    ('image,caption,split\na.jpg,a dog,train\nb.jpg,"a big cat,val\nc.jpg,a "cow",val\n', r"c\.csv:3: a field runs on"),
    ('image,caption,split\n\na.jpg,"a dog",train\n"b.jpg",a cat,,\n', r"c\.csv:4: 4 fields"),
])
def test_bad_csv_files_name_the_line_at_fault(tmp_path, text, match):
    f = tmp_path / "c.csv"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError, match=match):
        load_folder(f, tmp_path)


def test_bad_jsonl_lines_are_errors_and_unknown_keys_a_warning(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"image": "a.jpg", "caption": "a dog"}\n["b.jpg", "a cat"]\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"c\.jsonl:2: expected a JSON object"):
        load_folder(f, tmp_path)
    f.write_text('{"image": "a.jpg", "caption": "a dog"\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"c\.jsonl:1: not a JSON object"):
        load_folder(f, tmp_path)
    f.write_text('{"image": "a.jpg", "caption": "a dog", "splt": "val"}\n', encoding="utf-8")
    with pytest.warns(DatasetWarning, match="ignored columns splt"):
        assert load_folder(f, tmp_path)[0].split is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_folder(_write_jsonl(f, [{"image": "a.jpg", "caption": "a dog", "split": "val"},
                                     {"image": "b.jpg", "caption": "a cat", "split": "train"}]), tmp_path)


def test_extract_refuses_a_mixed_split_file_in_one_line(cli, tmp_path):
    f = _write_csv(tmp_path / "c.csv", [("a.jpg", "a dog", "train"), ("b.jpg", "a cat", "")])
    proc = cli("stage1_extract", "--images", tmp_path, "--captions", f, "--out", tmp_path / "c.h5", "--no-progress")
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
    assert "c.csv" in errors[0] and "have none (e.g. b.jpg)" in errors[0]
    assert not (tmp_path / "c.h5").exists()


# --- the four commands of docs/own-photos.md ----------------------------------------------------------------

def test_own_photos_from_a_folder_to_captions_in_four_commands(cli, own_folder, tmp_path):
    from common.feature_cache import load_cache
    from stage2_decoder.training.checkpoint import load_checkpoint

    photos, captions, by_rel = own_folder  # command 1: the captions file, written by the fixture
    cache, run = tmp_path / "cache.h5", tmp_path / "run"
    proc = _ok(cli("stage1_extract", "--images", photos, "--captions", captions, "--out", cache,
                   "--backbone", "mobilenet_v2", "--workers", 0, "--no-progress"))
    assert f"{N_PHOTOS} images" in proc.stdout
    c = load_cache(cache)
    assert c.meta.dataset_format == "folder" and sorted(c.keys) == sorted(by_rel)

    _ok(cli("stage2_decoder.train", "--features", cache, "--out", run, "--epochs", 2, "--hidden-size", 32,
            "--embed-size", 32, "--batch-size", 32, "--vocab-threshold", 2, "--val-images", 8,
            "--scst-epochs", 0, "--no-progress"))
    split = json.loads((run / "split.json").read_text())
    assert split == official_split(load_dataset("folder", captions, photos))  # the file's split, not a hash split
    vocab = json.loads((run / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["tokenizer"] == "nltk" and {"a", "of", "on"} <= set(vocab["words"])

    photo = photos / split["test"][0]
    proc = _ok(cli("stage2_decoder.caption", "--checkpoint", run / "best.pt", photo, "--json"))
    [item] = json.loads(proc.stdout)
    words = item["caption"].split()
    assert words and set(words) <= set(vocab["words"]), item
    assert load_checkpoint(run / "best.pt")["backbone"]["name"] == "mobilenet_v2"
