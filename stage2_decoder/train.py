"""Train the projection + LSTM decoder from a feature cache (hand-written loop).

    python -m stage2_decoder.train --features FILE.h5 --out RUN_DIR [--epochs N] ...

RUN_DIR gets config.json, split.json, vocab.json, metrics.jsonl, last.pt (every epoch, with the state
to resume) and best.pt (the selected epoch, what captioning needs). Rerunning with the same RUN_DIR
resumes from last.pt.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.atomic import atomic_write, remove_stale_temporaries
from common.device import resolve_device
from common.cli import config_options, run_guarded
from common.datasets import FORMATS, load_dataset, official_split, split_keys, write_split
from common.feature_cache import CacheError, FeatureCache, load_cache
from common.lock import LOCK_NAME, hold
from common.token_cache import tokenize_records
from common.tokenizer import TOKENIZERS
from common.vocab import Vocabulary, build_vocab
from stage2_decoder.checkpoint import cpu_state, inference_extra, load_checkpoint, save_checkpoint
from stage2_decoder.data import CaptionPairs
from stage2_decoder.ema import EMA
from stage2_decoder.model import CaptionDecoder, DecoderConfig
from stage2_decoder.resume import _resume, _run_config, cuda_rng_state


@dataclass
class TrainConfig:
    features: str
    out: str
    captions: str | None = None  # default: the captions file recorded in the cache
    images: str | None = None  # default: the images folder recorded in the cache
    dataset: str | None = None  # default: the format recorded in the cache
    # with the weight average, validation still improves past 12 epochs (docs/defaults.md)
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    embed_size: int = 256
    hidden_size: int = 512
    num_layers: int = 1
    dropout: float = 0.5  # on word embeddings and LSTM outputs (docs/defaults.md)
    # score words against their own input embeddings (DecoderConfig.tie_embeddings): helps rare words (docs/defaults.md)
    tie_embeddings: bool = True
    vocab_threshold: int = 4
    tokenizer: str = "nltk"  # nltk | whitespace | chars (languages written without spaces); kept in the vocabulary
    max_caption_len: int = 50
    val_frac: float = 0.05
    test_frac: float = 0.05
    split_seed: int = 0
    label_smoothing: float = 0.0
    # >0: validate, select and save a per-step moving average of the cross-entropy weights (~1/(1-decay) steps)
    ema_decay: float = 0.995
    train_views: bool = True  # cross-entropy: each caption's image from a random cached view, if the cache has several
    length_buckets: int = 16  # batch captions of like length, sorted within runs of this many batches (1 = random)
    select_by: str = "cider"  # best.pt by validation "cider" (decoded as --val-beam-size says) or "loss"
    patience: int = 0  # early stop after this many epochs without a better best (0 = never)
    # halve (lr_factor) the rate after this many epochs without a better score; 1 chased noise (docs/defaults.md)
    lr_patience: int = 3
    lr_factor: float = 0.5
    scst_epochs: int = 2  # then this many self-critical epochs (CIDEr-D reward) from the best model
    # one SCST epoch at this rate beat a lower rate with 4x the steps; more epochs overfit (docs/defaults.md)
    scst_lr: float = 1e-4
    scst_views: bool = False  # SCST: each image's feature from a random cached view (as --train-views does)
    scst_samples: int = 5  # captions sampled per image; each one's baseline is the mean of the others
    # validation decodes as the captioner does (1 = greedy) to pick best.pt and the schedule (docs/defaults.md)
    val_beam_size: int = 3
    val_images: int = 500  # validation images decoded for CIDEr each epoch (0 = all)
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    dry_run: bool = False  # one batch per epoch: the cheap mode tests use

    # a resume from last.pt may change these, and they apply to the epochs still to run (config.json records it)
    RESUME_APPLIED = ("epochs", "scst_epochs", "patience")
    # where the data is and how the run is shown, not the training math
    RESUME_FREE = ("out", "captions", "images", "dataset", "device", "progress", "dry_run")
    # every other field changes the math and must not change on resume (set below, new fields included)
    RESUME_FIXED = ()
    # what a run from before the setting existed did, where that is not the field's default
    RESUME_LEGACY = {"val_beam_size": 1, "tie_embeddings": False, "tokenizer": "nltk"}

    def decoder_config(self, feature_dim: int, vocab_size: int) -> DecoderConfig:
        """The decoder these settings train (train() and the benchmarks build it from here)."""
        return DecoderConfig(feature_dim, vocab_size, self.embed_size, self.hidden_size, self.num_layers,
                             self.dropout, self.tie_embeddings)


TrainConfig.RESUME_FIXED = tuple(f.name for f in fields(TrainConfig)
                                 if f.name not in TrainConfig.RESUME_APPLIED + TrainConfig.RESUME_FREE)
RUN_OUTPUTS = ("config.json", "split.json", "vocab.json", "metrics.jsonl", "best.pt", "last.pt", "curves.png")


@dataclass
class TrainResult:
    run_dir: str
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    history: list[dict]
    best_val_cider: float = float("nan")


MAX_LSTM_WEIGHTS = 1 << 30  # 4 GiB of float32 before gradients and Adam's two moments: no decoder of this kind


def _check(cfg: TrainConfig) -> None:
    for name in ("epochs", "batch_size", "embed_size", "hidden_size", "num_layers", "vocab_threshold",
                 "max_caption_len", "length_buckets", "val_beam_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    if cfg.tokenizer not in TOKENIZERS:
        raise ValueError(f"--tokenizer must be one of {', '.join(TOKENIZERS)}, got {cfg.tokenizer!r}")
    if cfg.select_by not in ("cider", "loss"):
        raise ValueError(f"--select-by must be cider or loss, got {cfg.select_by!r}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if not 0 <= cfg.label_smoothing < 1:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if not 0 < cfg.lr_factor < 1:
        raise ValueError(f"--lr-factor must be in (0, 1), got {cfg.lr_factor}")
    if not cfg.grad_clip > 0:
        raise ValueError(f"--grad-clip must be positive, got {cfg.grad_clip}")
    if cfg.scst_epochs and (cfg.scst_samples < 2 or not cfg.scst_lr > 0):
        raise ValueError("--scst-samples must be at least 2 and --scst-lr positive for self-critical training")
    for name in ("weight_decay", "patience", "lr_patience", "val_images", "scst_epochs"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(cfg, name)}")
    h, e, n = cfg.hidden_size, cfg.embed_size, cfg.num_layers
    weights = 4 * h * (e + h + 2) + (n - 1) * 4 * h * (2 * h + 2)  # (4h, in + h) weights + 2 biases per layer
    if weights > MAX_LSTM_WEIGHTS:
        raise ValueError(f"--hidden-size {h} --embed-size {e} --num-layers {n}: the LSTM alone would need "
                         f"{weights:,} weights ({weights * 4 / 2**30:,.0f} GiB); at most {MAX_LSTM_WEIGHTS:,}")


def prepare_data(cfg: TrainConfig, cache: FeatureCache):
    """Records of the cached images, the image split, the train-split vocabulary, the feature rows and
    the tokenised captions of the train and val images ({key: one word list per caption}).

    Captions are tokenised here once, by --tokenizer (NLTK: ~0.2 ms each, minutes on full COCO), for the
    vocabulary, the caption tensors and the SCST reward alike, and their tokens cached on disk
    (common/token_cache.py) for the next run on the same captions file.
    """
    m = cache.meta
    records = load_dataset(cfg.dataset or m.dataset_format, cfg.captions or m.captions_file,
                           cfg.images or m.images_dir, allow_outside_images=True)  # only captions are read here
    rows = cache.rows_by_key()
    records = [r for r in records if r.key in rows]
    if len(records) < 3:
        raise ValueError(f"only {len(records)} images of {cfg.captions or m.captions_file} have features in "
                         f"{cache.path}; is this the captions file the cache was made from?")
    # a Karpathy file fixes the split (comparable numbers); otherwise our deterministic hash split
    split = official_split(records) or split_keys([r.key for r in records], cfg.val_frac, cfg.test_frac,
                                                  cfg.split_seed)
    by_split = {name: set(keys) for name, keys in split.items()}
    parts = {name: [r for r in records if r.key in by_split[name]] for name in split}
    tokens = tokenize_records(cfg.captions or m.captions_file, [r for n in ("train", "val") for r in parts[n]],
                              cfg.tokenizer, progress=cfg.progress)  # read from the token cache when it has them
    vocab = build_vocab((words for r in parts["train"] for words in tokens[r.key]), cfg.vocab_threshold, cfg.tokenizer)
    return parts, split, vocab, rows, tokens


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) a decoder; returns the history. Importable: the CLI and sweeps call this."""
    # absolute, so a resume from another working directory names the same cache (last.pt records this)
    cfg = replace(cfg, features=os.path.abspath(cfg.features))
    with contextlib.ExitStack() as owned:  # the run folder's lock, held until training returns or fails
        return _train(cfg, owned)


