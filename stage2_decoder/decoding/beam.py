"""Greedy and beam-search decoding of a trained CaptionDecoder (call in eval mode)."""
from __future__ import annotations

import math

import torch

from common.vocab import Vocabulary
from stage2_decoder.decoding.config import DecodeConfig  # noqa: F401  (defined torch-free, re-exported)
from stage2_decoder.decoding.ngram_block import block_repeats
from stage2_decoder.decoding.readback import LaggedFlags, read_back
from stage2_decoder.model import CaptionDecoder

START_ID, END_ID = Vocabulary.start_id, Vocabulary.end_id  # every vocabulary's fixed special ids
DONE_CHECK_EVERY = 2  # decoding steps between the loops' "have all images finished?" check points on a GPU


def done_check_every(device: torch.device) -> int:
    """Steps between a decoding loop's "all finished?" check points: every step on the CPU, where the read costs
    nothing and a step past the last <end> is wasted work; every DONE_CHECK_EVERY on a GPU, where each check
    point's flags are read at the next (readback.LaggedFlags: no stall), so a loop runs 2-3 steps past the last
    <end>. Either way the same captions: the steps past the last <end> change nothing."""
    return 1 if device.type == "cpu" else DONE_CHECK_EVERY


@torch.inference_mode()
def greedy(model: CaptionDecoder, features: torch.Tensor, max_len: int = 20, min_len: int = 0) -> list[list[int]]:
    """features (B, D) -> per image, the word ids up to (not including) <end>."""
    state = model.init_state(features)
    b = features.shape[0]
    tokens = torch.full((b,), START_ID, dtype=torch.long, device=features.device)
    out = torch.zeros(b, max_len, dtype=torch.long, device=features.device)
    finished = torch.zeros(b, dtype=torch.bool, device=features.device)
    every, flags = done_check_every(features.device), LaggedFlags(features.device)
    for t in range(max_len):
        logp, state = model.step(tokens, state)  # (B, V)
        if t < min_len:
            logp[:, END_ID] = float("-inf")
        tokens = logp.argmax(-1)
        out[:, t] = tokens
        finished |= tokens == END_ID
        if (t + 1) % every == 0 and flags.post(finished.all()):  # later steps only write past the <end>
            break
    return [until_end(row) for row in read_back(out)[0]]


def until_end(ids: list[int]) -> list[int]:
    return ids[: ids.index(END_ID)] if END_ID in ids else ids


def decode(model: CaptionDecoder, features: torch.Tensor, cfg: DecodeConfig) -> list[list[int]]:
    """Greedy when beam_size == 1 (and no n-gram blocking), beam search otherwise."""
    if cfg.beam_size == 1 and cfg.no_repeat_ngram == 0:
        return greedy(model, features, cfg.max_len, cfg.min_len)
    return [hyps[0][0] for hyps in beam_search_nbest(model, features, cfg)]


@torch.inference_mode()
def beam_search_nbest(model: CaptionDecoder, features: torch.Tensor, cfg: DecodeConfig
                      ) -> list[list[tuple[list[int], float]]]:
    """Batched beam search: per image, up to beam_size (ids, normalised score), best first.

    Finished hypotheses are kept in device tensors (slots in the order they ended) and read back in one copy
    at the end; on a GPU the loop learns that all images are done a check point late, without a stall
    (steps after that change nothing: a finished image's beams all score -inf).
    """
    b, k, dev, steps = features.shape[0], cfg.beam_size, features.device, cfg.max_len
    h, c = model.init_state(features)  # (L, B, H)
    state = (h.repeat_interleave(k, dim=1), c.repeat_interleave(k, dim=1))  # (L, B*k, H)
    scores = torch.full((b, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    tokens = torch.full((b * k,), START_ID, dtype=torch.long, device=dev)
    seqs = torch.zeros(b, k, steps, dtype=torch.long, device=dev)  # (B, k, max_len); column t = step t's word
    # an image has at most k - 1 finished hypotheses before a step and gains at most k in it: 2k - 1 slots,
    # and slot 2k - 1 takes the writes of the beams that did not end
    slots = 2 * k
    fin_seqs = torch.zeros(b, slots, steps, dtype=torch.long, device=dev)
    fin_len = torch.zeros(b, slots, dtype=torch.long, device=dev)
    fin_score = torch.full((b, slots), float("-inf"), dtype=torch.float64, device=dev)  # sum log p / len ** lp
    n_fin = torch.zeros(b, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    offsets = (torch.arange(b, device=dev) * k).unsqueeze(1)  # (B, 1)
    images = torch.arange(b, device=dev).unsqueeze(1).expand(b, k)  # (B, k)
    every, flags = done_check_every(dev), LaggedFlags(dev)
    for t in range(steps):
        logp, state = model.step(tokens, state)  # (B*k, V)
        v = logp.shape[1]
        logp = logp.view(b, k, v)
        if t < cfg.min_len:
            logp[:, :, END_ID] = float("-inf")
        if cfg.no_repeat_ngram > 0 and t + 1 >= cfg.no_repeat_ngram:
            block_repeats(logp, seqs[:, :, :t], cfg.no_repeat_ngram)
        cand = (scores.unsqueeze(-1) + logp).view(b, k * v)
        top, idx = cand.topk(k, dim=1)  # (B, k)
        beam, word = idx // v, idx % v
        seqs = seqs.gather(1, beam.unsqueeze(-1).expand(-1, -1, steps))
        seqs[:, :, t] = word
        flat = (offsets + beam).view(-1)
        state = (state[0][:, flat], state[1][:, flat])
        ended = (word == END_ID) & torch.isfinite(top) & ~done.unsqueeze(1)  # (B, k)
        slot = torch.where(ended, n_fin.unsqueeze(1) + ended.long().cumsum(1) - 1, slots - 1)  # (B, k)
        fin_seqs[images, slot] = seqs  # the words are columns :t (column t is the <end>)
        fin_len[images, slot] = t
        # in float64, as the Python float division it replaces: the same scores to the last bit
        fin_score[images, slot] = top.double() / ((t + 1) ** cfg.length_penalty)
        n_fin += ended.sum(1)
        scores = top.masked_fill(ended, float("-inf"))  # a finished beam is not extended
        done |= (n_fin >= k) | ~torch.isfinite(scores).any(1)
        if (t + 1) % every == 0 and flags.post(done.all()):  # true from a check point before, on a GPU
            break
        scores = scores.masked_fill(done.unsqueeze(1), float("-inf"))
        tokens = word.view(-1)
    # the one transfer: finished hypotheses, and the unfinished beams of images that ran into max_len
    fin_seqs, fin_len, fin_score, n_fin, seqs, scores = read_back(fin_seqs, fin_len, fin_score, n_fin, seqs, scores)
    out = []
    for i in range(b):
        hyps = [(fin_seqs[i][s][:fin_len[i][s]], fin_score[i][s]) for s in range(n_fin[i])]
        if len(hyps) < k:  # fill with unfinished beams (ran into max_len)
            hyps += [(seqs[i][j], scores[i][j] / (steps ** cfg.length_penalty))
                     for j in range(k) if math.isfinite(scores[i][j])]
        out.append(sorted(hyps, key=lambda h: -h[1])[:k] or [([], float("-inf"))])
    return out
