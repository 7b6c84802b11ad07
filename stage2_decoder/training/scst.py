"""Self-critical sequence training (SCST, Rennie et al. 2017): fine-tune a cross-entropy-trained
decoder to maximise CIDEr-D of its own sampled captions.

For every training image K captions are sampled from the model; each one's reward is its CIDEr-D
against the image's references, and its baseline is the mean reward of the image's other K-1
samples (the "new self-critical" variant of ruotianluo/self-critical.pytorch: no extra greedy pass).
The loss is -(reward - baseline) * log p(caption), averaged over the sampled tokens.

CIDEr-D needs document frequencies from a fixed corpus (pycocoevalcap recomputes them from whatever
set it is given, which for a batch of 64 images would be meaningless), so `CiderD`
(stage2_decoder/training/cider.py: integer n-gram ids in numpy arrays) takes them once from the training
references, with the same formula as pycocoevalcap's scorer, and scores a whole batch at once.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import nn

from common.tokenizer import DEFAULT_TOKENIZER, tokenize
from common.vocab import Vocabulary
from stage2_decoder.decoding.beam import END_ID, START_ID, done_check_every
from stage2_decoder.decoding.readback import LaggedFlags, read_back, upload
from stage2_decoder.decoding.sampling import draw_one, drawable
from stage2_decoder.model import CaptionDecoder
from stage2_decoder.training.cider import CiderD
from stage2_decoder.training.pairs import view_rows


def sample(model: CaptionDecoder, features: torch.Tensor, k: int, max_len: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample k captions per image, keeping the graph.

    features (B, D) -> ids (B*k, T) (0 after <end>), log-probs of the chosen tokens (B*k, T) and
    their mask (B*k, T): 1 for every word and the <end> that closes the caption.

    "Has every caption ended?" is asked at check points every `done_check_every(device)` steps (every step on
    the CPU; on a GPU every few, each read a check point late: readback.LaggedFlags, no stall). The loop then
    keeps the steps up to the first with none alive and puts the sampling generator back to its state after
    that step's draw, so every draw is the one a per-step check took.
    Non-finite next-word probabilities raise FloatingPointError (torch.multinomial would trip a CUDA
    device-side assert, which kills the process's CUDA context).
    """
    dev = features.device
    gen = torch.default_generator if dev.type == "cpu" else \
        torch.cuda.default_generators[dev.index if dev.index is not None else torch.cuda.current_device()]
    h, c = model.init_state(features)  # (L, B, H)
    state = (h.repeat_interleave(k, dim=1), c.repeat_interleave(k, dim=1))
    n = features.shape[0] * k
    tokens = torch.full((n,), START_ID, dtype=torch.long, device=dev)
    alive = torch.ones(n, dtype=torch.bool, device=dev)
    ids, logps, masks, gen_states = [], [], [], []  # per step
    any_alive, finite = [], []  # per step since the last check point
    every, flags, windows = done_check_every(dev), LaggedFlags(dev), []  # windows: each posted one's first step
    ended = None  # the step after which every caption had ended
    for t in range(max_len):
        logp, state = model.step(tokens, state)  # (n, V)
        probs, ok = drawable(logp.detach().exp())  # the error is raised when its check point is read
        tokens = draw_one(probs, gen)
        gen_states.append(gen.get_state())
        masks.append(alive.clone())
        logps.append(logp.gather(1, tokens[:, None]).squeeze(1))
        ids.append(torch.where(alive, tokens, torch.zeros_like(tokens)))
        alive &= tokens != END_ID
        any_alive.append(alive.any())
        finite.append(ok)
        if (t + 1) % every and t + 1 < max_len:
            continue
        windows.append(t + 1 - len(any_alive))
        due = flags.post(torch.stack([torch.stack(any_alive), torch.stack(finite)]))
        any_alive, finite = [], []
        if due is not None and (ended := _ended(due, windows.pop(0))) is not None:
            break
    for due in flags.drain():  # a GPU's last check points, read once the loop is over
        if ended is None:
            ended = _ended(due, windows.pop(0))
    if ended is not None:
        del ids[ended + 1:], logps[ended + 1:], masks[ended + 1:]
        gen.set_state(gen_states[ended])
    return torch.stack(ids, 1), torch.stack(logps, 1), torch.stack(masks, 1).float()


def _ended(window: list[list[bool]], first: int) -> int | None:
    """The step after which no caption was alive, from a check point's flags ([alive after each step, finite
    at each step] of the steps from `first`), or None; raises FloatingPointError on non-finite probabilities."""
    alive, finite = window
    end = alive.index(False) if False in alive else len(alive) - 1
    if False in finite[:end + 1]:  # the steps a per-step loop would have taken
        raise FloatingPointError(f"SCST sampling: the decoder's next-word probabilities are not finite at "
                                 f"step {first + finite.index(False) + 1} (NaN or inf in its weights or "
                                 f"features)")
    return first + end if False in alive else None


