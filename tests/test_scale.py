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
