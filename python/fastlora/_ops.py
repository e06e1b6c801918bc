"""Fake (meta) kernels and autograd formulas of ``torch.ops.fastlora.*``, and the typed
wrappers production calls them through.

The schemas and device kernels are registered in C++ (csrc/ops). Registering the fake kernels
here lets ``torch.compile`` trace through the ops without graph breaks; registering autograd
makes ``lora_forward`` differentiable with the memory-lean backward of ``lora_layer.md``: it
saves x (not a copy), xa (T x r) and the dropout seed, never a mask or a T x out tensor.
``lora_down`` and ``lora_up`` are differentiable too; the backward pieces (``lora_dy_products``,
``lora_grad_A``, ``lora_grad_x``) and ``dropout_mask`` are not (they are derivatives already),
nor is the optimizer pass ``lora_pro_moments``. Where no compiled kernel of ``dropout_mask`` or
``lora_pro_moments`` runs, their wrappers here compute them in library ops (:mod:`fastlora._numerics`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _numerics
from ._extension import extension_available
from .backends.registry import kernel_used, op_function

__all__ = ["lora_forward", "dropout_mask", "lora_pro_moments", "lora_pro_kernel_applies"]


def lora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``torch.ops.fastlora.lora_forward`` on a 2-D x: (y, xa), differentiable in x, A and B."""
    return torch.ops.fastlora.lora_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)


def dropout_mask(seed: Tensor, rows: int, cols: int, p: float) -> Tensor:
    """The keep-mask dropout applies for this seed (the compiled kernel where the registry says so)."""
    return op_function("dropout_mask", seed.device)(seed, rows, cols, p)


def lora_pro_kernel_applies(exp_avg: Tensor, r: int) -> bool:
    """Whether :func:`lora_pro_moments` runs a compiled kernel for these moments and rank."""
    return kernel_used("lora_pro_moments", exp_avg.device.type, exp_avg.dtype, r)


def lora_pro_moments(
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    grad_A0: Tensor,
    grad_B0: Tensor,
    scale: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
) -> tuple[Tensor, Tensor]:
    """LoRA-Pro's fused full-mode moment pass (see :func:`fastlora._numerics.lora_pro_moments`):
    the compiled kernel where one applies, else library ops."""
    args = (exp_avg, exp_avg_sq, lora_A, lora_B, grad_A0, grad_B0, scale, beta1, beta2, eps, step)
    if lora_pro_kernel_applies(exp_avg, lora_A.shape[0]):
        return torch.ops.fastlora.lora_pro_moments(*args)
    return _numerics.lora_pro_moments(*args)


def _register_fakes() -> None:
    acc = _numerics.accumulation_dtype

    @torch.library.register_fake("fastlora::lora_down")
    def _lora_down(x, lora_A, dropout_p, seed):
        return x.new_empty(x.shape[0], lora_A.shape[0])

    @torch.library.register_fake("fastlora::lora_up")
    def _lora_up(y, xa, lora_B, scale):
        return y.new_empty(y.shape[0], y.shape[1])

    @torch.library.register_fake("fastlora::lora_forward")
    def _lora_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
        return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])

    @torch.library.register_fake("fastlora::lora_dy_products")
    def _lora_dy_products(dy, xa, lora_B, scale):
        dxa = dy.new_empty(dy.shape[0], lora_B.shape[1], dtype=acc(dy.dtype))
        return dxa, lora_B.new_empty(dy.shape[1], xa.shape[1])

    @torch.library.register_fake("fastlora::lora_grad_A")
    def _lora_grad_A(x, dxa, dropout_p, seed, dtype):
        return x.new_empty(dxa.shape[1], x.shape[1], dtype=dtype)

    @torch.library.register_fake("fastlora::lora_grad_x")
    def _lora_grad_x(dy, weight, dxa, lora_A, dropout_p, seed):
        return dy.new_empty(dy.shape[0], weight.shape[1])

    @torch.library.register_fake("fastlora::accumulate_outer")
    def _accumulate_outer(acc, dy, x, alpha):
        return None

    @torch.library.register_fake("fastlora::dropout_mask")
    def _dropout_mask(seed, rows, cols, dropout_p):
        return seed.new_empty(rows, cols, dtype=torch.bool)

    @torch.library.register_fake("fastlora::lora_pro_moments")
    def _lora_pro_moments(exp_avg, exp_avg_sq, lora_A, lora_B, grad_A0, grad_B0, scale, beta1, beta2, eps, step):
        dtype = acc(exp_avg.dtype)
        return exp_avg.new_empty(lora_A.shape, dtype=dtype), exp_avg.new_empty(lora_B.shape, dtype=dtype)


def _forward_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias, lora_A, lora_B, scale, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scale = scale
    ctx.dropout_p = dropout_p


def _forward_backward(ctx: Any, dy: Tensor | None, dxa_extra: Tensor | None) -> tuple:
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_b_lora = ctx.needs_input_grad[:5]
    if need_w or need_b:
        raise RuntimeError(
            "fastlora.lora_forward does not differentiate the frozen weight or bias; "
            "fastlora.LoRALinear uses the composed path when they require gradients."
        )
    ops = torch.ops.fastlora
    if dy is None:
        dy = torch.zeros(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    dxa, d_b = ops.lora_dy_products(dy, xa, lora_B, ctx.scale)
    if dxa_extra is not None:  # only when a caller differentiates through the xa output
        dxa = dxa + dxa_extra.to(dxa.dtype)
    p = ctx.dropout_p
    d_a = ops.lora_grad_A(x, dxa, p, seed, lora_A.dtype) if need_a else None
    dx = ops.lora_grad_x(dy, weight, dxa, lora_A, p, seed) if need_x else None
    return dx, None, None, d_a, d_b if need_b_lora else None, None, None, None


def _down_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, lora_A, dropout_p, seed = inputs
    ctx.save_for_backward(x, lora_A, seed)
    ctx.dropout_p = dropout_p


def _down_backward(ctx: Any, dxa: Tensor) -> tuple:
    x, lora_A, seed = ctx.saved_tensors
    p = ctx.dropout_p
    dxa = dxa.to(_numerics.accumulation_dtype(x.dtype))
    d_a = torch.ops.fastlora.lora_grad_A(x, dxa, p, seed, lora_A.dtype) if ctx.needs_input_grad[1] else None
    dx = None
    if ctx.needs_input_grad[0]:
        mask = dropout_mask(seed, x.shape[0], x.shape[1], p) if p > 0 else None
        dx = _numerics.dropout(dxa @ lora_A.to(dxa.dtype), p, seed, mask).to(x.dtype)
    return dx, d_a, None, None


def _up_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    y, xa, lora_B, scale = inputs
    ctx.save_for_backward(xa, lora_B)
    ctx.scale = scale


def _up_backward(ctx: Any, grad: Tensor) -> tuple:
    xa, lora_B = ctx.saved_tensors
    dxa, d_b = torch.ops.fastlora.lora_dy_products(grad, xa, lora_B, ctx.scale)
    return grad, dxa.to(xa.dtype), d_b, None


def _register_autograd() -> None:
    reg = torch.library.register_autograd
    reg("fastlora::lora_forward", _forward_backward, setup_context=_forward_setup)
    reg("fastlora::lora_down", _down_backward, setup_context=_down_setup)
    reg("fastlora::lora_up", _up_backward, setup_context=_up_setup)


if extension_available():
    _register_fakes()
    _register_autograd()
