"""Every implementation of fastlora's ops, what each can take, and the switches that pick one.

An :class:`Implementation` declares the device types it runs on, its dtypes, its constraints
(rank, dropout, index range, Triton or the compiled extension, gradients of the frozen weight)
and the devices a run validated it on. This module is the only reader of the switches:

- the backend (:func:`set_backend`, ``FASTLORA_BACKEND``): "auto" lets fastlora choose,
  any implementation's name pins it;
- the CUDA layer switch (:func:`set_cuda_layer_kernels`, ``FASTLORA_CUDA_LAYER``): trusts the
  experimental CUDA kernels without measuring them;
- measured dispatch (:func:`set_measured`, ``FASTLORA_MEASURED``, on by default): under "auto",
  layer shapes where several implementations apply are settled by a self-check and a timing on
  the user's device (:mod:`fastlora.backends.measured`); off, the fixed order of
  :data:`STATIC_ORDER` among the implementations trusted on the device decides.

Kernel-level ops (the dropout mask, LoRA-Pro's moment pass, the gradient engine's ops) are
declared here and chosen statically: the compiled kernel where it applies and is trusted, else
their library-op implementation (:mod:`fastlora.backends.library`). The layer's implementations
register themselves from :mod:`fastlora.backends.layer`; the float64 oracle registers itself as
the "reference" one when :mod:`fastlora.testing` is imported (nothing here imports it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from .._extension import OPS, compiled_kernel, env_flag
from . import library

__all__ = [
    "BACKENDS",
    "Implementation",
    "cuda_layer_kernels",
    "get_backend",
    "implementations",
    "ineligibility",
    "kernel_used",
    "measured",
    "op_function",
    "register",
    "unregister",
    "unregistered",
    "set_backend",
    "set_cuda_layer_kernels",
    "set_measured",
    "trusted",
    "use_backend",
]

ANY_FLOAT = frozenset((torch.float32, torch.bfloat16, torch.float16, torch.float64))


@dataclass(frozen=True)
class Implementation:
    """One way to compute an op, with what it can take.

    ``fn`` has the op's signature (``None`` for kernel-level ops: :func:`op_function` resolves
    them). ``interpreted`` lists device types where it runs only emulated (Triton's interpreter):
    it runs there when pinned, never by choice. ``max_rank`` maps a device type to a per-dtype
    rank limit. ``max_index`` bounds ``rows x width`` of every operand (32-bit offsets).
    """

    name: str
    op: str
    devices: frozenset[str] | None = None  # None: any device type
    dtypes: frozenset[torch.dtype] = ANY_FLOAT
    needs_extension: tuple[str, ...] = ()  # compiled ops it calls: each needs a kernel for the device type
    available: Callable[[], bool] | None = None  # a run-time requirement (Triton), with ...
    unavailable: str = ""  # ... what to do when it is not met
    dropout: bool = True
    weight_grad: bool = True  # produces gradients of the frozen weight/bias when asked
    max_rank: Mapping[str, Mapping[torch.dtype, int]] = field(default_factory=dict)
    max_index: int | None = None
    validated: frozenset[str] | None = frozenset(("cpu",))  # device types a run checked it on; None: all
    interpreted: frozenset[str] = frozenset()
    experimental_cuda: bool = False  # trusted on CUDA when the CUDA layer switch is on
    fn: Callable | None = None


_registry: dict[str, dict[str, Implementation]] = {}


def register(impl: Implementation) -> Implementation:
    """Adds ``impl`` to the registry (one per op and name)."""
    _registry.setdefault(impl.op, {})[impl.name] = impl
    _changed()
    return impl


def implementations(op: str) -> dict[str, Implementation]:
    """The registered implementations of ``op`` by name: the registry's own dict, live (change it
    only through :func:`register` / :func:`unregister`; a plain dict, which torch.compile traces)."""
    return _registry.setdefault(op, {})


def unregister(op: str, name: str) -> None:
    """Removes an implementation (tests that register a poisoned one)."""
    del _registry[op][name]
    _changed()


# ---- switches -----------------------------------------------------------------------------------

# The names a backend may take: "auto" and the layer's implementations ("kernels" are the
# compiled C++/CUDA kernels; "reference", the float64 oracle, once fastlora.testing registered it).
BACKENDS = ("auto", "composed", "fused", "kernels", "reference")
# What "auto" takes without measuring: the first trusted one that applies (never the oracle).
STATIC_ORDER = ("kernels", "fused", "composed")
# Backends whose implementation registers itself from outside the library, by the module that does.
_REGISTERED_ON_IMPORT = {"reference": "fastlora.testing"}

_listeners: list[Callable[[], None]] = []


def on_change(listener: Callable[[], None]) -> None:
    """Calls ``listener`` whenever a switch or the registry changes (dispatch memos clear)."""
    _listeners.append(listener)


def _changed() -> None:
    for listener in _listeners:
        listener()


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} (FASTLORA_BACKEND takes the same names)")
    return name


_backend = _check_backend(os.environ.get("FASTLORA_BACKEND", "").strip() or "auto")
_cuda_layer_kernels = env_flag("FASTLORA_CUDA_LAYER")
_measured = os.environ.get("FASTLORA_MEASURED", "1").strip().lower() not in ("0", "false", "no", "off")


def unregistered(name: str) -> str | None:
    """What to do before backend ``name`` can run when its implementation registers itself from
    outside the library (the float64 oracle) and has not yet, else None."""
    module = _REGISTERED_ON_IMPORT.get(name)
    if module is not None and name not in implementations("linear"):
        return (f"fastlora: the backend {name!r} is registered when {module} is imported (production never "
                f"imports it); run `import {module}` first")
    return None


def get_backend() -> str:
    """The current backend: "auto" or the pinned implementation's name (see :func:`set_backend`)."""
    return _backend


