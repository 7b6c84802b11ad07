"""`python -m stage2_decoder.caption` and `make caption` as a new user runs them: the checkpoint found by
default, several captions in text and JSON, sampling, --dry-run, a torch-free start, and evaluate's --json."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from reliability_helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(shared_cache, tmp_path_factory):
    return tiny_run(shared_cache, tmp_path_factory) / "best.pt"


@pytest.fixture(scope="module")
def photos(coco_records):
    return [coco_records[i].path for i in (0, 5)]


def _caption(*args):
    from stage2_decoder.caption import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_default_checkpoint_is_the_newest_run_and_is_named(ckpt, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CAPCACHE_CHECKPOINT", raising=False)
    (tmp_path / "runs" / "old").mkdir(parents=True)
    (tmp_path / "runs" / "old" / "best.pt").write_text("an older, broken checkpoint")
    os.utime(tmp_path / "runs" / "old" / "best.pt", (1_000_000, 1_000_000))
    (tmp_path / "runs" / "demo").mkdir()
    shutil.copy(ckpt, tmp_path / "runs" / "demo" / "best.pt")
    r = _caption(*photos, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == [f"using checkpoint {Path('runs/demo/best.pt')}"]
    lines = r.stdout.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == photos and all(ln.split("\t")[1].strip() for ln in lines)
    named = _caption(*photos, "--device", "cpu", "--checkpoint", ckpt)
    assert named.stdout == r.stdout and named.stderr == ""  # an explicit checkpoint: nothing said about it


def test_no_checkpoint_anywhere_is_one_line_saying_what_to_do(photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CAPCACHE_CHECKPOINT", raising=False)
    r = _caption(photos[0])
    assert r.exit_code == 1 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: no checkpoint found")
    assert all(s in r.stderr for s in ("make demo", "make train", "--checkpoint"))


def test_num_captions_text_and_json_agree(ckpt, photos):
    text = _caption(*photos, "--checkpoint", ckpt, "--device", "cpu", "--num-captions", 3)
    js = _caption(*photos, "--checkpoint", ckpt, "--device", "cpu", "--num-captions", 3, "--json")
    assert text.exit_code == 0 and js.exit_code == 0, text.output + js.output
    data = json.loads(js.stdout)
    assert [d["image"] for d in data] == photos
    lines = text.stdout.splitlines()
    assert len(lines) == 3 * len(photos)
    for i, d in enumerate(data):
        assert [c["caption"] for c in d["captions"]][0] == d["caption"] and len(d["captions"]) == 3
        assert [c["score"] for c in d["captions"]] == sorted((c["score"] for c in d["captions"]), reverse=True)
        best, *alts = lines[3 * i:3 * i + 3]
        assert best == f"{d['image']}\t{d['caption']}"
        for line, c in zip(alts, d["captions"][1:]):  # marked so scripts can skip them
            marker, score, caption = line.split("\t")
            assert marker == "  alt" and caption == c["caption"] and float(score) == pytest.approx(c["score"], abs=1e-4)
    # scripts that only want the best caption: skip the marked lines, get what one caption gives
    single = _caption(*photos, "--checkpoint", ckpt, "--device", "cpu")
    assert [ln for ln in lines if not ln.startswith("  alt")] == single.stdout.splitlines()


def test_sampling_from_the_cli_is_seeded(ckpt, photos):
    args = [photos[0], "--checkpoint", ckpt, "--device", "cpu", "--sample", "--num-captions", 4, "--json"]
    a, b, c = _caption(*args, "--seed", 7), _caption(*args, "--seed", 7), _caption(*args, "--seed", 8)
    assert a.exit_code == 0, a.output
    assert a.stdout == b.stdout != c.stdout
    assert len(json.loads(a.stdout)[0]["captions"]) == 4


def test_dry_run_lists_images_and_loads_nothing(photos, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos:
        shutil.copy(p, folder / Path(p).name)
    (folder / "notes.txt").write_text("not an image")
    junk = tmp_path / "junk.pt"
    junk.write_text("never loaded by a dry run")
    r = _caption(folder, "--checkpoint", junk, "--dry-run")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == sorted(str(folder / Path(p).name) for p in photos)
    assert "dry run: 2 images" in r.stderr


def test_subfolders_are_captioned_with_recursive_and_named_in_the_error_without(ckpt, photos, tmp_path):
    folder = tmp_path / "trip"
    for sub, p in zip(("day1", "day2/evening"), photos):
        (folder / sub).mkdir(parents=True)
        shutil.copy(p, folder / sub / "x.jpg")  # the same name in two subfolders: both are captioned
    (folder / "day1" / "notes.txt").write_text("not an image")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(photos[0], tmp_path / "elsewhere" / "z.jpg")
    (folder / "link").symlink_to(tmp_path / "elsewhere")  # a symlinked folder is not entered
    (folder / "day1" / "loop").symlink_to(folder)  # nor is a loop followed
    r = _caption(folder, "--checkpoint", ckpt, "--dry-run")
    assert r.exit_code == 1 and "--recursive" in r.stderr, r.output
    r = _caption(folder, "--checkpoint", ckpt, "--recursive", "--beam-size", "1", "--json")
    assert r.exit_code == 0, r.output
    assert [x["image"] for x in json.loads(r.stdout)] == [str(folder / "day1" / "x.jpg"),
                                                          str(folder / "day2" / "evening" / "x.jpg")]
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _caption(empty, "--checkpoint", ckpt, "--dry-run")
    assert r.exit_code == 1 and "no image files" in r.stderr and "--recursive" not in r.stderr


@pytest.mark.parametrize("bad", [["--onnx", "x", "--checkpoint", "y.pt"], ["--top-p", "0"], ["--temperature", "0"],
                                 ["--num-captions", "0"]])
def test_usage_errors(photos, bad):
    r = _caption(photos[0], *bad)
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_caption_cli_starts_where_torch_cannot_be_imported(photos, tmp_path):
    """The --onnx path runs without torch: the module, its options and --dry-run import none of it."""
    for name in ("torch", "torchvision"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    for args in (["--help"], [photos[0], "--onnx", str(tmp_path), "--dry-run"]):
        proc = subprocess.run([sys.executable, "-m", "stage2_decoder.caption", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    assert "--num-captions" in subprocess.run([sys.executable, "-m", "stage2_decoder.caption", "--help"], cwd=REPO,
                                              env=env, capture_output=True, text=True, timeout=60).stdout


def test_make_caption(ckpt, photos, tmp_path):
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    # -o install: the venv is already set up; nothing gets installed here
    base = [make, "-s", "-o", "install", "-o", ".venv/.installed", "caption", f"PY={sys.executable}"]
    ok = subprocess.run([*base, f"IMAGES={photos[0]} {photos[1]}", f"CHECKPOINT={ckpt}", "CAPTION_ARGS=--dry-run"],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == photos and str(ckpt) in ok.stderr
    spaced = tmp_path / "my runs" / "best.pt"  # a checkpoint path with a space is one path
    spaced.parent.mkdir()
    shutil.copy(ckpt, spaced)
    ok = subprocess.run([*base, f"IMAGES={photos[0]}", f"CHECKPOINT={spaced}", "CAPTION_ARGS=--dry-run"],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and str(spaced) in ok.stderr, ok.stderr
    missing = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and 'IMAGES="a.jpg photos/"' in missing.stderr


def test_evaluate_json_means_what_it_means_in_caption(ckpt, shared_cache, tmp_path, monkeypatch):
    """evaluate --json prints the report as JSON on stdout (as caption --json does); --json-out writes it."""
    from stage2_decoder.evaluate import main
    from stage2_decoder.reporting import metrics

    monkeypatch.setattr(metrics, "java_available", lambda: False)  # the pure-Python scorers are enough here
    out = tmp_path / "eval.json"
    args = ["--checkpoint", str(ckpt), "--features", str(shared_cache), "--split", "test", "--device", "cpu",
            "--beam-size", "2"]
    r = CliRunner().invoke(main, [*args, "--json", "--json-out", str(out)])
    assert r.exit_code == 0, r.output
    printed, written = json.loads(r.stdout), json.loads(out.read_text(encoding="utf-8"))
    printed.pop("seconds"), written.pop("seconds")
    assert printed == written and printed["decode"]["beam_size"] == 2 and "CIDEr" in printed["metrics"]
    table = CliRunner().invoke(main, args)
    assert table.exit_code == 0 and "| BLEU-1" in table.stdout
    assert [i["caption"] for i in written["images"]] == [i["caption"] for i in json.loads(
        CliRunner().invoke(main, [*args, "--json"]).stdout)["images"]]


def test_evaluate_checks_where_its_reports_go_before_it_decodes(ckpt, shared_cache, tmp_path, monkeypatch):
    """--json-out into a folder that did not exist failed after the whole evaluation (hours on raw images) and
    took the --html gallery with it; --html made its folder, --json-out did not."""
    import stage2_decoder.evaluate as evaluate_mod
    from stage2_decoder.reporting import metrics

    monkeypatch.setattr(metrics, "java_available", lambda: False)
    args = ["--checkpoint", str(ckpt), "--features", str(shared_cache), "--split", "test", "--device", "cpu"]
    r = CliRunner().invoke(evaluate_mod.main, [*args, "--json-out", tmp_path / "new" / "r.json", "--html",
                                               tmp_path / "other" / "g.html"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "new" / "r.json").read_text())["metrics"]["CIDEr"] >= 0
    assert (tmp_path / "other" / "g.html").stat().st_size > 0

    (tmp_path / "a-file").write_text("")
    decoded = []
    monkeypatch.setattr(evaluate_mod, "captions_from_cache", lambda *a, **k: decoded.append(1))
    r = CliRunner().invoke(evaluate_mod.main, [*args, "--json-out", tmp_path / "a-file" / "r.json"])
    assert r.exit_code == 1 and not decoded  # refused before any decoding
    assert r.stderr.strip() == (f"error: cannot write evaluation report {tmp_path / 'a-file' / 'r.json'}: "
                                f"a part of its folder's path is a file")


def test_a_figure_that_cannot_be_written_loses_no_caption(ckpt, photos, tmp_path, monkeypatch):
    """--save-figure wrote each figure before printing its caption, and its error ended the run: one figure that
    could not be written (a full disk, a name too long) lost every caption, the other photos' too."""
    import stage2_decoder.reporting.figures as figures
    from common.atomic import AtomicWriteError

    real = figures.save_caption_figure

    def full_disk_for_the_first(image, *args, **kwargs):
        if image == photos[0]:
            raise AtomicWriteError(28, f"cannot write figure {image}: No space left on device")
        return real(image, *args, **kwargs)

    monkeypatch.setattr(figures, "save_caption_figure", full_disk_for_the_first)
    r = _caption(*photos, "--checkpoint", ckpt, "--device", "cpu", "--save-figure", tmp_path / "figs")
    assert r.exit_code == 1
    assert [ln.split("\t")[0] for ln in r.stdout.splitlines()] == photos  # both captions printed
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [
        f"error: cannot write figure {photos[0]}: No space left on device"]
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [Path(photos[1]).stem + ".png"]
    assert "1 figures in" in r.stderr and "1 figures could not be written" in r.stderr


