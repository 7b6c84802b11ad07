"""Train the projection + LSTM decoder from a feature cache (hand-written loop).

    python -m stage2_decoder.train --features FILE.h5 --out RUN_DIR [--epochs N] ...

RUN_DIR gets config.json, split.json, vocab.json, metrics.jsonl, last.pt (every epoch) and
best.pt (lowest validation loss). Rerunning with the same RUN_DIR resumes from last.pt.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.backbones import resolve_device
from common.cli import config_options, run_guarded
from common.datasets import load_dataset, split_keys, write_split
from common.feature_cache import FeatureCache, load_cache
from common.tokenizer import tokenize
from common.vocab import Vocabulary, build_vocab
from stage2_decoder.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from stage2_decoder.data import CaptionPairs
from stage2_decoder.model import CaptionDecoder, DecoderConfig


@dataclass
class TrainConfig:
    features: str
    out: str
    captions: str | None = None  # default: the captions file recorded in the cache
    images: str | None = None  # default: the images folder recorded in the cache
    dataset: str | None = None  # default: the format recorded in the cache
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    embed_size: int = 256
    hidden_size: int = 512
    num_layers: int = 1
    dropout: float = 0.0
    vocab_threshold: int = 4
    max_caption_len: int = 50
    val_frac: float = 0.05
    test_frac: float = 0.05
    split_seed: int = 0
    label_smoothing: float = 0.0
    select_by: str = "cider"  # best.pt by validation "cider" (greedy decode) or "loss"
    patience: int = 0  # early stop after this many epochs without a better best (0 = never)
    lr_patience: int = 1  # halve (lr_factor) the learning rate after this many epochs without improvement
    lr_factor: float = 0.5
    val_images: int = 500  # validation images greedy-decoded for CIDEr each epoch (0 = all)
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    dry_run: bool = False  # one batch per epoch: the cheap mode tests use

    # settings that must not change when a run resumes from last.pt
    RESUME_FIXED = ("features", "embed_size", "hidden_size", "num_layers", "vocab_threshold", "max_caption_len",
                    "val_frac", "test_frac", "split_seed", "dropout", "select_by")


@dataclass
class TrainResult:
    run_dir: str
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    history: list[dict]
    best_val_cider: float = float("nan")


def _check(cfg: TrainConfig) -> None:
    for name in ("epochs", "batch_size", "embed_size", "hidden_size", "num_layers", "vocab_threshold",
                 "max_caption_len"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    if cfg.select_by not in ("cider", "loss"):
        raise ValueError(f"--select-by must be cider or loss, got {cfg.select_by!r}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {cfg.dropout}")


def prepare_data(cfg: TrainConfig, cache: FeatureCache):
    """Records of the cached images, the image split, and the train-split vocabulary."""
    m = cache.meta
    records = load_dataset(cfg.dataset or m.dataset_format, cfg.captions or m.captions_file,
                           cfg.images or m.images_dir)
    rows = cache.rows_by_key()
    records = [r for r in records if r.key in rows]
    if len(records) < 3:
        raise ValueError(f"only {len(records)} images of {cfg.captions or m.captions_file} have features in "
                         f"{cache.path}; is this the captions file the cache was made from?")
    split = split_keys([r.key for r in records], cfg.val_frac, cfg.test_frac, cfg.split_seed)
    by_split = {name: set(keys) for name, keys in split.items()}
    parts = {name: [r for r in records if r.key in by_split[name]] for name in split}
    vocab = build_vocab((tokenize(c) for r in parts["train"] for c in r.captions), cfg.vocab_threshold)
    return parts, split, vocab, rows


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) a decoder; returns the history. Importable: the CLI and sweeps call this."""
    _check(cfg)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)

    cache = load_cache(cfg.features)
    parts, split, vocab, rows = prepare_data(cfg, cache)
    train_set = CaptionPairs(parts["train"], rows, vocab, cfg.max_caption_len)
    if not parts["val"] and cfg.progress:
        tqdm.write("no validation images (--val-frac 0): validating on training images")
    val_records = parts["val"] or parts["train"][:50]
    val_set = CaptionPairs(val_records, rows, vocab, cfg.max_caption_len)
    features = torch.from_numpy(cache.features).float().to(device)  # (N, D), all in memory once
    backbone = {"name": cache.meta.backbone, "weights": cache.meta.weights,
                "weights_sha256": cache.meta.weights_sha256 or None, "feature_dim": cache.meta.feature_dim,
                "preprocess": cache.meta.preprocess}

    dcfg = DecoderConfig(cache.meta.feature_dim, len(vocab), cfg.embed_size, cfg.hidden_size, cfg.num_layers,
                         cfg.dropout)
    model = CaptionDecoder(dcfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.lr_factor,
                                                       patience=cfg.lr_patience)
    history, start_epoch, best = _resume(run, cfg, model, opt, sched, vocab, device)
    val_keys = set([r.key for r in val_records][: cfg.val_images or None])
    val_refs = {r.key: r.captions for r in val_records if r.key in val_keys}
    if start_epoch == 0:
        (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        write_split(split, run / "split.json")
        vocab.save(run / "vocab.json")
    # metrics.jsonl = the checkpoint's history (drops a line from an epoch whose last.pt never landed)
    (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))

    n_train = len(train_set)
    steps = 1 if cfg.dry_run else math.ceil(n_train / cfg.batch_size)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # order depends on (seed, epoch) only
        perm = torch.randperm(n_train, generator=g)
        loss_sum = torch.zeros((), device=device)  # summed on device: no host sync per step
        n_tokens = 0
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                   disable=not cfg.progress, dynamic_ncols=True)
        for s in bar:
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on one sample; this pair is seen in other epochs
                continue
            b = train_set.gather(idx, features)
            loss, n = _batch_loss(model, b, device, cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loss_sum += loss.detach() * n
            n_tokens += n
        train_loss = float(loss_sum) / max(n_tokens, 1)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} in epoch {epoch + 1}; lower --lr")
        val_loss = evaluate_loss(model, val_set, features, cfg.batch_size * 4, device, cfg.dry_run)
        val_cider = validation_cider(model, vocab, features, rows, val_refs) if val_refs else 0.0
        lr_now = opt.param_groups[0]["lr"]
        rec = {"epoch": epoch + 1, "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5),
               "val_perplexity": round(math.exp(min(val_loss, 50)), 3), "val_cider": round(val_cider, 4),
               "seconds": round(time.perf_counter() - t0, 3), "train_pairs": n_train, "lr": lr_now}
        history.append(rec)
        if cfg.progress:
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
                       f"val ppl {rec['val_perplexity']:.2f}  val CIDEr {val_cider:.3f}  lr {lr_now:.2g}  "
                       f"{rec['seconds']:.1f}s")
        score = val_cider if cfg.select_by == "cider" else -val_loss  # higher is better
        is_best = score > best["score"]
        if is_best:
            best = {"score": score, "epoch": epoch + 1, "val_loss": val_loss, "val_cider": val_cider}
        sched.step(score)
        extra = dict(epoch=epoch + 1, optimizer_state=opt.state_dict(), scheduler_state=sched.state_dict(),
                     rng_state=torch.get_rng_state(), train_config=asdict(cfg), history=history, best=best,
                     split={"val": split["val"], "test": split["test"]})
        save_checkpoint(run / "last.pt", model, vocab, backbone, **extra)
        if is_best:
            save_checkpoint(run / "best.pt", model, vocab, backbone, **extra)
        with open(run / "metrics.jsonl", "a") as f:  # after last.pt: a resume never repeats a line
            f.write(json.dumps(rec) + "\n")
        if cfg.patience and epoch + 1 - best["epoch"] >= cfg.patience:
            if cfg.progress:
                tqdm.write(f"early stop: no better validation {cfg.select_by} for {cfg.patience} epochs")
            break
    return TrainResult(str(run), len(history), best["epoch"], best.get("val_loss", float("nan")), history,
                       best.get("val_cider", float("nan")))


