"""Exponential moving average of a model's weights, kept on the model's device.

`torch.optim.swa_utils.AveragedModel` counts its updates in a tensor that it reads back on the
host at every step (`if self.n_averaged == 0`): a device sync per training step on a GPU. Here the
count is a Python flag and the update is one fused `torch._foreach_lerp_` per dtype, queued like
any other kernel. Same numbers as `AveragedModel(..., get_ema_multi_avg_fn(decay), use_buffers=True)`:
the first update copies the weights, later ones move them by (1 - decay) towards the trained ones,
and BatchNorm's running statistics are averaged like the weights; integer buffers (BatchNorm's
batch count) are copied.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """`module` holds the average; `update(model)` after each optimiser step."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).requires_grad_(False)
        for m in self.module.modules():
            if isinstance(m, nn.RNNBase):  # the copy's LSTM weights are no longer one cuDNN chunk: re-compact
                m.flatten_parameters()
        self.started = False  # False: the next update copies (AveragedModel's n_averaged == 0)

    def _pairs(self, model: nn.Module):
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        return [(a, b.detach()) for a, b in zip(mine, theirs, strict=True)]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = self._pairs(model)
        if not self.started:
            torch._foreach_copy_([a for a, _ in pairs], [b for _, b in pairs])
            self.started = True
            return
        groups: dict[tuple, tuple[list, list]] = {}
        for a, b in pairs:
            groups.setdefault((a.device, a.dtype), ([], []))
            groups[(a.device, a.dtype)][0].append(a)
            groups[(a.device, a.dtype)][1].append(b)
        for (_, dtype), (avg, cur) in groups.items():
            if dtype.is_floating_point:
                torch._foreach_lerp_(avg, cur, 1.0 - self.decay)
            else:
                torch._foreach_copy_(avg, cur)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Go on averaging from a saved average (a checkpoint's `model_state`)."""
        self.module.load_state_dict(state, strict=True)
        self.started = True
