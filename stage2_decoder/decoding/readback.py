"""Reading the decoding loops' results and "all ended?" flags back from the device without stalling it (and
uploading without a stall).

A blocking read (`bool(t)`, `.tolist()`, `.cpu()` of a CUDA tensor) makes the host wait until the GPU has run
everything queued, so the GPU then idles while the host queues the next step's kernels: on a decoder this
small, a read per step or two is most of the decoding time. Two ways around it:

- `LaggedFlags`: a loop's check point copies its flags into pinned host memory with a non-blocking copy and
  reads the flags of the check point before it. The host waits (if at all) for work queued `every` steps ago,
  so the GPU still has the steps since then queued and never runs dry; a loop learns that every caption has
  ended one check point late, and runs a few steps past it (the same captions: see each loop). On the CPU a
  read costs nothing and the flags are read at once.
- `read_back`: a loop's several result tensors in one device-to-host copy (each copy is a sync).

bench/gpu.py counts the syncs that remain (`torch.cuda.set_sync_debug_mode`): the event waits here are not
syncs in its sense (they wait for old work, not all of it); `read_back`'s one copy is, and is counted apart
as the results' read.
"""
from __future__ import annotations

from collections import deque

import torch


class LaggedFlags:
    """The flags posted at a loop's check points, handed back in order: at once on the CPU, one check point
    late on CUDA (`lag` check points, for the tests: 0 reads at once)."""

    def __init__(self, device: torch.device, lag: int | None = None):
        self.cuda = device.type == "cuda"
        self.lag = (1 if self.cuda else 0) if lag is None else lag
        self._queue: deque = deque()

    def post(self, flags: torch.Tensor):
        """Queue this check point's flags (a bool tensor, read with .tolist()); returns the flags now due (those
        of `lag` check points ago), or None while none are."""
        if self.lag == 0:
            return flags.tolist()
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=self.cuda)
        host.copy_(flags, non_blocking=self.cuda)
        event = None
        if self.cuda:  # on the stream of the flags' own GPU (not the current device's: --device cuda:1)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(flags.device))
        self._queue.append((host, event))
        return self._pop() if len(self._queue) > self.lag else None

    def drain(self) -> list:
        """The flags still queued (the loop has ended), oldest first, waiting for them."""
        out = []
        while self._queue:
            out.append(self._pop())
        return out

    def _pop(self):
        host, event = self._queue.popleft()
        if event is not None:
            event.synchronize()  # for the copy queued a check point ago; later steps stay queued
        return host.tolist()


def read_back(*tensors: torch.Tensor, pack: bool | None = None) -> list:
    """Each tensor's .tolist(), from one device-to-host copy: off the CPU (or with `pack`) the tensors are
    flattened into one int64 tensor (floats as float64 bits: float32 and float64 values survive exactly), copied
    once and split."""
    if pack is None:
        pack = any(t.device.type != "cpu" for t in tensors)
    if not pack or not tensors:
        return [t.tolist() for t in tensors]
    flat = [(t.double() if t.is_floating_point() else t.long()).reshape(-1) for t in tensors]
    both = torch.cat([f.view(torch.int64) if f.is_floating_point() else f for f in flat]).cpu()  # the one sync
    out, at = [], 0
    for t, f in zip(tensors, flat):
        part = both[at:at + f.numel()]
        at += f.numel()
        part = part.view(torch.float64) if f.is_floating_point() else part.bool() if t.dtype == torch.bool else part
        out.append(part.reshape(t.shape).tolist())
    return out


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: to a GPU from pinned memory with a non-blocking copy (a copy from pageable
    memory makes the host wait for it: a sync)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