def set_backend(name: str) -> str:
    """Selects the backend for every layer and op; returns the previous one.

    "auto": fastlora chooses (measured dispatch for the layer, see :func:`set_measured`; the
    compiled kernel-level ops where they are trusted). "kernels": the compiled kernels (C++ on
    CPU, the experimental CUDA kernels on CUDA). "fused": the fused Triton GEMMs (on CPU through
    Triton's interpreter: slow, for tests). "composed": library GEMMs and no compiled kernel, as
    on a device without fastlora's kernels. "reference": the float64 oracle through ordinary
    autograd (comparisons, debugging; ``import fastlora.testing`` first, which registers it).
    A pinned implementation that cannot take a call raises an error saying why.
    ``FASTLORA_BACKEND`` sets it at import.
    """
    global _backend
    why = unregistered(_check_backend(name))
    if why is not None:
        raise RuntimeError(why)
    previous, _backend = _backend, name
    _changed()
    return previous


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def cuda_layer_kernels() -> bool:
    """Whether the experimental CUDA kernels are trusted without measurement (see :func:`set_cuda_layer_kernels`)."""
    return _cuda_layer_kernels


def set_cuda_layer_kernels(enabled: bool) -> bool:
    """Trusts the experimental CUDA kernels (the layer's, the dropout mask's, LoRA-Pro's moment
    pass) or not; returns the previous setting.

    Off by default (``FASTLORA_CUDA_LAYER=1`` turns it on at import): the kernel-level ops then
    use library ops on CUDA tensors, and the layer's CUDA kernels run only where measured
    dispatch checked them against the composed path on the device and they won the timing.
    """
    global _cuda_layer_kernels
    previous, _cuda_layer_kernels = _cuda_layer_kernels, bool(enabled)
    _changed()
    return previous


def measured() -> bool:
    """Whether "auto" settles a layer shape by a self-check and a timing (see :func:`set_measured`)."""
    return _measured


