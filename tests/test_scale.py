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
    from stage2_decoder.cider import CiderD

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


def test_array_cider_d_tokenises_string_references_like_word_lists(coco_records):
    from stage2_decoder.cider import CiderD

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
    shutil.copy(coco_dir / "captions.json", captions)
    records = load_dataset("coco", captions, coco_dir / "images")[:30]
    calls = []
    real = tokenizer_mod.tokenize
    monkeypatch.setattr(tokenizer_mod, "tokenize", lambda c: calls.append(c) or real(c))
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
            arrays["ids"] = arrays["ids"] + len(arrays["words"])
        else:  # the same keys, other captions: the stored caption lengths no longer match
            arrays["cap_chars"] = arrays["cap_chars"] + 1
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    calls.clear()
    assert tokenize_records(captions, records) == want
    assert len(calls) == sum(len(r.captions) for r in records)  # tokenised again, not read
    calls.clear()
    tokenize_records(captions, records)
    assert calls == []  # and the rebuilt file is good
