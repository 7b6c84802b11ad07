"""The training loop: `train(cfg)` trains (or resumes) a decoder, epoch by epoch, into a run folder.
The CLI (train.py) and the sweeps call it.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from common.atomic import remove_stale_temporaries
from common.device import resolve_device
from common.lock import LOCK_NAME, hold
from stage2_decoder.model import CaptionDecoder
from stage2_decoder.training.config import TrainConfig
from stage2_decoder.training.data import load_train_data
from stage2_decoder.training.ema import EMA
from stage2_decoder.training.epochs import self_critical_epoch, start_scst, validate, xe_epoch
from stage2_decoder.training.resume import resume_run
from stage2_decoder.training.run_files import EpochRecord, epoch_record, save_epoch, write_run_start


# curves.png is not here: `plot` may be drawing it during the run (plot_run cleans its own under its lock)
RUN_OUTPUTS = ("config.json", "split.json", "vocab.json", "metrics.jsonl", "best.pt", "last.pt")


@dataclass
class TrainResult:
    run_dir: str
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    history: list[EpochRecord]  # the metrics.jsonl lines
    best_val_cider: float = float("nan")


MAX_LSTM_WEIGHTS = 1 << 30  # 4 GiB of float32 before gradients and Adam's two moments: no decoder of this kind


def check_settings(cfg: TrainConfig) -> None:
    """Refuse settings no run could train with (one ValueError naming the option); a sweep checks every point
    with this before its first run starts."""
    for name in ("epochs", "batch_size", "embed_size", "hidden_size", "num_layers", "vocab_threshold",
                 "max_caption_len", "length_buckets", "val_beam_size", "scst_max_len"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    for name, choices in TrainConfig.CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                             f"got {getattr(cfg, name)!r}")
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
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):  # found before the data loads, not after
        raise NotADirectoryError(f"--out {cfg.out} is a file: training writes a run folder there")
    h, e, n = cfg.hidden_size, cfg.embed_size, cfg.num_layers
    weights = 4 * h * (e + h + 2) + (n - 1) * 4 * h * (2 * h + 2)  # (4h, in + h) weights + 2 biases per layer
    if weights > MAX_LSTM_WEIGHTS:
        raise ValueError(f"--hidden-size {h} --embed-size {e} --num-layers {n}: the LSTM alone would need "
                         f"{weights:,} weights ({weights * 4 / 2**30:,.0f} GiB); at most {MAX_LSTM_WEIGHTS:,}")


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) a decoder; returns the history. Importable: the CLI and sweeps call this."""
    for name in ("features", "out"):
        if not str(getattr(cfg, name)).strip():  # "" would be the current folder
            raise ValueError(f"--{name} is empty: name the {'feature cache' if name == 'features' else 'run folder'}")
    # absolute, so a resume from another working directory names the same cache (last.pt records this)
    cfg = replace(cfg, features=os.path.abspath(cfg.features))
    with contextlib.ExitStack() as owned:  # the run folder's lock, held until training returns or fails
        return _train(cfg, owned)


