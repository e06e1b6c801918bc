"""Loading the compiled operators (``fastlora._C``) and choosing between them and the reference.

The extension registers ``torch.ops.fastlora.*``. It is compiled against one torch version;
under another one it refuses to load with an error that says how to rebuild. If it is missing
or fails to load for another reason, fastlora runs on the composed path (library GEMMs, see
``fastlora.composed``) and warns once; ``FASTLORA_REQUIRE_EXTENSION=1`` turns that into an error and
``FASTLORA_DISABLE_EXTENSION=1`` skips loading on purpose.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

import torch

logger = logging.getLogger("fastlora")

_BACKENDS = ("auto", "composed", "fused", "reference")
_backend = "auto"
_load_error: str | None = None

_REBUILD = (
    "Rebuild it against the installed torch: `pip install --no-build-isolation --no-deps "
    "--force-reinstall <path to the fastlora source>`, or set FASTLORA_DISABLE_EXTENSION=1 to "
    "use the slower pure-PyTorch reference path."
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _load() -> str | None:
    """Imports the extension; returns why it is unavailable, or None when it loaded."""
    if _env_flag("FASTLORA_DISABLE_EXTENSION"):
        return "disabled by FASTLORA_DISABLE_EXTENSION"
    try:
        from . import _build_info
    except ImportError:
        return "fastlora was installed without its compiled extension"
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"fastlora's compiled operators were built against torch {_build_info.TORCH_VERSION} "
            f"but torch {torch.__version__} is installed. {_REBUILD}"
        )
    try:
        from . import _C  # noqa: F401  (importing runs the operator registrations)
    except (ImportError, OSError) as exc:
        return f"the compiled extension failed to load ({exc})"
    return None


_load_error = _load()
if _load_error is not None:
    if _env_flag("FASTLORA_REQUIRE_EXTENSION"):
        raise ImportError(f"fastlora: {_load_error}, and FASTLORA_REQUIRE_EXTENSION is set. {_REBUILD}")
    if not _env_flag("FASTLORA_DISABLE_EXTENSION"):
        warnings.warn(
            f"fastlora: {_load_error}; running on the composed path of library GEMMs (slower than "
            "the kernels). Set FASTLORA_REQUIRE_EXTENSION=1 to make this an error.",
            RuntimeWarning,
            stacklevel=2,
        )


def extension_available() -> bool:
    """Whether the compiled operators (``torch.ops.fastlora``) are loaded."""
    return _load_error is None


def extension_error() -> str | None:
    """Why the compiled operators are unavailable, or None when they are loaded."""
    return _load_error


_OPS = (
    "lora_down",
    "lora_up",
    "lora_forward",
    "lora_dy_products",
    "lora_grad_A",
    "lora_grad_x",
    "accumulate_outer",
    "dropout_mask",
    "lora_pro_moments",
)


def _kernel_table() -> dict[tuple[str, str], bool]:
    # Computed once: registrations are static, and a plain dict lookup keeps torch.compile
    # from tracing into the dispatcher query.
    if _load_error is not None:
        return {}
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {(op, dev): has(f"fastlora::{op}", key) for op in _OPS for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


_kernels = _kernel_table()


# The layer's CUDA kernels (the dropout mask's included) are compiled and registered
# (torch.ops.fastlora.* runs them on CUDA tensors), but fastlora's own callers (the layer, the
# gradient engine) use them only when switched on: they stay experimental until
# benchmarks/gpu_check.sh has validated them on a GPU.
_CUDA_LAYER_OPS = frozenset(
    (
        "lora_down",
        "lora_up",
        "lora_forward",
        "lora_dy_products",
        "lora_grad_A",
        "lora_grad_x",
        "dropout_mask",
        "lora_pro_moments",
    )
)
_cuda_layer_kernels = _env_flag("FASTLORA_CUDA_LAYER")


def compiled_kernel(op: str, device_type: str) -> bool:
    """Whether the extension registered a kernel of ``torch.ops.fastlora.<op>`` for ``device_type``."""
    return _kernels.get((op, device_type), False)


def has_kernel(op: str, device_type: str) -> bool:
    """Whether fastlora routes ``op`` on ``device_type`` ("cpu", "cuda") to a compiled kernel: it
    is compiled, the backend is "auto", and (CUDA layer ops) they are switched on."""
    if _backend != "auto":
        return False
    if device_type == "cuda" and op in _CUDA_LAYER_OPS and not _cuda_layer_kernels:
        return False
    return compiled_kernel(op, device_type)


def cuda_layer_kernels() -> bool:
    """Whether the layer's experimental CUDA kernels are switched on (see :func:`set_cuda_layer_kernels`)."""
    return _cuda_layer_kernels


def set_cuda_layer_kernels(enabled: bool) -> bool:
    """Switches the layer's CUDA kernels (the dropout mask's and LoRA-Pro's moment kernel
    included) on or off; returns the previous setting.

    Off by default (``FASTLORA_CUDA_LAYER=1`` turns it on at import): CUDA tensors then run the
    composed path of library GEMMs (``fastlora.composed``). The kernels are experimental until ``benchmarks/gpu_check.sh`` has
    validated them on a GPU.
    """
    global _cuda_layer_kernels
    previous, _cuda_layer_kernels = _cuda_layer_kernels, bool(enabled)
    return previous


def note_python_kernel(op: str, device_type: str) -> None:
    """Records a kernel registered from Python (after the table was built)."""
    _kernels[(op, device_type)] = True


def get_backend() -> str:
    """The current backend: "auto", "composed", "fused" or "reference" (see :func:`set_backend`)."""
    return _backend


def set_backend(name: str) -> str:
    """Selects the backend for all layers; returns the previous one.

    "auto": compiled kernels where they apply, the fused Triton path for CUDA tensors when Triton
    is installed, the composed path of library GEMMs elsewhere.
    "composed": the composed path and no compiled kernel, as on a device without fastlora's
    kernels (so CPU tests run what CUDA runs with the layer kernels off). "fused": the fused
    Triton path everywhere (on CPU through Triton's interpreter: slow, for tests). "reference":
    the pure-PyTorch definitions through ordinary autograd (for comparisons and debugging).
    """
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {_BACKENDS}")
    previous, _backend = _backend, name
    return previous


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def cpu_isa(name: str = "") -> str:
    """Returns the CPU kernel build in use; with a name ("auto", "avx512", "avx2", "baseline")
    selects it first. Raises RuntimeError without the extension or if the CPU lacks it."""
    if _load_error is not None:
        raise RuntimeError(f"fastlora: {_load_error}")
    return torch.ops.fastlora._cpu_isa(name)
