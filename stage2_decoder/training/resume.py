"""Resuming a training run from RUN_DIR/last.pt, strictly: settings that change the training math must
match what last.pt recorded (TrainConfig.RESUME_FIXED), the few that may change (RESUME_APPLIED) apply to
the remaining epochs, and config.json records each resume's changes. `cfg` is a TrainConfig."""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import MISSING, asdict
from pathlib import Path

import torch
from tqdm import tqdm

from common.bounds import MAX_EPOCHS
from common.jsonio import JSONFileError, read_json
from common.vocab import Vocabulary
from stage2_decoder.training.checkpoint import CheckpointError, load_checkpoint
from stage2_decoder.training.ema import EMA, optimizer_steps


def cuda_rng_state(device) -> dict:
    """{"cuda_rng_state": one state per visible GPU} when training on CUDA (dropout and SCST sampling draw there)."""
    if torch.device(device).type != "cuda":
        return {}
    return {"cuda_rng_state": [s.cpu() for s in torch.cuda.get_rng_state_all()]}


def restore_cuda_rng_state(ckpt: dict, device) -> None:
    """Put back the CUDA generators a checkpoint saved (as many GPUs as both have). cuDNN's LSTM is not
    bitwise reproducible, so a resumed GPU run is statistically, not bitwise, the uninterrupted one."""
    states = ckpt.get("cuda_rng_state")
    if not states or torch.device(device).type != "cuda":
        return
    for i, state in enumerate(states[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state.cpu(), i)


def run_config(run: Path, cfg, start_epoch: int) -> dict:
    """config.json: the settings the epochs from `start_epoch` on use, and under "resumed" every resume that
    changed one of type(cfg).RESUME_APPLIED ({"after_epoch", "changed": {name: [before, now]}})."""
    before: dict = {}
    if start_epoch:
        try:
            before = read_json(run / "config.json", "run config", expect=dict)
        except (OSError, JSONFileError) as e:
            warnings.warn(f"{run / 'config.json'} could not be read ({e}): its record of earlier resumes is lost")
            before = {}
    resumed = list(before.get("resumed", [])) if isinstance(before.get("resumed"), list) else []
    changed = {k: [before[k], getattr(cfg, k)] for k in type(cfg).RESUME_APPLIED
               if k in before and before[k] != getattr(cfg, k)}
    if changed:
        resumed.append({"after_epoch": start_epoch, "changed": changed})
    return {**asdict(cfg), **({"resumed": resumed} if resumed else {})}


def _recorded(cfg, old: dict, name: str):
    """A setting as last.pt recorded it; one it predates is what runs did before it existed."""
    if name in old:
        return old[name]
    if name in type(cfg).RESUME_LEGACY:
        return type(cfg).RESUME_LEGACY[name]
    default = type(cfg).__dataclass_fields__[name].default
    return None if default is MISSING else default


def recorded_epochs(run: Path) -> int | None:
    """How many finished epochs RUN/metrics.jsonl records (its non-empty lines); None if it cannot be read."""
    try:
        return sum(1 for line in (run / "metrics.jsonl").read_bytes().splitlines() if line.strip())
    except OSError:
        return None


def _check_nothing_to_overwrite(run: Path) -> None:
    """A run folder without last.pt whose metrics.jsonl records finished epochs: last.pt was deleted (best.pt is
    all captioning needs). A fresh run there would overwrite best.pt and the metrics; refused. (A run killed in
    its first epoch, between best.pt and last.pt, has recorded none: it starts over; so does a folder whose
    checkpoints were both deleted.)"""
    if not (run / "best.pt").exists():  # the checkpoints deleted to train again: nothing of value is replaced
        return
    epochs = recorded_epochs(run)
    if epochs:
        raise CheckpointError(f"{run} holds a run of {epochs} finished epochs (metrics.jsonl) but no last.pt to "
                              f"resume it from; a new run would overwrite its best.pt: use a new --out, or "
                              f"delete {run} to start over there")


def _check_resume_epochs(last: Path, cfg, old: dict, done: int) -> None:
    """More epochs (or patience) apply to the rest of the run; fewer than already ran, or a moved
    cross-entropy / self-critical boundary once SCST began, are refused."""
    old_epochs = old.get("epochs", cfg.epochs)
    if cfg.epochs < min(done, old_epochs):
        raise CheckpointError(f"{last} already ran {min(done, old_epochs)} cross-entropy epochs: --epochs "
                              f"{cfg.epochs} cannot undo them (use --epochs {old_epochs} or a new --out)")
    if done > old_epochs and cfg.epochs != old_epochs:
        raise CheckpointError(f"{last} is in its self-critical phase (it began after epoch {old_epochs}): "
                              f"--epochs must stay {old_epochs}")
    if cfg.epochs + cfg.scst_epochs < done:
        raise CheckpointError(f"{last} already ran {done} epochs: --epochs {cfg.epochs} + --scst-epochs "
                              f"{cfg.scst_epochs} is fewer")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_progress(last: Path, run: Path, epoch: int, best: dict, history: list) -> None:
    """last.pt's record of the epochs run, each field of the type training reads, else one CheckpointError
    (a best without a score was a KeyError traceback in the first resumed epoch)."""
    why = None
    if not 0 <= epoch <= MAX_EPOCHS + MAX_EPOCHS:
        why = f"its epoch is {epoch}"
    elif not (_number(best.get("score")) and not math.isnan(best["score"])):
        why = f"its best has no score (got {repr(best.get('score'))[:40]})"
    elif not (isinstance(best.get("epoch"), int) and not isinstance(best["epoch"], bool)
              and 0 <= best["epoch"] <= epoch):
        why = f"its best epoch is {repr(best.get('epoch'))[:40]}, not one of the {epoch} epochs run"
    elif not all(_number(v) for k, v in best.items() if k not in ("score", "epoch")):
        why = "its best holds a value that is not a number"
    elif not all(isinstance(h, dict) and all(isinstance(v, (str, int, float, type(None))) for v in h.values())
                 for h in history):
        why = "its history is not a list of epoch records"
    if why:
        raise CheckpointError(f"cannot resume from {last}: {why}; use a new --out or delete {run}")


def resume_run(run: Path, cfg, model, opt, sched, vocab: Vocabulary, device, backbone: dict,
               ema: EMA | None = None, split: dict[str, list[str]] | None = None,
               cache: dict[str, str | int] | None = None):
    last = run / "last.pt"
    if not last.exists():
        _check_nothing_to_overwrite(run)
        return [], 0, {"score": float("-inf"), "epoch": 0}
    ckpt = load_checkpoint(last, map_location=device)
    old = ckpt.get("train_config", {})
    if not isinstance(old, dict):
        raise CheckpointError(f"{last} has a damaged train_config ({type(old).__name__}, expected a dict): "
                              f"use a new --out or delete {run}")
    changed = [f"{k} {_recorded(cfg, old, k)!r} -> {getattr(cfg, k)!r}"
               for k in type(cfg).RESUME_FIXED if k != "features" and _recorded(cfg, old, k) != getattr(cfg, k)]
    if os.path.abspath(old.get("features", "")) != os.path.abspath(cfg.features):
        changed.append("features")
    # the same cache path may now hold features of another backbone (same size, other meaning)
    changed += [f"backbone {k}" for k in ("name", "weights", "feature_dim", "preprocess")
                if ckpt["backbone"].get(k) != backbone[k]]
    if "weights_sha256" in ckpt["backbone"] and (ckpt["backbone"]["weights_sha256"] or None) != \
            (backbone.get("weights_sha256") or None):  # a weights file of the same name, other contents
        changed.append("backbone weights_sha256")
    made = ckpt.get("cache_identity")  # absent from a last.pt written before it was recorded: not checked
    if cache is not None and isinstance(made, dict):
        changed += [f"cache {k} {made.get(k)!r} -> {v!r}" for k, v in cache.items() if made.get(k) != v]
    if split is not None and isinstance(ckpt.get("split"), dict) and \
            any(list(ckpt["split"].get(k, [])) != list(split[k]) for k in ("val", "test")):
        changed.append("the image split (another captions file or images?)")  # trained images would be tested on
    if changed or Vocabulary.from_dict(ckpt["vocab"]) != vocab:
        raise CheckpointError(f"{last} was trained with other settings ({', '.join(changed) or 'vocabulary'}); "
                              f"resume with the same ones, or use a new --out or delete {run}")
    try:
        model.load_state_dict(ckpt.get("train_model_state", ckpt["model_state"]), strict=True)
        if ema is not None:
            # goes on averaging (not a fresh copy of the trained weights); a last.pt from before the counter:
            # one update per optimiser step
            ema.load_state_dict(ckpt["model_state"], ckpt.get("ema_updates", optimizer_steps(ckpt["optimizer_state"])))
        opt.load_state_dict(ckpt["optimizer_state"])
        sched.load_state_dict(ckpt["scheduler_state"])
        torch.set_rng_state(ckpt["rng_state"].cpu())
        restore_cuda_rng_state(ckpt, device)
        history, epoch, best = list(ckpt.get("history", [])), int(ckpt["epoch"]), dict(ckpt["best"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot resume from {last}: {type(e).__name__}: {e}") from e
    _check_progress(last, run, epoch, best, history)
    _check_resume_epochs(last, cfg, old, epoch)
    threads, now = ckpt.get("torch_threads"), torch.get_num_threads()
    if torch.device(device).type == "cpu" and isinstance(threads, int) and threads != now:
        # said, not refused: moving a run to a bigger machine is fair; its last bits then differ
        warnings.warn(f"{last} was trained on {threads} torch threads and goes on with {now}: it will not end "
                      f"bit for bit as an uninterrupted run would (OMP_NUM_THREADS={threads} keeps it so)")
    if cfg.progress:
        tqdm.write(f"resuming {run} after epoch {epoch}")
    return history, epoch, best
