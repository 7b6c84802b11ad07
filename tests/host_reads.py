"""A torch function mode that counts the calls reading a tensor back to the host, for the CPU tests of what
would be a device sync on CUDA."""
from __future__ import annotations

import sys

from torch.overrides import TorchFunctionMode

HOST_READS = ("__bool__", "item", "tolist", "cpu", "__int__", "__float__", "numpy")


class HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor back to the host (each a device sync on CUDA)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []  # the names of the reading calls, in order
        self.callers: list[str] = []  # the functions that made them

    @property
    def n(self) -> int:
        return len(self.reads)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (name := getattr(func, "__name__", "")) in HOST_READS:
            self.reads.append(name)
            self.callers.append(sys._getframe(1).f_code.co_name)
        return func(*args, **(kwargs or {}))