def scst_loss(model: CaptionDecoder, features: torch.Tensor, keys: list[str], scorer: CiderD, itos: list[str],
              k: int = 5, max_len: int = 16) -> tuple[torch.Tensor, float]:
    """One SCST batch: returns (loss to minimise, mean reward of the samples)."""
    ids, logp, mask = sample(model, features, k, max_len)
    # the samples' one read: CIDEr-D is scored on the host
    hyps = [[itos[w] for w in row if w not in (Vocabulary.pad_id, END_ID)] for row in read_back(ids)[0]]
    rewards = torch.from_numpy(scorer.score_batch([key for key in keys for _ in range(k)], hyps)).float()
    r = rewards.view(-1, k)
    baseline = (r.sum(1, keepdim=True) - r) / max(k - 1, 1)  # mean of the image's other samples
    adv = upload((r - baseline).view(-1, 1), logp.device)  # (B*k, 1)
    loss = -(adv * logp * mask).sum() / mask.sum().clamp(min=1)
    return loss, float(rewards.mean())


def scst_epoch(model: CaptionDecoder, opt: torch.optim.Optimizer, features: torch.Tensor, rows: dict[str, int],
               scorer: CiderD, itos: list[str], batch_images: int, generator: torch.Generator, k: int = 5,
               grad_clip: float = 5.0, max_batches: int | None = None, progress=None, max_len: int = 16) -> float:
    """One pass of SCST over the scorer's images (in a seeded random order), sampling captions of at most
    `max_len` words (TrainConfig.scst_max_len); returns the mean reward.

    `features` (N, D), or (V, N, D) for V cached views: then each image of a batch gets a random one."""
    with scst_mode(model):
        return _scst_batches(model, opt, features, rows, scorer, itos, batch_images, generator, k, grad_clip,
                             max_batches, progress, max_len)


@contextlib.contextmanager
def scst_mode(model: CaptionDecoder):
    """Train the LSTM with BatchNorm's running statistics frozen and no dropout anywhere.

    Not `model.eval()`: cuDNN refuses RNN backward in eval mode ("cudnn RNN backward can only be called
    in training mode"), so the LSTM stays in training mode with its inter-layer dropout set to 0 while
    BatchNorm and the dropout module are in eval mode. The LSTM's dropout is restored on exit.
    """
    model.train()
    rnns = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
            m.eval()
    saved = [m.dropout for m in rnns]
    for m in rnns:
        m.dropout = 0.0
    try:
        yield model
    finally:
        for m, p in zip(rnns, saved):
            m.dropout = p


def _scst_batches(model: CaptionDecoder, opt: torch.optim.Optimizer, features: torch.Tensor, rows: dict[str, int],
                  scorer: CiderD, itos: list[str], batch_images: int, generator: torch.Generator, k: int,
                  grad_clip: float, max_batches: int | None, progress, max_len: int) -> float:
    keys = scst_keys(scorer, rows)
    order = torch.randperm(len(keys), generator=generator).tolist()
    # the epoch's cache rows in its order, uploaded once: a batch's rows are then a slice, with no upload
    epoch_rows = upload(torch.tensor([rows[keys[i]] for i in order]), features.device)
    total, batches = 0.0, 0
    for s in range(0, len(order), batch_images):
        chunk = [keys[i] for i in order[s:s + batch_images]]
        batch_rows = epoch_rows[s:s + batch_images]
        feats = view_rows(features, batch_rows, generator).float()  # cached views are in the cache's float16
        # bf16 autocast on CUDA for the projections, as in the cross-entropy step (the LSTM stays fp32)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=features.device.type == "cuda"):
            loss, reward = scst_loss(model, feats, chunk, scorer, itos, k, max_len)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        total, batches = total + reward, batches + 1
        if progress is not None:
            progress.update(1)
        if max_batches and batches >= max_batches:
            break
    return total / max(batches, 1)


def scst_keys(scorer: CiderD, rows: dict[str, int]) -> list[str]:
    """The images an SCST epoch trains on: cached (in `rows`) and with references."""
    return [key for key in scorer.keys if key in rows and scorer.n_refs(key)]


def scst_refs(records, tokens: dict[str, list[list[str]]] | None = None,
              tokenizer: str = DEFAULT_TOKENIZER) -> dict[str, list[list[str]]]:
    """{key: tokenised captions} of the training images: the corpus of the rewards' document frequencies.

    `tokens` ({key: one word list per caption}, from `train.prepare_data`) spares tokenising again;
    without it the captions are split by `tokenizer` (the run's).
    """
    refs: dict[str, list[list[str]]] = defaultdict(list)
    for r in records:
        words = tokens[r.key] if tokens is not None else [tokenize(c, tokenizer) for c in r.captions]
        refs[r.key].extend(w for c, w in zip(r.captions, words) if c.strip())
    return dict(refs)
