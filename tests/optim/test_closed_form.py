"""LoRA-Pro's closed form (fastlora.optim.closed_form) in float64 against its definition: the
tangent-space projection, optimality against perturbations and brute-force least squares, the
Sylvester solver, B = 0 and rank-deficient adapters."""

from __future__ import annotations

import pytest
import torch

from fastlora.optim import equivalent_gradient, lora_pro_gradients, solve_sylvester
from fastlora.optim.closed_form import X_MODES

F64 = torch.float64
# (out, in, r): rank one, odd sizes, wide and tall.
SHAPES = [(1, 1, 1), (7, 5, 1), (20, 15, 4), (9, 33, 7), (64, 48, 16)]


def _problem(out, n_in, r, seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, r, n_in, dtype=F64, generator=g)
    b = torch.randn(*batch, out, r, dtype=F64, generator=g)
    full = torch.randn(*batch, out, n_in, dtype=F64, generator=g)
    return a, b, full


def _lora_grads(a, b, full, s):
    return s * b.mT @ full, s * full @ a.mT


def _projection(a, b, full):
    p_b = b @ torch.linalg.pinv(b)
    p_a = torch.linalg.pinv(a) @ a
    return p_b @ full + full @ p_a - p_b @ full @ p_a


def _rel(x, y):
    return ((x - y).norm() / y.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("x_mode", X_MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_equivalent_gradient_is_the_tangent_projection(shape, x_mode):
    a, b, full = _problem(*shape, seed=sum(shape))
    s = 1.7
    g_a, g_b = _lora_grads(a, b, full, s)
    h_a, h_b = lora_pro_gradients(a, b, g_a, g_b, s, x_mode=x_mode, ridge=0.0)
    assert h_a.dtype == F64 and h_a.shape == a.shape and h_b.shape == b.shape
    assert _rel(equivalent_gradient(a, b, h_a, h_b, s), _projection(a, b, full)) < 1e-10


def test_x_changes_the_adapter_gradients_not_the_equivalent_gradient():
    a, b, full = _problem(12, 10, 3, seed=4)
    g_a, g_b = _lora_grads(a, b, full, 0.5)
    results = {m: lora_pro_gradients(a, b, g_a, g_b, 0.5, x_mode=m, ridge=0.0) for m in X_MODES}
    eq = {m: equivalent_gradient(a, b, *h, 0.5) for m, h in results.items()}
    assert _rel(eq["sylvester"], eq["zero"]) < 1e-12 and _rel(eq["symmetry"], eq["zero"]) < 1e-12
    assert _rel(results["sylvester"][0], results["zero"][0]) > 1e-3  # X really is used
    assert _rel(results["symmetry"][0], results["sylvester"][0]) > 1e-3


def test_batch_with_per_layer_scales_equals_single_layers():
    a, b, full = _problem(11, 8, 3, seed=2, batch=(4,))
    scales = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=F64)
    g_a, g_b = _lora_grads(a, b, full, scales.view(-1, 1, 1))
    h_a, h_b = lora_pro_gradients(a, b, g_a, g_b, scales)
    for k in range(4):
        one_a, one_b = lora_pro_gradients(a[k], b[k], g_a[k], g_b[k], float(scales[k]))
        assert _rel(h_a[k], one_a) < 1e-13 and _rel(h_b[k], one_b) < 1e-13


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_no_perturbation_does_better(shape):
    a, b, full = _problem(*shape, seed=7)
    s = 2.0
    h_a, h_b = lora_pro_gradients(a, b, *_lora_grads(a, b, full, s), s)
    best = (equivalent_gradient(a, b, h_a, h_b, s) - full).norm()
    g = torch.Generator().manual_seed(1)
    for eps in (1e-6, 1e-3, 1e-1):
        for _ in range(30):
            d_a = eps * torch.randn(h_a.shape, dtype=F64, generator=g)
            d_b = eps * torch.randn(h_b.shape, dtype=F64, generator=g)
            worse = (equivalent_gradient(a, b, h_a + d_a, h_b + d_b, s) - full).norm()
            assert worse >= best * (1 - 1e-12), f"a perturbation of size {eps} did better"


def _null_space(m):
    u, sv, vh = torch.linalg.svd(m)
    rank = int((sv > sv.max() * 1e-12 * max(m.shape)).sum())
    return vh[rank:].mT


@pytest.mark.parametrize("shape", [(3, 4, 1), (4, 3, 2), (5, 4, 2), (4, 6, 3)])
def test_matches_brute_force_least_squares(shape):
    """The closed form against the explicit linear least-squares problem: the fitted value
    s (B hA + hB A) of min ||s (B hA + hB A) - G||, and, among all minimisers, the one closest to
    the LoRA gradients (the Sylvester choice of X)."""
    out, n_in, r = shape
    a, b, full = _problem(out, n_in, r, seed=11)
    s = 1.3
    g_a, g_b = _lora_grads(a, b, full, s)
    # Row-major vec: vec(B hA) = (B kron I_in) vec(hA), vec(hB A) = (I_out kron A^T) vec(hB).
    a_t = a.mT.flatten().reshape(n_in, r)  # kron needs standard strides
    m = s * torch.cat([torch.kron(b, torch.eye(n_in, dtype=F64)), torch.kron(torch.eye(out, dtype=F64), a_t)], 1)
    solution = torch.linalg.lstsq(m, full.reshape(-1, 1), driver="gelsd").solution
    fitted = (m @ solution).reshape(out, n_in)
    null = _null_space(m)
    lora = torch.cat([g_a.reshape(-1, 1), g_b.reshape(-1, 1)])
    closest = solution + null @ (null.mT @ (lora - solution))
    h_a, h_b = lora_pro_gradients(a, b, g_a, g_b, s, ridge=0.0)
    assert _rel(equivalent_gradient(a, b, h_a, h_b, s), fitted) < 1e-10
    assert _rel(torch.cat([h_a.reshape(-1, 1), h_b.reshape(-1, 1)]), closest) < 1e-9


@pytest.mark.parametrize("r", [1, 3, 8, 16])
def test_sylvester_residual_float64(r):
    g = torch.Generator().manual_seed(r)
    m1 = torch.randn(r, 2 * r + 3, dtype=F64, generator=g)
    m2 = torch.randn(r, r + 5, dtype=F64, generator=g)
    p, q = m1 @ m1.mT, 1e-3 * m2 @ m2.mT  # PSD, very different scales
    c = torch.randn(r, r, dtype=F64, generator=g)
    x = solve_sylvester(p, q, c)
    assert (p @ x + x @ q - c).norm() / c.norm() <= 1e-10


def test_sylvester_of_the_closed_form_float64():
    # The X the closed form uses solves (B^T B) X + X (A A^T) = -(1/s^2)(B^T B)^{-1} gA A^T.
    a, b, full = _problem(30, 25, 6, seed=5)
    s = 0.7
    g_a, g_b = _lora_grads(a, b, full, s)
    h_a, _ = lora_pro_gradients(a, b, g_a, g_b, s, ridge=0.0)
    btb, aat = b.mT @ b, a @ a.mT
    base = torch.linalg.solve(btb, g_a) / s**2
    x = (h_a - base) @ torch.linalg.pinv(a)  # hA = base + X A, A has full row rank
    residual = btb @ x + x @ aat + torch.linalg.solve(btb, g_a @ a.mT) / s**2
    assert residual.norm() / x.norm() <= 1e-10


@pytest.mark.parametrize("x_mode", X_MODES)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_b_zero_gives_finite_results(x_mode, dtype):
    a, _, full = _problem(16, 12, 4, seed=3)
    b = torch.zeros(16, 4, dtype=F64)
    s = 2.0
    g_a, g_b = _lora_grads(a, b, full, s)
    ridge = 0.0 if dtype == F64 else 1e-8  # the default ridge moves float64 results by ~1e-9
    h_a, h_b = lora_pro_gradients(a.to(dtype), b.to(dtype), g_a.to(dtype), g_b.to(dtype), s, x_mode, ridge)
    assert torch.isfinite(h_a).all() and torch.isfinite(h_b).all()
    assert torch.equal(h_a, torch.zeros_like(h_a))
    # hB = (1/s^2) gB (A A^T)^{-1}: the equivalent gradient is G P_A.
    p_a = torch.linalg.pinv(a) @ a
    tol = 1e-10 if dtype == F64 else 2e-2
    assert _rel(equivalent_gradient(a, b, h_a.double(), h_b.double(), s), full @ p_a) < tol


def test_rank_deficient_adapters_use_the_pseudo_inverse():
    a, b, full = _problem(15, 13, 4, seed=9)
    b[:, 3] = b[:, 0] - 2 * b[:, 1]  # B has rank 3
    a[2] = 0.0  # A has rank 3
    s = 1.0
    h_a, h_b = lora_pro_gradients(a, b, *_lora_grads(a, b, full, s), s, ridge=0.0)
    assert torch.isfinite(h_a).all() and torch.isfinite(h_b).all()
    assert _rel(equivalent_gradient(a, b, h_a, h_b, s), _projection(a, b, full)) < 1e-9


def test_float32_is_close_to_float64():
    a, b, full = _problem(200, 150, 8, seed=1)
    s = 2.0
    g_a, g_b = _lora_grads(a, b, full, s)
    want = lora_pro_gradients(a, b, g_a, g_b, s)
    got = lora_pro_gradients(a.float(), b.float(), g_a.float(), g_b.float(), s)
    assert got[0].dtype == torch.float32
    assert _rel(got[0].double(), want[0]) < 1e-4 and _rel(got[1].double(), want[1]) < 1e-4


@pytest.mark.parametrize(
    "args,message",
    [
        (lambda a, b, ga, gb: (a[0], b, ga, gb), "both be 2-D"),
        (lambda a, b, ga, gb: (a, b[:, :1], ga, gb[:, :1]), "does not fit"),
        (lambda a, b, ga, gb: (a, b, ga[:1], gb), "grad_A has shape"),
        (lambda a, b, ga, gb: (a, b, ga, gb.mT), "grad_B has shape"),
    ],
)
def test_shape_errors(args, message):
    a, b, full = _problem(5, 4, 2)
    with pytest.raises(ValueError, match=message):
        lora_pro_gradients(*args(a, b, *_lora_grads(a, b, full, 1.0)), 1.0)


def test_unknown_x_mode():
    a, b, full = _problem(5, 4, 2)
    with pytest.raises(ValueError, match="unknown x_mode 'exact'"):
        lora_pro_gradients(a, b, *_lora_grads(a, b, full, 1.0), 1.0, x_mode="exact")
