"""Exponential moving average of a model's weights, kept on the model's device, with a warm-up.

`torch.optim.swa_utils.AveragedModel` counts its updates in a tensor that it reads back on the
host at every step (`if self.n_averaged == 0`): a device sync per training step on a GPU. Here the
count is a Python int and the update is one fused `torch._foreach_lerp_` per dtype, queued like
any other kernel. The first update copies the weights, later ones move them by (1 - decay_t) towards
the trained ones, and BatchNorm's running statistics are averaged like the weights; integer buffers
(BatchNorm's batch count) are copied.

Warm-up: the average is bias-corrected (Adam's correction of its moment estimates), i.e. the n-th
update moves it by (1 - decay) / (1 - decay ** n): after n updates it is sum_i (1 - decay) decay ** (n - i) w_i
/ (1 - decay ** n), the weights of every step so far with 0.995's weighting, none of them over-counted. A
constant 0.995 from the start kept 74% of the first step's weights after 60 steps, so a short run saved an
average that captioned every photo alike; corrected, the first step is one of 60. Past ~1,000 updates the
correction is below 1% and the average is the constant decay's (docs/defaults.md has the evidence). Without
warm-up: AveragedModel's get_ema_multi_avg_fn(decay) numbers.

Start: for its first `start` updates the average follows the trained weights (each update copies them) and
only then begins averaging, from that step's weights. Even corrected, an average of every step so far lags
the trained weights by half the run: after a 60-step run it was the weights of about step 30 (validation
loss 3.61 against the trained weights' 3.41). Past the start it is the same average as from step 0, less
the first steps' share (0.995 ** (t - start) of it).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def warmed_decay(decay: float, updates: int) -> float:
    """The decay of the update that follows `updates` earlier ones: 1 - (1 - decay) / (1 - decay ** n), n = updates + 1.

    0 for the first update (a copy), then rising towards `decay`."""
    return 1.0 - (1.0 - decay) / (1.0 - decay ** (updates + 1))


def optimizer_steps(optimizer_state: dict) -> int:
    """Optimiser steps an optimiser state_dict has taken (Adam's per-parameter "step"; 0 if it has none).

    What a last.pt from before the update counter was saved stands in with: one update followed each
    cross-entropy step."""
    for s in optimizer_state.get("state", {}).values():
        if isinstance(s, dict) and "step" in s:
            return int(float(s["step"]))
    return 0


class EMA:
    """`module` holds the average; `update(model)` after each optimiser step; `updates` counts them."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True, start: int = 0):
        self.decay = decay
        self.warmup = warmup
        self.start = start
        self.module = copy.deepcopy(model).requires_grad_(False)
        for m in self.module.modules():
            if isinstance(m, nn.RNNBase):  # the copy's LSTM weights are no longer one cuDNN chunk: re-compact
                m.flatten_parameters()
        self.updates = 0  # 0: the next update copies (AveragedModel's n_averaged == 0)

    def current_decay(self) -> float:
        """The decay the next update uses (0: it copies)."""
        averaged = self.updates - self.start  # averaging updates so far
        if averaged < 0:
            return 0.0
        return warmed_decay(self.decay, averaged) if self.warmup else self.decay

    def _pairs(self, model: nn.Module):
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        return [(a, b.detach()) for a, b in zip(mine, theirs, strict=True)]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = self._pairs(model)
        if not self.updates or self.updates < self.start:
            torch._foreach_copy_([a for a, _ in pairs], [b for _, b in pairs])
            self.updates += 1
            return
        weight = 1.0 - self.current_decay()  # a Python float: nothing read back from the device
        groups: dict[tuple, tuple[list, list]] = {}
        for a, b in pairs:
            groups.setdefault((a.device, a.dtype), ([], []))
            groups[(a.device, a.dtype)][0].append(a)
            groups[(a.device, a.dtype)][1].append(b)
        for (_, dtype), (avg, cur) in groups.items():
            if dtype.is_floating_point:
                torch._foreach_lerp_(avg, cur, weight)
            else:
                torch._foreach_copy_(avg, cur)
        self.updates += 1

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """Go on averaging from a saved average (a checkpoint's `model_state`) made of `updates` updates."""
        self.module.load_state_dict(state, strict=True)
        self.updates = max(1, int(updates))  # a saved average exists: never copy over it
