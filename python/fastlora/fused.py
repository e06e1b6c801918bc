"""The fused path: the layer's two big products with the rank-r terms inside them (Triton).

    forward   y  = [x | s·xa] · [W | B]^T + b          one accumulator, the rank-r block last
    backward  dx = dy · W + drop'(dxa · A)              a second, rank-r accumulator; the dropout
                                                        mask regenerated in the epilogue

so ``y`` and ``dx`` are written once and never read back. The rest is as on the composed path
(:mod:`fastlora.composed`, whose forward and backward it shares): ``xa = drop(x) A^T`` in forward,
``dxa = s dy B``, ``dB = s dy^T xa`` and ``dA = dxa^T drop(x)`` in backward, saving only ``x``,
``xa`` and the seed.

The kernels are written once in Triton's language: compiled (autotuned per shape, results cached
by Triton) for CUDA tensors, run by Triton's interpreter for CPU tensors, which is how CI checks
them against the float64 reference without a GPU (float32/float16; the interpreter gets bfloat16
wrong). The dropout hash is ``csrc/kernels/common/dropout_rng.h``'s, bit for bit.
"""

import functools
import inspect
from typing import Any, Optional

import torch
from torch import Tensor

from .composed import lora_backward, lora_forward
from .reference import dropout_threshold

__all__ = ["available", "applies", "lora_linear", "forward", "grad_x"]

try:
    import triton

    from .fused_kernels import _forward_kernel, _grad_x_kernel
except ImportError:  # the fused path needs Triton; everything else works without it
    triton = None

# Rank-r blocks are padded to this (tl.dot needs 16 along every dimension).
_MIN_DOT = 16


def available() -> bool:
    """Whether Triton (and torch.library.triton_op) are present."""
    return triton is not None and hasattr(torch.library, "triton_op")


def _device_type(t: Tensor) -> str:
    return t.device.type


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether the fused path takes this call on its own (CUDA tensors of a 16-bit or float32
    dtype); the "fused" backend forces it, on CPU through the interpreter."""
    return (available() and _device_type(x) == "cuda" and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and weight.dtype == x.dtype)


# Tile sizes tried by the autotuner on a GPU (the interpreter runs the first).
_CONFIGS = (
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
)
_INTERPRETED_TILE = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)


@functools.lru_cache(maxsize=None)
def _kernel(name: str, interpret: bool) -> Any:
    """The kernel as Triton's interpreter runs it (CPU tensors), or compiled and autotuned per
    (M, N, K, R, dtype) shape (CUDA tensors)."""
    fn = {"forward": _forward_kernel, "grad_x": _grad_x_kernel}[name]
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    configs = [triton.Config({k: v for k, v in c.items() if k.startswith("BLOCK")}, num_warps=c["num_warps"],
                             num_stages=c["num_stages"]) for c in _CONFIGS]
    # The tuning result per shape persists on disk where this Triton can (cache_results).
    persist = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs, key=["M", "N", "K", "R"], **persist)(triton.jit(fn))


def _precision(dtype: torch.dtype) -> str:
    # float32 products in full float32, as torch.mm does by default (TF32 off)
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch(name: str, out: Tensor, rank: int, *args: Any, **flags: Any) -> None:
    m, n = out.shape
    block_r = max(_MIN_DOT, triton.next_power_of_2(rank))
    if out.device.type == "cpu":
        tile = _INTERPRETED_TILE
        grid = (triton.cdiv(m, tile["BLOCK_M"]) * triton.cdiv(n, tile["BLOCK_N"]),)
        _kernel(name, True)[grid](*args, **flags, BLOCK_R=block_r, **tile)
        return
    from torch.library import wrap_triton

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    wrap_triton(_kernel(name, False))[grid](*args, **flags, BLOCK_R=block_r)


def _forward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], xa: Tensor, lora_B: Tensor,
                  scale: float) -> Tensor:
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    m, k = x.shape
    n, r = weight.shape[0], xa.shape[1]
    _launch("forward", y, r, x, weight, bias if bias is not None else weight, xa, lora_B, y, m, n, k, r,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), xa.stride(0), xa.stride(1),
            lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), scale,
            HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype))
    return y


def _grad_x_impl(dy: Tensor, weight: Tensor, dxa: Tensor, lora_A: Tensor, seed: Optional[Tensor],
                 dropout_p: float) -> Tensor:
    dx = torch.empty(dy.shape[0], weight.shape[1], dtype=dy.dtype, device=dy.device)
    m, k = dy.shape
    n, r = weight.shape[1], dxa.shape[1]
    drop = dropout_p > 0.0
    _launch("grad_x", dx, r, dy, weight, dxa, lora_A, seed if drop else dy, dx, m, n, k, r,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), dxa.stride(0), dxa.stride(1),
            lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
            dropout_threshold(dropout_p) if drop else 0, 1.0 / (1.0 - dropout_p),
            DROPOUT=drop, PRECISION=_precision(dy.dtype))
    return dx


if available():
    # Custom ops, so torch.compile and CUDA graphs see through them: on CUDA a triton_op (its
    # kernel launch traced through wrap_triton), under the interpreter an opaque custom op.
    _ops = {
        (name, device): op
        for name, impl in (("forward", _forward_impl), ("grad_x", _grad_x_impl))
        for device, op in (
            ("cuda", torch.library.triton_op(f"fastlora::fused_{name}", mutates_args=())(impl)),
            ("cpu", torch.library.custom_op(f"fastlora::fused_{name}_interpreted", mutates_args=())(impl)),
        )
    }
    _ops["forward", "cpu"].register_fake(lambda x, weight, *args: x.new_empty(x.shape[0], weight.shape[0]))
    _ops["grad_x", "cpu"].register_fake(lambda dy, weight, *args: dy.new_empty(dy.shape[0], weight.shape[1]))


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], xa: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """``x W^T + b + (s·xa) B^T`` in one GEMM (2-D x, x's dtype)."""
    return _ops["forward", "cuda" if x.is_cuda else "cpu"](x, weight, bias, xa, lora_B, scale)


def grad_x(dy: Tensor, weight: Tensor, dxa: Tensor, lora_A: Tensor, seed: Optional[Tensor], dropout_p: float) -> Tensor:
    """``dy W + mask/(1-p) ⊙ (dxa A)`` in one kernel, the mask regenerated from ``seed``."""
    return _ops["grad_x", "cuda" if dy.is_cuda else "cpu"](dy, weight, dxa, lora_A, seed, dropout_p)


def _fused_grad_x(dy: Tensor, weight: Tensor, dxa: Tensor, lora_A: Tensor, seed: Optional[Tensor], p: float,
                  mask: Optional[Tensor]) -> Tensor:
    return grad_x(dy, weight, dxa, lora_A, seed, p)  # the kernel regenerates the mask itself


class _FusedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                scale: float, dropout_p: float, seed: Optional[Tensor]) -> Tensor:
        return lora_forward(ctx, x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, product=forward)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple:
        return lora_backward(ctx, dy, grad_x=_fused_grad_x)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scale: float,
                dropout_p: float, seed: Optional[Tensor]) -> Tensor:
    """``x W^T + b + scale * (drop(x) A^T) B^T`` for a 2-D x through the fused kernels
    (arguments checked by the caller); differentiable in every tensor argument but the seed."""
    return _FusedLoRA.apply(x, weight, bias, lora_A, lora_B, float(scale), float(dropout_p), seed)
