"""The layer as one autograd Function of library GEMMs and in-place updates.

This is what runs wherever fastlora's own kernels do not apply (CUDA while the layer kernels are
switched off, other accelerators, CPU without the extension). Where :func:`uses_skinny` (CUDA with
Triton, once :func:`self_check` passed on the device) its rank-r products are :mod:`fastlora.skinny`'s
single-pass kernels, the dropout mask regenerated in registers; elsewhere they are library GEMMs
and the mask the PyTorch hash. It computes what the float64 oracle
(:func:`fastlora.testing.reference.lora_linear`) defines, with the backward of ``lora_layer.md``:

    forward   y = addmm(b, x, W^T);  xa = drop(x) A^T;  y += s xa B^T      (in place)
    backward  dxa = s dy B;  dB = s dy^T xa;  dA = dxa^T drop(x);  dx = dy W;  dx += drop'(dxa A)

Saved for backward: ``x`` (not a copy), ``xa`` (T x r), the seed, and the parameters. The
dropout mask is regenerated from the seed in backward, never kept across forward/backward.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import skinny
from ._ops import dropout_mask

__all__ = ["lora_linear", "lora_update", "self_check", "uses_skinny"]

logger = logging.getLogger("fastlora")


def _keep_mask(seed: Tensor, x: Tensor, p: float) -> Tensor:
    return dropout_mask(seed, x.shape[0], x.shape[1], p)


def _masked(t: Tensor, mask: Tensor | None) -> Tensor:
    # where, not a product: a dropped element is exactly zero even where t is infinite. A Python
    # zero, not a 0-dim tensor: no allocation (on CUDA, no fill kernel) per call.
    return t if mask is None else torch.where(mask, t, 0.0)


def _down(x: Tensor, lora_A: Tensor, p: float, seed: Tensor | None) -> Tensor:
    """xa = drop(x) A^T; 1/(1-p) scales the T x r product, not x: one fewer T x in pass."""
    if uses_skinny(x):
        return skinny.down(x, lora_A, p, seed)
    mask = _keep_mask(seed, x, p) if p > 0.0 else None
    xa = torch.mm(_masked(x, mask), lora_A.to(x.dtype).t())
    return xa.mul_(1.0 / (1.0 - p)) if p > 0.0 else xa


def _product(x: Tensor, weight: Tensor, bias: Tensor | None, xa: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    return y.addmm_(xa, lora_B.to(x.dtype).t(), alpha=scale)


def _grad_x(dy: Tensor, weight: Tensor | None, dxa: Tensor, lora_A: Tensor, seed: Tensor | None, p: float,
            mask: Tensor | None) -> Tensor:
    """dy W (when there is a weight) + drop'(dxa A)."""
    if p == 0.0:
        a = lora_A.to(dy.dtype)
        return torch.mm(dxa, a) if weight is None else torch.mm(dy, weight).addmm_(dxa, a)
    if mask is None and uses_skinny(dy, dxa):  # the mask regenerated in the kernel, never built
        return skinny.add_low_rank(None if weight is None else torch.mm(dy, weight), dxa, lora_A, seed, p)
    mask = dropout_mask(seed, dy.shape[0], lora_A.shape[1], p) if mask is None else mask
    low_rank = torch.mm(dxa, lora_A.to(dy.dtype)).masked_fill_(mask.logical_not_(), 0.0)
    return low_rank.mul_(1.0 / (1.0 - p)) if weight is None else torch.mm(dy, weight).add_(low_rank, alpha=1.0 / (1.0 - p))