@torch.no_grad()
def validation_cider(model: CaptionDecoder, vocab: Vocabulary, features: torch.Tensor, rows: dict[str, int],
                     refs: dict[str, list[str]], batch_size: int = 256) -> float:
    """Greedy-decode the validation images from the cache and score them with CIDEr (in-process)."""
    from stage2_decoder.decode import greedy
    from stage2_decoder.metrics import cider

    model.eval()
    keys = sorted(refs)
    res = {}
    for s in range(0, len(keys), batch_size):
        chunk = keys[s:s + batch_size]
        ids = greedy(model, features[torch.tensor([rows[k] for k in chunk])], max_len=20)
        res.update({k: " ".join(vocab.decode(x)) for k, x in zip(chunk, ids)})
    return cider(refs, res)[0]


def _batch_loss(model: CaptionDecoder, b, device, label_smoothing: float = 0.0):
    from torch.nn.utils.rnn import pack_padded_sequence

    feats = b.features.to(device, non_blocking=True)
    logits = model(feats, b.inputs.to(device, non_blocking=True), b.lengths)  # (sum(lengths), V)
    targets = pack_padded_sequence(b.targets, b.lengths, batch_first=True, enforce_sorted=False).data
    n = int(b.lengths.sum())
    return F.cross_entropy(logits.float(), targets.to(device, non_blocking=True),
                           label_smoothing=label_smoothing), n


