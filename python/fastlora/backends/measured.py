"""Measured dispatch: per layer shape, check each candidate against the composed path, time the
survivors on the user's device, keep the fastest, and remember the choice on disk.

A shape key is (op, device, dtype, adapter dtype, bucket of T, in, out, r, p > 0, bias, gradient
of the frozen weight). :func:`settle` runs every candidate's forward and backward on synthetic
tensors of that shape, compares outputs and gradients with the composed path's within the
dtype's rounding (a candidate that disagrees or raises is dropped for the key, with one warning
naming it), times the rest (CUDA events on CUDA, ``time.perf_counter`` elsewhere; median of a
few runs) and keeps the fastest, or the composed path when none beats it by 2 %. Choices persist in a JSON file per library and torch version
(``$FASTLORA_CACHE_DIR`` or ``~/.cache/fastlora/``), one section per device, written atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._numerics import accumulation_dtype
from .._version import __version__

__all__ = ["Key", "bucket", "cache_path", "cached_choice", "cpu_model", "device_name", "elapsed", "settle", "time_run"]

logger = logging.getLogger("fastlora")

# (op, torch.device, dtype, adapter dtype, T bucket, in, out, r, p > 0, bias, weight grad, >= 2^31 elements)
Key = tuple

# Token counts share a key per power of two up to this (so varying batch lengths tune rarely);
# synthetic tensors have the bucket's rows, at most _SYNTHETIC_ROWS[device type].
T_CAP = 16384
_SYNTHETIC_ROWS = {"cpu": 2048}
_REPEATS = 5
_TIME_BUDGET_S = 1.0  # per candidate and key: fewer repetitions once a candidate has used it
# Another candidate replaces the composed path only when this much faster (timing noise is not a win).
_MARGIN = 0.02

# Unit roundoff of each dtype, for the agreement check.
_UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def bucket(tokens: int) -> int:
    """The smallest power of two >= tokens, capped at :data:`T_CAP`."""
    return min(1 << max(tokens - 1, 0).bit_length(), T_CAP)


def key_text(key: Key) -> str:
    """The key without its device, as stored in the cache file's device section."""
    op, _, dtype, adtype, t, n_in, n_out, r, dropout, bias, wgrad, huge = key
    return (f"{op} {str(dtype).removeprefix('torch.')}/{str(adtype).removeprefix('torch.')} T<={t} "
            f"{n_in}->{n_out} r={r} p{'>0' if dropout else '=0'}{' bias' if bias else ''}{' grad_W' if wgrad else ''}"
            f"{' 2^31+' if huge else ''}")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_device_names: dict[torch.device, str] = {}


def device_name(device: torch.device) -> str:
    """The device's model (and thread count on CPU): what a timing depends on."""
    name = _device_names.get(device)
    if name is None:
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            name = f"{torch.cuda.get_device_name(device)} sm{major}{minor}"
        elif device.type == "cpu":
            name = f"cpu {cpu_model()}"
        else:
            name = device.type
        _device_names[device] = name
    return f"{name} {torch.get_num_threads()} threads" if device.type == "cpu" else name


def cache_path() -> Path:
    """The choices file of this library and torch version."""
    root = os.environ.get("FASTLORA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastlora")
    return Path(root) / f"dispatch-{__version__}-torch{torch.__version__.split('+')[0]}.json"


_disk: dict[str, dict[str, dict]] | None = None  # device name -> key text -> record
_disk_path: Path | None = None


def _read(path: Path) -> dict[str, dict[str, dict]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        warnings.warn(f"fastlora: cannot read the dispatch cache {path} ({exc}); measuring again", RuntimeWarning)
        return {}
    try:
        data = json.loads(text)
        devices = data["devices"]
        if not isinstance(devices, dict) or not all(isinstance(v, dict) for v in devices.values()):
            raise ValueError("'devices' is not a mapping of mappings")
        return devices
    except (ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"fastlora: ignoring the corrupt dispatch cache {path} ({exc}); it is rewritten on the next "
                      "choice", RuntimeWarning)
        return {}


def _records() -> dict[str, dict[str, dict]]:
    global _disk, _disk_path
    path = cache_path()
    if _disk is None or path != _disk_path:
        _disk, _disk_path = _read(path), path
    return _disk


def forget() -> None:
    """Drops the in-memory copy of the choices file (it is read again on the next lookup)."""
    global _disk
    _disk = None


def cached_choice(key: Key) -> dict | None:
    """The stored record of ``key`` on its device ({"choice", "ms", "rejected"}), or None."""
    return _records().get(device_name(key[1]), {}).get(key_text(key))


def _store(key: Key, record: dict) -> None:
    records = _records()
    records.setdefault(device_name(key[1]), {})[key_text(key)] = record
    path = _disk_path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        on_disk = _read(path)  # another process may have added choices since
        for device, entries in records.items():
            on_disk.setdefault(device, {}).update(entries)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"fastlora": __version__, "torch": torch.__version__, "devices": on_disk}, f, indent=1,
                          sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        logger.warning("fastlora: cannot write the dispatch cache %s (%s); choices last for this process", path, exc)


