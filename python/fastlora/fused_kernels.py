"""The fused path's Triton kernels (see :mod:`fastlora.fused`), the device functions every
fastlora kernel shares, and the two ways of running a kernel; imported only where Triton is.

Annotations stay source text (``from __future__ import annotations``): Triton's compiler and its
interpreter both read ``tl.constexpr`` from it. Only ``tl`` builtins are called (``tl.full``, not
the library's jit-compiled ``tl.zeros`` / ``tl.cdiv``), so the interpreter runs the kernels without
``TRITON_INTERPRET`` set when Triton was imported.

The device functions (``_dropout_keep``, ``_grouped_tile``, ``_masked_low_rank``; the skinny
kernels use them too) are plain Python functions here, which the interpreter calls as they are;
:func:`compiled` gives a kernel a copy of its globals in which they are ``triton.jit`` functions,
which is what the compiler needs (it cannot call a plain function, and the interpreter cannot
call a ``JITFunction`` unless ``TRITON_INTERPRET`` was set).
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable, Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


def _dropout_keep(seed_ptr, rows, cols, col0, n_cols, threshold,
                  PAIRED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask tile of elements (rows[:, None], cols[None, :]) of a matrix ``n_cols`` wide,
    bit for bit ``csrc/kernels/common/dropout_rng.h``: key = mix64(seed + gamma); element i keeps
    the low (even i) or high (odd i) 32 bits of mix64(key + (i >> 1) gamma) at or above the
    threshold; i = row * n_cols + col, in 64 bits whatever the index width. With PAIRED (n_cols
    even, cols = col0 + arange(BLOCK_N), col0 even) each hash serves its two columns: half the
    integer work, which bounds these kernels on a GPU."""
    z = tl.load(seed_ptr).to(tl.uint64, bitcast=True) + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    key = z ^ (z >> 31)
    if PAIRED:
        first = (rows[:, None].to(tl.uint64) * n_cols + col0) >> 1
        c = key + (first + tl.arange(0, BLOCK_N // 2)[None, :].to(tl.uint64)) * 0x9E3779B97F4A7C15
    else:
        flat = rows[:, None].to(tl.uint64) * n_cols + cols[None, :].to(tl.uint64)
        c = key + (flat >> 1) * 0x9E3779B97F4A7C15
    c = (c ^ (c >> 30)) * 0xBF58476D1CE4E5B9
    c = (c ^ (c >> 27)) * 0x94D049BB133111EB
    bits = c ^ (c >> 31)
    if PAIRED:  # columns 2j and 2j + 1 take the low and high halves of pair j's hash
        draw = tl.reshape(tl.join(bits & 0xFFFFFFFF, bits >> 32), (BLOCK_M, BLOCK_N))
    else:
        draw = tl.where((flat & 1) == 1, bits >> 32, bits & 0xFFFFFFFF)
    return draw >= threshold.to(tl.uint64)


def _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M):
    """(row block, column block) of program ``pid``, GROUP_M row blocks at a time: consecutive
    programs share a band of weight columns, so a wave re-reads it from L2, not from DRAM."""
    grid_m = (M + BLOCK_M - 1) // BLOCK_M
    grid_n = (N + BLOCK_N - 1) // BLOCK_N
    band = GROUP_M * grid_n
    first_m = (pid // band) * GROUP_M
    rows_in_band = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % band) % rows_in_band, (pid % band) // rows_in_band


def _masked_low_rank(dxa_ptr, a_ptr, seed_ptr, rows, cols, col0, M, N, R, s_dm, s_dr, s_ar, s_an, threshold,
                     inv_keep, DROPOUT: tl.constexpr, PAIRED: tl.constexpr, PRECISION: tl.constexpr,
                     INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """The fp32 tile mask/(1-p) ⊙ (dxa A) of rows x cols (dxa: M x R, A: R x N), the rank
    looped in blocks of BLOCK_R: dx's rank-r part, its dropout mask regenerated."""
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        if INDEX_64:
            rr = rr.to(tl.int64)
        g = tl.load(dxa_ptr + rows[:, None] * s_dm + rr[None, :] * s_dr, mask=(rows[:, None] < M) & (rr[None, :] < R),
                    other=0.0)
        a = tl.load(a_ptr + rr[:, None] * s_ar + cols[None, :] * s_an, mask=(rr[:, None] < R) & (cols[None, :] < N),
                    other=0.0)
        acc = tl.dot(g, a.to(g.dtype), acc, input_precision=PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed_ptr, rows, cols, col0, N, threshold, PAIRED, BLOCK_M, BLOCK_N)
        acc = tl.where(keep, acc * inv_keep, 0.0)
    return acc


_DEVICE_FUNCTIONS = ("_dropout_keep", "_grouped_tile", "_masked_low_rank")


@functools.lru_cache(maxsize=None)
def _jitted_device_functions() -> dict[str, Any]:
    """The device functions as ``triton.jit`` functions whose globals hold the jitted versions
    too (so one that calls another compiles)."""
    scope = dict(globals())
    for name in _DEVICE_FUNCTIONS:
        fn = globals()[name]
        scope[name] = triton.jit(types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__))
    return {name: scope[name] for name in _DEVICE_FUNCTIONS}


def compiled(fn: Callable) -> Any:
    """``triton.jit(fn)`` with the device functions it calls jit-compiled too."""
    scope = dict(fn.__globals__)
    scope.update({name: jitted for name, jitted in _jitted_device_functions().items() if name in scope})
    return triton.jit(types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__))


