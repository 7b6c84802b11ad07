"""Greedy and beam search in numpy over one decoder step (the ONNX captioner's search).

A line-by-line copy of `stage2_decoder.decoding.beam` (same minimum length, length penalty, finished-beam
handling, n-best fill with unfinished beams, float32 scores), so an exported model gives the very
captions the PyTorch one does. `step(tokens (N,) int64, h, c) -> (logp (N, V) float32, h, c)`, the
states (L, N, H). Ties in top-k go to the lower index (numpy's stable sort).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from stage2_decoder.decoding.ngram_block import block_repeats

Step = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
NEG_INF = np.float32(-np.inf)


def greedy_scored(step: Step, h: np.ndarray, c: np.ndarray, start_id: int, end_id: int, max_len: int = 20,
                  min_len: int = 1, length_penalty: float = 0.0) -> list[list[tuple[list[int], float]]]:
    """Per image [(word ids, score)]: the greedy caption with the score a beam of one gives it (sum log p /
    tokens ** length_penalty, <end> counted), as `stage2_decoder.decoding.sampling.greedy_scored` (float32 sums)."""
    b = h.shape[1]
    tokens = np.full((b,), start_id, dtype=np.int64)
    out = np.zeros((b, max_len), dtype=np.int64)
    total, count = np.zeros(b, dtype=np.float32), np.zeros(b, dtype=np.float32)
    alive = np.ones(b, dtype=bool)
    for t in range(max_len):
        logp, h, c = step(tokens, h, c)  # (B, V)
        if t < min_len:
            logp[:, end_id] = NEG_INF
        tokens = logp.argmax(-1).astype(np.int64)
        out[:, t] = tokens
        total += logp[np.arange(b), tokens] * alive
        count += alive
        alive &= tokens != end_id
        if not alive.any():
            break
    # in float64, as the torch search divides: the same score to the last bit
    scores = (total.astype(np.float64) / np.maximum(count, 1).astype(np.float64) ** float(length_penalty)).tolist()
    return [[(_until_end(row, end_id), s)] for row, s in zip(out.tolist(), scores)]


def _until_end(ids: list[int], end_id: int) -> list[int]:
    return ids[: ids.index(end_id)] if end_id in ids else ids


def _topk(cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, N) -> the k largest values and their indices per row, largest first."""
    idx = np.argsort(-cand, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cand, idx, 1), idx


def beam_search_nbest(step: Step, h: np.ndarray, c: np.ndarray, start_id: int, end_id: int, beam_size: int = 3,
                      max_len: int = 20, min_len: int = 1, length_penalty: float = 0.7, no_repeat_ngram: int = 0
                      ) -> list[list[tuple[list[int], float]]]:
    """Batched beam search from the initial state: per image, up to beam_size (ids, normalised score), best first."""
    b, k = h.shape[1], beam_size
    h, c = np.repeat(h, k, axis=1), np.repeat(c, k, axis=1)  # (L, B*k, H)
    scores = np.full((b, k), NEG_INF, dtype=np.float32)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    tokens = np.full((b * k,), start_id, dtype=np.int64)
    seqs = np.zeros((b, k, 0), dtype=np.int64)
    finished: list[list[tuple[list[int], float]]] = [[] for _ in range(b)]
    done = [False] * b
    offsets = (np.arange(b) * k)[:, None]  # (B, 1)
    for t in range(max_len):
        logp, h, c = step(tokens, h, c)  # (B*k, V)
        v = logp.shape[1]
        logp = logp.reshape(b, k, v)
        if t < min_len:
            logp[:, :, end_id] = NEG_INF
        if no_repeat_ngram > 0 and t + 1 >= no_repeat_ngram:
            block_repeats(logp, seqs, no_repeat_ngram)
        cand = (scores[:, :, None] + logp).reshape(b, k * v)
        top, idx = _topk(cand, k)  # (B, k)
        beam, word = idx // v, idx % v
        seqs = np.concatenate([np.take_along_axis(seqs, beam[:, :, None], 1), word[:, :, None]], 2)
        flat = (offsets + beam).reshape(-1)
        h, c = h[:, flat], c[:, flat]
        scores = top.copy()
        ended = (word == end_id) & np.isfinite(top)
        if ended.any():
            for i, j in zip(*np.nonzero(ended)):
                if not done[i]:
                    finished[i].append((seqs[i, j, :-1].tolist(), float(top[i, j]) / ((t + 1) ** length_penalty)))
            scores[ended] = NEG_INF  # a finished beam is not extended
        for i in range(b):
            if not done[i] and (len(finished[i]) >= k or not np.isfinite(scores[i]).any()):
                done[i] = True
        if all(done):
            break
        for i in range(b):
            if done[i]:
                scores[i] = NEG_INF
        tokens = word.reshape(-1).astype(np.int64)
    out = []
    for i in range(b):
        hyps = finished[i]
        if len(hyps) < k:  # fill with unfinished beams (ran into max_len)
            for j in range(k):
                if np.isfinite(scores[i, j]):
                    hyps.append((seqs[i, j].tolist(), float(scores[i, j]) / (max_len ** length_penalty)))
        out.append(sorted(hyps, key=lambda hyp: -hyp[1])[:k] or [([], float("-inf"))])
    return out