@torch.no_grad()
def evaluate_loss(model: CaptionDecoder, pairs: CaptionPairs, features: torch.Tensor, batch_size: int,
                  device, dry_run: bool = False) -> float:
    """Mean per-token cross-entropy of the pairs, in eval mode."""
    model.eval()
    total, count = torch.zeros((), device=device), 0
    idx = torch.arange(len(pairs))
    for s in range(0, len(pairs), batch_size):
        b = pairs.gather(idx[s:s + batch_size], features)
        loss, n = _batch_loss(model, b, device)
        total += loss * n
        count += n
        if dry_run:
            break
    return float(total) / max(count, 1)


def _resume(run: Path, cfg: TrainConfig, model, opt, sched, vocab: Vocabulary, device):
    last = run / "last.pt"
    if not last.exists():
        return [], 0, {"score": float("-inf"), "epoch": 0}
    ckpt = load_checkpoint(last, map_location=device)
    old = ckpt.get("train_config", {})
    changed = [k for k in TrainConfig.RESUME_FIXED
               if k != "features" and old.get(k) != getattr(cfg, k)]
    if os.path.abspath(old.get("features", "")) != os.path.abspath(cfg.features):
        changed.append("features")
    if changed or Vocabulary.from_dict(ckpt["vocab"]) != vocab:
        raise CheckpointError(f"{last} was trained with other settings ({', '.join(changed) or 'vocabulary'}); "
                              f"use a new --out or delete {run}")
    try:
        model.load_state_dict(ckpt["model_state"], strict=True)
        opt.load_state_dict(ckpt["optimizer_state"])
        sched.load_state_dict(ckpt["scheduler_state"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot resume from {last}: {e}") from e
    torch.set_rng_state(ckpt["rng_state"].cpu())
    if cfg.progress:
        tqdm.write(f"resuming {run} after epoch {ckpt['epoch']}")
    return list(ckpt.get("history", [])), int(ckpt["epoch"]), dict(ckpt["best"])


_CLI_OWN = {"features", "out", "captions", "images", "dataset", "device", "progress", "dry_run"}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--features", required=True, type=click.Path(), help="Feature cache from stage 1.")
@click.option("--out", required=True, type=click.Path(), help="Run directory (resumed if it has last.pt).")
@click.option("--captions", default=None, help="Override the captions file recorded in the cache.")
@click.option("--images", default=None, help="Override the images folder recorded in the cache.")
@click.option("--dataset", type=click.Choice(["coco", "flickr8k"]), default=None,
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
