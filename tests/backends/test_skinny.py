"""The skinny Triton kernels (fastlora.skinny) under Triton's interpreter on the CPU: each kernel
against the float64 reference on hypothesis-drawn shapes, ranks and layouts (float32/float16,
with and without dropout, 64-bit offsets forced), dA/dB in float32 within a float32 bound, the
dropout mask bit for bit, the layer through them, the dispatch, and the byte count (no mask
temporary is ever created)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlora
from fastlora import composed, fused, skinny
from fastlora.testing import reference
from conftest import assert_matches, make_matrix, seed_tensor

# Triton's interpreter on the CPU: slow
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not skinny.available(), reason="needs Triton (pip install triton)")]

DTYPES = (torch.float32, torch.float16)  # the interpreter gets bfloat16 wrong; a GPU checks it
U32 = 2.0**-24  # unit roundoff of float32


@contextlib.contextmanager
def index_64(on: bool):
    """Forces the kernels' 64-bit offset variant (normally chosen only when offsets reach 2^31)."""
    if not on:
        yield
        return
    with mock.patch.object(skinny, "needs_index_64", lambda *t: True), \
            mock.patch.object(fused, "needs_index_64", lambda *t: True):
        yield


def _draw(rows, cols, layout, g, dtype=torch.float32):
    return make_matrix(rows, cols, dtype, layout, g)


def _fp32_sum_bound(n_terms: int, magnitude: float) -> float:
    """Worst-case error of a float32 sum of ``n_terms`` products of magnitude sum ``magnitude``
    (products of 16-bit values are exact in float32, float32 ones round once), the partial
    sums, the final scaling and the output rounding included: independent of summation order."""
    return (n_terms + 8) * U32 * max(magnitude, 1e-30)


def _kernels_vs_reference(T, n_in, n_out, r, dtype, layout, p, seed, wide, db_second_read=False):
    g = torch.Generator().manual_seed(seed)
    x, dy = _draw(T, n_in, layout, g, dtype), _draw(T, n_out, layout, g, dtype)
    a = _draw(r, n_in, layout, g)  # float32 master adapters, rounded to dtype in the kernels
    b = _draw(n_out, r, layout, g)
    xa, dxa = _draw(T, r, layout, g, dtype), _draw(T, r, layout, g, dtype)
    base = _draw(T, n_in, "contiguous", g, dtype)
    s, drop_seed = 1.7, seed_tensor(seed)
    # dB from dy_products' own pass, or (large ranks on long batches) from a second read of dy
    one_pass = mock.patch.object(skinny, "db_in_one_pass", lambda *args: not db_second_read)
    with index_64(wide), one_pass:
        got_xa = skinny.down(x, a, p, drop_seed)
        got_dxa, got_db = skinny.dy_products(dy, b, xa, s)
        got_da = skinny.grad_a(dxa, x, p, drop_seed)
        got_dx = skinny.add_low_rank(base.clone(), dxa, a, drop_seed, p)

    x64, dy64, xa64, dxa64 = x.double(), dy.double(), xa.double(), dxa.double()
    a64, b64 = a.to(dtype).double(), b.to(dtype).double()
    keep = reference.dropout_mask(drop_seed, T, n_in, p)
    inv = 1.0 / (1.0 - p)
    xd = torch.where(keep, x64 * inv, 0.0)
    assert_matches(got_xa, xd @ a64.t(), dtype, "xa", magnitude=((xd.abs() @ a64.abs().t()).max().item()))
    assert_matches(got_dxa, s * dy64 @ b64, dtype, "dxa", magnitude=s * (dy64.abs() @ b64.abs()).max().item())
    low = torch.where(keep, dxa64 @ a64 * inv, 0.0)
    assert_matches(got_dx, base.double() + low, dtype, "dx",
                   magnitude=(base.double().abs() + (dxa64.abs() @ a64.abs()) * inv).max().item())
    # The adapters' gradients: float32, with float32's error only (a 16-bit rounding is ~2^-11).
    for name, got, want, size, n_terms in (
        ("dB", got_db, s * dy64.t() @ xa64, s * (dy64.abs().t() @ xa64.abs()), T),
        ("dA", got_da, dxa64.t() @ xd, dxa64.abs().t() @ xd.abs(), T),
    ):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        err = (got.double() - want).abs().max().item() if want.numel() else 0.0
        bound = _fp32_sum_bound(n_terms, size.max().item() if size.numel() else 0.0)
        assert err <= bound, f"{name}: {err:.3g} > {bound:.3g}"


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    T=st.integers(1, 300), n_in=st.integers(1, 300), n_out=st.integers(1, 300), r=st.integers(1, 130),
    dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["contiguous", "transposed", "strided"]),
    p=st.one_of(st.just(0.0), st.floats(0.1, 0.5)), seed=st.integers(0, 2**20), wide=st.booleans(),
    db_second_read=st.booleans(),
)
def test_kernels_match_float64_reference(T, n_in, n_out, r, dtype, layout, p, seed, wide, db_second_read):
    _kernels_vs_reference(T, n_in, n_out, r, dtype, layout, p, seed, wide, db_second_read)


