"""The rank-r side of the layer as single-pass Triton kernels, dropout regenerated in registers.

    down         xa  = drop(x) A^T                       one read of x
    dy_products  dxa = s dy B,  dB = s dy^T xa          one read of dy (two for large ranks, where
                                                         dB's partials would cost more than a read)
    grad_a       dA  = dxa^T drop(x)                     one read of x
    add_low_rank dx += drop'(dxa A)                      one read and write of dx

(one read for ranks up to 64, the rank tile; larger ranks loop over rank blocks and re-read).
The keep-mask is ``csrc/kernels/common/dropout_rng.h``'s hash computed in the kernels, bit for bit
:func:`fastlora._numerics.dropout_mask`, so no mask tensor exists. ``dA`` and ``dB`` are sums over
tokens: per-block fp32 partials added in a fixed order (deterministic, no atomics), returned in
fp32 so fp32 master adapters get gradients without a 16-bit rounding.

:mod:`fastlora.composed` (and so the fused path, which shares its forward and backward) uses these
kernels wherever they :func:`apply <applies>` (CUDA tensors of a float32/bfloat16/float16 dtype
with Triton present), and only on a device where they passed its self-check
(:func:`fastlora.composed.self_check`, run once per device and dtype on first use: no GPU has
validated them, so each user's device checks them against the composed path's library ops in
float64 before trusting them; where they fail, the composed path runs those library ops, with one
warning). The PyTorch hash stays the fallback without Triton. Under :func:`forced` they also take
CPU tensors, run by Triton's interpreter, without a self-check: that is how CI checks them, and
how a dispatcher can try them on CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import Tensor

from ._numerics import dropout_threshold

__all__ = ["available", "applies", "forced", "pinned", "down", "dy_products", "grad_a", "add_low_rank"]

try:
    import triton

    from . import skinny_kernels
    from .fused_kernels import compiled, custom_ops, interpreted
except ImportError:  # the kernels need Triton; the composed path then builds the mask in PyTorch
    triton = None

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_forced: Optional[bool] = None  # a module global like the backend (torch.compile cannot trace a ContextVar)

# CUDA tiles per kernel, (BLOCK_T, BLOCK_K or BLOCK_N, warps), for rank tiles of 16, 32 and 64:
# the largest for which ptxas (Triton 3.9, bf16, sm_90a and sm_80) reports no register spill in the
# 32-bit-offset build (the in-register hash needs several 64-bit values per element; the rare
# 64-bit build spills a little in dy_products). Not timed: no GPU has run them. dy_products keeps
# 128-token blocks where it can, as dB's fp32 partials (one N x r block per token block, written
# and read back) cost 2r/BLOCK_T of dy's 16-bit bytes. Rank tiles of at most 64 keep the
# accumulators in registers for any rank. The interpreter runs smaller tiles: faster in numpy,
# and more blocks exercise the partial sums on small test shapes.
_MAX_BLOCK_R = 64
_CUDA_TILES = {
    "down": {16: (64, 32, 8), 32: (64, 32, 8), 64: (64, 32, 8)},
    "dy_products": {16: (128, 64, 8), 32: (64, 64, 8), 64: (64, 32, 8)},
    "grad_a": {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4)},
    "add_low_rank": {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4)},
}
_INTERPRETED_TILE = (32, 32)
_GRAD_A_PROGRAMS = 512  # grad_a splits the tokens until about this many programs run (H100: 132 SMs)
_INT32_LIMIT = 2**31 - 1


def available() -> bool:
    """Whether Triton (and torch.library.triton_op) are present."""
    return triton is not None and hasattr(torch.library, "triton_op")


def _device_type(t: Tensor) -> str:
    return t.device.type


@contextlib.contextmanager
def forced(on: bool = True) -> Iterator[None]:
    """Within this context the kernels also take CPU tensors (Triton's interpreter runs them);
    ``forced(False)`` keeps them off even for CUDA tensors (the PyTorch-op fallback)."""
    global _forced
    previous, _forced = _forced, on
    try:
        yield
    finally:
        _forced = previous


def applies(*tensors: Tensor) -> bool:
    """Whether these kernels take operands ``tensors``: all of one float32/bfloat16/float16
    dtype, on CUDA (also on CPU under :func:`forced`, on nothing under ``forced(False)``).
    Unless :func:`pinned`, the composed path runs them on a device only after its self-check
    passed there (:func:`fastlora.composed.uses_skinny`)."""
    dtypes = {t.dtype for t in tensors}
    if not available() or len(dtypes) != 1 or not dtypes <= set(_DTYPES):
        return False
    device = _device_type(tensors[0])
    if _forced is not None:
        return _forced and device in ("cuda", "cpu")
    return device == "cuda"


def pinned() -> bool:
    """Whether :func:`forced` turned the kernels on: they run wherever they apply, unchecked."""
    return bool(_forced)


def tiles(kernel: str, device_type: str, rank: int) -> dict:
    """Tile sizes (and warps on CUDA) of ``kernel`` for this rank on this device type."""
    block_r = min(_MAX_BLOCK_R, max(16, triton.next_power_of_2(rank)))
    if device_type == "cpu":
        (block_t, block_k), warps = _INTERPRETED_TILE, {}
    else:
        block_t, block_k, n = _CUDA_TILES[kernel][block_r]
        warps = {"num_warps": n}
    wide = "BLOCK_N" if kernel == "dy_products" else "BLOCK_K"
    return {"BLOCK_T": block_t, wide: block_k, "BLOCK_R": block_r, **warps}


def needs_index_64(*tensors: Tensor) -> bool:
    """Whether some offset a kernel forms (rows and columns padded by a tile) reaches 2^31."""
    return any(sum((n + 256) * abs(s) for n, s in zip(t.shape, t.stride())) > _INT32_LIMIT for t in tensors)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 products follow torch's matmul setting (TF32 unless
    "highest"), as the library GEMMs beside these kernels do."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _run(name: str, grid: tuple, t: Tensor, *args: Any, num_warps: int = 4, **meta: Any) -> None:
    if t.device.type == "cpu":
        _interpreted(name)[grid](*args, **meta)
        return
    from torch.library import wrap_triton

    wrap_triton(_compiled(name))[grid](*args, **meta, num_warps=num_warps)


_KERNELS: dict = {}


def _interpreted(name: str) -> Any:
    key = (name, "interpreted")
    if key not in _KERNELS:
        _KERNELS[key] = interpreted(getattr(skinny_kernels, f"fastlora_{name}_kernel"))
    return _KERNELS[key]


def _compiled(name: str) -> Any:
    key = (name, "compiled")
    if key not in _KERNELS:
        _KERNELS[key] = compiled(getattr(skinny_kernels, f"fastlora_{name}_kernel"))
    return _KERNELS[key]


def dropout_args(p: float) -> tuple[int, float]:
    """The kernels' dropout arguments (the hash threshold, 1/(1-p)); (0, 1.0) without dropout."""
    return (dropout_threshold(p), 1.0 / (1.0 - p)) if p > 0.0 else (0, 1.0)


def _down_impl(x: Tensor, lora_A: Tensor, p: float, seed: Optional[Tensor]) -> Tensor:
    t, k = x.shape
    r = lora_A.shape[0]
    xa = torch.empty(t, r, dtype=x.dtype, device=x.device)
    meta = tiles("down", x.device.type, r)
    _run("down", (triton.cdiv(t, meta["BLOCK_T"]),), x, x, lora_A, seed if p > 0.0 else x, xa, t, k, r,
         x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), xa.stride(0), xa.stride(1), *dropout_args(p),
         DROPOUT=p > 0.0, PAIRED=k % 2 == 0, PRECISION=dot_precision(x.dtype), INDEX_64=needs_index_64(x, lora_A, xa),
         **meta)
    return xa


