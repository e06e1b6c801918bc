"""The float64 oracle: the pure-PyTorch definition of every fastlora operator and of the layer.

Each function computes what the same-named ``torch.ops.fastlora`` operator (or
:func:`fastlora.lora_linear` / :func:`fastlora.lora_update`) computes, on any device and in any
floating dtype (float64 included), with ordinary autograd. Tests compare the compiled kernels,
the Triton kernels and the composed path (``fastlora.composed``) against these in float64; the
layer runs them only under ``fastlora.use_backend("reference")``, which importing
:mod:`fastlora.testing` makes available. No production module imports this one.

The per-op formulas are the library-op implementations production falls back to
(:mod:`fastlora.backends.library`) and the shared numerics (:mod:`fastlora._numerics`): one copy
of each, re-exported here.

Notation (as PEFT): x (T, in), weight W (out, in), lora_A A (r, in), lora_B B (out, r),
``xa = drop(x) A^T`` (T, r), dy (T, out), ``dxa = s dy B`` (T, r).
"""

from __future__ import annotations

from torch import Tensor

from .._numerics import accumulation_dtype, adam_directions, dropout, dropout_mask, dropout_threshold, lora_pro_moments
from ..backends.library import (
    accumulate_outer,
    lora_down,
    lora_dy_products,
    lora_forward,
    lora_grad_A,
    lora_grad_x,
    lora_up,
)

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
    "lora_update",
]


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


def lora_update(x: Tensor, y: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, dropout_p: float = 0.0,
                seed: Tensor | None = None) -> Tensor:
    """The adapter branch added to a base output ``y`` computed elsewhere, for 2-D x and y:
    ``y + scale * (drop(x) A^T) B^T`` in x's dtype, through ordinary autograd."""
    return lora_up(y.to(x.dtype), lora_down(x, lora_A, dropout_p, seed), lora_B, scale)
