"""Shared timing, memory and reporting helpers for the benchmark scripts and the examples (the
main job and the FSDP2 example import it; it imports nothing from them). Not a test suite."""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastlora.backends.measured import cpu_model, elapsed

try:  # FSDP2
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # torch 2.4 and 2.5
    try:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # no FSDP2 (torch without distributed): the FSDP scripts say so when they need it
        MixedPrecisionPolicy = fully_shard = None


def measure(fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 3, repeat: int = 30) -> float:
    """Median wall time of fn() in seconds (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    return statistics.median(elapsed(fn, device) for _ in range(repeat))


def measure_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device | str = "cpu", warmup: int = 2, repeat: int = 30
) -> dict[str, float]:
    """Median time of each fn, timed in alternating rounds so that drift in the machine's speed
    (other load, frequency) affects every variant alike; the ratios are what to trust."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(measure(fn, device, warmup=0, repeat=1))
    return {name: statistics.median(t) for name, t in times.items()}


def environment(device: torch.device | str = "cpu") -> dict:
    """What a result needs next to it: device, torch version, threads, fastlora's kernel build."""
    import fastlora

    device = torch.device(device)
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(),
        "fastlora_extension": fastlora.extension_available(),
    }
    if fastlora.extension_available():
        info["fastlora_cpu_isa"] = fastlora.cpu_isa()
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    return info


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    cells = [[str(c) for c in columns]] + [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [" | ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Writes atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    return path


def pyplot():
    """``matplotlib.pyplot`` drawing to files (the Agg backend), or None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Lays out, writes (creating the folder) and closes ``fig``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_ratios(path: str | os.PathLike, rows: Sequence[dict], label_key: str, series: Sequence[str], title: str) -> Path | None:
    """Grouped bar chart of ratio columns per row; returns None if matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    labels = [str(r[label_key]) for r in rows]
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(min(18, 3 + 0.8 * len(labels)), 5.5))
    for i, name in enumerate(series):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [r.get(name, float("nan")) for r in rows], width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("time / frozen nn.Linear")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


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