def db_in_one_pass(tokens: int, n_out: int, rank: int, element_size: int, device_type: str = "cuda") -> bool:
    """Whether dB comes from dy_products' own read of dy: its fp32 partials (an N x r block per
    token block, written and read back) cost less than a second read of dy by grad_a's split
    kernel (large ranks). A function of the shape alone, so the summation order is too."""
    blocks = triton.cdiv(tokens, tiles("dy_products", device_type, rank)["BLOCK_T"])
    splits = triton.cdiv(tokens, _grad_a_splits(tokens, n_out, tiles("grad_a", device_type, rank)))
    return 2 * blocks * n_out * rank * 4 <= tokens * n_out * element_size + 2 * splits * rank * n_out * 4


def _dy_products_impl(dy: Tensor, lora_B: Tensor, xa: Tensor, scale: float, need_dxa: bool,
                      need_db: bool) -> tuple[Tensor, Tensor]:
    t, n = dy.shape
    r = lora_B.shape[1]
    meta = tiles("dy_products", dy.device.type, r)
    blocks = triton.cdiv(t, meta["BLOCK_T"])
    in_pass = need_db and db_in_one_pass(t, n, r, dy.element_size(), dy.device.type)
    dxa = torch.empty(t if need_dxa else 0, r, dtype=dy.dtype, device=dy.device)
    part = torch.empty(blocks if in_pass else 0, n, r, dtype=torch.float32, device=dy.device)
    if blocks and (need_dxa or in_pass):
        _run("dy_products", (blocks,), dy, dy, lora_B, xa, dxa, part, t, n, r, dy.stride(0), dy.stride(1),
             lora_B.stride(0), lora_B.stride(1), xa.stride(0), xa.stride(1), dxa.stride(0), dxa.stride(1),
             scale, NEED_DXA=need_dxa, NEED_DB=in_pass, PRECISION=dot_precision(dy.dtype),
             INDEX_64=needs_index_64(dy, lora_B, xa, dxa, part), **meta)
    if not need_db:
        d_b = torch.zeros(0, r, dtype=torch.float32, device=dy.device)
    elif in_pass:
        d_b = part.sum(0) if blocks else torch.zeros(n, r, dtype=torch.float32, device=dy.device)
    else:  # (xa^T dy)^T: grad_a's kernel with xa for dxa and dy for x, no dropout
        d_b = _grad_a_impl(xa, dy, 0.0, None).t().mul(scale).contiguous()
    return dxa, d_b