def interpreted(fn: Callable) -> Any:
    """The kernel run by Triton's interpreter (CPU tensors)."""
    return InterpretedFunction(fn)


def custom_ops(name: str, impl: Callable, fake: Optional[Callable], mutates: tuple = ()) -> dict[str, Any]:
    """``impl`` as the custom ops torch.compile and CUDA graphs see through: for "cuda" a
    triton_op (its kernel launches traced through wrap_triton), for "cpu" an opaque custom op
    around the interpreter, traced by ``fake``."""
    ops = {"cuda": torch.library.triton_op(f"fastlora::{name}", mutates_args=mutates)(impl),
           "cpu": torch.library.custom_op(f"fastlora::{name}_interpreted", mutates_args=mutates)(impl)}
    if fake is not None:
        ops["cpu"].register_fake(fake)
    return ops


def fastlora_forward_kernel(
    x_ptr, w_ptr, bias_ptr, xa_ptr, b_ptr, y_ptr,
    M, N, K, R,
    sxm, sxk, swn, swk, s_bias, sam, sar, sbn, sbr, sym, syn,
    scale, M_BUCKET,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, INDEX_64: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y = [x | xa] [W | s B]^T + b; M_BUCKET only keys the autotuner."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if INDEX_64:  # offsets reach 2^31: 64-bit index math (rarely needed, so a separate build)
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    # Rows and columns past the edge load wrapped (valid) ones and are never stored, so the
    # K loop's loads mask K alone (fewer registers than full 2-D masks).
    x_rows = x_ptr + (rm % M)[:, None] * sxm
    w_cols = w_ptr + (rn % N)[None, :] * swn
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        if INDEX_64:
            rk = rk.to(tl.int64)
        a = tl.load(x_rows + rk[None, :] * sxk, mask=rk[None, :] < K, other=0.0)
        w = tl.load(w_cols + rk[:, None] * swk, mask=rk[:, None] < K, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    # The rank-r block: xa against s·B (B's float32 master values scaled, then rounded once).
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        if INDEX_64:
            rr = rr.to(tl.int64)
        a = tl.load(xa_ptr + rm[:, None] * sam + rr[None, :] * sar, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        b = tl.load(b_ptr + rn[None, :] * sbn + rr[:, None] * sbr, mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
        b = (b.to(tl.float32) * scale).to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn * s_bias, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rm[:, None] * sym + rn[None, :] * syn
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def fastlora_grad_x_kernel(
    dy_ptr, w_ptr, dxa_ptr, a_ptr, seed_ptr, dx_ptr,
    M, N, K, R,
    sdm, sdk, swk, swn, sam, sar, sar2, san, sxm, sxn,
    threshold, inv_keep, M_BUCKET,
    DROPOUT: tl.constexpr, PAIRED: tl.constexpr, PRECISION: tl.constexpr, INDEX_64: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dx = dy W + mask/(1-p) ⊙ (dxa A) with one fp32 accumulator: it starts as the masked
    rank-r tile, then the dy W loop adds into it; M_BUCKET only keys the autotuner."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if INDEX_64:
        rm = rm.to(tl.int64)
        rn = rn.to(tl.int64)
    acc = _masked_low_rank(dxa_ptr, a_ptr, seed_ptr, rm, rn, pid_n * BLOCK_N, M, N, R, sam, sar, sar2, san, threshold,
                           inv_keep, DROPOUT, PAIRED, PRECISION, INDEX_64, BLOCK_M, BLOCK_N, BLOCK_R)
    dy_rows = dy_ptr + (rm % M)[:, None] * sdm  # wrapped edge rows/columns, as in the forward
    w_cols = w_ptr + (rn % N)[None, :] * swn
    for k0 in range(0, K, BLOCK_K):  # dy W over the layer's outputs
        rk = k0 + tl.arange(0, BLOCK_K)
        if INDEX_64:
            rk = rk.to(tl.int64)
        a = tl.load(dy_rows + rk[None, :] * sdk, mask=rk[None, :] < K, other=0.0)
        w = tl.load(w_cols + rk[:, None] * swk, mask=rk[:, None] < K, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    out = dx_ptr + rm[:, None] * sxm + rn[None, :] * sxn
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))
