"""Full-size scaling: token-id cache, the compact CIDEr-D scorer, slim best.pt, the capped gallery,
and the smoke mode of bench/scale.py."""
from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from common.tokenizer import tokenize

NGRAMS, SIGMA = 4, 6.0


def _counts(words):
    return [Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1)) for n in range(1, NGRAMS + 1)]


class DictCiderD:
    """The dict-based CIDEr-D scorer the array one replaced: the reference its scores must equal."""

    def __init__(self, refs):
        self.refs = {k: [c if isinstance(c, list) else tokenize(c) for c in caps] for k, caps in refs.items()}
        df = Counter()
        for caps in self.refs.values():
            df.update({g for c in caps for order in _counts(c) for g in order})
        self.log_n = math.log(max(len(self.refs), 1))
        self.df = df
        self._ref_vecs = {k: [self._vec(c) for c in caps] for k, caps in self.refs.items()}

    def _vec(self, words):
        vec, norm = [], []
        for order in _counts(words):
            v = {g: tf * (self.log_n - math.log(max(1.0, self.df.get(g, 0.0)))) for g, tf in order.items()}
            vec.append(v)
            norm.append(math.sqrt(sum(x * x for x in v.values())))
        return vec, norm, len(words)

    def score(self, key, words):
        refs = self._ref_vecs[key]
        if not refs:
            return 0.0
        hv, hn, hl = self._vec(words)
        total = 0.0
        for rv, rn, rl in refs:
            penalty = math.exp(-((hl - rl) ** 2) / (2 * SIGMA ** 2))
            for n in range(NGRAMS):
                if hn[n] and rn[n]:
                    dot = sum(min(x, rv[n].get(g, 0.0)) * rv[n].get(g, 0.0) for g, x in hv[n].items())
                    total += penalty * dot / (hn[n] * rn[n])
        return 10.0 * total / (NGRAMS * len(refs))


# --- CIDEr-D ------------------------------------------------------------------------------------------------

def test_array_cider_d_equals_the_dict_scorer_on_real_captions(coco_records):
    from stage2_decoder.training.cider import CiderD

    recs = coco_records[:300]
    refs = {r.key: [tokenize(c) for c in r.captions[1:]] for r in recs}
    refs["no-refs"] = []
    mine, theirs = CiderD(refs), DictCiderD(refs)
    rng = random.Random(0)
    keys, hyps = [], []
    for i, r in enumerate(recs):
        own = tokenize(r.captions[0])
        other = tokenize(recs[(i + 7) % len(recs)].captions[0])
        # own caption, another image's, a shuffled mix, words never seen in a reference, repeats, nothing
        for h in (own, other, rng.sample(own + other, len(own)), own[:3] + ["zzqx", "zzqx", "qqzz"] + own[3:],
                  own[:2] * 3, [], own[:1]):
            keys.append(r.key)
            hyps.append(h)
    keys.append("no-refs")
    hyps.append(["a", "dog"])
    got = mine.score_batch(keys, hyps)
    want = [theirs.score(k, h) for k, h in zip(keys, hyps)]
    assert max(want) > 1.0  # the own captions match well: the comparison is not between zeros
    assert max(abs(g - w) for g, w in zip(got, want)) < 1e-6
    assert mine.score(keys[1], hyps[1]) == pytest.approx(want[1], abs=1e-6)
    assert mine.n_refs("no-refs") == 0 and mine.n_refs(recs[0].key) == len(recs[0].captions) - 1


def test_array_cider_d_counts_a_gram_repeated_past_65535_times(coco_records):
    from stage2_decoder.training.cider import CiderD

    # a reference of 70,000 words: its counts were clipped at 65,535 while its norm counted them all
    refs = {r.key: [tokenize(c) for c in r.captions] for r in coco_records[:20]}
    refs["long"] = [["a"] * 70_000, ["a", "dog"]]
    hyps = [["a"] * 70_000, ["a", "dog", "runs"]]
    got = CiderD(refs).score_batch(["long", "long"], hyps)
    want = [DictCiderD(refs).score("long", h) for h in hyps]
    assert max(abs(g - w) for g, w in zip(got, want)) < 1e-6 and want[0] > 1.0


