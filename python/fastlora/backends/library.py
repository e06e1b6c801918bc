"""The compiled ops (``torch.ops.fastlora.*``) in library ops: what a kernel-level op runs where
no compiled kernel applies or is trusted (:func:`fastlora.backends.registry.op_function`).

Each function takes the same arguments as the same-named op and computes the same thing, on any
device and in any floating dtype (float64 included), with ordinary autograd. They are also the
float64 oracle's definitions of these ops (:mod:`fastlora.testing.reference` re-exports them):
one copy of each formula. The dropout mask and LoRA-Pro's moment pass are :mod:`fastlora._numerics`'.

Notation (as PEFT): x (T, in), weight W (out, in), lora_A A (r, in), lora_B B (out, r),
``xa = drop(x) A^T`` (T, r), dy (T, out), ``dxa = s dy B`` (T, r).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._numerics import accumulation_dtype, dropout, dropout_mask, lora_pro_moments

__all__ = [
    "accumulate_outer",
    "dropout_mask",
    "lora_down",
    "lora_dy_products",
    "lora_forward",
    "lora_grad_A",
    "lora_grad_x",
    "lora_pro_moments",
    "lora_up",
]


def lora_down(
    x: Tensor, lora_A: Tensor, dropout_p: float, seed: Tensor | None, mask: Tensor | None = None
) -> Tensor:
    """xa = drop(x) A^T, in x's dtype."""
    return dropout(x, dropout_p, seed, mask) @ lora_A.to(x.dtype).t()


def lora_up(y: Tensor, xa: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """y + scale * xa B^T, in y's dtype."""
    return y + scale * (xa @ lora_B.to(xa.dtype).t())


def lora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(y, xa) with y = x W^T + bias + scale * xa B^T and xa = drop(x) A^T."""
    xa = lora_down(x, lora_A, dropout_p, seed, mask)
    return lora_up(torch.nn.functional.linear(x, weight, bias), xa, lora_B, scale), xa


def lora_dy_products(dy: Tensor, xa: Tensor, lora_B: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(dxa, dB): dxa = scale * dy B in the accumulation dtype, dB = scale * dy^T xa in B's dtype."""
    acc = accumulation_dtype(dy.dtype)
    dy_acc = dy.to(acc)
    dxa = scale * (dy_acc @ lora_B.to(acc))
    d_b = scale * (dy_acc.t() @ xa.to(acc))
    return dxa, d_b.to(lora_B.dtype)


def lora_grad_A(x: Tensor, dxa: Tensor, dropout_p: float, seed: Tensor | None, dtype: torch.dtype) -> Tensor:
    """dA = dxa^T drop(x) with the forward's mask, in ``dtype``."""
    return (dxa.t() @ dropout(x.to(dxa.dtype), dropout_p, seed)).to(dtype)


def lora_grad_x(
    dy: Tensor, weight: Tensor, dxa: Tensor, lora_A: Tensor, dropout_p: float, seed: Tensor | None
) -> Tensor:
    """dx = dy W + mask / (1 - p) * (dxa A), in dy's dtype."""
    low_rank = dropout(dxa @ lora_A.to(dxa.dtype), dropout_p, seed)
    return (dy.to(dxa.dtype) @ weight.to(dxa.dtype) + low_rank).to(dy.dtype)


def accumulate_outer(acc: Tensor, dy: Tensor, x: Tensor, alpha: float) -> None:
    """acc += alpha * dy^T x in acc's dtype (the gradient of a frozen weight, accumulated)."""
    acc.add_(dy.to(acc.dtype).t() @ x.to(acc.dtype), alpha=alpha)
