"""CIDEr-D with corpus document frequencies, held as integer n-gram ids in numpy arrays.

The SCST reward scores every sampled caption against its image's references with document
frequencies taken once from the training references (pycocoevalcap recomputes them from whatever
set it is given). Same formula as pycocoevalcap's scorer: n = 1..4, tf-idf vectors with clipped
hypothesis counts, Gaussian length penalty sigma = 6, x10.

Layout (C reference captions, I images, U_n distinct n-grams of order n in the references):
    n-gram ids   order 1: word id; order n: position of (id of its (n-1)-gram prefix, last word)
                 in the sorted table `_tables[n]` of int64 keys prefix * _M + word
    references   per order, CSR over captions: `_ptr[n]` (C + 1,) into `_gram[n]` int32 and `_tf[n]` uint16
                 (uint32 where a gram occurs over 65,535 times in one caption)
    per caption  `_norm` (C, 4) float64 tf-idf norms, `_len` (C,) word counts
    per image    `_img_ptr` (I + 1,) into the captions; `_idf[n]` (U_n,) float64
A hypothesis n-gram unseen in the references gets a fresh id (idf log(I), matches nothing).
"""
from __future__ import annotations

import math
from itertools import chain

import numpy as np

from common.tokenizer import DEFAULT_TOKENIZER, tokenize

NGRAMS, SIGMA = 4, 6.0
_M = 1 << 40  # key multiplier: word ids (and fresh ones) stay below it
_BIG = 1 << 40  # hypothesis keys: (hyp * NGRAMS + order) * _BIG + gram id


def _flat(captions: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Word-id lists -> flat ids (T,) int64 and caption offsets (C + 1,) int64."""
    lengths = np.fromiter((len(c) for c in captions), dtype=np.int64, count=len(captions))
    offsets = np.zeros(len(captions) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.fromiter(chain.from_iterable(captions), dtype=np.int64, count=int(offsets[-1])), offsets


def _positions(offsets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Start positions (P,) of every n-gram inside one caption, and the caption (P,) each belongs to."""
    lengths = np.diff(offsets)
    counts = np.maximum(lengths - n + 1, 0)
    cap = np.repeat(np.arange(len(lengths)), counts)
    starts = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts) + offsets[:-1][cap]
    return starts, cap


def _unique(x: np.ndarray, counts: bool = False, inverse: bool = False):
    """np.unique of int64 `x` by one sort (a stable one uses the caption-major runs the keys come in;
    numpy 2's unique is 2-4x slower here): the sorted distinct values, and their counts or `x`'s
    positions among them if asked."""
    perm = np.argsort(x) if inverse else None  # ties in any order: the inverse is the same
    xs = x[perm] if inverse else np.sort(x, kind="stable")
    first = np.empty(len(xs), dtype=bool)
    first[:1] = True
    np.not_equal(xs[1:], xs[:-1], out=first[1:])
    uniq = xs[first]
    if counts:
        return uniq, np.diff(np.append(np.flatnonzero(first), len(xs)))
    if inverse:
        inv = np.empty(len(xs), dtype=np.int64)
        inv[perm] = np.cumsum(first) - 1
        return uniq, inv
    return uniq


