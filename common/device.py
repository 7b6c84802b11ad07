"""The one device resolver every entry point uses (extraction, training, captioning, serving), and the
CPU cores a process may use."""
from __future__ import annotations

import math
import os

import torch


CGROUP = "/sys/fs/cgroup"  # where a container's CPU quota is read


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity where the OS has one (else every core), and no more
    than a container's CPU quota (cgroup v2 cpu.max or v1 cfs quota), which affinity does not show: a 16-core
    quota on a 200-core host would otherwise start 200 decoding workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota() -> float | None:
    """CPUs of the cgroup's quota, or None when it has none (or it cannot be read)."""
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            with open(os.path.join(CGROUP, quota_file)) as f:
                fields = f.read().split()
            if period_file is not None:
                with open(os.path.join(CGROUP, period_file)) as f:
                    fields.append(f.read().strip())
            quota, period = float(fields[0]), float(fields[1])
        except (OSError, ValueError, IndexError):  # no such file, or "max": no quota
            continue
        if quota > 0 and period > 0:
            return quota / period
    return None


class DeviceError(ValueError):
    """A --device value that names no usable device."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) -> cuda when available, else cpu; 'cpu', 'cuda', 'cuda:N' (or a torch.device) as asked
    (refused when absent)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise DeviceError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N")
    try:
        dev = torch.device(device)
    except RuntimeError as e:  # "gpu", "cuda:x": torch's message spans lines and names no option
        raise DeviceError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device} asked for, but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev
