"""torchrun support for stage 1: which rank this process is, which rows it takes, and agreeing on success.

`torchrun --nproc_per_node=N -m stage1_extract ...` (or multi-node, with torchrun's usual
arguments) sets WORLD_SIZE, RANK and LOCAL_RANK. Each rank extracts every WORLD_SIZE-th of the rows
still pending, from its RANK-th on (round-robin by row on a fresh run), and writes its own shards (`rankRRR-*.npz`, see stage1_extract.cache_writer);
rank 0 assembles the one cache once all ranks are done. The output folder must be on a
filesystem every node sees.

The process group only carries a few integers (who failed, how many rows each did), so it
uses gloo on CPU whatever runs the CNN: no NCCL set-up, and it works where CUDA does not.
Every collective is reached by every rank even when one fails (`agree`), so a rank's error
stops the others at the next step instead of leaving them waiting for the timeout.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

from common.backbones import BackboneError
from common.device import resolve_device

T = TypeVar("T")


class RankFailed(RuntimeError):
    """Another rank failed; its own error says why."""


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def mine(self, rows) -> list[int]:
        """This rank's share of `rows` (the same list on every rank): every world_size-th by position, so a
        resume spreads what is left evenly (by row number, all of it fell to the rank that fell behind)."""
        return [int(r) for r in list(rows)[self.rank::self.world_size]]

    def reduce(self, ok: bool, *counts: int) -> tuple[bool, list[int]]:
        """(did every rank succeed, the counts summed over ranks); every rank must call it."""
        if not self.active:
            return ok, list(counts)
        import torch.distributed as dist

        t = torch.tensor([0 if ok else 1, *counts], dtype=torch.int64)
        try:
            dist.all_reduce(t)
        except RuntimeError as e:  # gloo: a peer died (connection closed) or the timeout passed
            raise RankFailed(f"lost contact with the other ranks ({str(e).splitlines()[0]})") from e
        return int(t[0]) == 0, [int(v) for v in t[1:]]

    def agree(self, what: str, fn: Callable[[], T]) -> T:
        """Run fn here; if it fails on any rank, raise on every rank (this one's own error where it failed)."""
        try:
            result = fn()
        except Exception:
            try:
                self.reduce(False)
            except RankFailed:
                pass  # the others are gone already; this rank's own error is the one to report
            raise
        if not self.reduce(True)[0]:
            raise RankFailed(f"{what} failed on another rank (see its error above)")
        return result

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def from_env(timeout_s: float) -> Dist:
    """The torchrun rank of this process (a plain Dist() when not started by torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    try:
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as e:
        raise ValueError(f"WORLD_SIZE={world} but RANK/LOCAL_RANK are missing or not numbers ({e}): "
                         f"start several processes with torchrun") from e
    import torch.distributed as dist
    # before the group exists: importing torchvision imports torch._dynamo and with it modules whose default
    # arguments are `dist.group.WORLD`, which would hold the group past destroy_process_group, its gloo threads
    # alive into Python's exit, where one dropping the last all_reduce's tensors aborts the process (SIGABRT)
    import torchvision.models  # noqa: F401

    try:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:
        raise RankFailed(f"rank {rank} of {world} cannot join the others: {str(e).splitlines()[0]}") from e
    return Dist(rank, world, local)


def device_for(name: str, d: Dist) -> torch.device:
    """cfg.device resolved; under torchrun any CUDA device ('auto', 'cuda', 'cuda:N') means this rank's GPU,
    cuda:(LOCAL_RANK % visible GPUs): every rank on its own GPU when a node shows them all, and GPU 0 when the
    launcher shows each process only its own (CUDA_VISIBLE_DEVICES, device_count() == 1)."""
    device = resolve_device(name)
    if d.active and device.type == "cuda":
        count = torch.cuda.device_count()
        if count < 1:
            raise BackboneError(f"rank {d.rank} asked for {name} but sees no GPU")
        device = torch.device("cuda", d.local_rank % count)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # so pinned memory and streams belong to this rank's GPU
    return device