@pytest.mark.parametrize("T,n_in,n_out,r", [(1, 1, 1, 1), (1, 37, 19, 3), (33, 65, 17, 64), (70, 9, 100, 65),
                                             (40, 50, 30, 130)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_odd_shapes_and_rank_blocks(T, n_in, n_out, r, dtype):
    for db_second_read in (False, True):
        _kernels_vs_reference(T, n_in, n_out, r, dtype, "strided", 0.3, seed=5, wide=True, db_second_read=db_second_read)


def test_db_takes_a_second_read_of_dy_only_where_partials_cost_more():
    """Headline shape (T = 8192, 4096 outputs, bf16): one pass up to rank 16, two beyond."""
    assert [skinny.db_in_one_pass(8192, 4096, r, 2) for r in (8, 16, 32, 64)] == [True, True, False, False]
    assert skinny.db_in_one_pass(64, 4096, 128, 2)  # a short batch: few partials


@pytest.mark.parametrize("n_in", [37, 40])  # odd: a hash per element; even: one per column pair
@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_every_kernel_regenerates_the_mask_bit_for_bit(p, wide, n_in):
    """Each kernel's zeros are exactly the reference hash's dropped elements: down with A = I
    gives drop(x)/(1-p); grad_a with dxa = I gives it too; add_low_rank gives the masked dxa A."""
    T = 29
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, n_in, generator=g)
    seed = seed_tensor(77)
    keep = reference.dropout_mask(seed, T, n_in, p)
    want = torch.where(keep, x / (1 - p), 0.0)
    with index_64(wide):
        xa = skinny.down(x, torch.eye(n_in), p, seed)
        da = skinny.grad_a(torch.eye(T), x, p, seed)
        low = skinny.add_low_rank(None, torch.randn(T, 3, generator=g), torch.randn(3, n_in, generator=g), seed, p)
    for name, got in (("down", xa), ("grad_a", da), ("add_low_rank", low)):
        assert torch.equal(got != 0, keep), name
    torch.testing.assert_close(xa, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(da, want, rtol=1e-6, atol=0)


def _layer_check(T, n_in, n_out, r, dtype, layout, bias, p, seed, backend):
    g = torch.Generator().manual_seed(seed)
    x = make_matrix(T, n_in, dtype, layout, g)
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(n_out, generator=g, dtype=torch.float64).to(dtype) if bias else None
    a = torch.randn(r, n_in, generator=g, dtype=torch.float64).float().requires_grad_(True)
    bb = torch.randn(n_out, r, generator=g, dtype=torch.float64).float().requires_grad_(True)
    dy = torch.randn(T, n_out, generator=g, dtype=torch.float64).to(dtype)
    s, drop_seed = 0.9, seed_tensor(seed)
    xs = x.detach().requires_grad_(True)

    def no_mask(*args):
        raise AssertionError("a PyTorch-op dropout mask was built")

    with fastlora.use_backend(backend), skinny.forced(), mock.patch.object(composed, "dropout_mask", no_mask):
        y = fastlora.lora_linear(xs, w, b, a, bb, s, p, drop_seed)
        y.backward(dy)
    x64 = x.double().requires_grad_(True)
    a64, b64 = a.detach().double().requires_grad_(True), bb.detach().double().requires_grad_(True)
    y64 = reference.lora_linear(x64, w.double(), None if b is None else b.double(), a64, b64, s, p, drop_seed)
    y64.backward(dy.double())
    ax, aw, aa, ab, ady = x64.detach().abs(), w.double().abs(), a64.detach().abs(), b64.detach().abs(), dy.double().abs()
    inv = 1.0 / (1.0 - p)
    sizes = {
        "y": (ax @ aw.t() + s * inv * (ax @ aa.t()) @ ab.t()).max().item() + (0.0 if b is None else b.abs().max().item()),
        "dx": (ady @ aw + s * inv * (ady @ ab) @ aa).max().item(),
        "dA": (s * inv * (ady @ ab).t() @ ax).max().item(),
        "dB": (s * inv * ady.t() @ (ax @ aa.t())).max().item(),
    }
    # dA and dB come back in the adapters' float32, the rank-r intermediates (xa, dxa) in dtype.
    assert a.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32
    for name, got, want in (("y", y, y64), ("dx", xs.grad, x64.grad), ("dA", a.grad, a64.grad), ("dB", bb.grad, b64.grad)):
        assert_matches(got, want, dtype, name, magnitude=2 * sizes[name])


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    T=st.integers(1, 120), n_in=st.integers(1, 120), n_out=st.integers(1, 120), r=st.integers(1, 130),
    dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["contiguous", "transposed", "strided"]),
    bias=st.booleans(), p=st.one_of(st.just(0.0), st.floats(0.1, 0.5)), seed=st.integers(0, 2**20),
    backend=st.sampled_from(["composed", "fused"]),
)
def test_layer_through_the_kernels_matches_float64_reference(T, n_in, n_out, r, dtype, layout, bias, p, seed, backend):
    """The composed and the fused path with the skinny kernels (as on CUDA): no PyTorch mask."""
    _layer_check(T, n_in, n_out, r, dtype, layout, bias, p, seed, backend)


