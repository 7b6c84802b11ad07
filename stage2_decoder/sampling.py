"""Draw several captions per image at random: temperature and nucleus (top-p) sampling, seeded."""
from __future__ import annotations

import torch

from common.vocab import Vocabulary
from stage2_decoder.model import CaptionDecoder


@torch.inference_mode()
def sample_captions(model: CaptionDecoder, features: torch.Tensor, n: int, max_len: int = 20, min_len: int = 1,
                    temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None
                    ) -> list[list[tuple[list[int], float]]]:
    """features (B, D) -> per image, n sampled (word ids without <end>, score), best score first.

    The score is the caption's mean log-probability per emitted token (its words and <end>) under the
    model itself, not the tempered distribution it was drawn from, so scores compare across settings.
    The same seed on the same device gives the same captions.
    """
    b, dev = features.shape[0], features.device
    gen = torch.Generator(device=dev)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    state = model.init_state(features)  # (L, B, H) each
    state = (state[0].repeat_interleave(n, dim=1), state[1].repeat_interleave(n, dim=1))  # (L, B*n, H)
    tokens = torch.full((b * n,), Vocabulary.start_id, dtype=torch.long, device=dev)
    out = torch.zeros(b * n, max_len, dtype=torch.long, device=dev)
    total = torch.zeros(b * n, device=dev)  # summed model log-prob of the emitted tokens
    count = torch.zeros(b * n, device=dev)
    alive = torch.ones(b * n, dtype=torch.bool, device=dev)
    for t in range(max_len):
        logp, state = model.step(tokens, state)  # (B*n, V); <pad>/<start>/<unk> already -inf
        if t < min_len:
            logp[:, Vocabulary.end_id] = float("-inf")
        probs = _nucleus(torch.softmax(logp / temperature, dim=-1), top_p)  # (B*n, V)
        tokens = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # (B*n,)
        out[:, t] = tokens
        total += logp.gather(1, tokens[:, None]).squeeze(1) * alive
        count += alive
        alive &= tokens != Vocabulary.end_id
        if not bool(alive.any()):
            break
    scores = (total / count.clamp(min=1)).view(b, n).tolist()
    rows = out.view(b, n, max_len).tolist()
    return [sorted(((_until_end(ids), s) for ids, s in zip(rows[i], scores[i])), key=lambda h: -h[1])
            for i in range(b)]


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely words whose probability reaches top_p (per row)."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)  # (N, V)
    # keep a word if the mass before it is below top_p: the most likely word is always kept
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return probs * keep


def _until_end(ids: list[int]) -> list[int]:
    return ids[: ids.index(Vocabulary.end_id)] if Vocabulary.end_id in ids else ids