def test_array_cider_d_tokenises_string_references_like_word_lists(coco_records):
    from stage2_decoder.training.cider import CiderD

    recs = coco_records[:20]
    as_text = CiderD({r.key: r.captions for r in recs})
    as_words = CiderD({r.key: [tokenize(c) for c in r.captions] for r in recs})
    hyps = [tokenize(r.captions[0]) for r in recs]
    keys = [r.key for r in recs]
    assert as_text.score_batch(keys, hyps).tolist() == as_words.score_batch(keys, hyps).tolist()


# --- token cache --------------------------------------------------------------------------------------------

@pytest.fixture()
def token_env(tmp_path, monkeypatch, coco_dir):
    """An empty token cache, a private copy of the real captions file, and a counting tokenizer."""
    import shutil

    import common.tokenizer as tokenizer_mod
    from common.datasets import load_dataset

    monkeypatch.setenv("CAPCACHE_TOKEN_CACHE", str(tmp_path / "tokens"))
    captions = tmp_path / "captions.json"
    shutil.copyfile(coco_dir / "captions.json", captions)  # not its mode: the shared data may be read-only
    records = load_dataset("coco", captions, coco_dir / "images")[:30]
    calls = []
    real = tokenizer_mod.tokenize
    monkeypatch.setattr(tokenizer_mod, "tokenize", lambda c, *how: calls.append(c) or real(c, *how))
    return captions, records, calls


def test_token_cache_hits_on_a_rerun_and_gives_what_tokenising_gives(token_env):
    from common.token_cache import cache_file, tokenize_records

    captions, records, calls = token_env
    first = tokenize_records(captions, records)
    assert len(calls) == sum(len(r.captions) for r in records) and cache_file(captions).is_file()
    calls.clear()
    again = tokenize_records(captions, records)
    assert calls == [] and again == first
    assert again == {r.key: [tokenize(c) for c in r.captions] for r in records}


def test_token_cache_tokenises_only_keys_it_lacks(token_env):
    from common.token_cache import tokenize_records

    captions, records, calls = token_env
    tokenize_records(captions, records[:10])
    calls.clear()
    both = tokenize_records(captions, records[5:20])
    assert len(calls) == sum(len(r.captions) for r in records[10:20]) and set(both) == {r.key for r in records[5:20]}
    calls.clear()
    tokenize_records(captions, records[:20])  # the merged file holds all twenty
    assert calls == []


def test_token_cache_is_invalidated_by_new_captions_content(token_env):
    from common.token_cache import tokenize_records

    captions, records, calls = token_env
    tokenize_records(captions, records)
    captions.write_text(captions.read_text() + "\n")  # same records, other bytes: another file
    calls.clear()
    tokenize_records(captions, records)
    assert len(calls) == sum(len(r.captions) for r in records)


def test_token_cache_is_invalidated_by_a_new_tokenizer_version(token_env, monkeypatch):
    import common.token_cache as tc

    captions, records, calls = token_env
    tc.tokenize_records(captions, records)
    calls.clear()
    monkeypatch.setattr(tc, "tokenizer_version", lambda name: "edited")
    tc.tokenize_records(captions, records)
    assert len(calls) == sum(len(r.captions) for r in records)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign", "bad_ids", "other_captions"])
