"""Peak memory of this process: host RSS and GPU memory allocated by torch, in GiB.

The one measurement behind `compress model`'s summary, the checkpoint record (`host_peak_gib`, `gpu_peak_gib`)
and a sweep job's `peak_memory`. Host: Linux lets a process reset its own high-water mark (VmHWM) by writing 5
to /proc/self/clear_refs, so a window can start at `reset()`; where that is not possible the window is the whole
process lifetime (ru_maxrss).
"""
from __future__ import annotations

import resource

import torch
from pydantic import BaseModel, ConfigDict


class PeakMemory(BaseModel):
    """Peak host RSS and, on a CUDA device, peak GPU memory allocated by torch, in GiB."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    host_gib: float
    gpu_gib: float | None = None

    def max(self, other: PeakMemory | None) -> PeakMemory:
        """The larger of two windows' peaks, per kind."""
        if other is None:
            return self
        gpus = [g for g in (self.gpu_gib, other.gpu_gib) if g is not None]
        return PeakMemory(host_gib=max(self.host_gib, other.host_gib), gpu_gib=max(gpus) if gpus else None)


def _host_high_water_gib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB -> GiB
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new measuring window (the host one only where the kernel allows it, see the module doc)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the host window is the process lifetime
        pass


def peak_memory(device: torch.device) -> PeakMemory:
    """The peaks since the last reset_peak_memory (host: since process start where it cannot be reset)."""
    host = _host_high_water_gib()
    if host is None:
        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
    gpu = round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None
    return PeakMemory(host_gib=round(host, 3), gpu_gib=gpu)
