"""One conformance suite over every implementation of the layer (``fastlora.lora_linear``), each
pinned by its registry name (``fastlora.backends.registry.implementations("linear")``): values and
gradients against the float64 oracle with the same dropout mask, gradcheck (with and without a
trainable base), low precision, odd shapes, non-contiguous inputs, bias and dropout.

Which checks an implementation gets follows from what the registry says it takes (its dtypes,
gradients of the frozen weight). The oracle ("reference") is the expectation of every comparison,
so it only runs the gradchecks. Implementations that run interpreted on the CPU (the fused Triton
GEMMs under Triton's interpreter) are marked slow and keep their own case and example counts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlora
from fastlora import skinny
from fastlora.testing import reference
from fastlora.backends.registry import Implementation, implementations
from conftest import RTOL, assert_matches, requires_extension, seed_tensor
from helpers import assert_pinned_runs, check_against_the_oracle, layer_input, layer_params

LINEAR = implementations("linear")
ORACLE = "reference"
LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def _interpreted(impl: Implementation) -> bool:
    return "cpu" in impl.interpreted


def _low_precision(impl: Implementation) -> list[torch.dtype]:
    """The dtypes below float64 it takes; Triton's interpreter gets bfloat16 wrong (a GPU checks it)."""
    return [d for d in LOW_PRECISION if d in impl.dtypes and not (_interpreted(impl) and d == torch.bfloat16)]


def _implementations(applies, oracle: bool = False) -> list:
    """pytest params of the implementations ``applies`` accepts, each skipped where it cannot run
    here and marked slow where it runs interpreted."""
    params = []
    for name, impl in sorted(LINEAR.items()):
        if (name == ORACLE and not oracle) or not applies(impl):
            continue
        marks = [requires_extension] if impl.needs_extension else []
        if impl.available is not None:
            marks.append(pytest.mark.skipif(not impl.available(), reason=f"{name}: {impl.unavailable}"))
        if _interpreted(impl):
            marks.append(pytest.mark.slow)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _float64(impl: Implementation) -> bool:
    return torch.float64 in impl.dtypes


# ---- float64: the same values and gradients as the oracle, gradcheck --------------------------------

# (T, in, out, r, leading shape, layout): T = 1, r = 1, 3-D and non-contiguous inputs.
CASES = [
    (1, 5, 3, 1, (1,), "contiguous"),
    (6, 7, 9, 2, (2, 3), "contiguous"),
    (10, 13, 6, 5, (10,), "transposed"),
    (12, 17, 11, 3, (3, 4), "strided"),
]


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("T,n_in,n_out,r,lead,layout", CASES)
@pytest.mark.parametrize("impl", _implementations(_float64))
def test_float64_matches_the_oracle_with_the_same_mask(impl, T, n_in, n_out, r, lead, layout, p):
    """Values and gradients (of the frozen weight and bias too, where the implementation gives
    them) equal the oracle's on the same dropout mask, to float64 rounding."""
    w, b, a, bb, s = layer_params(n_in, n_out, r)
    x = layer_input(T, n_in, lead, layout).requires_grad_(True)
    inputs = (x, w, b, a, bb) if LINEAR[impl].weight_grad else (x, a, bb)
    for t in inputs[1:]:
        t.requires_grad_(True)
    seed = seed_tensor(7)
    assert_pinned_runs(impl, x, w, b, a, p)
    with fastlora.use_backend(impl):
        y = fastlora.lora_linear(x, w, b, a, bb, s, p, seed)
    ref = reference.lora_linear(x.reshape(-1, n_in), w, b, a, bb, s, p, seed).reshape(y.shape)
    assert_matches(y, ref, torch.float64, "y")
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(y, inputs, g)
    want = torch.autograd.grad(ref, inputs, g)
    names = ("dx", "dW", "db", "dA", "dB") if len(inputs) == 5 else ("dx", "dA", "dB")
    for name, u, v in zip(names, got, want):
        assert_matches(u, v, torch.float64, name)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("T,n_in,n_out,r,lead,layout", CASES)
@pytest.mark.parametrize("impl", _implementations(_float64, oracle=True))
def test_gradcheck(impl, T, n_in, n_out, r, lead, layout, p, bias):
    w, b, a, bb, s = layer_params(n_in, n_out, r, bias=bias)
    x = layer_input(T, n_in, lead, layout).requires_grad_(True)
    seed = seed_tensor(11)

    def f(x, a, bb):
        with fastlora.use_backend(impl):
            return fastlora.lora_linear(x, w, b, a, bb, s, p, seed)

    assert_pinned_runs(impl, x, w, b, a, p)
    assert torch.autograd.gradcheck(f, (x, a.requires_grad_(True), bb.requires_grad_(True)))