def test_a_corrupt_or_foreign_token_cache_is_ignored_and_rebuilt(token_env, damage):
    import json

    import numpy as np

    from common.token_cache import cache_file, tokenize_records

    captions, records, calls = token_env
    want = tokenize_records(captions, records)
    path = cache_file(captions)
    with np.load(path, allow_pickle=False) as z:
        arrays = dict(z)
    if damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        if damage == "foreign":
            meta = json.loads(str(arrays["meta"]))
            arrays["meta"] = np.array(json.dumps({**meta, "captions_sha256": "0" * 64}))
        elif damage == "bad_ids":
            arrays["ids"] = arrays["ids"] + len(json.loads(str(arrays["words"])))
        else:  # the same keys, other captions: the stored caption digests no longer match
            arrays["digests"] = arrays["digests"] ^ 1
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    calls.clear()
    assert tokenize_records(captions, records) == want
    assert len(calls) == sum(len(r.captions) for r in records)  # tokenised again, not read
    calls.clear()
    tokenize_records(captions, records)
    assert calls == []  # and the rebuilt file is good


# --- checkpoints --------------------------------------------------------------------------------------------

TINY = dict(batch_size=16, embed_size=16, hidden_size=32, vocab_threshold=2, dry_run=True, device="cpu",
            progress=False, scst_epochs=0)


def torch_from(a):
    import torch

    return torch.from_numpy(a).float()


@pytest.fixture(scope="module")
def tiny_run(shared_cache, tmp_path_factory):
    from stage2_decoder.training.config import TrainConfig
    from stage2_decoder.training.loop import train

    run = tmp_path_factory.mktemp("scale") / "run"
    train(TrainConfig(features=str(shared_cache), out=str(run), epochs=1, **TINY))
    return run


def test_best_pt_holds_what_captioning_needs_and_last_pt_the_resume_state(tiny_run, shared_cache):
    from common.feature_cache import load_cache
    from stage2_decoder.api import Captioner
    from stage2_decoder.training.checkpoint import RESUME_ONLY, load_checkpoint

    best, last = load_checkpoint(tiny_run / "best.pt"), load_checkpoint(tiny_run / "last.pt")
    assert not set(RESUME_ONLY) & set(best)
    assert {"optimizer_state", "scheduler_state", "rng_state", "history", "train_model_state"} <= set(last)
    assert {"epoch", "best", "split", "model_state", "decoder_config", "vocab", "backbone"} <= set(best)
    cap = Captioner.load(tiny_run / "best.pt", device="cpu")
    feats = torch_from(load_cache(shared_cache).features[:2])
    assert len(cap.caption_features(feats)) == 2


def test_an_old_best_pt_with_the_resume_state_still_loads_and_captions_the_same(tiny_run, tmp_path, shared_cache):
    import torch

    from common.feature_cache import load_cache
    from stage2_decoder.api import Captioner
    from stage2_decoder.training.checkpoint import load_checkpoint

    last = torch.load(tiny_run / "last.pt", weights_only=True)
    fat = tmp_path / "old-best.pt"
    torch.save(last, fat)  # best.pt as it used to be written: every key of last.pt
    assert "optimizer_state" in load_checkpoint(fat)
    feats = torch_from(load_cache(shared_cache).features[:3])
    old = Captioner.load(fat, device="cpu").caption_features(feats)
    slim = tmp_path / "slim.pt"
    torch.save({k: v for k, v in last.items() if k not in ("optimizer_state", "history", "rng_state",
                                                            "scheduler_state", "train_model_state")}, slim)
    assert Captioner.load(slim, device="cpu").caption_features(feats) == old


