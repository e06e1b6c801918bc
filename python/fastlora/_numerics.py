"""The numerics production shares with the oracle (:mod:`fastlora.testing.reference`): the
dropout hash and its threshold, the accumulation dtype, Adam's directions and LoRA-Pro's moment
pass in library ops. The kernels implement the same definitions (the hash is
``csrc/kernels/common/dropout_rng.h``); tests hold both to the float64 oracle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "adam_directions", "dropout", "dropout_mask", "dropout_threshold", "lora_pro_moments"]

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(v: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch integers are signed)."""
    v &= _MASK64
    return v - (1 << 64) if v >= (1 << 63) else v


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> s).bitwise_and_((1 << (64 - s)) - 1)


def _mix64_(z: Tensor) -> Tensor:
    # SplitMix64's finaliser, in place (the mask's int64 temporaries dominate its memory); int64
    # products wrap modulo 2^64 like the uint64 ones in C++.
    z ^= _shr(z, 30)
    z *= _signed(_MIX1)
    z ^= _shr(z, 27)
    z *= _signed(_MIX2)
    z ^= _shr(z, 31)
    return z


def dropout_threshold(p: float) -> int:
    """Draws (uniform 32-bit integers) below this value are dropped."""
    t = p * 4294967296.0
    if t <= 0.0:
        return 0
    if t >= 4294967295.0:
        return 0xFFFFFFFF
    return int(t + 0.5)


def dropout_mask(seed: Tensor, rows: int, cols: int, p: float, first_row: int = 0) -> Tensor:
    """The keep-mask (bool, rows x cols) of dropout with this seed: a pure function of
    (seed, row * cols + col), identical to the kernels' (csrc/kernels/common/dropout_rng.h).
    ``first_row`` gives rows [first_row, first_row + rows) of a taller matrix."""
    if p == 0.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=seed.device)
    key = _mix64_(seed.reshape(()).to(torch.int64) + _signed(_GAMMA))
    # Element i draws the low (even i) or high (odd i) 32 bits of the hash of counter i >> 1.
    first = first_row * cols
    pairs = torch.arange(first >> 1, (first + rows * cols + 1) >> 1, dtype=torch.int64, device=seed.device)
    bits = _mix64_(pairs.mul_(_signed(_GAMMA)).add_(key))
    threshold = dropout_threshold(p)
    keep = torch.stack(((bits & 0xFFFFFFFF) >= threshold, _shr(bits, 32) >= threshold), dim=1).reshape(-1)
    return keep[first & 1 : (first & 1) + rows * cols].reshape(rows, cols)


def dropout(x: Tensor, p: float, seed: Tensor | None, mask: Tensor | None = None) -> Tensor:
    """Inverted dropout of a 2-D x: kept elements times 1/(1-p), dropped ones exactly zero.
    ``mask`` may pass a precomputed :func:`dropout_mask` of x's shape."""
    if p == 0.0:
        return x
    if mask is None:
        assert seed is not None, "dropout with p > 0 needs a seed"
        mask = dropout_mask(seed, x.shape[0], x.shape[1], p)
    return torch.where(mask, x * (1.0 / (1.0 - p)), 0.0)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 activations accumulate in float64, every other dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def adam_directions(
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    grads: Sequence[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    steps: Sequence[int],
) -> list[Tensor]:
    """Adam's moment update and direction for each tensor, with bias correction from step 1:
    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2`` (written back into the moments, in
    their dtype) and ``D = (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)`` from the values
    before that rounding. The math runs in float64 for float64 moments, else in float32."""
    ms = [m.to(accumulation_dtype(m.dtype)) for m in exp_avgs]
    vs = [v.to(accumulation_dtype(v.dtype)) for v in exp_avg_sqs]
    gs = [g.to(m.dtype) for g, m in zip(grads, ms)]
    torch._foreach_mul_(ms, beta1)
    torch._foreach_add_(ms, gs, alpha=1.0 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_mul_(denom, [1.0 / math.sqrt(1.0 - beta2**t) for t in steps])
    torch._foreach_add_(denom, eps)
    directions = torch._foreach_mul(ms, [1.0 / (1.0 - beta1**t) for t in steps])
    torch._foreach_div_(directions, denom)
    for stored, new in ((exp_avgs, ms), (exp_avg_sqs, vs)):
        for dst, src in zip(stored, new):
            if dst is not src:
                dst.copy_(src)
    return directions


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
    """LoRA-Pro's full-mode moment pass: with ``g = scale (B grad_A0 + grad_B0 A)`` (the
    equivalent gradient), updates the out x in moments in place as :func:`adam_directions`
    and returns the LoRA gradients of its direction D, ``(scale B^T D, scale D A^T)``, in
    float32 (float64 for float64 moments)."""
    acc = accumulation_dtype(exp_avg.dtype)
    a, b = lora_A.to(acc), lora_B.to(acc)
    g = scale * (b @ grad_A0.to(acc) + grad_B0.to(acc) @ a)
    d = adam_directions([exp_avg], [exp_avg_sq], [g], beta1, beta2, eps, [step])[0]
    return scale * (b.t() @ d), scale * (d @ a.t())