def test_lora_update_through_the_kernels():
    """The quantized layers' branch (lora_update) takes the kernels too, dx without a base term."""
    g = torch.Generator().manual_seed(3)
    T, n_in, n_out, r, p = 21, 35, 18, 4, 0.25
    x = torch.randn(T, n_in, generator=g).requires_grad_(True)
    y0 = torch.randn(T, n_out, generator=g)
    a = torch.randn(r, n_in, generator=g).requires_grad_(True)
    b = torch.randn(n_out, r, generator=g).requires_grad_(True)
    seed, dy = seed_tensor(4), torch.randn(T, n_out, generator=g)
    with fastlora.use_backend("composed"), skinny.forced():
        out = fastlora.lora_update(x, y0, a, b, 1.5, p, seed)
        grads = torch.autograd.grad(out, (x, a, b), dy)
    x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, a, b))
    want = reference.lora_up(y0.double(), reference.lora_down(x64, a64, p, seed), b64, 1.5)
    want_grads = torch.autograd.grad(want, (x64, a64, b64), dy.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)


def test_dispatch(monkeypatch):
    x = torch.randn(4, 8)
    assert not skinny.applies(x) and not composed.uses_skinny(x)  # CPU tensors: the composed path's PyTorch ops
    with skinny.forced():
        assert skinny.applies(x, x) and composed.uses_skinny(x, x)
        assert not skinny.applies(x.double())  # float64: the oracle's dtype, PyTorch ops
        assert not skinny.applies(x, x.half())  # mixed dtypes
    monkeypatch.setattr(skinny, "_device_type", lambda t: "cuda")  # as a CUDA tensor is seen
    monkeypatch.setattr(composed, "_checked", {})
    monkeypatch.setattr(composed, "self_check", lambda device, dtype: None)  # tested below
    assert all(composed.uses_skinny(t) for t in (x, x.half(), x.bfloat16()))
    with skinny.forced(False):
        assert not skinny.applies(x) and not composed.uses_skinny(x)
    monkeypatch.setattr(skinny, "available", lambda: False)  # no Triton: the PyTorch hash
    assert not skinny.applies(x) and not composed.uses_skinny(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_self_check_passes_on_correct_kernels_and_names_a_wrong_one(monkeypatch, dtype):
    assert composed.self_check(torch.device("cpu"), dtype) is None
    grad_a = skinny.grad_a
    monkeypatch.setattr(skinny, "grad_a", lambda *args: grad_a(*args) * 1.1)  # 10 %: beyond any rounding
    assert "grad_a" in composed.self_check(torch.device("cpu"), dtype)


def test_the_kernels_run_on_a_device_only_after_passing_the_self_check(monkeypatch):
    x = torch.randn(4, 8)
    monkeypatch.setattr(skinny, "_device_type", lambda t: "cuda")  # as a CUDA tensor is seen
    monkeypatch.setattr(composed, "_checked", {})
    checks = []
    monkeypatch.setattr(composed, "self_check", lambda device, dtype: checks.append(dtype) or "down: wrong")
    with pytest.warns(RuntimeWarning, match="disagree with the composed path's library ops"):
        assert not composed.uses_skinny(x)
    assert not composed.uses_skinny(x) and checks == [torch.float32]  # checked once per device and dtype
    monkeypatch.setattr(composed, "self_check", lambda device, dtype: checks.append(dtype))
    assert composed.uses_skinny(x.half()) and composed.uses_skinny(x.half())
    assert checks == [torch.float32, torch.float16]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not composed.uses_skinny(x.bfloat16()) and len(checks) == 2  # no check while compiling: library ops


def test_64_bit_offsets_only_where_offsets_reach_2_31():
    assert not skinny.needs_index_64(torch.empty(2**15, 2**15, device="meta"))
    assert skinny.needs_index_64(torch.empty(2**16, 2**15, device="meta"))
    assert skinny.needs_index_64(torch.empty(8, 2**28, device="meta")[:, :8])  # small, but a wide row stride


def test_float32_follows_torch_matmul_precision():
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert skinny.dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert skinny.dot_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("medium")
        assert skinny.dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)


