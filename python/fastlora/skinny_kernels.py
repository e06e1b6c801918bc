"""The skinny products' Triton kernels (see :mod:`fastlora.skinny`); imported only where Triton is.

Each reads its big operand (``x`` or ``dy``) once for ranks up to BLOCK_R (64) and once per
further rank block beyond; the dropout mask is regenerated in registers
(:func:`fastlora.fused_kernels._dropout_keep`). Sums over tokens are written as fp32 partials, one
per token block or token split, which the caller adds in a fixed order: no atomics, so results do
not depend on scheduling. The same conventions as ``fused_kernels`` (source annotations, ``tl``
builtins only) let the interpreter run them on CPU tensors.
"""

from __future__ import annotations

import triton.language as tl

from .fused_kernels import _dropout_keep, _masked_low_rank


def fastlora_down_kernel(
    x_ptr, a_ptr, seed_ptr, xa_ptr,
    T, K, R,
    sxt, sxk, sar, sak, sot, sor,
    threshold, inv_keep,
    DROPOUT: tl.constexpr, PAIRED: tl.constexpr, PRECISION: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """xa = drop(x) A^T / (1-p) for one block of tokens (grid: token blocks)."""
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    if INDEX_64:
        rt = rt.to(tl.int64)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        acc = tl.full((BLOCK_T, BLOCK_R), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            if INDEX_64:
                rk = rk.to(tl.int64)
            x = tl.load(x_ptr + rt[:, None] * sxt + rk[None, :] * sxk, mask=(rt[:, None] < T) & (rk[None, :] < K),
                        other=0.0)
            if DROPOUT:  # where, not a product: a dropped element is zero even where x is infinite
                keep = _dropout_keep(seed_ptr, rt, rk, k0, K, threshold, PAIRED, BLOCK_T, BLOCK_K)
                x = tl.where(keep, x, 0.0).to(x.dtype)
            a = tl.load(a_ptr + rr[None, :] * sar + rk[:, None] * sak, mask=(rr[None, :] < R) & (rk[:, None] < K),
                        other=0.0)
            acc = tl.dot(x, a.to(x.dtype), acc, input_precision=PRECISION)
        out = xa_ptr + rt[:, None] * sot + rr[None, :] * sor
        tl.store(out, (acc * inv_keep).to(xa_ptr.dtype.element_ty), mask=(rt[:, None] < T) & (rr[None, :] < R))


def fastlora_dy_products_kernel(
    dy_ptr, b_ptr, xa_ptr, dxa_ptr, part_ptr,
    T, N, R,
    sdt, sdn, sbn, sbr, sat, sar, sgt, sgr,
    scale,
    NEED_DXA: tl.constexpr, NEED_DB: tl.constexpr, PRECISION: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """From one read of a block of dy: dxa = s dy B for those tokens, and their share of
    dB = s dy^T xa as partial[token block] (fp32, N x R, contiguous)."""
    pid = tl.program_id(0)
    rt = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    part = part_ptr + pid * N * R
    if INDEX_64:
        rt = rt.to(tl.int64)
        part = part_ptr + pid.to(tl.int64) * N * R
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        if NEED_DB:
            xa = tl.load(xa_ptr + rt[:, None] * sat + rr[None, :] * sar, mask=(rt[:, None] < T) & (rr[None, :] < R),
                         other=0.0)
        acc = tl.full((BLOCK_T, BLOCK_R), 0.0, tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            if INDEX_64:
                rn = rn.to(tl.int64)
            dy = tl.load(dy_ptr + rt[:, None] * sdt + rn[None, :] * sdn, mask=(rt[:, None] < T) & (rn[None, :] < N),
                         other=0.0)
            if NEED_DXA:
                b = tl.load(b_ptr + rn[:, None] * sbn + rr[None, :] * sbr, mask=(rn[:, None] < N) & (rr[None, :] < R),
                            other=0.0)
                acc = tl.dot(dy, b.to(dy.dtype), acc, input_precision=PRECISION)
            if NEED_DB:
                share = tl.dot(tl.trans(dy), xa.to(dy.dtype), input_precision=PRECISION) * scale
                tl.store(part + rn[:, None] * R + rr[None, :], share, mask=(rn[:, None] < N) & (rr[None, :] < R))
        if NEED_DXA:
            out = dxa_ptr + rt[:, None] * sgt + rr[None, :] * sgr
            tl.store(out, (acc * scale).to(dxa_ptr.dtype.element_ty), mask=(rt[:, None] < T) & (rr[None, :] < R))


def fastlora_grad_a_kernel(
    dxa_ptr, x_ptr, seed_ptr, part_ptr,
    T, K, R, T_SPLIT,
    sgt, sgr, sxt, sxk,
    threshold, inv_keep,
    DROPOUT: tl.constexpr, PAIRED: tl.constexpr, PRECISION: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """partial[split] = dxa^T drop(x) / (1-p) over one split of T_SPLIT tokens (a multiple of
    BLOCK_T), for one block of columns (grid: column blocks x splits; partial fp32, R x K)."""
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    part = part_ptr + split * R * K
    if INDEX_64:
        rk = rk.to(tl.int64)
        part = part_ptr + split.to(tl.int64) * R * K
    t_first = split * T_SPLIT
    t_end = tl.minimum(t_first + T_SPLIT, T)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        acc = tl.full((BLOCK_R, BLOCK_K), 0.0, tl.float32)
        for t0 in range(t_first, t_end, BLOCK_T):
            rt = t0 + tl.arange(0, BLOCK_T)
            if INDEX_64:
                rt = rt.to(tl.int64)
            x = tl.load(x_ptr + rt[:, None] * sxt + rk[None, :] * sxk, mask=(rt[:, None] < T) & (rk[None, :] < K),
                        other=0.0)
            if DROPOUT:
                keep = _dropout_keep(seed_ptr, rt, rk, tl.program_id(0) * BLOCK_K, K, threshold, PAIRED, BLOCK_T,
                                     BLOCK_K)
                x = tl.where(keep, x, 0.0).to(x.dtype)
            g = tl.load(dxa_ptr + rt[:, None] * sgt + rr[None, :] * sgr, mask=(rt[:, None] < T) & (rr[None, :] < R),
                        other=0.0)
            acc = tl.dot(tl.trans(g.to(x.dtype)), x, acc, input_precision=PRECISION)
        tl.store(part + rr[:, None] * K + rk[None, :], acc * inv_keep, mask=(rr[:, None] < R) & (rk[None, :] < K))


def fastlora_add_low_rank_kernel(
    dx_ptr, dxa_ptr, a_ptr, seed_ptr,
    T, K, R,
    sdt, sdk, sgt, sgr, sar, sak,
    threshold, inv_keep,
    ACCUMULATE: tl.constexpr, DROPOUT: tl.constexpr, PAIRED: tl.constexpr, PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dx (+)= mask/(1-p) ⊙ (dxa A) for one tile (grid: token blocks x column blocks): the
    composed path's dx epilogue in one pass over dx, its mask regenerated, none stored."""
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if INDEX_64:
        rt = rt.to(tl.int64)
        rk = rk.to(tl.int64)
    acc = _masked_low_rank(dxa_ptr, a_ptr, seed_ptr, rt, rk, tl.program_id(1) * BLOCK_K, T, K, R, sgt, sgr, sar, sak,
                           threshold, inv_keep, DROPOUT, PAIRED, PRECISION, INDEX_64, BLOCK_T, BLOCK_K, BLOCK_R)
    inside = (rt[:, None] < T) & (rk[None, :] < K)
    out = dx_ptr + rt[:, None] * sdt + rk[None, :] * sdk
    if ACCUMULATE:
        acc += tl.load(out, mask=inside, other=0.0).to(tl.float32)
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=inside)