def _adapter_grads(dy: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor, seed: Tensor | None,
                   p: float, s: float, need_x: bool, need_a: bool, need_b: bool) -> tuple:
    """(dxa, dA, dB, mask) of the branch ``s·drop(x) A^T B^T`` with dropout ``p``; dxa only when
    dx or dA needs it, the mask only when dA was computed with it."""
    if uses_skinny(dy, x, xa):
        # one read of dy for dxa and dB, one of x for dA; dA and dB summed in float32
        dxa, d_b = skinny.dy_products(dy, lora_B, xa, s, need_dxa=need_x or need_a, need_db=need_b)
        d_a = skinny.grad_a(dxa, x, p, seed).to(lora_A.dtype) if need_a else None
        return dxa, d_a, (d_b.to(lora_B.dtype) if need_b else None), None
    dxa = d_a = d_b = mask = None
    if need_b:
        d_b = torch.mm(dy.t(), xa).mul_(s).to(lora_B.dtype)
    if need_x or need_a:
        dxa = torch.mm(dy, lora_B.to(x.dtype)).mul_(s)
        if need_a:
            mask = _keep_mask(seed, x, p) if p > 0.0 else None
            d_a = torch.mm(dxa.t(), _masked(x, mask))
            d_a = (d_a.mul_(1.0 / (1.0 - p)) if mask is not None else d_a).to(lora_A.dtype)
    return dxa, d_a, d_b, mask


def lora_forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                 scale: float, dropout_p: float, seed: Tensor | None, product: Callable = _product) -> Tensor:
    """The forward of the layer's autograd Functions: ``xa`` here, ``y`` by ``product`` (the
    composed path's addmm pair, or the fused path's single GEMM)."""
    xa = _down(x, lora_A, dropout_p, seed)
    y = product(x, weight, bias, xa, lora_B, scale)
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed if dropout_p > 0.0 else None)
    ctx.scale = scale
    ctx.dropout_p = dropout_p
    return y


def lora_backward(ctx: Any, dy: Tensor, grad_x: Callable = _grad_x) -> tuple:
    """The matching backward; ``dx`` by ``grad_x`` (given the mask when it was built for dA)."""
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_b_lora = ctx.needs_input_grad[:5]
    dxa, d_a, d_b, mask = _adapter_grads(dy, x, lora_A, lora_B, xa, seed, ctx.dropout_p, ctx.scale, need_x, need_a,
                                         need_b_lora)
    dx = grad_x(dy, weight, dxa, lora_A, seed, ctx.dropout_p, mask) if need_x else None
    d_w = torch.mm(dy.t(), x) if need_w else None
    d_bias = dy.sum(0) if need_b else None
    return dx, d_w, d_bias, d_a, d_b, None, None, None


class _ComposedLoRA(torch.autograd.Function):
    # Temporaries where the skinny kernels do not apply (transient, none saved): with dropout,
    # the PyTorch hash's int64 tensors, the bool mask and mask ⊙ x (T x in) in forward and again
    # in backward, and dxa A (T x in) for dx. With them: none beyond dB's and dA's fp32 partials.
    forward = staticmethod(lora_forward)
    backward = staticmethod(lora_backward)


class _ComposedUpdate(torch.autograd.Function):
    """``y + s·(drop(x) A^T) B^T`` for a base output ``y`` computed elsewhere (a quantized layer's
    own forward): the same branch and saved tensors as the layer; ``y``'s gradient passes
    through to whatever produced it, which adds the base's dx."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, dropout_p: float,
                seed: Tensor | None) -> Tensor:
        xa = _down(x, lora_A, dropout_p, seed)
        ctx.save_for_backward(x, lora_A, lora_B, xa, seed if dropout_p > 0.0 else None)
        ctx.scale = scale
        ctx.dropout_p = dropout_p
        return torch.addmm(y.to(x.dtype), xa, lora_B.to(x.dtype).t(), alpha=scale)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple:
        x, lora_A, lora_B, xa, seed = ctx.saved_tensors
        need_x, need_y, need_a, need_b = ctx.needs_input_grad[:4]
        dxa, d_a, d_b, mask = _adapter_grads(dy, x, lora_A, lora_B, xa, seed, ctx.dropout_p, ctx.scale, need_x,
                                             need_a, need_b)
        dx = _grad_x(dy, None, dxa, lora_A, seed, ctx.dropout_p, mask) if need_x else None
        return dx, (dy if need_y else None), d_a, d_b, None, None, None


def lora_update(x: Tensor, y: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, dropout_p: float,
                seed: Tensor | None) -> Tensor:
    """``y + scale * (drop(x) A^T) B^T`` for 2-D x and y (arguments checked by the caller)."""
    return _ComposedUpdate.apply(x, y, lora_A, lora_B, scale, dropout_p, seed)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
) -> Tensor:
    """``x W^T + b + scale * (drop(x) A^T) B^T`` for a 2-D x (arguments checked by the caller);
    differentiable in every tensor argument but the seed."""
    return _ComposedLoRA.apply(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)


# ---- trusting the skinny kernels on a device ----------------------------------------------------

_checked: dict[tuple[str, torch.dtype], bool] = {}  # (device, dtype): whether self_check passed there


def uses_skinny(*tensors: Tensor) -> bool:
    """Whether this path runs :mod:`fastlora.skinny`'s kernels for operands ``tensors``: they
    apply, and either :func:`fastlora.skinny.forced` pins them or they passed :func:`self_check`
    on this device in this dtype."""
    if not skinny.applies(*tensors):
        return False
    return skinny.pinned() or _trusted(tensors[0].device, tensors[0].dtype)


def _trusted(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the skinny kernels passed :func:`self_check` on this device and dtype; runs it the
    first time (not while compiling or capturing a CUDA graph: there the library ops run until an
    eager call, or fastlora.tune, has checked them)."""
    key = (str(device), dtype)
    passed = _checked.get(key)
    if passed is not None:
        return passed
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return False
    why = self_check(device, dtype)
    _checked[key] = why is None
    if why is not None:
        message = (f"fastlora: the Triton skinny kernels disagree with the composed path's library ops on {device} "
                   f"in {dtype} ({why}); the composed path uses library ops and PyTorch-op dropout masks there "
                   "instead (correct, slower). Please report this with your GPU, torch and Triton versions")
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return _checked[key]