def _ranges(ptr: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entries of CSR rows `which` (P,): their positions (E,) and the index into `which` (E,) of each."""
    n = ptr[which + 1] - ptr[which]
    owner = np.repeat(np.arange(len(which)), n)
    return np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n) + ptr[which][owner], owner


class CiderD:
    """CIDEr-D of captions against their image's references, with corpus document frequencies.

    `refs`: {key: captions}, each a string or already a word list (`scst.scst_refs` makes those).
    """

    def __init__(self, refs: dict[str, list[str] | list[list[str]]], tokenizer: str = DEFAULT_TOKENIZER):
        self.keys = list(refs)
        self._index = {k: i for i, k in enumerate(self.keys)}
        caps = [c if isinstance(c, list) else tokenize(c, tokenizer) for k in self.keys for c in refs[k]]
        n_caps = len(caps)
        per_image = np.fromiter((len(refs[k]) for k in self.keys), dtype=np.int64, count=len(self.keys))
        self._img_ptr = np.concatenate([[0], np.cumsum(per_image)])
        self.log_n = math.log(max(len(self.keys), 1))
        offsets = np.zeros(n_caps + 1, dtype=np.int64)
        np.cumsum(np.fromiter((len(c) for c in caps), dtype=np.int64, count=n_caps), out=offsets[1:])
        # word ids (sorted words: the same ids in every process) streamed into one array, no Python int per word
        stoi = self._stoi = {w: i for i, w in enumerate(sorted(set(chain.from_iterable(caps))))}
        words = np.fromiter(map(stoi.__getitem__, chain.from_iterable(caps)), dtype=np.int64, count=int(offsets[-1]))
        del caps
        self._len = np.diff(offsets).astype(np.int32)
        image_of = np.repeat(np.arange(len(self.keys), dtype=np.int64), per_image)  # (C,)
        self._tables, self._idf, self._ptr, self._gram, self._tf = [], [], [], [], []
        self._norm = np.zeros((n_caps, NGRAMS))
        prev = words  # (T,) id of the (n-1)-gram starting at each position (valid where an n-gram starts)
        for n in range(1, NGRAMS + 1):
            starts, cap = _positions(offsets, n)
            if n == 1:
                ids, table = words, np.arange(len(stoi), dtype=np.int64)
            else:
                table, ids = _unique(prev[starts] * _M + words[starts + n - 1], inverse=True)
                prev = np.empty(len(words), dtype=np.int64)
                prev[starts] = ids
            u = max(len(table), 1)
            per_cap, tf = _unique(cap * u + ids, counts=True)  # distinct (caption, gram), caption-major
            del starts, ids
            c_of, g_of = per_cap // u, per_cap % u
            del per_cap
            df = np.bincount(_unique(image_of[c_of] * u + g_of) % u, minlength=len(table))
            idf = self.log_n - np.log(np.maximum(1.0, df))
            val = tf * idf[g_of]
            self._norm[:, n - 1] = np.sqrt(np.bincount(c_of, weights=val * val, minlength=n_caps))
            self._tables.append(table)
            self._idf.append(idf)
            self._ptr.append(np.searchsorted(c_of, np.arange(n_caps + 1)))
            self._gram.append(g_of.astype(np.int32))
            # uint16 halves the largest array; a gram repeated more often in one caption keeps its count (the
            # norm above counted it whole)
            self._tf.append(tf.astype(np.uint16 if tf.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32))
            del c_of, g_of, val, tf, cap

    def n_refs(self, key: str) -> int:
        """How many reference captions image `key` has (0 if unknown)."""
        i = self._index.get(key)
        return 0 if i is None else int(self._img_ptr[i + 1] - self._img_ptr[i])

    def score(self, key: str, words: list[str]) -> float:
        """CIDEr-D of one caption (word list) against the references of `key`."""
        return float(self.score_batch([key], [words])[0])

    def score_batch(self, keys: list[str], hyps: list[list[str]]) -> np.ndarray:
        """CIDEr-D (B,) float64 of hyps[i] (word lists) against the references of keys[i]."""
        b = len(hyps)
        fresh: dict[str, int] = {}
        base = len(self._stoi)
        ids = [[self._stoi.get(w) if w in self._stoi else base + fresh.setdefault(w, len(fresh)) for w in h]
               for h in hyps]
        words, offsets = _flat(ids)
        hyp_keys, hyp_vals = [], []
        hn = np.zeros((b, NGRAMS))
        prev = np.full(len(words), -1, dtype=np.int64)
        for n in range(1, NGRAMS + 1):
            starts, hyp = _positions(offsets, n)
            table = self._tables[n - 1]
            if n == 1:
                gram = words[starts]
                seen = gram < base
            else:
                k = prev[starts] * _M + words[starts + n - 1]
                pos = np.minimum(np.searchsorted(table, k), max(len(table) - 1, 0))
                seen = (table[pos] == k) if len(table) else np.zeros(len(k), dtype=bool)
                gram = np.where(seen, pos, 0)
                _, fresh_ids = np.unique(k[~seen], return_inverse=True)
                gram[~seen] = len(table) + fresh_ids
            cur = np.full(len(words), -1, dtype=np.int64)
            cur[starts] = gram
            prev = cur
            idf = np.full(len(gram), self.log_n)
            idf[seen] = self._idf[n - 1][gram[seen]]
            hk, first, tf = np.unique((hyp * NGRAMS + n - 1) * _BIG + gram, return_index=True, return_counts=True)
            v = tf * idf[first]
            hyp_keys.append(hk)
            hyp_vals.append(v)
            hn[:, n - 1] = np.sqrt(np.bincount(hk // _BIG // NGRAMS, weights=v * v, minlength=b))
        hkeys, hvals = np.concatenate(hyp_keys), np.concatenate(hyp_vals)
        order_k = np.argsort(hkeys)
        hkeys, hvals = hkeys[order_k], hvals[order_k]

        # (hypothesis, reference caption) pairs: every reference of each hypothesis's image
        img = np.array([self._index[k] for k in keys], dtype=np.int64)
        m = self._img_ptr[img + 1] - self._img_ptr[img]  # (B,)
        pair_ref, pair_hyp = _ranges(self._img_ptr, img)
        # every n-gram entry of every pair's reference, order by order, looked up among the hypothesis's
        dot = np.zeros((len(pair_ref), NGRAMS))  # (P, 4)
        for n in range(NGRAMS):
            ent, ent_pair = _ranges(self._ptr[n], pair_ref)
            gram = self._gram[n][ent].astype(np.int64)
            rv = self._tf[n][ent] * self._idf[n][gram]
            want = (pair_hyp[ent_pair] * NGRAMS + n) * _BIG + gram
            pos = np.minimum(np.searchsorted(hkeys, want), max(len(hkeys) - 1, 0))
            x = np.where(hkeys[pos] == want, hvals[pos], 0.0) if len(hkeys) else np.zeros(len(want))
            dot[:, n] = np.bincount(ent_pair, weights=np.minimum(x, rv) * rv, minlength=len(pair_ref))
        hnp, rnp = hn[pair_hyp], self._norm[pair_ref]  # (P, 4) each
        ok = (hnp > 0) & (rnp > 0)
        cos = np.where(ok, dot / np.where(ok, hnp * rnp, 1.0), 0.0).sum(1)  # (P,)
        hl = np.diff(offsets)[pair_hyp]
        penalty = np.exp(-((hl - self._len[pair_ref]) ** 2) / (2 * SIGMA ** 2))
        total = np.bincount(pair_hyp, weights=penalty * cos, minlength=b)
        return np.where(m > 0, 10.0 * total / (NGRAMS * np.maximum(m, 1)), 0.0)

    def nbytes(self) -> int:
        """Bytes held in the scorer's arrays (the Python word dict and key index come on top)."""
        arrays = [self._norm, self._len, self._img_ptr, *self._ptr, *self._gram, *self._tf, *self._tables,
                  *self._idf]
        return int(sum(a.nbytes for a in arrays))
