"""Greedy and beam-search decoding of a trained CaptionDecoder (call in eval mode)."""
from __future__ import annotations

import torch

from stage2_decoder.decode_config import DecodeConfig  # noqa: F401  (defined torch-free, re-exported)
from stage2_decoder.model import CaptionDecoder

START_ID, END_ID = 1, 2


@torch.inference_mode()
def greedy(model: CaptionDecoder, features: torch.Tensor, max_len: int = 20, min_len: int = 0) -> list[list[int]]:
    """features (B, D) -> per image, the word ids up to (not including) <end>."""
    state = model.init_state(features)
    b = features.shape[0]
    tokens = torch.full((b,), START_ID, dtype=torch.long, device=features.device)
    out = torch.zeros(b, max_len, dtype=torch.long, device=features.device)
    finished = torch.zeros(b, dtype=torch.bool, device=features.device)
    for t in range(max_len):
        logp, state = model.step(tokens, state)  # (B, V)
        if t < min_len:
            logp[:, END_ID] = float("-inf")
        tokens = logp.argmax(-1)
        out[:, t] = tokens
        finished |= tokens == END_ID
        if bool(finished.all()):
            break
    return [_until_end(row) for row in out.tolist()]


def _until_end(ids: list[int]) -> list[int]:
    return ids[: ids.index(END_ID)] if END_ID in ids else ids


def decode(model: CaptionDecoder, features: torch.Tensor, cfg: DecodeConfig) -> list[list[int]]:
    """Greedy when beam_size == 1 (and no n-gram blocking), beam search otherwise."""
    if cfg.beam_size == 1 and cfg.no_repeat_ngram == 0:
        return greedy(model, features, cfg.max_len, cfg.min_len)
    return [hyps[0][0] for hyps in beam_search_nbest(model, features, cfg)]


def beam_search(model: CaptionDecoder, features: torch.Tensor, beam_size: int = 3, max_len: int = 20,
                length_penalty: float = 0.0, min_len: int = 0, no_repeat_ngram: int = 0) -> list[list[int]]:
    """Best hypothesis per image (word ids, no <end>). With beam_size=1 this equals greedy."""
    cfg = DecodeConfig(beam_size, max_len, min_len, length_penalty, no_repeat_ngram)
    return [hyps[0][0] for hyps in beam_search_nbest(model, features, cfg)]


@torch.inference_mode()
def beam_search_nbest(model: CaptionDecoder, features: torch.Tensor, cfg: DecodeConfig
                      ) -> list[list[tuple[list[int], float]]]:
    """Batched beam search: per image, up to beam_size (ids, normalised score), best first."""
    b, k, dev = features.shape[0], cfg.beam_size, features.device
    h, c = model.init_state(features)  # (L, B, H)
    state = (h.repeat_interleave(k, dim=1), c.repeat_interleave(k, dim=1))  # (L, B*k, H)
    scores = torch.full((b, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    tokens = torch.full((b * k,), START_ID, dtype=torch.long, device=dev)
    seqs = torch.zeros(b, k, 0, dtype=torch.long, device=dev)
    finished: list[list[tuple[list[int], float]]] = [[] for _ in range(b)]
    done = [False] * b
    offsets = (torch.arange(b, device=dev) * k).unsqueeze(1)  # (B, 1)
    for t in range(cfg.max_len):
        logp, state = model.step(tokens, state)  # (B*k, V)
        v = logp.shape[1]
        logp = logp.view(b, k, v)
        if t < cfg.min_len:
            logp[:, :, END_ID] = float("-inf")
        if cfg.no_repeat_ngram > 0 and t + 1 >= cfg.no_repeat_ngram:
            _block_repeats(logp, seqs, cfg.no_repeat_ngram)
        cand = (scores.unsqueeze(-1) + logp).view(b, k * v)
        top, idx = cand.topk(k, dim=1)  # (B, k)
        beam, word = idx // v, idx % v
        seqs = torch.cat([seqs.gather(1, beam.unsqueeze(-1).expand(-1, -1, seqs.shape[2])), word.unsqueeze(-1)], 2)
        flat = (offsets + beam).view(-1)
        state = (state[0][:, flat], state[1][:, flat])
        scores = top.clone()
        ended = (word == END_ID) & torch.isfinite(top)
        if bool(ended.any()):
            for i, j in ended.nonzero().tolist():
                if not done[i]:
                    finished[i].append((seqs[i, j, :-1].tolist(), float(top[i, j]) / ((t + 1) ** cfg.length_penalty)))
            scores[ended] = float("-inf")  # a finished beam is not extended
        for i in range(b):
            if not done[i] and (len(finished[i]) >= k or not bool(torch.isfinite(scores[i]).any())):
                done[i] = True
        if all(done):
            break
        for i in range(b):
            if done[i]:
                scores[i] = float("-inf")
        tokens = word.view(-1)
    out = []
    for i in range(b):
        hyps = finished[i]
        if len(hyps) < k:  # fill with unfinished beams (ran into max_len)
            for j in range(k):
                if torch.isfinite(scores[i, j]):
                    hyps.append((seqs[i, j].tolist(), float(scores[i, j]) / (cfg.max_len ** cfg.length_penalty)))
        out.append(sorted(hyps, key=lambda h: -h[1])[:k] or [([], float("-inf"))])
    return out


def _block_repeats(logp: torch.Tensor, seqs: torch.Tensor, n: int) -> None:
    """Set -inf on words that would repeat an n-gram already in the beam's sequence."""
    b, k, t = seqs.shape
    if t < n - 1:
        return
    rows = seqs.tolist()
    for i in range(b):
        for j in range(k):
            s = rows[i][j]
            prefix = tuple(s[t - n + 1:]) if n > 1 else ()
            banned = [s[p + n - 1] for p in range(t - n + 1) if tuple(s[p:p + n - 1]) == prefix]
            if banned:
                logp[i, j, banned] = float("-inf")
