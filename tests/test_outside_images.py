"""Nothing is read from outside the data: captions entries whose image resolves outside `--images`
(an absolute path, `../`, a symlink out of the folder) are skipped with a `warning:` each and a total,
unless `--allow-outside-images`; `report` embeds only images inside the images root.

The layout is built in tmp: a few real COCO photos copied into `images/`, one more outside it as the
"private" photo an entry points at.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from reliability_helpers import tiny_run


@pytest.fixture
def layout(coco_records, tmp_path) -> dict:
    """images/ with 3 photos + a symlink out; private/secret.jpg outside; captions.json naming 6 entries."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    private = tmp_path / "private"
    private.mkdir()
    recs = coco_records[:4]
    for r in recs[:3]:
        shutil.copy(r.path, images / Path(r.path).name)
    secret = private / "secret.jpg"
    shutil.copy(recs[3].path, secret)
    (images / "link.jpg").symlink_to(secret)
    names = [Path(r.path).name for r in recs[:3]] + [str(secret), "../../private/secret.jpg", "link.jpg"]
    data = {"images": [{"id": i + 1, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "caption": "a photo of a thing"}
                            for i in range(len(names))]}
    captions = tmp_path / "data" / "captions.json"
    captions.write_text(json.dumps(data))
    return {"images": images, "captions": captions, "secret": secret, "inside": ["1", "2", "3"]}


def test_load_dataset_skips_every_way_out_of_the_images_folder(layout):
    from common.datasets import load_dataset
    from common.records import DatasetWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = load_dataset("coco", layout["captions"], layout["images"])
    assert [r.key for r in recs] == layout["inside"]
    said = [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)]
    assert sum("resolves outside the images folder" in s for s in said) == 3
    assert any("skipped 3 entries" in s and "--allow-outside-images" in s for s in said)
    everything = load_dataset("coco", layout["captions"], layout["images"], allow_outside_images=True)
    assert len(everything) == 6


@pytest.mark.slow  # a backbone over real photos through the CLI
def test_stage1_does_not_cache_a_photo_from_outside_the_images_folder(layout, tmp_path):
    from common.feature_cache import load_cache
    from stage1_extract.__main__ import main

    out = tmp_path / "c.h5"
    r = CliRunner().invoke(main, ["--images", str(layout["images"]), "--captions", str(layout["captions"]),
                                  "--out", str(out), "--backbone", "mobilenet_v2", "--weights", "default",
                                  "--batch-size", "8", "--workers", "0", "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert sorted(load_cache(out).keys) == layout["inside"]
    assert r.stderr.count("warning:") == 4 and "skipped 3 entries" in r.stderr


@pytest.mark.slow  # raw-image evaluation: a backbone over real photos
def test_evaluate_html_does_not_show_a_photo_from_outside(layout, shared_cache, tmp_path_factory, tmp_path,
                                                          monkeypatch):
    import stage2_decoder.reporting.evaluation
    from stage2_decoder.evaluate import main

    run = tiny_run(shared_cache, tmp_path_factory)
    monkeypatch.setattr(stage2_decoder.reporting.evaluation, "score_captions",  # where evaluate_captions finds it
                        lambda gts, res, **kw: ({"CIDEr": 0.5}, {k: 0.5 for k in res}, []))
    page, js = tmp_path / "e.html", tmp_path / "e.json"
    r = CliRunner().invoke(main, ["--checkpoint", str(run / "best.pt"), "--images", str(layout["images"]),
                                  "--captions", str(layout["captions"]), "--beam-size", "1", "--workers", "0",
                                  "--device", "cpu", "--html", str(page), "--json-out", str(js)])
    assert r.exit_code == 0, r.output
    report = json.loads(js.read_text())
    assert sorted(i["key"] for i in report["images"]) == layout["inside"]
    assert str(layout["secret"]) not in page.read_text() and page.read_text().count("data:image/jpeg") == 3


def test_report_embeds_only_images_inside_the_images_root(layout, tmp_path):
    from stage2_decoder.report import main

    inside = sorted(layout["images"].glob("0*.jpg"))
    ev = {"metrics": {"CIDEr": 0.5}, "n_images": 3, "images_root": str(layout["images"]),
          "images": [{"key": p.stem, "image": str(p), "caption": "c", "references": ["r"], "cider": 1.0}
                     for p in [*inside[:1], layout["secret"], layout["images"] / "link.jpg"]]}
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    r = CliRunner().invoke(main, [str(tmp_path / "eval.json"), "--out", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r.html").read_text().count("data:image/jpeg") == 1
    assert r.stderr.count("warning:") == 2 and "outside the images folder" in r.stderr
    r = CliRunner().invoke(main, [str(tmp_path / "eval.json"), "--out", str(tmp_path / "all.html"),
                                  "--allow-outside-images"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "all.html").read_text().count("data:image/jpeg") == 3