def elapsed(run: Callable[[], Any], device: torch.device | str) -> float:
    """Seconds one ``run()`` takes on ``device`` (CUDA events on CUDA, ``time.perf_counter`` elsewhere)."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def time_run(name: str, run: Callable[[], Any], device: torch.device) -> float:
    """Median seconds of ``run()`` on ``device`` over a few repetitions, fewer once they have
    taken :data:`_TIME_BUDGET_S`; ``name`` is the candidate's (for tests that inject timings)."""
    times: list[float] = []
    while len(times) < _REPEATS and (sum(times) < _TIME_BUDGET_S or not times):
        times.append(elapsed(run, device))
    return statistics.median(times)


def _unit(dtype: torch.dtype, device: torch.device) -> float:
    """Unit roundoff of products in ``dtype`` on ``device`` (float32 GEMMs may run in TF32 there)."""
    if dtype == torch.float32 and device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return 2.0**-11
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return 2.0**-11
    return _UNIT[dtype]


def _disagreement(got: Sequence[Tensor | None], want: Sequence[Tensor | None], names: Sequence[str],
                  dtype: torch.dtype, depth: int, unit: float | None = None) -> str | None:
    """Why ``got`` differs from the composed path's ``want`` beyond rounding, or None. Each
    result is a sum of at most ``depth`` products: its error against max|want| is a few units
    of the compute dtype (``unit``; outputs, xa and dxa round there) plus the fp32 accumulation's."""
    rtol = 8 * (unit or _UNIT[dtype]) + 4 * math.sqrt(depth) * _UNIT[accumulation_dtype(dtype)]
    for name, g, w in zip(names, got, want):
        if (g is None) != (w is None):
            return f"{name} is {'missing' if g is None else 'unexpected'}"
        if g is None:
            continue
        if g.shape != w.shape:
            return f"{name} has shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        g64, w64 = g.detach().double(), w.detach().double()
        if not torch.isfinite(g64).all():
            return f"{name} has non-finite values"
        scale = w64.abs().max().item() if w64.numel() else 0.0
        err = (g64 - w64).abs().max().item() if w64.numel() else 0.0
        if err > rtol * max(scale, 1e-30):
            return f"{name} differs by {err:.3g} (allowed {rtol * scale:.3g})"
    return None


def synthetic_rows(key: Key) -> int:
    """Rows of the synthetic tensors a key is tuned on."""
    return min(key[4], _SYNTHETIC_ROWS.get(key[1].type, T_CAP))


def settle(key: Key, candidates: Sequence[Any], oracle: Any, run: Callable[[Callable], list], names: Sequence[str],
           depth: int) -> tuple[Any, dict]:
    """Checks each of ``candidates`` (implementations with ``name`` and ``fn``) against
    ``oracle`` (the composed path) with ``run(fn) -> outputs``, times the survivors, stores and
    returns (fastest, record)."""
    started = time.perf_counter()
    device, dtype = key[1], key[2]
    want = run(oracle.fn)
    survivors, rejected = [oracle], {}  # the composed path: the oracle and the default
    for impl in candidates:
        if impl is oracle:
            continue
        try:
            why = _disagreement(run(impl.fn), want, names, dtype, depth, _unit(dtype, device))
        except Exception as exc:  # noqa: BLE001  (any failure disqualifies the candidate)
            why = f"it raised {type(exc).__name__}: {exc}"
        if why is None:
            survivors.append(impl)
        else:
            rejected[impl.name] = why
            warnings.warn(f"fastlora: the {impl.name} implementation disagrees with the composed path on {device} for "
                          f"{key_text(key)} ({why}); it is disabled for this shape", RuntimeWarning, stacklevel=2)
    del want
    seconds = {impl.name: time_run(impl.name, lambda fn=impl.fn: run(fn), device) for impl in survivors}
    best = min(survivors, key=lambda impl: seconds[impl.name])
    if seconds[best.name] > (1.0 - _MARGIN) * seconds[oracle.name]:
        best = oracle
    record = {"choice": best.name, "ms": {k: round(v * 1e3, 4) for k, v in seconds.items()}, "rejected": rejected}
    _store(key, record)
    logger.info("fastlora: chose %s for %s on %s in %.2f s (%s)", best.name, key_text(key), device_name(device),
                time.perf_counter() - started, ", ".join(f"{k} {v:.3g} ms" for k, v in record["ms"].items()))
    return best, record
