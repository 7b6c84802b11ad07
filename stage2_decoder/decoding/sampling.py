"""Word-by-word decoding that keeps each caption's score: seeded temperature / top-p sampling of N
captions per image, and greedy decoding (the argmax at each step) with the beam search's score."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from common.vocab import Vocabulary
from stage2_decoder.decoding.beam import done_check_every
from stage2_decoder.decoding.readback import LaggedFlags, read_back
from stage2_decoder.model import CaptionDecoder


def content_key(data: torch.Tensor) -> int:
    """What an image's draws are seeded from besides the seed: a digest of its pixels (or its feature row;
    floats as float32, so the same values give the same draws in any float type, bfloat16 included, which
    numpy cannot hold)."""
    data = data.detach().cpu()
    if data.is_floating_point():
        data = data.float()
    return int.from_bytes(hashlib.sha256(data.contiguous().numpy().tobytes()).digest()[:16], "big")


def image_seed(seed: int, key: int) -> int:
    """The seed of one image's generator, mixed from the request's seed and the image's key (SeedSequence:
    nearby seeds and keys give unrelated streams)."""
    # int(): a numpy integer's `% 2**64` overflows int64 ("Python int too large to convert to C long")
    return int(np.random.SeedSequence([int(seed) % 2**64, int(key)]).generate_state(1, np.uint64)[0])


@torch.inference_mode()
def sample_captions(model: CaptionDecoder, features: torch.Tensor, n: int, max_len: int = 20, min_len: int = 1,
                    temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                    keys: Sequence[int] | None = None) -> list[list[tuple[list[int], float]]]:
    """features (B, D) -> per image, n sampled (word ids without <end>, score), best score first.

    The score is the caption's mean log-probability per emitted token (its words and <end>) under the
    model itself, not the tempered distribution it was drawn from, so scores compare across settings.
    Each image draws from its own generator, seeded from (seed, its key; default: `content_key` of its
    feature row): the same seed gives an image the same captions on the same device wherever it stands in
    a request and however the request is split into batches. Non-finite probabilities (NaN in the weights or
    features) raise FloatingPointError (torch.multinomial would trip a CUDA device-side assert, which kills the
    process's CUDA context: a server's every later request).
    """
    if seed is None:
        seed = torch.Generator().seed()
    keys = [content_key(f) for f in features] if keys is None else list(keys)
    if len(keys) != features.shape[0]:
        raise ValueError(f"sample_captions: {len(keys)} keys for {features.shape[0]} images")
    gens = [torch.Generator(device=features.device).manual_seed(image_seed(seed, k)) for k in keys]
    finite = torch.ones((), dtype=torch.bool, device=features.device)

    def draw(logp: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        nonlocal finite
        probs, ok = drawable(_nucleus(torch.softmax(logp / temperature, dim=-1), top_p))  # (B*n, V)
        # raised after the loop; a step past the last <end> (a GPU's late check) does not count
        finite = finite & (ok | ~alive.any())
        return draw_rows(probs, n, gens)

    ids, total, count = _word_by_word(model, features, n, max_len, min_len, draw)
    ids, scores, finite = read_back(ids, total / count, finite)
    if not finite:
        raise FloatingPointError("sampling: the decoder's next-word probabilities are not finite (NaN or inf in "
                                 "its weights or the image features)")
    return _ranked(ids, scores, features.shape[0], n)


def drawable(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (N, V) with each row whose mass is not finite and positive (NaN in the weights or features) replaced
    by a harmless stand-in, and whether no row was (a bool on the device: reading it is the caller's sync).
    torch.multinomial on such a row trips a CUDA device-side assert, which ends the process's CUDA context."""
    mass = probs.sum(-1, keepdim=True)
    ok = torch.isfinite(mass) & (mass > 0)
    return torch.where(ok, probs, 1.0), ok.all()


