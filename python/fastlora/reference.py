"""Pure-PyTorch definitions of every fastlora operator: the single source of their semantics.

Each function here computes what the same-named ``torch.ops.fastlora`` operator computes, on
any device and in any floating dtype (float64 included), with ordinary autograd. Tests compare
the compiled kernels and the composed path (``fastlora.composed``) against these in float64;
the layer runs them only under ``fastlora.use_backend("reference")``.

Notation (as PEFT): x (T, in), weight W (out, in), lora_A A (r, in), lora_B B (out, r),
``xa = drop(x) A^T`` (T, r), dy (T, out), ``dxa = s dy B`` (T, r).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._numerics import accumulation_dtype, adam_directions, dropout, dropout_mask, dropout_threshold, lora_pro_moments

__all__ = [
    "accumulate_outer",
    "accumulation_dtype",
    "adam_directions",
    "dropout",
    "dropout_mask",
    "dropout_threshold",
    "lora_down",
    "lora_dy_products",
    "lora_forward",
    "lora_grad_A",
    "lora_grad_x",
    "lora_linear",
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


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> Tensor:
    """The whole layer on a 2-D x through ordinary autograd (gradients for every input that
    requires them, the frozen weight included). The adapter branch runs in x's dtype."""
    return lora_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)[0]


def accumulate_outer(acc: Tensor, dy: Tensor, x: Tensor, alpha: float) -> None:
    """acc += alpha * dy^T x in acc's dtype (the gradient of a frozen weight, accumulated)."""
    acc.add_(dy.to(acc.dtype).t() @ x.to(acc.dtype), alpha=alpha)