def _grad_a_splits(t: int, k: int, meta: dict) -> int:
    """Tokens per split of grad_a: a multiple of BLOCK_T, as many splits as keep about
    _GRAD_A_PROGRAMS programs busy; a function of the shape alone, so the sum order is too."""
    blocks_t = triton.cdiv(t, meta["BLOCK_T"])
    splits = max(1, min(blocks_t, triton.cdiv(_GRAD_A_PROGRAMS, triton.cdiv(k, meta["BLOCK_K"]))))
    return triton.cdiv(blocks_t, splits) * meta["BLOCK_T"]


def _grad_a_impl(dxa: Tensor, x: Tensor, p: float, seed: Optional[Tensor]) -> Tensor:
    t, k = x.shape
    r = dxa.shape[1]
    meta = tiles("grad_a", x.device.type, r)
    t_split = _grad_a_splits(t, k, meta)
    splits = triton.cdiv(t, t_split)
    part = torch.empty(splits, r, k, dtype=torch.float32, device=x.device)
    if splits == 0:
        return torch.zeros(r, k, dtype=torch.float32, device=x.device)
    _run("grad_a", (triton.cdiv(k, meta["BLOCK_K"]), splits), x, dxa, x, seed if p > 0.0 else x, part, t, k, r,
         t_split, dxa.stride(0), dxa.stride(1), x.stride(0), x.stride(1), *dropout_args(p), DROPOUT=p > 0.0,
         PAIRED=k % 2 == 0, PRECISION=dot_precision(x.dtype), INDEX_64=needs_index_64(dxa, x, part), **meta)
    return part.sum(0)


def _add_low_rank_impl(dx: Tensor, dxa: Tensor, lora_A: Tensor, seed: Optional[Tensor], p: float,
                       accumulate: bool) -> None:
    t, k = dx.shape
    r = dxa.shape[1]
    meta = tiles("add_low_rank", dx.device.type, r)
    if t == 0 or k == 0:
        return
    _run("add_low_rank", (triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(k, meta["BLOCK_K"])), dx, dx, dxa, lora_A,
         seed if p > 0.0 else dx, t, k, r, dx.stride(0), dx.stride(1), dxa.stride(0), dxa.stride(1),
         lora_A.stride(0), lora_A.stride(1), *dropout_args(p), ACCUMULATE=accumulate, DROPOUT=p > 0.0,
         PAIRED=k % 2 == 0, PRECISION=dot_precision(dx.dtype), INDEX_64=needs_index_64(dx, dxa, lora_A), **meta)


if available():
    _ops = {
        "down": custom_ops("skinny_down", _down_impl, lambda x, a, p, seed: x.new_empty(x.shape[0], a.shape[0])),
        "dy_products": custom_ops(
            "skinny_dy_products", _dy_products_impl,
            lambda dy, b, xa, s, need_dxa, need_db: (
                dy.new_empty(dy.shape[0] if need_dxa else 0, b.shape[1]),
                dy.new_empty(b.shape[0] if need_db else 0, b.shape[1], dtype=torch.float32))),
        "grad_a": custom_ops("skinny_grad_a", _grad_a_impl,
                             lambda dxa, x, p, seed: x.new_empty(dxa.shape[1], x.shape[1], dtype=torch.float32)),
        "add_low_rank": custom_ops("skinny_add_low_rank", _add_low_rank_impl, lambda *args: None, mutates=("dx",)),
    }


def _op(name: str, t: Tensor) -> Any:
    return _ops[name]["cpu" if t.device.type == "cpu" else "cuda"]


def down(x: Tensor, lora_A: Tensor, p: float, seed: Optional[Tensor]) -> Tensor:
    """``xa = drop(x) A^T`` (T x r, x's dtype) for a 2-D x; A in any float dtype (rounded to x's
    in registers)."""
    return _op("down", x)(x, lora_A, float(p), seed if p > 0.0 else None)


def dy_products(dy: Tensor, lora_B: Tensor, xa: Tensor, scale: float, need_dxa: bool = True,
                need_db: bool = True) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(s dy B, s dy^T xa)`` from one read of dy: dxa in dy's dtype, dB in float32; None for
    one not asked for."""
    dxa, d_b = _op("dy_products", dy)(dy, lora_B, xa, float(scale), need_dxa, need_db)
    return (dxa if need_dxa else None), (d_b if need_db else None)


def grad_a(dxa: Tensor, x: Tensor, p: float, seed: Optional[Tensor]) -> Tensor:
    """``dA = dxa^T drop(x)`` (r x in, float32) from one read of x."""
    return _op("grad_a", x)(dxa, x, float(p), seed if p > 0.0 else None)


def add_low_rank(dx: Optional[Tensor], dxa: Tensor, lora_A: Tensor, seed: Optional[Tensor], p: float) -> Tensor:
    """``dx + mask/(1-p) ⊙ (dxa A)`` written into ``dx`` (T x in, updated in place), or into a
    new tensor of dxa's dtype when dx is None."""
    accumulate = dx is not None
    if dx is None:
        dx = torch.empty(dxa.shape[0], lora_A.shape[1], dtype=dxa.dtype, device=dxa.device)
    _op("add_low_rank", dx)(dx, dxa, lora_A, seed if p > 0.0 else None, float(p), accumulate)
    return dx