def _train(cfg: TrainConfig, owned: contextlib.ExitStack) -> TrainResult:
    _check(cfg)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    run = Path(cfg.out)
    cache = load_cache(cfg.features, views=cfg.train_views or cfg.scst_views)
    images_dir = Path(os.path.abspath(cfg.images or cache.meta.images_dir))
    if Path(os.path.abspath(run)).is_relative_to(images_dir):
        raise ValueError(f"--out {run} is inside the images folder {images_dir}; write the run elsewhere")
    parts, split, vocab, rows, tokens = prepare_data(cfg, cache)
    run.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be usable
    owned.enter_context(hold(run / LOCK_NAME, "run folder"))
    remove_stale_temporaries(run, RUN_OUTPUTS)  # what a killed run was writing: ours now that we hold the lock
    train_set = CaptionPairs(parts["train"], rows, vocab, cfg.max_caption_len, tokens).to(device)  # beside the features
    val_records = [r for r in parts["val"] if r.captions]  # images without references cannot validate
    if not val_records and cfg.progress:
        tqdm.write("no validation images with captions (--val-frac 0?): validating on training images")
    val_records = val_records or parts["train"][:50]
    val_set = CaptionPairs(val_records, rows, vocab, cfg.max_caption_len, tokens).to(device)
    # HDF5 has no checksums: a damaged file reads as garbage. Checked on the host arrays (the rows stage 1
    # finished, every cached view), before gigabytes are uploaded to a GPU.
    done = sorted(rows.values())
    if not all(np.isfinite(a[done]).all() for a in (cache.features, cache.views) if a is not None):
        raise CacheError(f"{cfg.features} holds non-finite (nan/inf) features: it is damaged; re-run stage 1")
    # with --train-views (--scst-views) cross-entropy (SCST) batches draw each image feature from one of the
    # cached views (stage 1 --views: centre crop, mirrored, whole image); validation and captioning see the
    # centre view only, the one a raw photo gets. Features stay in the cache's dtype (the decoder casts each
    # batch) and the centre view is held once: `features` is all_views[0], not a copy
    all_views = torch.from_numpy(cache.features)  # (N, D)
    if cache.views is not None:  # loaded only when one of the two asks for it
        all_views = torch.cat([all_views[None], torch.from_numpy(cache.views).transpose(0, 1)])  # (V, N, D)
    all_views = all_views.to(device)
    features = all_views[0] if cache.views is not None else all_views  # (N, D)
    cache.features = cache.views = None  # the tensors hold them now (a copy where views were joined)
    train_features = all_views if cfg.train_views else features
    scst_features = all_views if cfg.scst_views else features
    backbone = {"name": cache.meta.backbone, "weights": cache.meta.weights,
                "weights_sha256": cache.meta.weights_sha256 or None, "feature_dim": cache.meta.feature_dim,
                "preprocess": cache.meta.preprocess}

    model = CaptionDecoder(cfg.decoder_config(cache.meta.feature_dim, len(vocab))).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.lr_factor,
                                                       patience=cfg.lr_patience)
    # with --ema-decay the cross-entropy phase's weights validated, selected and saved (model_state) are a
    # moving average of the trained ones, which its checkpoints also keep (train_model_state) so a resumed run
    # goes on exactly. SCST is not averaged: its few steps (one per batch of images) would be mostly undone.
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    history, start_epoch, best = _resume(run, cfg, model, opt, sched, vocab, device, backbone, ema)
    val_keys = set([r.key for r in val_records][: cfg.val_images or None])
    val_refs = {r.key: r.captions for r in val_records if r.key in val_keys and r.captions}
    atomic_write(run / "config.json", json.dumps(_run_config(run, cfg, start_epoch), indent=2), what="run config")
    if start_epoch == 0:
        write_split(split, run / "split.json")
        vocab.save(run / "vocab.json")
    # metrics.jsonl = the checkpoint's history (drops a line from an epoch whose last.pt never landed)
    atomic_write(run / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history), what="metrics")

    n_train = len(train_set)
    steps = 1 if cfg.dry_run else math.ceil(n_train / cfg.batch_size)
    scst = None
    for epoch in range(start_epoch, cfg.epochs + cfg.scst_epochs):
        if _patience_ran_out(cfg, best, epoch):  # stateless, so a resumed run decides the same way
            if epoch < cfg.epochs and cfg.scst_epochs:
                continue  # skip the rest of the cross-entropy phase, go on to SCST
            break
        t0 = time.perf_counter()
        if epoch < cfg.epochs:
            train_loss = _xe_epoch(model, opt, train_set, train_features, device, cfg, epoch, steps, ema)
        else:  # self-critical fine-tuning of the best cross-entropy model (stage2_decoder/scst.py)
            scst = scst or _start_scst(cfg, run, model, opt, sched, parts["train"], tokens, epoch, device)
            train_loss = -_scst_epoch(cfg, scst, model, opt, scst_features, rows, vocab, epoch)
        averaged = ema is not None and epoch < cfg.epochs
        saved = ema.module if averaged else model
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} in epoch {epoch + 1}; lower --lr")
        val_loss = evaluate_loss(saved, val_set, features, cfg.batch_size * 4, device, cfg.dry_run)
        val_cider = validation_cider(saved, vocab, features, rows, val_refs, beam_size=cfg.val_beam_size) \
            if val_refs else 0.0
        lr_now = opt.param_groups[0]["lr"]
        rec = {"epoch": epoch + 1, "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5),
               "val_perplexity": round(math.exp(min(val_loss, 50)), 3), "val_cider": round(val_cider, 4),
               "seconds": round(time.perf_counter() - t0, 3), "train_pairs": n_train, "lr": lr_now}
        if epoch >= cfg.epochs:  # SCST maximises a reward (mean sampled-caption CIDEr-D); it has no XE loss
            reward = -rec.pop("train_loss")
            rec = {**rec, "phase": "scst", "train_reward": round(reward, 4)}
        history.append(rec)
        if cfg.progress:
            what = f"reward {-train_loss:.4f}" if epoch >= cfg.epochs else f"loss {train_loss:.4f}"
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs + cfg.scst_epochs}  train {what}  val loss {val_loss:.4f}  "
                       f"val ppl {rec['val_perplexity']:.2f}  val CIDEr {val_cider:.3f}  lr {lr_now:.2g}  "
                       f"{rec['seconds']:.1f}s")
        score = val_cider if cfg.select_by == "cider" else -val_loss  # higher is better
        is_best = score > best["score"]
        if is_best:
            best = {"score": score, "epoch": epoch + 1, "val_loss": val_loss, "val_cider": val_cider}
        sched.step(score)
        extra = dict(epoch=epoch + 1, optimizer_state=opt.state_dict(), scheduler_state=sched.state_dict(),
                     rng_state=torch.get_rng_state(), train_config=asdict(cfg), history=history, best=best,
                     split={"val": split["val"], "test": split["test"]}, **cuda_rng_state(device))
        if averaged:
            extra["train_model_state"] = cpu_state(model)
        if is_best:  # before last.pt: a kill between the two redoes this epoch, best.pt included
            save_checkpoint(run / "best.pt", saved, vocab, backbone, **inference_extra(extra))  # no resume state
        save_checkpoint(run / "last.pt", saved, vocab, backbone, **extra)
        with open(run / "metrics.jsonl", "a") as f:  # after last.pt: a resume never repeats a line
            f.write(json.dumps(rec) + "\n")
        if _patience_ran_out(cfg, best, epoch + 1) and cfg.progress:
            tqdm.write(f"early stop: no better validation {cfg.select_by} for {cfg.patience} epochs")
    try:  # RUN_DIR/curves.png is a convenience: a plotting failure must never fail a finished run
        from stage2_decoder.plot import plot_run
        plot_run(run)
    except Exception as e:  # noqa: BLE001
        tqdm.write(f"warning: training curves not plotted: {e}", file=sys.stderr)
    return TrainResult(str(run), len(history), best["epoch"], best.get("val_loss", float("nan")), history,
                       best.get("val_cider", float("nan")))