def _train(cfg: TrainConfig, owned: contextlib.ExitStack) -> TrainResult:
    check_settings(cfg)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    run = Path(cfg.out)
    data = load_train_data(cfg, device)
    run.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be usable
    owned.enter_context(hold(run / LOCK_NAME, "run folder", reenter=True))  # a sweep's run holds it already
    remove_stale_temporaries(run, RUN_OUTPUTS)  # what a killed run was writing: ours now that we hold the lock

    model = CaptionDecoder(cfg.decoder_config(data.feature_dim, len(data.vocab))).to(device)
    model.bn.warmup = cfg.bn_warmup
    opt = cfg.optimizer(model.parameters())
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.lr_factor,
                                                       patience=cfg.lr_patience)
    # with --ema-decay the cross-entropy phase's weights validated, selected and saved (model_state) are a
    # moving average of the trained ones, which its checkpoints also keep (train_model_state) so a resumed run
    # goes on exactly. SCST is not averaged: its few steps (one per batch of images) would be mostly undone.
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup, cfg.ema_start) if cfg.ema_decay else None
    history, start_epoch, best = resume_run(run, cfg, model, opt, sched, data.vocab, device, data.backbone, ema,
                                            data.split, data.cache)
    val_keys = set([r.key for r in data.val_records][: cfg.val_images or None])
    val_refs = {r.key: r.captions for r in data.val_records if r.key in val_keys and r.captions}
    write_run_start(run, cfg, start_epoch, data.split, data.vocab, history)

    steps = 1 if cfg.dry_run else math.ceil(len(data.train_set) / cfg.batch_size)
    scst = None
    for epoch in range(start_epoch, cfg.epochs + cfg.scst_epochs):
        if _patience_ran_out(cfg, best, epoch):  # stateless, so a resumed run decides the same way
            if epoch < cfg.epochs and cfg.scst_epochs:
                continue  # skip the rest of the cross-entropy phase, go on to SCST
            break
        t0 = time.perf_counter()
        if epoch < cfg.epochs:
            trained = xe_epoch(model, opt, data.train_set, data.train_features, device, cfg, epoch, steps, ema)
        else:  # self-critical fine-tuning of the best cross-entropy model (stage2_decoder/training/scst.py)
            scst = scst or start_scst(cfg, run, model, opt, sched, data.parts["train"], data.tokens, epoch, device)
            trained = self_critical_epoch(cfg, scst, model, opt, data.scst_features, data.rows, data.vocab, epoch)
        train_loss = trained["train_loss"] if "train_loss" in trained else -trained["train_reward"]
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} in epoch {epoch + 1}; lower --lr")
        averaged = ema is not None and epoch < cfg.epochs
        saved = ema.module if averaged else model
        val = validate(saved, cfg, data.val_set, data.features, data.rows, data.vocab, val_refs, device)
        rec = epoch_record(epoch, trained, val, time.perf_counter() - t0, len(data.train_set),
                           opt.param_groups[0]["lr"])
        history.append(rec)
        if cfg.progress:
            _print_epoch(cfg, rec, trained, val)
        score = val["val_cider"] if cfg.select_by == "cider" else -val["val_loss"]  # higher is better
        is_best = score > best["score"]
        if is_best:
            best = {"score": score, "epoch": epoch + 1, **val}
            rec["best"] = True  # the plot marks the epoch best.pt holds without comparing rounded scores
        sched.step(score)
        save_epoch(run, cfg, saved, model if averaged else None, opt, sched, device, data.vocab, data.backbone,
                   data.split, history, best, is_best, ema.updates if averaged else None, data.cache)
        if _patience_ran_out(cfg, best, epoch + 1) and cfg.progress:
            tqdm.write(f"early stop: no better validation {cfg.select_by} for {cfg.patience} epochs")
    _plot(run)
    return TrainResult(str(run), len(history), best["epoch"], best.get("val_loss", float("nan")), history,
                       best.get("val_cider", float("nan")))


def _print_epoch(cfg: TrainConfig, rec: EpochRecord, trained: dict[str, float], val: dict[str, float]) -> None:
    """The epoch's summary line (unrounded losses and scores; rec's perplexity, rate and time)."""
    what = f"reward {trained['train_reward']:.4f}" if "train_reward" in trained else f"loss {trained['train_loss']:.4f}"
    tqdm.write(f"epoch {rec['epoch']}/{cfg.epochs + cfg.scst_epochs}  train {what}  val loss {val['val_loss']:.4f}  "
               f"val ppl {rec['val_perplexity']:.2f}  val CIDEr {val['val_cider']:.3f}  lr {rec['lr']:.2g}  "
               f"{rec['seconds']:.1f}s")


def _plot(run: Path) -> None:
    """RUN_DIR/curves.png is a convenience: a plotting failure must never fail a finished run."""
    try:
        # imported inside the try: a failure to import it is caught like any other
        from stage2_decoder.reporting.curves import plot_run
        plot_run(run)
    except Exception as e:  # noqa: BLE001
        tqdm.write(f"warning: training curves not plotted: {e}", file=sys.stderr)


def _patience_ran_out(cfg: TrainConfig, best: dict, epochs_done: int) -> bool:
    """Early stopping: `patience` epochs of the current phase (cross-entropy, then SCST) without a new best."""
    since = max(best["epoch"], cfg.epochs) if epochs_done >= cfg.epochs else best["epoch"]
    return bool(cfg.patience) and epochs_done > 0 and epochs_done - since >= cfg.patience
