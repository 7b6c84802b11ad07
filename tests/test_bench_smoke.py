"""The performance benchmarks run end to end in their tiny modes and print their ratio lines.

No timing is asserted: the numbers of a tiny run on a shared machine mean nothing; what is
checked is that each script runs the real pipeline, measures, and reports every ratio it owes.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, TEST_THREADS

RATIO = re.compile(r"^ratio (?P<name>\S.*?): (?P<value>-?\d+\.\d+)", re.M)

EXPECTED = {
    "stage1.py": ["stage1.mobilenet_v2 pipeline/bare"],
    "stage2.py": ["stage2.per_epoch seed/ours", "stage2.2_epochs seed/ours", "stage2.step_overhead bare/ours - 1",
                  "stage2.peak_rss / limit"],
    "decode_steps.py": ["decode_steps greedy, batch 1 every 1/2", "decode_steps beam 3, batch 1 every 1/2",
                        "decode_steps SCST sampling, 64 x 5 every 1/2"],
    "caption.py": ["caption.cold_start mobilenet_v2 greedy 1 image",
                   "caption.warm_greedy mobilenet_v2 1 image ours/bare",
                   "caption.warm_greedy mobilenet_v2 folder of 4 ours/bare"],
}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_bench_tiny_mode_prints_its_ratios(script, data_dir, coco_dir):
    p = subprocess.run([sys.executable, f"bench/{script}", "--tiny", "--data", str(data_dir),
                        "--threads", TEST_THREADS], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    found = {m["name"]: float(m["value"]) for m in RATIO.finditer(p.stdout)}
    assert set(EXPECTED[script]) <= set(found), p.stdout
    assert all(v == v and v != float("inf") for v in found.values()), found  # measured, not nan/inf
    assert "Traceback" not in p.stderr


def test_quality_ratio_interval_brackets_the_ratio_and_narrows_with_agreement():
    sys.path.insert(0, str(REPO / "bench"))
    import numpy as np
    from quality import ratio_interval

    rng = np.random.default_rng(1)
    base = rng.uniform(0, 2, 300)
    other = {"images": [{"key": str(i), "cider": float(c)} for i, c in enumerate(base)]}
    # every image scored exactly 1.3x: every resample gives 1.3
    scaled = {"images": [{"key": str(i), "cider": 1.3 * float(c)} for i, c in enumerate(base)]}
    lo, hi = ratio_interval(scaled, other)
    assert lo == pytest.approx(1.3) and hi == pytest.approx(1.3)
    # noisy per image, 1.3x on average: the interval holds the corpus ratio and has width
    noisy = {"images": [{"key": str(i), "cider": float(c * rng.uniform(0.6, 2.0))} for i, c in enumerate(base)]}
    ratio = np.mean([i["cider"] for i in noisy["images"]]) / base.mean()
    lo, hi = ratio_interval(noisy, other)
    assert lo < ratio < hi and hi - lo > 0.05
    # only images both sides scored are paired
    lo2, hi2 = ratio_interval(noisy, {"images": other["images"][:150]})
    assert (lo2, hi2) != (lo, hi)


def test_quality_mean_of_runs_averages_metrics_and_each_image():
    sys.path.insert(0, str(REPO / "bench"))
    from quality import mean_of_runs, ratio_interval

    def report(ciders, bleu, distinct):
        return {"metrics": {"CIDEr": sum(ciders) / len(ciders), "BLEU-4": bleu},
                "stats": {"distinct_fraction": distinct, "most_common_fraction": 0.1},
                "images": [{"key": k, "cider": c} for k, c in zip("abc", ciders)]}

    runs = [report([0.3, 0.6, 0.9], 0.2, 0.8), report([0.1, 0.2, 0.6], 0.1, 0.6)]
    m = mean_of_runs(runs)
    assert m["runs"] == pytest.approx([0.6, 0.3])
    assert m["metrics"]["CIDEr"] == pytest.approx(0.45) and m["metrics"]["BLEU-4"] == pytest.approx(0.15)
    assert m["stats"]["distinct_fraction"] == pytest.approx(0.7)
    assert [i["cider"] for i in m["images"]] == pytest.approx([0.2, 0.4, 0.75])
    # the corpus CIDEr stays the mean of the per-image scores, so the bootstrap pairs the right figures
    assert m["metrics"]["CIDEr"] == pytest.approx(sum(i["cider"] for i in m["images"]) / 3)
    ours = report([0.5, 0.7, 1.6], 0.3, 0.9)
    lo, hi = ratio_interval(ours, m)
    assert lo <= ours["metrics"]["CIDEr"] / m["metrics"]["CIDEr"] <= hi


def test_quality_table_shows_no_ratio_to_a_run_that_scored_nothing():
    sys.path.insert(0, str(REPO / "bench"))
    from quality import OURS, mean_of_runs, table

    def report(ciders):
        return {"metrics": {"CIDEr": sum(ciders) / len(ciders), "BLEU-4": 0.1, "ROUGE-L": 0.3},
                "stats": {"distinct_fraction": 0.5, "most_common_fraction": 0.1},
                "images": [{"key": k, "cider": c} for k, c in zip("abc", ciders)]}

    # one seed-recipe run that learned nothing was printed as "128504310.85x (its worst)"
    seed = mean_of_runs([report([0.3, 0.6, 0.9]), report([0.0, 0.0, 0.0])])
    text = table("COCO", {"n_test": 3, "timings": {}, "results": {"seed recipe": seed, OURS: report([0.5, 0.7, 1.6])}})
    assert "to n/a (CIDEr 0) (its worst)" in text and "1.56x (its best run)" in text  # 0.933 / 0.6


def test_quality_consensus_is_leave_one_out_cider_with_the_corpus_document_frequencies():
    """The nearest neighbour's consensus caption: each reference scored against the image's other
    references, idf from the training corpus. A one-image corpus gave every n-gram idf 0, every score
    0, and so always the first reference."""
    sys.path.insert(0, str(REPO / "bench"))
    from pycocoevalcap.cider.cider_scorer import CiderScorer
    from types import SimpleNamespace

    import numpy as np
    from quality import consensus_scores, nearest_neighbour
    from stage2_decoder.training.cider import CiderD
    from common.tokenizer import tokenize

    refs = {"dog": ["a dog runs on the grass", "a brown dog running in a field", "a dog on grass",
                    "two cats sleep on a sofa", "a dog is running across the green grass"],
            "cat": ["a cat sleeps on a sofa", "a grey cat asleep", "a cat lying on a couch"],
            "bus": ["a red bus on a street", "a bus parked by the road", "a double decker bus"],
            "man": ["a man rides a bike", "a person on a bicycle in the street"]}
    corpus = CiderD(refs)
    got = consensus_scores(corpus, "dog", refs["dog"])

    # reference: pycocoevalcap's own CIDEr-D, document frequencies from the whole corpus, then each
    # caption of "dog" scored against the other four
    spaced = {k: [" ".join(tokenize(c)) for c in caps] for k, caps in refs.items()}
    want = []
    for i, cap in enumerate(spaced["dog"]):
        scorer = CiderScorer(n=4, sigma=6.0)
        for k, caps in spaced.items():
            scorer.cook_append(cap, caps)
        scorer.compute_doc_freq()
        scorer.crefs[0] = [r for j, r in enumerate(scorer.crefs[0]) if j != i]  # "dog" is the first image
        want.append(scorer.compute_cider()[0])
    assert got == pytest.approx(want, rel=1e-9)
    assert int(got.argmax()) != 0 and got.max() > 0  # the odd one out (cats) scores lowest, not first
    assert int(got.argmin()) == 3

    # the baseline gives a test photo whose features are nearest "dog" that consensus caption
    keys = [*refs, "test photo"]
    feats = np.eye(len(keys), 8, dtype=np.float32)
    feats[-1] = feats[0] + 0.1
    cache = SimpleNamespace(features=feats, rows_by_key=lambda: {k: i for i, k in enumerate(keys)})
    records = {k: SimpleNamespace(captions=caps) for k, caps in refs.items()}
    picked = nearest_neighbour(cache, records, list(refs), ["test photo"])
    assert picked == {"test photo": refs["dog"][int(got.argmax())]}


def _quick_quality(data_dir, tmp_path, *extra):
    out = tmp_path / "q.json"
    p = subprocess.run([sys.executable, "bench/quality.py", "--quick", "--datasets", "coco", "--seed-runs", "2",
                        *extra, "--data", str(data_dir), "--work", str(tmp_path / "work"), "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": TEST_THREADS})
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, json.loads(out.read_text())["coco"]


def test_quality_quick_mode_scores_the_seed_recipe_as_a_mean_of_runs(data_dir, coco_dir, tmp_path):
    stdout, report = _quick_quality(data_dir, tmp_path, "--ours-runs", "1")
    assert "mean of 2 training seeds" in stdout and "its worst" in stdout
    assert {"seed recipe", "nearest neighbour", "ours (default)"} <= set(report["metrics"])
    assert sorted(k for k in report["timings"] if k.startswith("train seed recipe")) == \
        ["train seed recipe seed 0 s", "train seed recipe seed 1 s"]
    assert (tmp_path / "work" / "coco-seed" / "last.pt").is_file()  # the first run keeps the old directory
    assert (tmp_path / "work" / "coco-seed-s1" / "last.pt").is_file()


@pytest.mark.slow
def test_quality_averages_ours_over_seeds_and_compares_one_setting_paired(data_dir, coco_dir, tmp_path):
    stdout, report = _quick_quality(data_dir, tmp_path, "--ours-runs", "2", "--compare", "ema_warmup=off")
    assert "ours / ours (ema_warmup=False) = " in stdout  # the A/B of one setting, paired
    assert {"ours (default)", "ours (ema_warmup=False)"} <= set(report["metrics"])
    assert (tmp_path / "work" / "coco-ours-s1" / "last.pt").is_file()


def test_quality_compare_takes_one_train_setting_of_its_type():
    import argparse

    sys.path.insert(0, str(REPO / "bench"))
    from quality import compare_setting

    assert compare_setting("ema_warmup=off") == ("ema_warmup", False)
    assert compare_setting("ema_decay=0.99") == ("ema_decay", 0.99)
    assert compare_setting("scst_max_len=20") == ("scst_max_len", 20)
    for bad in ("ema_warmup", "no_such=1", "ema_warmup=maybe", "scst_max_len=1.5", "features=x"):
        with pytest.raises(argparse.ArgumentTypeError):
            compare_setting(bad)


def test_precision_quick_mode_compares_bf16_with_fp32_features(data_dir, coco_dir, tmp_path):
    """bench/precision.py: a float32 and a bfloat16 cache (the CUDA path's encoder, run on the CPU), a decoder
    on each, each scored from both precisions' features."""
    from common.feature_cache import read_meta

    out = tmp_path / "precision.json"
    p = subprocess.run([sys.executable, "bench/precision.py", "--quick", "--data", str(data_dir), "--work",
                        str(tmp_path / "work"), "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": TEST_THREADS})
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    for prec in ("float32", "bfloat16"):
        assert read_meta(tmp_path / "work" / f"coco-mobilenet_v2-{prec}.h5").precision == prec
        scores = report["trained_on"][prec]
        assert set(scores["cider"]) == {"float32", "bfloat16"} and 0 <= scores["captions_changed"] <= 1
        lo, hi = scores["ratio_bf16_over_fp32_95"]
        assert lo <= hi
    diff = report["feature_relative_difference"]
    assert 1e-3 < diff["median"] <= diff["max"] < 0.5  # rounded to bf16, and still the same features
    assert "| bfloat16 cache |" in p.stdout and report["images"] > 0