def _patience_ran_out(cfg: TrainConfig, best: dict, epochs_done: int) -> bool:
    """Early stopping: `patience` epochs of the current phase (cross-entropy, then SCST) without a new best."""
    since = max(best["epoch"], cfg.epochs) if epochs_done >= cfg.epochs else best["epoch"]
    return bool(cfg.patience) and epochs_done > 0 and epochs_done - since >= cfg.patience


def _xe_epoch(model: CaptionDecoder, opt, train_set: CaptionPairs, features: torch.Tensor, device, cfg: TrainConfig,
              epoch: int, steps: int, ema: EMA | None = None) -> float:
    """One cross-entropy (teacher-forcing) epoch; returns the mean per-token training loss.

    `features` (N, D), or (V, N, D) for V cached views of each image, one drawn at random per caption."""
    model.train()
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # order depends on (seed, epoch) only
    batches = train_set.batches(cfg.batch_size, g, cfg.length_buckets)
    # Length-bucketed batches differ in token count (short captions, few tokens). Weighting each batch's mean
    # token loss by its tokens / the epoch's mean gives every token the weight random batches give it; left
    # unweighted, a batch of short captions pulls as hard as one of long ones (0.07 worse validation loss).
    tokens_per_batch = float(train_set.lengths.sum()) / len(batches)
    loss_sum = torch.zeros((), device=device)  # summed on device: no host sync per step
    n_tokens = 0
    for idx in tqdm(batches[:steps], desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
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
    return float(loss_sum) / max(n_tokens, 1)


def train_step(model: CaptionDecoder, opt, b, device, grad_clip: float, label_smoothing: float = 0.0,
               weight: float = 1.0):
    """One optimisation step on a gathered batch, its mean token loss scaled by `weight` for the
    gradient; returns (detached mean token loss, token count).

    The whole step of the training loop (bench/stage2.py times exactly this against a bare
    LSTM + Linear + Adam step). Nothing in it waits for the device: the token count comes from
    the CPU-side lengths and the loss stays a device tensor.
    """
    loss, n = _batch_loss(model, b, device, label_smoothing)
    opt.zero_grad(set_to_none=True)
    (loss * weight).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.detach(), n


def _start_scst(cfg: TrainConfig, run: Path, model: CaptionDecoder, opt, sched, train_records, tokens,
                epoch: int, device):
    """Enter the SCST phase: from the best cross-entropy weights (at its first epoch), at --scst-lr."""
    from stage2_decoder.scst import CiderD, scst_refs

    if epoch == cfg.epochs:  # not when resuming inside the phase: last.pt already holds SCST weights and state
        model.load_state_dict(load_checkpoint(run / "best.pt", map_location=device)["model_state"], strict=True)
        opt.state.clear()
        for group in opt.param_groups:
            group["lr"] = cfg.scst_lr
        sched.best, sched.num_bad_epochs, sched.cooldown_counter = sched.mode_worse, 0, 0  # a fresh plateau count
    if cfg.progress:
        tqdm.write(f"self-critical training (CIDEr-D reward, {cfg.scst_samples} samples per image)")
    return CiderD(scst_refs(train_records, tokens))


def _scst_epoch(cfg: TrainConfig, scorer, model: CaptionDecoder, opt, features, rows, vocab: Vocabulary,
                epoch: int) -> float:
    """One SCST epoch over the training images; returns the mean sampled-caption CIDEr-D."""
    from stage2_decoder.scst import scst_epoch, scst_keys

    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    n_batches = 1 if cfg.dry_run else math.ceil(len(scst_keys(scorer, rows)) / cfg.batch_size)
    with tqdm(total=n_batches, desc=f"scst {epoch + 1}/{cfg.epochs + cfg.scst_epochs}", unit="batch", leave=False,
              disable=not cfg.progress, dynamic_ncols=True) as bar:
        return scst_epoch(model, opt, features, rows, scorer, vocab.itos, cfg.batch_size, g, cfg.scst_samples,
                          cfg.grad_clip, max_batches=n_batches, progress=bar)


@torch.no_grad()
def validation_cider(model: CaptionDecoder, vocab: Vocabulary, features: torch.Tensor, rows: dict[str, int],
                     refs: dict[str, list[str]], batch_size: int = 256, beam_size: int = 1) -> float:
    """Decode the validation images from the cache (greedy, or a beam search of `beam_size` with the
    deployed decoder's other settings) and score them with CIDEr (in-process)."""
    from stage2_decoder.decode import DecodeConfig, decode
    from stage2_decoder.metrics import cider

    # beam 1 is the greedy validation of old runs (no minimum length); decode() dispatches to greedy for it
    how = DecodeConfig(1, min_len=0) if beam_size == 1 else DecodeConfig(beam_size)
    model.eval()
    keys = sorted(refs)
    res = {}
    for s in range(0, len(keys), batch_size):
        chunk = keys[s:s + batch_size]
        feats = features[torch.tensor([rows[k] for k in chunk])]
        ids = decode(model, feats, how)
        res.update({k: vocab.caption(x) for k, x in zip(chunk, ids)})
    return cider(refs, res, vocab.tokenizer)[0]


def _batch_loss(model: CaptionDecoder, b, device, label_smoothing: float = 0.0):
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
                  device, dry_run: bool = False) -> float:
    """Mean per-token cross-entropy of the pairs, in eval mode."""
    model.eval()
    total, count = torch.zeros((), device=device), 0
    idx = torch.argsort(pairs.lengths, stable=True)  # by length: batches with little padding, same sum
    for s in range(0, len(pairs), batch_size):
        b = pairs.gather(idx[s:s + batch_size], features)
        loss, n = _batch_loss(model, b, device)
        total += loss * n
        count += n
        if dry_run:
            break
    return float(total) / max(count, 1)


