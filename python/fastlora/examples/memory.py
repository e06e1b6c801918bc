"""Peak memory of a run: allocated device memory on a GPU, resident set size on a CPU."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

__all__ = ["PeakMemory"]


class PeakMemory:
    """Peak device memory on a GPU, peak resident set size of this process on a CPU (reset with
    ``/proc/self/clear_refs``, so each measured piece starts from the current size; NaN where
    ``/proc`` is missing)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _status_mib("VmHWM:")

    def current_mib(self) -> float:
        """Allocated device memory now on a GPU, resident set size now on a CPU."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return _status_mib("VmRSS:")


def _status_mib(key: str) -> float:
    """A size from /proc/self/status in MiB (NaN where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return float("nan")