def draw_one(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One word id per row of probs (N, V): what torch.multinomial(probs, 1, generator=generator) draws, the
    same way (argmax(p / q), q ~ Exp(1)), without its checks of probs, which read the device (a host sync per
    call on CUDA). The caller makes the rows drawable (`drawable`)."""
    return (probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax(-1)


def draw_rows(probs: torch.Tensor, n: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """One word id per row of probs (B*n, V), image i's n rows drawn with gens[i] (its draws never depend on the
    other images): what torch.multinomial(rows, 1, generator=gens[i]) draws, in one argmax for the batch.

    That is multinomial's own one-sample method, argmax(p / q) with q ~ Exp(1); a multinomial call per image
    was ~13 kernel launches per image per step on CUDA."""
    q = torch.empty_like(probs)
    for rows, g in zip(q.split(n), gens):
        rows.exponential_(1, generator=g)
    return (probs / q).argmax(-1)


@torch.inference_mode()
def greedy_scored(model: CaptionDecoder, features: torch.Tensor, max_len: int = 20, min_len: int = 1,
                  length_penalty: float = 0.0) -> list[list[tuple[list[int], float]]]:
    """features (B, D) -> per image [(word ids, score)]: `decode.greedy`'s caption with the score a beam of
    one gives it (sum log p / tokens ** length_penalty, <end> counted), at greedy's speed."""
    ids, total, count = _word_by_word(model, features, 1, max_len, min_len, lambda logp, alive: logp.argmax(-1))
    # in float64, as the beam divides: a beam of one's score to the last bit
    ids, scores = read_back(ids, total.double() / count.double().pow(length_penalty))
    return _ranked(ids, scores, features.shape[0], 1)


def _word_by_word(model: CaptionDecoder, features: torch.Tensor, n: int, max_len: int, min_len: int,
                  choose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n captions per image, each next word from choose(log-probs (B*n, V), alive (B*n,)) -> (B*n,). Returns, on
    the device, the ids (B*n, max_len), the summed log-prob of the emitted tokens and their count (words +
    <end>).
    "All ended?" is asked every `done_check_every(device)` steps (on a GPU read a check point late: no stall);
    the steps after the last caption ended write only past its <end> and add nothing to the sums."""
    b, dev = features.shape[0], features.device
    h, c = model.init_state(features)  # (L, B, H) each
    state = (h.repeat_interleave(n, dim=1), c.repeat_interleave(n, dim=1))  # (L, B*n, H)
    tokens = torch.full((b * n,), Vocabulary.start_id, dtype=torch.long, device=dev)
    out = torch.zeros(b * n, max_len, dtype=torch.long, device=dev)
    total = torch.zeros(b * n, device=dev)
    count = torch.zeros(b * n, device=dev)
    alive = torch.ones(b * n, dtype=torch.bool, device=dev)
    every, flags = done_check_every(dev), LaggedFlags(dev)
    for t in range(max_len):
        logp, state = model.step(tokens, state)  # (B*n, V); <pad>/<start>/<unk> already -inf
        if t < min_len:
            logp[:, Vocabulary.end_id] = float("-inf")
        tokens = choose(logp, alive)  # (B*n,)
        out[:, t] = tokens
        total += logp.gather(1, tokens[:, None]).squeeze(1) * alive
        count += alive
        alive &= tokens != Vocabulary.end_id
        if (t + 1) % every == 0 and flags.post(~alive.any()):
            break
    return out, total, count.clamp(min=1)


def _ranked(rows: list[list[int]], scores: list[float], b: int, n: int) -> list[list[tuple[list[int], float]]]:
    """Per image its n (ids up to <end>, score), best first."""
    end = Vocabulary.end_id
    hyps = [(ids[: ids.index(end)] if end in ids else ids, s) for ids, s in zip(rows, scores)]
    return [sorted(hyps[i * n:(i + 1) * n], key=lambda h: -h[1]) for i in range(b)]


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely words whose probability reaches top_p (per row)."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)  # (N, V)
    # keep a word if the mass before it is below top_p: the most likely word is always kept
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return probs * keep