def set_measured(enabled: bool) -> bool:
    """Measured dispatch on (the default; ``FASTLORA_MEASURED=0`` turns it off at import) or off:
    off, "auto" takes the first implementation trusted on the device in :data:`STATIC_ORDER`,
    which makes the path a call takes independent of timings (the test suite runs so).
    Returns the previous setting."""
    global _measured
    previous, _measured = _measured, bool(enabled)
    _changed()
    return previous


# ---- eligibility --------------------------------------------------------------------------------

def ineligibility(impl: Implementation, device_type: str, dtype: torch.dtype | None = None, rank: int | None = None,
                  dropout: bool = False, weight_grad: bool = False, index: int = 0, pinned: bool = False) -> str | None:
    """Why ``impl`` cannot take a call with these properties, or None when it can. ``index`` is
    the largest ``rows x width`` of an operand; ``pinned`` admits interpreted devices."""
    if impl.devices is not None and device_type not in impl.devices:
        return f"it runs on {sorted(impl.devices)}, not {device_type}"
    if device_type in impl.interpreted and not pinned:
        return f"it runs on {device_type} only emulated"
    if dtype is not None and dtype not in impl.dtypes:
        return f"it does not take {dtype}"
    if impl.available is not None and not impl.available():
        return impl.unavailable
    for op in impl.needs_extension:
        if not compiled_kernel(op, device_type):
            return f"the compiled extension has no {device_type} kernel of {op} (is it built and loaded?)"
    if dropout and not impl.dropout:
        return "it has no dropout"
    if weight_grad and not impl.weight_grad:
        return "it does not produce gradients of the frozen weight or bias"
    limit = impl.max_rank.get(device_type, {}).get(dtype, None) if rank is not None else None
    if limit is not None and rank > limit:
        return f"its rank limit for {dtype} is {limit}, got {rank}"
    if impl.max_index is not None and index >= impl.max_index:
        return f"an operand has {index} elements or more, beyond its {impl.max_index}-element index range"
    return None


def trusted(impl: Implementation, device_type: str) -> bool:
    """Whether ``impl`` may run on ``device_type`` without a check on the device: validated there,
    or pinned by the CUDA layer switch / the "kernels" backend."""
    if impl.validated is None or device_type in impl.validated:
        return True
    return device_type == "cuda" and impl.experimental_cuda and (_cuda_layer_kernels or _backend == "kernels")


# ---- kernel-level ops ---------------------------------------------------------------------------

# Largest rank of the CUDA lora_pro_moments kernel (csrc/kernels/cuda/lora_pro_moments.cuh).
_CUDA_LORA_PRO_MAX_RANK = {torch.float64: 32, torch.float32: 128, torch.bfloat16: 128, torch.float16: 0}

KERNEL_OPS = OPS
for _op in KERNEL_OPS:
    register(Implementation(name="library", op=_op, validated=None))
    register(Implementation(
        name="kernels", op=_op, devices=frozenset(("cpu", "cuda")), needs_extension=(_op,),
        max_rank={"cuda": _CUDA_LORA_PRO_MAX_RANK} if _op == "lora_pro_moments" else {},
        # accumulate_outer's CUDA kernel is cuBLAS's mixed-precision GEMM (csrc/ops/cuda.cpp)
        validated=frozenset(("cpu", "cuda")) if _op == "accumulate_outer" else frozenset(("cpu",)),
        experimental_cuda=True,
    ))
del _op


def kernel_used(op: str, device_type: str, dtype: torch.dtype | None = None, rank: int | None = None) -> bool:
    """Whether the compiled kernel of kernel-level ``op`` runs for these arguments: the backend is
    "auto" or "kernels", the kernel takes them, and it is trusted on the device."""
    if _backend not in ("auto", "kernels"):
        return False
    impl = _registry[op]["kernels"]
    return ineligibility(impl, device_type, dtype, rank) is None and trusted(impl, device_type)


def op_function(op: str, device: torch.device) -> Callable:
    """The compiled op where :func:`kernel_used`, else its library-op implementation (same signature)."""
    return getattr(torch.ops.fastlora, op) if kernel_used(op, device.type) else getattr(library, op)
