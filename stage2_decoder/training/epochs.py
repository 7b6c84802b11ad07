"""The epochs of the training loop: cross-entropy (teacher forcing), self-critical (CIDEr-D reward) and
validation, each returning its metrics dict; `train_step` is the one optimisation step they share with
the benchmarks."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.records import ImageRecord
from common.vocab import Vocabulary
from stage2_decoder.decoding.captions import caption_keys
from stage2_decoder.decoding.config import DecodeConfig
from stage2_decoder.model import CaptionDecoder
from stage2_decoder.reporting.metrics import cider
from stage2_decoder.training.checkpoint import load_checkpoint
from stage2_decoder.training.cider import CiderD
from stage2_decoder.training.config import TrainConfig
from stage2_decoder.training.ema import EMA
from stage2_decoder.training.pairs import CaptionBatch, CaptionPairs
from stage2_decoder.training.scst import scst_epoch, scst_keys, scst_refs


def xe_epoch(model: CaptionDecoder, opt: torch.optim.Optimizer, train_set: CaptionPairs, features: torch.Tensor,
              device: torch.device, cfg: TrainConfig, epoch: int, steps: int,
              ema: EMA | None = None) -> dict[str, float]:
    """One cross-entropy (teacher-forcing) epoch; returns {"train_loss": mean per-token training loss}.

    `features` (N, D), or (V, N, D) for V cached views of each image, one drawn at random per caption.
    """
    model.train()
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # order depends on (seed, epoch) only
    batches = train_set.batches(cfg.batch_size, g, cfg.length_buckets)
    # Length-bucketed batches differ in token count (short captions, few tokens). Weighting each batch's mean
    # token loss by its tokens / the epoch's mean gives every token the weight random batches give it; left
    # unweighted, a batch of short captions pulls as hard as one of long ones (0.07 worse validation loss).
    tokens_per_batch = float(train_set.lengths.sum()) / len(batches)
    loss_sum = torch.zeros((), device=device)  # summed on device: no host sync per step
    n_tokens = 0
    total = cfg.epochs + cfg.scst_epochs  # as the epoch lines and the SCST bar count
    for idx in tqdm(batches[:steps], desc=f"epoch {epoch + 1}/{total}", unit="batch", leave=False,
                    disable=not cfg.progress, dynamic_ncols=True):
        if len(idx) < 2:  # BatchNorm cannot train on one sample; this pair is seen in other epochs
            continue
        b = train_set.gather(idx, features, g)
        loss, n = train_step(model, opt, b, device, cfg.grad_clip, cfg.label_smoothing,
                             weight=float(b.lengths.sum()) / tokens_per_batch)
        if ema is not None:
            ema.update(model)
        loss_sum += loss * n
        n_tokens += n
    return {"train_loss": float(loss_sum) / max(n_tokens, 1)}


def train_step(model: CaptionDecoder, opt: torch.optim.Optimizer, b: CaptionBatch, device: torch.device | str,
               grad_clip: float, label_smoothing: float = 0.0, weight: float = 1.0) -> tuple[torch.Tensor, int]:
    """One optimisation step on a gathered batch, its mean token loss scaled by `weight` for the
    gradient; returns (detached mean token loss, token count).

    The whole step of the training loop (bench/stage2.py times exactly this against a bare
    LSTM + Linear + Adam step). Nothing in it waits for the device: the token count comes from
    the CPU-side lengths and the loss stays a device tensor.
    """
    loss, n = batch_loss(model, b, device, label_smoothing)
    opt.zero_grad(set_to_none=True)
    (loss * weight).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.detach(), n


def start_scst(cfg: TrainConfig, run: Path, model: CaptionDecoder, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.ReduceLROnPlateau, train_records: list[ImageRecord],
                tokens: dict[str, list[list[str]]], epoch: int, device: torch.device):
    """Enter the SCST phase: from the best cross-entropy weights (at its first epoch), at --scst-lr.
    Returns the CiderD reward scorer of the training images."""

    if epoch == cfg.epochs:  # not when resuming inside the phase: last.pt already holds SCST weights and state
        model.load_state_dict(load_checkpoint(run / "best.pt", map_location=device)["model_state"], strict=True)
        opt.state.clear()
        for group in opt.param_groups:
            group["lr"] = cfg.scst_lr
        sched.best, sched.num_bad_epochs, sched.cooldown_counter = sched.mode_worse, 0, 0  # a fresh plateau count
    if cfg.progress:
        tqdm.write(f"self-critical training (CIDEr-D reward, {cfg.scst_samples} samples per image)")
    return CiderD(scst_refs(train_records, tokens))


def self_critical_epoch(cfg: TrainConfig, scorer: CiderD, model: CaptionDecoder, opt: torch.optim.Optimizer,
                features: torch.Tensor, rows: dict[str, int], vocab: Vocabulary, epoch: int) -> dict[str, float]:
    """One SCST epoch over the training images; returns {"train_reward": mean sampled-caption CIDEr-D}."""
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    n_batches = 1 if cfg.dry_run else math.ceil(len(scst_keys(scorer, rows)) / cfg.batch_size)
    with tqdm(total=n_batches, desc=f"scst {epoch + 1}/{cfg.epochs + cfg.scst_epochs}", unit="batch", leave=False,
              disable=not cfg.progress, dynamic_ncols=True) as bar:
        return {"train_reward": scst_epoch(model, opt, features, rows, scorer, vocab.itos, cfg.batch_size, g,
                                           cfg.scst_samples, cfg.grad_clip, max_batches=n_batches, progress=bar,
                                           max_len=cfg.scst_max_len)}


def validate(model: CaptionDecoder, cfg: TrainConfig, val_set: CaptionPairs, features: torch.Tensor,
             rows: dict[str, int], vocab: Vocabulary, refs: dict[str, list[str]],
             device: torch.device) -> dict[str, float]:
    """The validation epoch: {"val_loss": mean token cross-entropy, "val_cider": CIDEr of the decoded
    captions (0 without references)}."""
    # about a minute an epoch on full COCO on a CPU: bars, gone when done (as the epoch's own)
    val_loss = evaluate_loss(model, val_set, features, cfg.batch_size * 4, device, cfg.dry_run, cfg.progress)
    val_cider = validation_cider(model, vocab, features, rows, refs, beam_size=cfg.val_beam_size,
                                 progress=cfg.progress) if refs else 0.0
    return {"val_loss": val_loss, "val_cider": val_cider}


@torch.no_grad()
def validation_cider(model: CaptionDecoder, vocab: Vocabulary, features: torch.Tensor, rows: dict[str, int],
                     refs: dict[str, list[str]], batch_size: int = 256, beam_size: int = 1,
                     progress: bool = False) -> float:
    """Decode the validation images from the cache as evaluate does (greedy, or a beam search of
    `beam_size` with the deployed decoder's other settings) and score them with CIDEr (in-process)."""

    # beam 1 is the greedy validation of old runs (no minimum length)
    how = DecodeConfig(1, min_len=0) if beam_size == 1 else DecodeConfig(beam_size)
    model.eval()
    keys = sorted(refs)
    feats = features[torch.tensor([rows[k] for k in keys])]  # (len(keys), D)
    res = caption_keys(model, vocab, keys, feats, how, batch_size, progress, desc="val decode")
    return cider(refs, res, vocab.tokenizer)[0]


def batch_loss(model: CaptionDecoder, b: CaptionBatch, device: torch.device | str,
                label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    from torch.nn.utils.rnn import pack_padded_sequence

    feats = b.features.to(device, non_blocking=True)
    # bf16 autocast on CUDA for the projections (tensor cores; the model keeps its LSTM in fp32); loss in fp32
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
        logits = model(feats, b.inputs.to(device, non_blocking=True), b.lengths)  # (sum(lengths), V)
    targets = pack_padded_sequence(b.targets, b.lengths, batch_first=True, enforce_sorted=True).data
    n = int(b.lengths.sum())
    return F.cross_entropy(logits.float(), targets.to(device, non_blocking=True),
                           label_smoothing=label_smoothing), n


@torch.no_grad()
def evaluate_loss(model: CaptionDecoder, pairs: CaptionPairs, features: torch.Tensor, batch_size: int,
                  device: torch.device | str, dry_run: bool = False, progress: bool = False) -> float:
    """Mean per-token cross-entropy of the pairs, in eval mode."""
    model.eval()
    total, count = torch.zeros((), device=device), 0
    idx = torch.argsort(pairs.lengths, stable=True)  # by length: batches with little padding, same sum
    starts = range(0, min(len(pairs), 1) if dry_run else len(pairs), batch_size)  # --dry-run: one batch
    for s in tqdm(starts, desc="val loss", unit="batch", leave=False, disable=not progress, dynamic_ncols=True):
        b = pairs.gather(idx[s:s + batch_size], features)
        loss, n = batch_loss(model, b, device)
        total += loss * n
        count += n
    return float(total) / max(count, 1)