def self_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """Runs each skinny kernel once on ``device`` in ``dtype`` on a small odd-shaped problem with
    dropout and compares it with this path's library ops in float64 on the CPU, from the same
    values; returns which kernel disagrees (or raised) and by how much, or None. A wrong mask,
    index or reduction gives errors of the order of the values; the tolerance admits ``dtype``'s
    rounding (TF32 for float32). The 64-bit-offset variants run only on tensors of 2^31 elements
    and are not checked."""
    g = torch.Generator().manual_seed(0)
    t, n_in, n_out, r, p, s = 67, 45, 29, 5, 0.25, 1.5
    x, dy, dx0 = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((t, n_in), (t, n_out), (t, n_in)))
    a, b = torch.randn(r, n_in, generator=g, dtype=torch.float64), torch.randn(n_out, r, generator=g, dtype=torch.float64)
    seed = torch.tensor([20261207], dtype=torch.int64)
    xa = _down(x, a, p, seed)  # float64: the skinny kernels never take it, so these are library ops
    dxa, d_a, d_b, _ = _adapter_grads(dy, x, a, b, xa, seed, p, s, True, True, True)
    want = {"down": xa, "dy_products (dxa)": dxa, "dy_products (dB)": d_b, "grad_a": d_a,
            "add_low_rank": dx0 + _grad_x(dy, None, dxa, a, seed, p, None)}

    def on(u: Tensor, to: torch.dtype = dtype) -> Tensor:
        return u.to(device, to)

    try:
        with skinny.forced(True):
            a32, seed_on = on(a, torch.float32), on(seed, torch.int64)
            got_dxa, got_db = skinny.dy_products(on(dy), on(b, torch.float32), on(xa), s)
            got = {"down": skinny.down(on(x), a32, p, seed_on), "dy_products (dxa)": got_dxa,
                   "dy_products (dB)": got_db, "grad_a": skinny.grad_a(on(dxa), on(x), p, seed_on),
                   "add_low_rank": skinny.add_low_rank(on(dx0), on(dxa), a32, seed_on, p)}
    except Exception as exc:  # noqa: BLE001  (a kernel that cannot run here is not trusted here)
        return f"a kernel raised {type(exc).__name__}: {exc}"
    tolerance = {torch.float32: 1e-2, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    for name, expected in want.items():
        error = (got[name].detach().cpu().double() - expected).abs().max().item()
        scale = expected.abs().max().item()
        if not error <= tolerance * scale:  # also catches NaN
            return f"{name}: largest error {error:.3g}, {error / scale:.3g} of the largest value"
    return None
