"""Property-based tests: every op against the float64 reference on drawn shapes, strides, dtypes,
ranks, dropout rates, seeds and CPU kernel builds (a few thousand cases per run in total)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlora
from fastlora.testing import reference
from conftest import (
    RTOL,
    assert_matches,
    magnitude,
    make_matrix,
    requires_extension,
    using_isa,
)

from helpers import ISAS, problem_tensors, problems

pytestmark = requires_extension
ops = torch.ops.fastlora
EXAMPLES = 600

SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _acc(dtype):
    return reference.accumulation_dtype(dtype)


@SETTINGS
@given(problems())
def test_lora_down(pr):
    t = problem_tensors(pr)
    with using_isa(pr["isa"]):
        got = ops.lora_down(t["x"], t["a"], pr["p"], t["seed"])
    want = reference.lora_down(t["x"].double(), t["a"].double(), pr["p"], t["seed"])
    assert got.dtype == pr["dtype"]
    mag = magnitude(reference.lora_down, t["x"], t["a"], pr["p"], t["seed"])
    assert_matches(got, want, pr["dtype"], "lora_down", mag)


@SETTINGS
@given(problems())
def test_lora_forward_and_up(pr):
    t = problem_tensors(pr)
    with using_isa(pr["isa"]):
        y, xa = ops.lora_forward(t["x"], t["w"], t["bias"], t["a"], t["b"], pr["scale"], pr["p"], t["seed"])
        up = ops.lora_up(t["dy"], xa, t["b"], pr["scale"])
    d = lambda v: v.double()  # noqa: E731
    base = torch.nn.functional.linear(d(t["x"]), d(t["w"]), d(t["bias"]))
    mag_xa = magnitude(reference.lora_down, t["x"], t["a"], pr["p"], t["seed"])
    assert_matches(xa, reference.lora_down(d(t["x"]), d(t["a"]), pr["p"], t["seed"]), pr["dtype"], "xa", mag_xa)
    mag_y = magnitude(lambda *a: reference.lora_forward(*a)[0], t["x"], t["w"], t["bias"], t["a"], t["b"],
                      pr["scale"], pr["p"], t["seed"])
    assert_matches(y, reference.lora_up(base, d(xa), d(t["b"]), pr["scale"]), pr["dtype"], "y", mag_y)
    mag_up = magnitude(reference.lora_up, t["dy"], xa, t["b"], pr["scale"])
    assert_matches(up, reference.lora_up(d(t["dy"]), d(xa), d(t["b"]), pr["scale"]), pr["dtype"], "lora_up", mag_up)


@SETTINGS
@given(problems())
def test_lora_dy_products(pr):
    t = problem_tensors(pr)
    xa = t["x"][:, : pr["r"]]  # any T x r matrix in the activation dtype, strided like x
    with using_isa(pr["isa"]):
        dxa, d_b = ops.lora_dy_products(t["dy"], xa, t["b2"], pr["scale"])
    dxa_ref, d_b_ref = reference.lora_dy_products(t["dy"].double(), xa.double(), t["b2"].double(), pr["scale"])
    assert dxa.dtype == _acc(pr["dtype"]) and d_b.dtype == pr["adapter_dtype"]
    assert dxa.shape == (pr["T"], pr["r2"]) and d_b.shape == (pr["n_out"], pr["r"])
    mag_dxa, mag_db = (
        magnitude(lambda *a: reference.lora_dy_products(*a)[i], t["dy"], xa, t["b2"], pr["scale"]) for i in (0, 1)
    )
    assert_matches(dxa, dxa_ref, _acc(pr["dtype"]), "dxa", mag_dxa)
    assert_matches(d_b, d_b_ref, _acc(pr["dtype"]), "dB", mag_db)


@SETTINGS
@given(problems())
def test_lora_grad_A(pr):
    t = problem_tensors(pr)
    with using_isa(pr["isa"]):
        got = ops.lora_grad_A(t["x"], t["dxa"], pr["p"], t["seed"], pr["adapter_dtype"])
    want = reference.lora_grad_A(t["x"].double(), t["dxa"].double(), pr["p"], t["seed"], torch.float64)
    assert got.dtype == pr["adapter_dtype"]
    mag = magnitude(reference.lora_grad_A, t["x"], t["dxa"], pr["p"], t["seed"], torch.float64)
    assert_matches(got, want, _acc(pr["dtype"]), "dA", mag)


@SETTINGS
@given(problems())
def test_lora_grad_x(pr):
    t = problem_tensors(pr)
    with using_isa(pr["isa"]):
        got = ops.lora_grad_x(t["dy"], t["w"], t["dxa"], t["a"], pr["p"], t["seed"])
    d = lambda v: v.double()  # noqa: E731
    want = reference.lora_grad_x(d(t["dy"]), d(t["w"]), d(t["dxa"]), d(t["a"]), pr["p"], t["seed"])
    assert got.dtype == pr["dtype"]
    mag = magnitude(reference.lora_grad_x, t["dy"], t["w"], t["dxa"], t["a"], pr["p"], t["seed"])
    assert_matches(got, want, pr["dtype"], "dx", mag)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 50), st.integers(0, 50), st.floats(0.0, 0.99), st.integers(-(2**63), 2**63 - 1))
def test_dropout_mask(rows, cols, p, seed):
    s = torch.tensor([seed])
    assert torch.equal(ops.dropout_mask(s, rows, cols, p), reference.dropout_mask(s, rows, cols, p))


@settings(max_examples=300, deadline=None)
@given(problems(dy_layouts=("contiguous",)), st.lists(st.integers(1, 3), min_size=0, max_size=2))
def test_layer_end_to_end(pr, lead):
    """lora_linear forward and all gradients, with extra leading dimensions, vs the reference."""
    t = problem_tensors(pr)
    n_in, dt = pr["n_in"], pr["dtype"]
    rows = pr["T"] * int(torch.tensor(lead, dtype=torch.int64).prod())
    g = torch.Generator().manual_seed(pr["values"] + 1)
    x = make_matrix(rows, n_in, dt, pr["x_layout"], g).reshape(*lead, pr["T"], n_in).requires_grad_(True)
    a, b = t["a"].clone().requires_grad_(True), t["b"].clone().requires_grad_(True)
    with using_isa(pr["isa"]):
        y = fastlora.lora_linear(x, t["w"], t["bias"], a, b, pr["scale"], pr["p"], t["seed"])
        g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dt)
        got = torch.autograd.grad(y, (x, a, b), g, allow_unused=True)

    def reference_grads(sign):
        # sign=abs gives every gradient entry as a sum of |terms|: the scale for tolerances.
        x64, a64, b64 = (sign(v.detach().double()).requires_grad_(True) for v in (x, a, b))
        scale = abs(pr["scale"]) if sign is torch.abs else pr["scale"]
        y64 = reference.lora_linear(x64.reshape(-1, n_in), sign(t["w"].double()), sign(t["bias"].double()),
                                    a64, b64, scale, pr["p"], t["seed"])
        return y64.reshape(y.shape), torch.autograd.grad(y64.reshape(y.shape), (x64, a64, b64), sign(g.double()))

    y64, want = reference_grads(lambda v: v)
    y_bound, bounds = reference_grads(torch.abs)
    # y cancels too (x W^T + b + s xa B^T): its tolerance floor is the size of its terms.
    assert_matches(y, y64, dt, "y", y_bound.abs().max().item() if y_bound.numel() else 0.0)
    for name, u, v, m in zip(("dx", "dA", "dB"), got, want, bounds):
        u = torch.zeros_like(v) if u is None else u
        # Gradients go through rounded intermediates (xa in the activation dtype): 3 roundings.
        scale = max(m.max().item(), 1e-30) if m.numel() else 1e-30
        err = (u.double() - v).abs().max().item() if v.numel() else 0.0
        assert err <= 3 * max(RTOL[dt], RTOL[u.dtype]) * scale, f"{name}: {err:.3g} vs {scale:.3g}"


def test_isas_found():
    # This machine (x86-64 with AVX-512) must exercise all three builds.
    if fastlora.extension_available() and torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert ISAS == ["baseline", "avx2", "avx512"]
    else:
        pytest.skip("not an AVX-512 machine")