def test_best_pt_of_the_default_decoder_at_ten_thousand_words_is_under_25_mb(tmp_path):
    import torch

    from common.vocab import SPECIALS, Vocabulary
    from stage2_decoder.model import CaptionDecoder
    from stage2_decoder.training.checkpoint import inference_extra, save_checkpoint
    from stage2_decoder.training.config import TrainConfig

    vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(10_000 - len(SPECIALS)))])
    model = CaptionDecoder(TrainConfig(features="f", out="o").decoder_config(2048, len(vocab)))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 2048), torch.randint(4, len(vocab), (4, 6)), torch.tensor([6, 5, 4, 3])).sum().backward()
    opt.step()  # the Adam moments: twice the weights again
    extra = dict(epoch=1, optimizer_state=opt.state_dict(), rng_state=torch.get_rng_state(), history=[],
                 train_model_state={k: v.clone() for k, v in model.state_dict().items()}, best={"epoch": 1})
    backbone = {"name": "resnet152", "weights": "none", "feature_dim": 2048, "preprocess": "{}"}
    save_checkpoint(tmp_path / "best.pt", model, vocab, backbone, **inference_extra(extra))
    save_checkpoint(tmp_path / "last.pt", model, vocab, backbone, **extra)
    best, last = (tmp_path / "best.pt").stat().st_size, (tmp_path / "last.pt").stat().st_size
    assert best <= 25 * 2**20 and last > 3 * best


# --- gallery ------------------------------------------------------------------------------------------------

def _report(n):
    return {"metrics": {"CIDEr": 0.5}, "n_images": n,
            "images": [{"key": f"k{i}", "caption": f"caption {i}", "references": ["a ref"],
                        "cider": None if i == 3 else (i * 7919 % n) / n} for i in range(n)]}


def test_the_gallery_keeps_the_best_and_worst_and_says_how_many_it_left_out():
    import re

    from stage2_decoder.reporting.gallery import render_html, shown_images

    report = _report(30)
    shown, left_out = shown_images(report["images"], 10)
    scored = sorted((x for x in report["images"] if x["cider"] is not None), key=lambda x: -x["cider"])
    keys = [x["key"] for _, x in shown]
    assert left_out == 20 and len(keys) == 10
    assert keys[:5] == [x["key"] for x in scored[:5]]
    assert keys[5:] == [x["key"] for x in scored[-4:]] + ["k3"]  # the unscored image counts as worst
    page = render_html(report, max_images=10)
    assert len(re.findall(r'<div class="card"', page)) == 10
    assert "20 left out" in page and "of 30 images" in page
    whole = render_html(report, max_images=0)
    assert len(re.findall(r'<div class="card"', whole)) == 30 and "left out" not in whole
    assert shown_images(report["images"], 30) == (shown_images(report["images"], 0)[0], 0)


def test_the_report_cli_caps_the_gallery(tmp_path):
    import json
    import re

    from click.testing import CliRunner

    from stage2_decoder.report import main

    src = tmp_path / "eval.json"
    src.write_text(json.dumps(_report(12)))
    result = CliRunner().invoke(main, [str(src), "--out", str(tmp_path / "g.html"), "--html-max", "4"])
    assert result.exit_code == 0, result.output
    assert "4 of 12 images" in result.output
    assert len(re.findall(r'<div class="card"', (tmp_path / "g.html").read_text())) == 4


# --- the benchmark's smoke mode -----------------------------------------------------------------------------

@pytest.mark.slow
def test_the_scale_benchmark_runs_in_tiny_mode_and_writes_its_table(data_dir, coco_dir, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "scale"
    cmd = [sys.executable, "bench/scale.py", "--tiny", "--data", str(data_dir), "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    doc = json.loads((out / "tiny" / "scale.json").read_text())
    assert doc["sizes"] == [0.5, 1.0]
    small, big = doc["results"]["0.5"], doc["results"]["1.0"]
    assert big["images"] == 2 * small["images"] and big["train_pairs"] > small["train_pairs"]
    assert big["best_pt_mb"] < big["last_pt_mb"] and big["gallery_mb"] > 0 and big["scorer_build_s"] > 0
    assert all(e is None or math.isfinite(e) for e in doc["exponents"].values())
    for label in ("start-up to 1st step, cold", "SCST scorer construction", "stage 1 assembly", "exponent"):
        assert label in p.stdout
    # a rerun reuses the workload: the captions file is not rewritten
    captions = out / "tiny" / "captions-1.0.json"
    before = captions.stat().st_mtime_ns
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, timeout=900)
    assert p.returncode == 0 and captions.stat().st_mtime_ns == before
