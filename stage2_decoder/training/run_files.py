"""What a training run writes into RUN_DIR: config.json, split.json and vocab.json at its start, and after
each epoch best.pt (when the epoch is the best so far), last.pt (with the state to resume) and its
metrics.jsonl line, in that order, so a kill at any instant leaves a run that resumes exactly."""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from common.atomic import atomic_write
from common.datasets import write_split
from common.vocab import Vocabulary
from stage2_decoder.model import CaptionDecoder
from stage2_decoder.training.checkpoint import cpu_optimizer_state, cpu_state, inference_extra, save_checkpoint
from stage2_decoder.training.config import TrainConfig
from stage2_decoder.training.resume import cuda_rng_state, run_config


EpochRecord = dict[str, int | float | str]  # one metrics.jsonl line: {"epoch", "train_loss", ..., "lr"}


def write_run_start(run: Path, cfg: TrainConfig, start_epoch: int, split: dict[str, list[str]],
                    vocab: Vocabulary, history: list[EpochRecord]) -> None:
    """config.json (the settings the epochs from `start_epoch` on use); split.json and vocab.json on a fresh
    run; metrics.jsonl rewritten as the checkpoint's history (drops a line from an epoch whose last.pt never
    landed). """
    atomic_write(run / "config.json", json.dumps(run_config(run, cfg, start_epoch), indent=2), what="run config")
    if start_epoch == 0 or not (run / "split.json").is_file():  # a resume puts back one deleted since
        write_split(split, run / "split.json")
    if start_epoch == 0 or not (run / "vocab.json").is_file():
        vocab.save(run / "vocab.json")
    atomic_write(run / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history), what="metrics")


def epoch_record(epoch: int, train: dict[str, float], val: dict[str, float], seconds: float, train_pairs: int,
                 lr: float) -> EpochRecord:
    """One metrics.jsonl line. SCST epochs (a "train_reward" in `train`) maximise a reward (mean
    sampled-caption CIDEr-D) and have no cross-entropy loss."""
    # an SCST reward r is rounded as the loss -r was (5 places), then to 4: the figures runs always recorded
    train_loss = train["train_loss"] if "train_reward" not in train else -train["train_reward"]
    rec = {"epoch": epoch + 1, "train_loss": round(train_loss, 5), "val_loss": round(val["val_loss"], 5),
           "val_perplexity": round(math.exp(min(val["val_loss"], 50)), 3), "val_cider": round(val["val_cider"], 4),
           "seconds": round(seconds, 3), "train_pairs": train_pairs, "lr": lr}
    if "train_reward" in train:
        reward = -rec.pop("train_loss")
        rec = {**rec, "phase": "scst", "train_reward": round(reward, 4)}
    return rec


def save_epoch(run: Path, cfg: TrainConfig, saved: CaptionDecoder, trained: CaptionDecoder | None,
               opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.ReduceLROnPlateau, device: torch.device,
               vocab: Vocabulary, backbone: dict[str, str | int | None], split: dict[str, list[str]],
               history: list[EpochRecord], best: dict[str, float], is_best: bool,
               ema_updates: int | None = None, cache: dict[str, str | int] | None = None) -> None:
    """After epoch `history[-1]`: best.pt if `is_best`, then last.pt, then its metrics.jsonl line.

    `saved` holds the weights validated (the weight average in the cross-entropy phase), `trained` the
    trained ones beside them (None when they are the same), which last.pt keeps to go on exactly, with
    the number of updates the average holds (`ema_updates`: its warm-up goes on from there)."""
    rec = history[-1]
    extra = dict(epoch=rec["epoch"], optimizer_state=cpu_optimizer_state(opt), scheduler_state=sched.state_dict(),
                 rng_state=torch.get_rng_state(), torch_threads=torch.get_num_threads(), train_config=asdict(cfg),
                 history=history, best=best,
                 split={"val": split["val"], "test": split["test"]}, **cuda_rng_state(device))
    if trained is not None:
        extra["train_model_state"] = cpu_state(trained)
    if ema_updates is not None:
        extra["ema_updates"] = ema_updates
    if cache is not None:
        extra["cache_identity"] = dict(cache)
    if is_best:  # before last.pt: a kill between the two redoes this epoch, best.pt included
        save_checkpoint(run / "best.pt", saved, vocab, backbone, **inference_extra(extra))  # no resume state
    save_checkpoint(run / "last.pt", saved, vocab, backbone, **extra)
    with open(run / "metrics.jsonl", "a") as f:  # after last.pt: a resume never repeats a line
        f.write(json.dumps(rec) + "\n")
