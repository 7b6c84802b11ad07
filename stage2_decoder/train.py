"""Train the projection + LSTM decoder from a feature cache (hand-written loop).

    python -m stage2_decoder.train --features FILE.h5 --out RUN_DIR [--epochs N] ...

RUN_DIR gets config.json, split.json, vocab.json, metrics.jsonl, last.pt (every epoch, with the state
to resume) and best.pt (the selected epoch, what captioning needs). Rerunning with the same RUN_DIR
resumes from last.pt.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import click
import torch
from tqdm import tqdm

from common.atomic import remove_stale_temporaries
from common.bounds import check_fields
from common.cli import config_options, run_guarded
from common.datasets import FORMATS
from common.device import resolve_device
from common.lock import LOCK_NAME, hold
from common.tokenizer import TOKENIZERS
from stage2_decoder.ema import EMA
from stage2_decoder.epochs import _scst_epoch, _start_scst, _xe_epoch, validate
from stage2_decoder.model import CaptionDecoder, DecoderConfig
from stage2_decoder.resume import _resume
from stage2_decoder.run_files import EpochRecord, epoch_record, save_epoch, write_run_start
from stage2_decoder.train_data import load_train_data
# importable from here as before (tests, bench/): the training step, the losses, validation, the data
from stage2_decoder.epochs import _batch_loss, evaluate_loss, train_step, validation_cider  # noqa: F401
from stage2_decoder.resume import cuda_rng_state, restore_cuda_rng_state  # noqa: F401
from stage2_decoder.train_data import prepare_data  # noqa: F401


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
    # warm the average up: decay_t = min(ema_decay, (1 + t) / (10 + t)) after t steps (docs/defaults.md)
    ema_warmup: bool = True
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
    scst_max_len: int = 16  # most words per sampled SCST caption (docs/defaults.md)
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

    def __post_init__(self):
        # each number within common.bounds' limits, as the CLI and a sweep grid check it, named as the option
        check_fields(self, lambda name: "--" + name.replace("_", "-"))

    def decoder_config(self, feature_dim: int, vocab_size: int) -> DecoderConfig:
        """The decoder these settings train (train() and the benchmarks build it from here)."""
        return DecoderConfig(feature_dim, vocab_size, self.embed_size, self.hidden_size, self.num_layers,
                             self.dropout, self.tie_embeddings)

    def optimizer(self, params) -> torch.optim.Adam:
        """The optimiser these settings train with (train() and the benchmarks build it from here).
        Fused on every device: one kernel per step on CUDA, and a faster step on the CPU too."""
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, fused=True)


TrainConfig.RESUME_FIXED = tuple(f.name for f in fields(TrainConfig)
                                 if f.name not in TrainConfig.RESUME_APPLIED + TrainConfig.RESUME_FREE)
RUN_OUTPUTS = ("config.json", "split.json", "vocab.json", "metrics.jsonl", "best.pt", "last.pt", "curves.png")


@dataclass
class TrainResult:
    run_dir: str
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    history: list[EpochRecord]  # the metrics.jsonl lines
    best_val_cider: float = float("nan")


MAX_LSTM_WEIGHTS = 1 << 30  # 4 GiB of float32 before gradients and Adam's two moments: no decoder of this kind


def _check(cfg: TrainConfig) -> None:
    for name in ("epochs", "batch_size", "embed_size", "hidden_size", "num_layers", "vocab_threshold",
                 "max_caption_len", "length_buckets", "val_beam_size", "scst_max_len"):
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
    data = load_train_data(cfg, device)
    run.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be usable
    owned.enter_context(hold(run / LOCK_NAME, "run folder"))
    remove_stale_temporaries(run, RUN_OUTPUTS)  # what a killed run was writing: ours now that we hold the lock

    model = CaptionDecoder(cfg.decoder_config(data.feature_dim, len(data.vocab))).to(device)
    opt = cfg.optimizer(model.parameters())
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.lr_factor,
                                                       patience=cfg.lr_patience)
    # with --ema-decay the cross-entropy phase's weights validated, selected and saved (model_state) are a
    # moving average of the trained ones, which its checkpoints also keep (train_model_state) so a resumed run
    # goes on exactly. SCST is not averaged: its few steps (one per batch of images) would be mostly undone.
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay else None
    history, start_epoch, best = _resume(run, cfg, model, opt, sched, data.vocab, device, data.backbone, ema)
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
            trained = _xe_epoch(model, opt, data.train_set, data.train_features, device, cfg, epoch, steps, ema)
        else:  # self-critical fine-tuning of the best cross-entropy model (stage2_decoder/scst.py)
            scst = scst or _start_scst(cfg, run, model, opt, sched, data.parts["train"], data.tokens, epoch, device)
            trained = _scst_epoch(cfg, scst, model, opt, data.scst_features, data.rows, data.vocab, epoch)
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
        sched.step(score)
        save_epoch(run, cfg, saved, model if averaged else None, opt, sched, device, data.vocab, data.backbone,
                   data.split, history, best, is_best, ema.updates if averaged else None)
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
        from stage2_decoder.plot import plot_run
        plot_run(run)
    except Exception as e:  # noqa: BLE001
        tqdm.write(f"warning: training curves not plotted: {e}", file=sys.stderr)


def _patience_ran_out(cfg: TrainConfig, best: dict, epochs_done: int) -> bool:
    """Early stopping: `patience` epochs of the current phase (cross-entropy, then SCST) without a new best."""
    since = max(best["epoch"], cfg.epochs) if epochs_done >= cfg.epochs else best["epoch"]
    return bool(cfg.patience) and epochs_done > 0 and epochs_done - since >= cfg.patience


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
