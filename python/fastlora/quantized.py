"""Quantized base layers (bitsandbytes ``Linear4bit`` NF4/FP4 and ``Linear8bitLt``): which ones
fastlora adapts, and reading, re-quantizing and swapping their weights.

bitsandbytes is imported only when a quantized layer is met, so it stays an optional dependency.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["is_quantized", "check_quantized_layer", "dense_weight", "requantize", "quantization_kind",
           "swap_weight", "cpu_repacking"]

QUANT_TYPES_4BIT = ("nf4", "fp4")
COMPUTE_DTYPES = (None, torch.float32, torch.bfloat16)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes layer."""
    return type(module).__module__.split(".")[0] == "bitsandbytes"


def _bnb_classes():
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def quantization_kind(module: nn.Module) -> str:
    """"nf4", "fp4" or "int8" for a supported quantized layer."""
    linear4bit, _ = _bnb_classes()
    return module.weight.quant_type if isinstance(module, linear4bit) else "int8"


def check_quantized_layer(module: nn.Module, where: str) -> None:
    """Raises TypeError unless ``module`` is a quantized layer fastlora adapts: a quantized
    ``Linear4bit`` (NF4 or FP4, compute dtype float32 or bfloat16) or an int8 ``Linear8bitLt``."""
    name = f"{type(module).__module__}.{type(module).__name__}"
    linear4bit, linear8bit = _bnb_classes()
    if type(module) not in (linear4bit, linear8bit) and not (
        isinstance(module, linear4bit) and type(module).forward is linear4bit.forward
    ):
        raise TypeError(f"{where}: {name} is a bitsandbytes layer fastlora does not adapt; it adapts Linear4bit "
                        "(NF4, FP4) and Linear8bitLt. Leave it out of target_modules (exclude_modules=...)")
    w = module.weight
    if isinstance(module, linear4bit):
        if not getattr(w, "bnb_quantized", False):
            raise TypeError(f"{where}: this Linear4bit is not quantized yet (bitsandbytes quantizes on .to(device)); "
                            "move the model to its device first")
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            raise TypeError(f"{where}: this Linear4bit's weight was repacked for bitsandbytes' CPU inference (an eval "
                            "forward without gradients does that on AVX512-BF16 CPUs), which rounds its scales to "
                            "bfloat16 and breaks its backward; adapt the freshly loaded model before running it")
        if w.quant_type not in QUANT_TYPES_4BIT:
            raise TypeError(f"{where}: 4-bit quant_type {w.quant_type!r} is not one of {QUANT_TYPES_4BIT}")
        if module.compute_dtype not in COMPUTE_DTYPES:
            raise TypeError(f"{where}: compute dtype {module.compute_dtype} is not float32 or bfloat16; "
                            "load the model with bnb_4bit_compute_dtype=torch.bfloat16 or torch.float32")
    elif w.dtype != torch.int8 or getattr(w, "has_fp16_weights", True):
        raise TypeError(f"{where}: this Linear8bitLt keeps float weights (has_fp16_weights=True) or is not quantized "
                        "yet; create it with has_fp16_weights=False and move it to its device")


def _int8_parts(module: nn.Module) -> tuple[Tensor, Tensor]:
    """(CB, SCB): int8 rows and their absmax scales; bitsandbytes moves them from the weight to
    the layer's state on the first forward."""
    w = module.weight
    if w.SCB is not None:
        return w.data, w.SCB
    return module.state.CB, module.state.SCB


def dense_weight(module: nn.Module) -> Tensor:
    """The weight ``module`` computes with, as a dense tensor: a plain layer's weight itself, a
    quantized layer's dequantized weight in float32 (out x in, a new tensor)."""
    if not is_quantized(module):
        return module.weight
    import bitsandbytes.functional as bnbf

    linear4bit, _ = _bnb_classes()
    w = module.weight
    if isinstance(module, linear4bit):
        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    cb, scb = _int8_parts(module)
    return cb.float() * (scb.float()[:, None] / 127.0)


def requantize(module: nn.Module, weight: Tensor) -> nn.Parameter:
    """A new frozen weight Parameter of ``module``'s kind and settings holding ``weight``
    quantized (the layer is not changed; see :func:`swap_weight`)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    linear4bit, _ = _bnb_classes()
    old = module.weight
    device = old.device
    if isinstance(module, linear4bit):
        storage = old.quant_state.dtype
        data, state = bnbf.quantize_4bit(weight.to(device, storage).contiguous(), blocksize=old.blocksize,
                                         compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                         quant_storage=old.quant_storage)
        return bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=old.blocksize,
                                 compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                 quant_storage=old.quant_storage, module=module, bnb_quantized=True)
    cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(device, torch.float16).contiguous())
    return bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)


def swap_weight(module: nn.Module, weight: nn.Parameter) -> nn.Parameter:
    """Puts ``weight`` (from :func:`requantize` or an earlier swap) into ``module`` and returns
    the weight it held, self-contained, so swapping it back restores the layer exactly."""
    linear4bit, _ = _bnb_classes()
    old = module.weight
    if isinstance(module, linear4bit):
        module.weight = weight
        module.quant_state = weight.quant_state
        return old
    old.CB, old.SCB = _int8_parts(module)
    module.state.CB = module.state.SCB = None  # the next forward takes them from the new weight
    module.weight = weight
    return old


def cpu_repacking(module: nn.Module, enabled: bool) -> bool:
    """Switches bitsandbytes' repacking of a ``Linear4bit`` weight for CPU inference on or off and
    returns the previous setting (False for other layers). On AVX512-BF16 CPUs bitsandbytes
    repacks the weight in place on an eval forward without gradients: its scales are rounded to
    bfloat16 and a later forward with gradients computes wrong values (bitsandbytes 0.50), so the
    layers fastlora adapts or collects gradients of keep the portable layout."""
    if not hasattr(module, "support_avx512bf16_for_cpu"):
        return False
    previous = bool(module.support_avx512bf16_for_cpu)
    module.support_avx512bf16_for_cpu = enabled
    return previous
