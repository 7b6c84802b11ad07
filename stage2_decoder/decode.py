"""Greedy and beam-search decoding of a trained CaptionDecoder (call in eval mode)."""
from __future__ import annotations

import torch

from stage2_decoder.model import CaptionDecoder

START_ID, END_ID = 1, 2


@torch.inference_mode()
def greedy(model: CaptionDecoder, features: torch.Tensor, max_len: int = 20) -> list[list[int]]:
    """features (B, D) -> per image, the word ids up to (not including) <end>."""
    state = model.init_state(features)
    b = features.shape[0]
    tokens = torch.full((b,), START_ID, dtype=torch.long, device=features.device)
    out = torch.zeros(b, max_len, dtype=torch.long, device=features.device)
    finished = torch.zeros(b, dtype=torch.bool, device=features.device)
    for t in range(max_len):
        logp, state = model.step(tokens, state)
        tokens = logp.argmax(-1)
        out[:, t] = tokens
        finished |= tokens == END_ID
        if bool(finished.all()):
            break
    return [_until_end(row) for row in out.tolist()]


def _until_end(ids: list[int]) -> list[int]:
    return ids[: ids.index(END_ID)] if END_ID in ids else ids


@torch.inference_mode()
def beam_search(model: CaptionDecoder, features: torch.Tensor, beam_size: int = 3, max_len: int = 20,
                length_penalty: float = 0.0) -> list[list[int]]:
    """Beam search per image; returns the best hypothesis' word ids (no <end>).

    Scores are summed log-probs divided by len**length_penalty (0 = plain sum). With
    beam_size=1 this is exactly greedy decoding.
    """
    results = []
    for i in range(features.shape[0]):
        results.append(_beam_one(model, features[i:i + 1], beam_size, max_len, length_penalty))
    return results


def _beam_one(model, feature, k, max_len, alpha):
    h, c = model.init_state(feature)  # (L, 1, H)
    device = feature.device
    seqs = torch.empty(1, 0, dtype=torch.long, device=device)
    scores = torch.zeros(1, device=device)
    tokens = torch.full((1,), START_ID, dtype=torch.long, device=device)
    state = (h, c)
    done: list[tuple[float, list[int]]] = []
    for t in range(max_len):
        logp, state = model.step(tokens, state)  # (n, V)
        cand = (scores.unsqueeze(1) + logp).view(-1)  # (n * V,)
        top, idx = cand.topk(min(k, cand.numel()))
        v = logp.shape[1]
        beam_idx, word = idx // v, idx % v
        seqs = torch.cat([seqs[beam_idx], word.unsqueeze(1)], dim=1)
        scores = top
        state = (state[0][:, beam_idx], state[1][:, beam_idx])
        ended = word == END_ID
        for j in torch.nonzero(ended).flatten().tolist():
            length = t + 1
            done.append((float(scores[j]) / (length ** alpha), seqs[j, :-1].tolist()))
        keep = ~ended
        if len(done) >= k or not bool(keep.any()):
            break
        seqs, scores, tokens = seqs[keep], scores[keep], word[keep]
        state = (state[0][:, keep], state[1][:, keep])
    if not done:  # nothing ended within max_len: take the best unfinished
        j = int(scores.argmax())
        return seqs[j].tolist()
    return max(done, key=lambda d: d[0])[1]