@pytest.mark.parametrize("impl", _implementations(lambda i: _float64(i) and i.weight_grad, oracle=True))
def test_gradcheck_with_trainable_base_and_dropout(impl):
    w, b, a, bb, s = layer_params(6, 5, 2)
    args = [t.requires_grad_(True) for t in (torch.randn(4, 6, dtype=torch.float64), w, b, a, bb)]
    seed = seed_tensor(5)

    def f(*t):
        with fastlora.use_backend(impl):
            return fastlora.lora_linear(*t, s, 0.3, seed)

    assert_pinned_runs(impl, *args[:4], 0.3)
    assert torch.autograd.gradcheck(f, args)


# ---- low precision against the float64 oracle ------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("impl", _implementations(lambda i: not _interpreted(i)))
def test_low_precision_matches_float64_reference(impl, dtype, p):
    """A layer-sized problem in float32/bfloat16/float16 with float32 adapters: output in x's
    dtype within its rounding, adapter gradients in float32. (Interpreted implementations skip
    this size; their drawn and odd-shape problems check low precision.)"""
    w, b, a, bb, s = layer_params(96, 80, 8, dtype=dtype, adapter_dtype=torch.float32)
    x = torch.randn(3, 20, 96, dtype=torch.float64).to(dtype).requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    seed = seed_tensor(21)
    assert_pinned_runs(impl, x, w, b, a, p)
    with fastlora.use_backend(impl):
        y = fastlora.lora_linear(x, w, b, a, bb, s, p, seed)
    assert y.dtype == dtype
    g = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    dx, da, db = torch.autograd.grad(y, (x, a, bb), g)
    assert da.dtype == torch.float32 and db.dtype == torch.float32 and dx.dtype == dtype

    x64 = x.detach().double().requires_grad_(True)
    a64, b64 = a.detach().double().requires_grad_(True), bb.detach().double().requires_grad_(True)
    y64 = reference.lora_linear(x64.reshape(-1, 96), w.double(), b.double(), a64, b64, s, p, seed).reshape(y.shape)
    want = torch.autograd.grad(y64, (x64, a64, b64), g.double())
    assert_matches(y, y64, dtype, "y")
    # Gradients pass through rounded intermediates (xa, dxa in x's dtype): two roundings.
    for name, u, v in zip(("dx", "dA", "dB"), (dx, da, db), want):
        err = (u.double() - v).abs().max() / v.abs().max()
        assert err <= 2 * RTOL[dtype], f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("impl", _implementations(_low_precision))
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    T=st.integers(1, 70), n_in=st.integers(1, 80), n_out=st.integers(1, 80), r=st.integers(1, 40),
    layout=st.sampled_from(["contiguous", "transposed", "strided"]), bias=st.booleans(),
    p=st.sampled_from([0.0, 0.25]), seed=st.integers(0, 2**20), data=st.data(),
)
def test_drawn_problems_match_the_oracle(impl, T, n_in, n_out, r, layout, bias, p, seed, data):
    """Hypothesis: shapes (1 token, rank 1, sizes off any tile), layouts, dtypes, bias, dropout."""
    dtype = data.draw(st.sampled_from(_low_precision(LINEAR[impl])), label="dtype")
    check_against_the_oracle(impl, T, n_in, n_out, r, dtype, layout, bias, p, seed)


ODD_SHAPES = [(1, 1, 1, 1), (1, 33, 17, 1), (37, 45, 29, 3), (64, 64, 48, 16), (5, 130, 70, 33), (9, 40, 33, 130)]


def _odd_shape_cases() -> list:
    """(impl, dtype) pairs: every low-precision dtype each implementation takes."""
    return [pytest.param(param.values[0], dtype, marks=param.marks, id=f"{param.id}-{str(dtype)[6:]}")
            for param in _implementations(_low_precision) for dtype in _low_precision(LINEAR[param.values[0]])]


@pytest.mark.parametrize("T,n_in,n_out,r", ODD_SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("impl,dtype", _odd_shape_cases())
def test_odd_shapes(impl, dtype, T, n_in, n_out, r, p):
    """1 token, rank 1, sizes that are not multiples of a tile, a rank above the width; strided x, bias."""
    check_against_the_oracle(impl, T, n_in, n_out, r, dtype, "strided", True, p, seed=3)


@pytest.mark.slow  # Triton's interpreter
@pytest.mark.skipif(not LINEAR["fused"].available(), reason=LINEAR["fused"].unavailable)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_with_the_skinny_kernels_matches_the_oracle(p):
    """As on CUDA: the fused GEMMs with the skinny kernels for xa, dxa, dB and dA."""
    with skinny.forced():
        check_against_the_oracle("fused", 33, 70, 41, 130, torch.float16, "strided", True, p, seed=4)
