"""Loading the compiled operators (``fastlora._C``) and recording which kernels they registered.

The extension registers ``torch.ops.fastlora.*``. It is compiled against one torch version;
under another one it refuses to load with an error that says how to rebuild. If it is missing
or fails to load for another reason, fastlora runs on the composed path (library GEMMs, see
``fastlora.composed``) and warns once; ``FASTLORA_REQUIRE_EXTENSION=1`` turns that into an error and
``FASTLORA_DISABLE_EXTENSION=1`` skips loading on purpose. Which implementation runs is decided
in :mod:`fastlora.backends.registry`, not here.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

logger = logging.getLogger("fastlora")

_load_error: str | None = None

_REBUILD = (
    "Rebuild it against the installed torch: `pip install --no-build-isolation --no-deps "
    "--force-reinstall <path to the fastlora source>`, or set FASTLORA_DISABLE_EXTENSION=1 to "
    "run on the slower composed path of library GEMMs."
)


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is set to 1/true/yes/on."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _load() -> str | None:
    """Imports the extension; returns why it is unavailable, or None when it loaded."""
    # Both imports are downward (build outputs next to this file, importing nothing of fastlora) and
    # inside this function on purpose: either may be absent (an install without the extension), and
    # FASTLORA_DISABLE_EXTENSION must keep the shared library from being loaded at all.
    if env_flag("FASTLORA_DISABLE_EXTENSION"):
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
    if env_flag("FASTLORA_REQUIRE_EXTENSION"):
        raise ImportError(f"fastlora: {_load_error}, and FASTLORA_REQUIRE_EXTENSION is set. {_REBUILD}")
    if not env_flag("FASTLORA_DISABLE_EXTENSION"):
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


# Every operator the extension registers (the registry declares an implementation of each).
OPS = (
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
    return {(op, dev): has(f"fastlora::{op}", key) for op in OPS for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


_kernels = _kernel_table()


def compiled_kernel(op: str, device_type: str) -> bool:
    """Whether the extension registered a kernel of ``torch.ops.fastlora.<op>`` for ``device_type``."""
    return _kernels.get((op, device_type), False)


def cpu_isa(name: str = "") -> str:
    """Returns the CPU kernel build in use; with a name ("auto", "avx512", "avx2", "baseline")
    selects it first. Raises RuntimeError without the extension or if the CPU lacks it."""
    if _load_error is not None:
        raise RuntimeError(f"fastlora: {_load_error}")
    return torch.ops.fastlora._cpu_isa(name)
