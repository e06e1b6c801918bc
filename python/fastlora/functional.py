"""The LoRA layer's computation as a function: ``y = x W^T + b + s * (drop(x) A^T) B^T``.

:func:`lora_linear` validates its arguments, handles autocast and leading dimensions, and runs
the implementation :mod:`fastlora.backends.layer` chooses for the call's shape (the compiled
kernels, the fused Triton GEMMs, the composed path of library GEMMs, or the float64 oracle when
pinned after ``import fastlora.testing``). :class:`fastlora.LoRALinear` calls it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .backends.layer import choose_linear, choose_update

__all__ = ["lora_linear", "lora_update", "kernel_path_applies", "new_dropout_seed", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def new_dropout_seed(device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
    """A fresh dropout seed (one-element int64 tensor on ``device``) drawn from torch's RNG, so
    ``torch.manual_seed`` makes dropout reproducible as it does for ``nn.Dropout``."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device, generator=generator)


def kernel_path_applies(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                        dropout_p: float = 0.0) -> bool:
    """Whether :func:`lora_linear` will run the compiled kernels for these arguments (a 2-D x)
    (under measured dispatch this settles the shape first, as the call would)."""
    return choose_linear(x, weight, bias, lora_A, dropout_p).name == "kernels"


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"LoRA layers take float32, bfloat16, float16 or float64 inputs, got {x.dtype}; "
            "cast the input (for example x.float())"
        )


def _check_operands(x: Tensor, scale: float, dropout_p: float, **tensors: Tensor | None) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    for what, t in tensors.items():
        if t is None:
            continue
        if t.device != x.device:  # a meta weight would give uninitialised outputs
            raise ValueError(f"{what} is on {t.device} and x on {x.device}; move the layer or the input "
                             "(a model created on the meta device needs its weights materialised first)")
        if not t.is_floating_point():
            raise TypeError(f"{what} must be a real floating-point tensor, got {t.dtype}")


def _check(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scale: float, dropout_p: float
) -> None:
    _check_input(x)
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"expected an input whose last dimension is in_features={weight.shape[1]}, "
            f"got shape {tuple(x.shape)}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(
            f"input dtype {x.dtype} does not match the layer's weight dtype {weight.dtype}; cast "
            "the input or the model, or run under torch.autocast"
        )
    r = lora_A.shape[0]
    if lora_A.shape != (r, weight.shape[1]) or lora_B.shape != (weight.shape[0], r):
        raise ValueError(
            f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not fit a layer of "
            f"shape {tuple(weight.shape)}: expected ({r}, {weight.shape[1]}) and ({weight.shape[0]}, {r})"
        )
    _check_operands(x, scale, dropout_p, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``x W^T + b + scale * (drop(x) A^T) B^T`` for x of shape (..., in).

    Args:
        x: activations, float32/bfloat16/float16/float64, any leading dimensions.
        weight, bias: the frozen base layer's parameters (out x in, out).
        lora_A, lora_B: adapters (r x in, out x r), in any float dtype (float32 keeps fp32
            master adapters while the branch runs in x's dtype with fp32 accumulation).
        scale: the LoRA scale s (alpha / r, or alpha / sqrt(r) for rsLoRA).
        dropout_p: dropout probability on the adapter branch's input; 0 disables dropout.
        seed: one-element int64 tensor on x's device fixing the dropout mask; drawn from
            torch's RNG (or ``generator``) when omitted.
    Returns:
        y with x's leading dimensions and ``out`` features, in x's dtype (the autocast dtype
        under ``torch.autocast``).
    """
    device_type = x.device.type if isinstance(x, Tensor) else "cpu"
    # Like autocast's own casts for F.linear: float64 is left alone. Devices without autocast
    # (meta) would make is_autocast_enabled raise.
    if (
        isinstance(x, Tensor)
        and torch.amp.is_autocast_available(device_type)
        and torch.is_autocast_enabled(device_type)
        and x.is_floating_point()
        and x.dtype != torch.float64
    ):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    _check(x, weight, bias, lora_A, lora_B, scale, dropout_p)
    if dropout_p > 0.0 and seed is None:
        seed = new_dropout_seed(x.device, generator)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    impl = choose_linear(x2d, weight, bias, lora_A, dropout_p)
    y = impl.fn(x2d, weight, bias, lora_A, lora_B, scale, dropout_p, seed)
    return y.reshape(*lead, weight.shape[0])


def lora_update(
    x: Tensor,
    y: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> Tensor:
    """``y + scale * (drop(x) A^T) B^T``: the adapter branch added to a base output ``y`` computed
    elsewhere (a quantized layer's own forward), for x of shape (..., in) and y (..., out).

    The branch runs in x's dtype (the compiled lora_down/lora_up or the composed path, as
    :mod:`fastlora.backends.layer` chooses); autograd saves x, the seed and ``xa`` (T x r) only, and backward
    regenerates the dropout mask from the seed. The gradient reaching y flows on to whatever
    produced it (the base's own backward gives its dx).
    """
    _check_input(x)
    if x.shape[-1] != lora_A.shape[1] or y.shape[:-1] != x.shape[:-1] or y.shape[-1] != lora_B.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} do not fit lora_A {tuple(lora_A.shape)} "
                         f"and lora_B {tuple(lora_B.shape)}")
    _check_operands(x, scale, dropout_p, y=y, lora_A=lora_A, lora_B=lora_B)
    if dropout_p > 0.0 and seed is None:
        seed = new_dropout_seed(x.device)
    x2d, y2d = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    out = choose_update(x2d, lora_A, lora_B, dropout_p).fn(x2d, y2d, lora_A, lora_B, scale, dropout_p, seed)
    return out.reshape(y.shape)