def test_a_photo_with_a_name_of_250_bytes_gets_its_figure(ckpt, photos, tmp_path):
    """The figure's temporary file, `.NAME.XXXXXXXX.tmp`, went past the 255-byte file name limit."""
    long = tmp_path / "in" / ("p" * 250 + ".jpg")
    long.parent.mkdir()
    shutil.copy(photos[0], long)
    r = _caption(long, "--checkpoint", ckpt, "--device", "cpu", "--save-figure", tmp_path / "figs")
    assert r.exit_code == 0, r.output
    (fig,) = (tmp_path / "figs").iterdir()
    assert fig.name == "p" * 200 + ".png" and fig.stat().st_size > 0


def _bad_name_copy(photo: str, folder: Path) -> Path:
    """A copy of `photo` whose file name is not UTF-8 (byte 0xff), as Python holds it (a lone surrogate)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = Path(os.fsdecode(os.path.join(os.fsencode(str(folder)), b"bad\xff.jpg")))
    shutil.copy(photo, target)
    return target


def test_a_file_name_that_is_not_utf8_gets_its_figure_and_the_others_theirs(ckpt, photos, tmp_path):
    """Its figure name failed to encode (UnicodeEncodeError, not an OSError) and ended the run: the photos after
    it got no caption and no figure."""
    bad = _bad_name_copy(photos[0], tmp_path / "in")
    r = _caption(bad, *photos, "--checkpoint", ckpt, "--device", "cpu", "--save-figure", tmp_path / "figs")
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) == 3
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(
        ["bad.png", *(Path(p).stem + ".png" for p in photos)])


def test_json_output_is_valid_utf8_json_for_any_file_name_and_score(ckpt, photos, tmp_path, monkeypatch):
    """A name that is not UTF-8 came out as a raw byte, and a -inf score as -Infinity: neither is JSON a strict
    parser reads."""
    import stage2_decoder.caption as caption_mod

    bad = _bad_name_copy(photos[0], tmp_path / "in")
    real = caption_mod._results

    def with_an_infinite_score(*args, **kwargs):
        for r in real(*args, **kwargs):
            yield {**r, "captions": [{**c, "score": float("-inf")} for c in r["captions"]]}

    monkeypatch.setattr(caption_mod, "_results", with_an_infinite_score)
    r = subprocess.run([sys.executable, "-c", "import sys; from stage2_decoder.caption import main; main()",
                        "--checkpoint", str(ckpt), "--device", "cpu", "--json", os.fsencode(str(bad))],
                       cwd=REPO, capture_output=True)
    assert r.returncode == 0, r.stderr
    (got,) = json.loads(r.stdout.decode("utf-8"))  # strict UTF-8, and JSON
    assert os.fsencode(got["image"]) == os.fsencode(str(bad))  # the \udcff escape is the file's own byte
    out = _caption(photos[0], "--checkpoint", ckpt, "--device", "cpu", "--json")
    assert out.exit_code == 0 and json.loads(out.stdout, parse_constant=lambda c: pytest.fail(c))[0][
        "captions"][0]["score"] is None


def test_a_figure_shows_a_16_bit_or_float_photo_as_the_captioner_saw_it(tmp_path):
    """Pillow's own conversion shows a 16-bit grey PNG white and a 0..1 float TIFF black."""
    import numpy as np
    from PIL import Image

    from common.preprocess import load_views, Preprocess
    from stage2_decoder.reporting.figures import load_display_image

    ramp = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    Image.fromarray((ramp * 4000).astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(ramp, mode="F").save(tmp_path / "f.tif")
    for name in ("g16.png", "f.tif"):
        shown = np.asarray(load_display_image(tmp_path / name), dtype=np.float32)
        assert 60 < shown.mean() < 200 and shown.std() > 40, (name, shown.mean(), shown.std())
        seen = load_views(str(tmp_path / name), Preprocess(resize=48, crop=48), 1)[0].astype(np.float32)
        assert abs(shown.mean() - seen.mean()) < 10


def test_evaluate_refuses_reports_over_its_inputs_or_each_other(ckpt, shared_cache, tmp_path):
    """--json-out at the checkpoint's own path overwrote it with JSON, exit 0; --json-out X --html X kept only
    the page."""
    import stage2_decoder.evaluate as evaluate_mod

    copy = tmp_path / "best.pt"
    shutil.copy(ckpt, copy)
    args = ["--checkpoint", str(copy), "--features", str(shared_cache), "--device", "cpu"]
    for more, says in ((["--json-out", copy], "--json-out"), (["--json-out", tmp_path / "r", "--html", tmp_path / "r"],
                                                               "--json-out and --html name one file")):
        r = CliRunner().invoke(evaluate_mod.main, [*args, *map(str, more)])
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1 and says in lines[0], r.output
    assert copy.read_bytes() == Path(ckpt).read_bytes() and not (tmp_path / "r").exists()


def test_evaluate_prints_a_skipped_images_name_on_one_line(ckpt, coco_records, tmp_path, monkeypatch):
    """A name with a line break forged a second stderr line (and ESC or U+202E reached the terminal)."""
    import stage2_decoder.evaluate as evaluate_mod
    from stage2_decoder.reporting import metrics

    monkeypatch.setattr(metrics, "java_available", lambda: False)
    shutil.copy(coco_records[0].path, tmp_path / "ok.jpg")
    doc = {"images": [{"id": 1, "file_name": "ok.jpg"}, {"id": 2, "file_name": "ne\nw\x1b[31m.jpg"}],
           "annotations": [{"id": 10, "image_id": 1, "caption": "a photo"}, {"id": 11, "image_id": 2,
                                                                            "caption": "another photo"}]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    (tmp_path / "ne\nw\x1b[31m.jpg").write_bytes(b"not an image")
    r = CliRunner().invoke(evaluate_mod.main, ["--checkpoint", str(ckpt), "--images", str(tmp_path), "--captions",
                                               str(tmp_path / "c.json"), "--device", "cpu", "--workers", "0"])
    assert r.exit_code == 0, r.output
    skipped = [ln for ln in r.stderr.splitlines() if "ne" in ln and ".jpg" in ln]
    assert len(skipped) == 1 and skipped[0].startswith("skipped ") and "ne\\nw" in skipped[0], r.stderr
    assert not any(ln.startswith("w") for ln in r.stderr.splitlines()), r.stderr  # no forged second line
