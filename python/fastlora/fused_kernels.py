"""The fused path's Triton kernels (see :mod:`fastlora.fused`); imported only where Triton is.

Annotations stay source text (``from __future__ import annotations``): Triton's compiler and its
interpreter both read ``tl.constexpr`` from it. Only ``tl`` builtins are called (``tl.full``, not
the library's jit-compiled ``tl.zeros`` / ``tl.cdiv``), so the interpreter runs the kernels without
``TRITON_INTERPRET`` set when Triton was imported.
"""

from __future__ import annotations

import triton.language as tl


def _forward_kernel(
    x_ptr, w_ptr, bias_ptr, xa_ptr, b_ptr, y_ptr,
    M, N, K, R,
    sxm, sxk, swn, swk, sam, sar, sbn, sbr, sym, syn,
    scale,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = (N + BLOCK_N - 1) // BLOCK_N
    rm = (pid // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * swn + rk[:, None] * swk, mask=(rn[None, :] < N) & (rk[:, None] < K), other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    # The rank-r block: xa against s·B (B's float32 master values scaled, then rounded once).
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        a = tl.load(xa_ptr + rm[:, None] * sam + rr[None, :] * sar, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        b = tl.load(b_ptr + rn[None, :] * sbn + rr[:, None] * sbr, mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
        b = (b.to(tl.float32) * scale).to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rm[:, None] * sym + rn[None, :] * syn
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _grad_x_kernel(
    dy_ptr, w_ptr, dxa_ptr, a_ptr, seed_ptr, dx_ptr,
    M, N, K, R,
    sdm, sdk, swk, swn, sam, sar, sar2, san, sxm, sxn,
    threshold, inv_keep,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = (N + BLOCK_N - 1) // BLOCK_N
    rm = (pid // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):  # dy W over the layer's outputs
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(dy_ptr + rm[:, None] * sdm + rk[None, :] * sdk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rk[:, None] * swk + rn[None, :] * swn, mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    low = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for r0 in range(0, R, BLOCK_R):  # dxa A, kept apart: dropout applies to it alone
        rr = r0 + tl.arange(0, BLOCK_R)
        a = tl.load(dxa_ptr + rm[:, None] * sam + rr[None, :] * sar, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        b = tl.load(a_ptr + rr[:, None] * sar2 + rn[None, :] * san, mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        low = tl.dot(a, b.to(a.dtype), low, input_precision=PRECISION)
    if DROPOUT:
        # dropout_rng.h: key = mix64(seed + gamma); element i keeps the low (even i) or high (odd
        # i) 32 bits of mix64(key + (i >> 1) gamma) at or above the threshold; i = row * N + col.
        z = tl.load(seed_ptr).to(tl.uint64, bitcast=True) + 0x9E3779B97F4A7C15
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        key = z ^ (z >> 31)
        flat = rm[:, None].to(tl.uint64) * N + rn[None, :].to(tl.uint64)
        c = key + (flat >> 1) * 0x9E3779B97F4A7C15
        c = (c ^ (c >> 30)) * 0xBF58476D1CE4E5B9
        c = (c ^ (c >> 27)) * 0x94D049BB133111EB
        bits = c ^ (c >> 31)
        draw = tl.where((flat & 1) == 1, bits >> 32, bits & 0xFFFFFFFF)
        low = tl.where(draw >= threshold.to(tl.uint64), low * inv_keep, 0.0)
    acc += low
    out = dx_ptr + rm[:, None] * sxm + rn[None, :] * sxn
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))