_CLI_OWN = {"features", "out", "captions", "images", "dataset", "device", "progress", "dry_run"}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--features", required=True, type=click.Path(), help="Feature cache from stage 1.")
@click.option("--out", required=True, type=click.Path(), help="Run directory (resumed if it has last.pt).")
@click.option("--captions", default=None, help="Override the captions file recorded in the cache.")
@click.option("--images", default=None, help="Override the images folder recorded in the cache.")
@click.option("--dataset", type=click.Choice(list(FORMATS)), default=None,
              help="Override the dataset format recorded in the cache.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--no-progress", is_flag=True, help="No progress bars or per-epoch lines.")
@click.option("--dry-run", is_flag=True, help="One batch per epoch (smoke test).")
@config_options(TrainConfig, skip=_CLI_OWN)
def main(features, out, captions, images, dataset, device, no_progress, dry_run, **hyper):
    """Train the decoder from a feature cache (each option is a TrainConfig field)."""
    cfg = TrainConfig(features=features, out=out, captions=captions, images=images, dataset=dataset,
                      device=device, progress=not no_progress, dry_run=dry_run, **hyper)

    def work():
        r = train(cfg)
        click.echo(f"trained {r.epochs_run} epochs; best epoch {r.best_epoch} (val loss {r.best_val_loss:.4f}, "
                   f"val CIDEr {r.best_val_cider:.3f}); "
                   f"checkpoint {Path(r.run_dir) / 'best.pt'}")
        return 0

    raise SystemExit(run_guarded(work, interrupted_msg=f"training interrupted; the last finished epoch is in "
                                                       f"{out}/last.pt, re-run the same command to resume"))


if __name__ == "__main__":
    main()