def _benchmark(name: str):
    """A module of benchmarks/ (they import their _common helpers by path)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def _dropout_bytes():
    return _benchmark("dropout_bytes")


def _kernel_spills():
    return _benchmark("kernel_spills")


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_mask_temporary_and_bytes_equal_the_model(p, dtype):
    """benchmarks/dropout_bytes.py on a tiny shape: with the dispatch CUDA gets, no int64 or bool
    tensor of the input's size is created and the bytes beyond the frozen layer equal the model;
    the PyTorch fallback does build them (so the check can fail)."""
    row = _dropout_bytes().measure(24, 40, 36, 5, p, dtype)
    assert row["mask_temporaries"] == 0 and row["fused_mask_temporaries"] == 0
    assert row["extra_bytes"] == row["model_extra_bytes"]
    assert row["fused_extra_bytes"] == row["fused_model_extra_bytes"]
    if p > 0:
        assert row["fallback_mask_temporaries"] > 0
        assert row["fallback_extra_bytes"] > 5 * row["extra_bytes"]


def _nvidia_compiler() -> bool:
    if not skinny.available():
        return False
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _nvidia_compiler(), reason="needs Triton's NVIDIA backend (ships with Triton on Linux)")
@pytest.mark.parametrize("name", ["forward", "grad_x", "down", "dy_products", "grad_a", "add_low_rank"])
def test_every_kernel_compiles_for_sm90_without_a_gpu(name):
    """The interpreter runs the kernels as Python; this compiles them as a GPU would get them
    (device functions jitted, constexpr branches, 64-bit build), down to sm_90a machine code."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastlora import fused_kernels

    spills = _kernel_spills()
    config = next(c for c in spills.configs(90, "bf16") if c[0] == name)
    _, fn, constexprs, warps, stages = config
    constexprs = dict(constexprs, INDEX_64=True)
    source = ASTSource(fn=fused_kernels.compiled(fn), signature=spills._signature(fn, "bf16", constexprs),
                       constexprs=constexprs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    assert f".entry fastlora_{name}_kernel" in kernel.asm["ptx"]
