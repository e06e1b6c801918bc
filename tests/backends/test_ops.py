"""Every torch.ops.fastlora operator against the float64 reference, plus opcheck and errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastlora.testing import reference
from conftest import (
    DTYPES,
    LAYOUTS,
    assert_matches,
    magnitude,
    make_matrix,
    poisoned_allocations,
    requires_extension,
    seed_tensor,
)

from helpers import op_inputs, opcheck_samples

pytestmark = requires_extension
ops = torch.ops.fastlora if hasattr(torch.ops, "fastlora") else None

# (T, in, out, r): one token, rank one, sizes that are not multiples of 8/16, wide and deep.
SHAPES = [(1, 1, 1, 1), (1, 17, 9, 1), (5, 7, 6, 3), (33, 70, 45, 16), (64, 300, 129, 8), (130, 31, 260, 31)]


def _d(t):
    return None if t is None else t.double()


CASES = list(itertools.product(SHAPES, DTYPES, LAYOUTS[:2], (0.0, 0.3)))


@pytest.mark.parametrize("shape,dtype,layout,p", CASES)
def test_ops_match_reference(shape, dtype, layout, p):
    T, n_in, n_out, r = shape
    x, w, bias, a, b, dy = op_inputs(T, n_in, n_out, r, dtype, layout)
    seed = seed_tensor(99)
    s = 1.7
    with poisoned_allocations():
        y, xa = ops.lora_forward(x, w, bias, a, b, s, p, seed)
        xa_only = ops.lora_down(x, a, p, seed)
        up = ops.lora_up(y, xa, b, s)
        dxa, d_b = ops.lora_dy_products(dy, xa, b, s)
        d_a = ops.lora_grad_A(x, dxa, p, seed, a.dtype)
        dx = ops.lora_grad_x(dy, w, dxa, a, p, seed)

    y_ref, xa_ref = reference.lora_forward(_d(x), _d(w), _d(bias), _d(a), _d(b), s, p, seed)
    assert y.dtype == dtype and xa.dtype == dtype
    assert_matches(xa, xa_ref, dtype, "xa")
    assert torch.equal(xa, xa_only), "lora_down and lora_forward disagree on xa"
    # The rank-r term uses the rounded xa, as the reference does when given it.
    y_ref = reference.lora_up(torch.nn.functional.linear(_d(x), _d(w), _d(bias)), _d(xa), _d(b), s)
    assert_matches(y, y_ref, dtype, "y")
    assert_matches(up, reference.lora_up(_d(y), _d(xa), _d(b), s), dtype, "lora_up")

    dxa_ref, d_b_ref = reference.lora_dy_products(_d(dy), _d(xa), _d(b), s)
    assert dxa.dtype == reference.accumulation_dtype(dtype) and d_b.dtype == b.dtype
    assert_matches(dxa, dxa_ref, dtype if dtype == torch.float64 else torch.float32, "dxa")
    assert_matches(d_b, d_b_ref, dtype if dtype == torch.float64 else torch.float32, "dB")
    d_a_ref = reference.lora_grad_A(_d(x), _d(dxa), p, seed, torch.float64)
    assert_matches(d_a, d_a_ref, dtype if dtype == torch.float64 else torch.float32, "dA")
    dx_ref = reference.lora_grad_x(_d(dy), _d(w), _d(dxa), _d(a), p, seed)
    assert_matches(dx, dx_ref, dtype, "dx")


@pytest.mark.parametrize("adapter_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_dtypes(dtype, adapter_dtype):
    x, w, bias, a, b, dy = op_inputs(9, 19, 23, 4, dtype, "strided", adapter_dtype)
    y, xa = ops.lora_forward(x, w, None, a, b, 0.5, 0.0, None)
    y_ref, _ = reference.lora_forward(_d(x), _d(w), None, _d(a), _d(b), 0.5, 0.0, None)
    assert_matches(y, y_ref, dtype, "y")
    dxa, d_b = ops.lora_dy_products(dy, xa, b, 0.5)
    assert d_b.dtype == adapter_dtype
    assert ops.lora_grad_A(x, dxa, 0.0, None, adapter_dtype).dtype == adapter_dtype


def test_broadcast_gradient_and_empty_batch():
    # The gradient of y.sum() arrives as an expanded tensor with zero strides.
    x, w, bias, a, b, _ = op_inputs(12, 10, 6, 2, torch.float64, "contiguous")
    dy = torch.ones(1, 6, dtype=torch.float64).expand(12, 6)
    _, xa = ops.lora_forward(x, w, bias, a, b, 2.0, 0.0, None)
    dxa, d_b = ops.lora_dy_products(dy, xa, b, 2.0)
    dxa_ref, d_b_ref = reference.lora_dy_products(dy, xa, b, 2.0)
    assert_matches(dxa, dxa_ref, torch.float64, "dxa")
    assert_matches(d_b, d_b_ref, torch.float64, "dB")
    assert_matches(ops.lora_grad_x(dy, w, dxa, a, 0.0, None), reference.lora_grad_x(dy, w, dxa, a, 0.0, None),
                   torch.float64, "dx")

    x0 = x[:0]
    y0, xa0 = ops.lora_forward(x0, w, bias, a, b, 2.0, 0.1, seed_tensor())
    assert y0.shape == (0, 6) and xa0.shape == (0, 2)
    dxa0, d_b0 = ops.lora_dy_products(torch.empty(0, 6, dtype=torch.float64), xa0, b, 2.0)
    assert dxa0.shape == (0, 2) and torch.equal(d_b0, torch.zeros_like(b))
    assert torch.equal(ops.lora_grad_A(x0, dxa0, 0.1, seed_tensor(), a.dtype), torch.zeros_like(a))


def test_dropout_mask_matches_reference_and_statistics():
    seed = seed_tensor(7)
    for rows, cols, p in [(1, 1, 0.5), (3, 5, 0.25), (17, 33, 0.9), (8, 8, 0.0)]:
        assert torch.equal(ops.dropout_mask(seed, rows, cols, p), reference.dropout_mask(seed, rows, cols, p))
    # Rows of a taller matrix, starting at even and odd element counters.
    full = reference.dropout_mask(seed, 9, 7, 0.5)
    for first in (0, 1, 4):
        assert torch.equal(reference.dropout_mask(seed, 3, 7, 0.5, first_row=first), full[first : first + 3])
    # Keep-rate within 1% of 1 - p over 10^6 draws; different seeds give different masks.
    for p in (0.05, 0.1, 0.5):
        m = ops.dropout_mask(seed, 1000, 1000, p)
        assert abs(m.float().mean().item() - (1 - p)) < 0.01 * (1 - p)
        other = ops.dropout_mask(seed_tensor(8), 1000, 1000, p)
        agree = (m == other).float().mean().item()
        expected = (1 - p) ** 2 + p**2  # independent masks agree this often
        assert abs(agree - expected) < 0.01


def test_dropout_is_applied_by_every_op_consistently():
    # Dropped inputs must not influence xa, dA or the low-rank part of dx.
    x, w, bias, a, b, dy = op_inputs(16, 40, 12, 5, torch.float64, "contiguous")
    seed, p = seed_tensor(3), 0.5
    mask = ops.dropout_mask(seed, 16, 40, p)
    x_changed = torch.where(mask, x, x + 100.0)  # only dropped elements differ
    assert torch.equal(ops.lora_down(x, a, p, seed), ops.lora_down(x_changed, a, p, seed))
    dxa = torch.randn(16, 5, dtype=torch.float64)
    assert torch.equal(ops.lora_grad_A(x, dxa, p, seed, a.dtype), ops.lora_grad_A(x_changed, dxa, p, seed, a.dtype))
    low_rank = ops.lora_grad_x(dy, torch.zeros_like(w), dxa, a, p, seed)
    assert torch.all(low_rank[~mask] == 0) and torch.all(low_rank[mask] != 0)


@pytest.mark.parametrize("name,args", opcheck_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(ops, name).default, args)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda x, w, a, b: ops.lora_down(x[0], a, 0.0, None), "x must be 2-D"),
        (lambda x, w, a, b: ops.lora_down(x, a[:, :-1], 0.0, None), "input features"),
        (lambda x, w, a, b: ops.lora_down(x.int(), a, 0.0, None), "must be float64, float32"),
        (lambda x, w, a, b: ops.lora_down(x, a, 0.1, None), "needs a seed"),
        (lambda x, w, a, b: ops.lora_down(x, a, 1.0, seed_tensor()), r"dropout_p must be in \[0, 1\)"),
        (lambda x, w, a, b: ops.lora_down(x, a, 0.1, torch.tensor([1.0])), "one-element int64"),
        (lambda x, w, a, b: ops.lora_down(x, a[:0], 0.0, None), "rank must be at least 1"),
        (lambda x, w, a, b: ops.lora_forward(x, w.double(), None, a, b, 1.0, 0.0, None), "weight is"),
        (lambda x, w, a, b: ops.lora_forward(x, w, None, a, b[:, :1], 1.0, 0.0, None), "lora_B has rank"),
        (lambda x, w, a, b: ops.lora_forward(x, w, None, a, b, float("nan"), 0.0, None), "scale must be finite"),
        (lambda x, w, a, b: ops.lora_forward(x, w[:-1], None, a, b, 1.0, 0.0, None), "weight has shape"),
    ],
)
def test_op_errors(call, message):
    x, w, bias, a, b, _ = op_inputs(4, 6, 5, 2, torch.float32, "contiguous")
    with pytest.raises(RuntimeError, match=message):
        call(x, w, a, b)


def test_poison_is_active():
    # Guards the poisoned-output checks above against a torch that stops filling memory.
    with poisoned_allocations():
        assert torch.isnan(torch.empty(64)).all()


def test_indices_beyond_2_to_the_31():
    # 2^31 + 3 * 2^16 elements without the memory: every row of x is the same storage.
    n_in, T = 1 << 16, (1 << 15) + 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, n_in, generator=g).expand(T, n_in)
    a = torch.randn(1, n_in, generator=g)
    seed, p = seed_tensor(5), 0.5
    xa = ops.lora_down(x, a, p, seed)
    last = 3
    mask = reference.dropout_mask(seed, last, n_in, p, first_row=T - last)
    want = reference.dropout(x[-last:].double(), p, None, mask) @ a.double().t()
    assert_matches(xa[-last:], want, torch.float32, "xa of the last rows")
    # Every row sees a different mask, so the rows differ.
    assert xa[0].item() != xa[-1].item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ("contiguous", "transposed", "broadcast"))
def test_accumulate_outer(dtype, layout):
    g = torch.Generator().manual_seed(3)
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    acc = make_matrix(9, 14, acc_dtype, "contiguous", g)
    dy, x = make_matrix(300, 9, dtype, layout, g), make_matrix(300, 14, dtype, "strided", g)
    want = acc.double() + 0.25 * dy.double().t() @ x.double()
    before = acc.data_ptr()
    ops.accumulate_outer(acc, dy, x, 0.25)
    assert acc.data_ptr() == before and acc.dtype == acc_dtype
    assert_matches(acc, want, acc_dtype, "acc", magnitude(lambda a, d, v: a + 0.25 * d.t() @ v, acc, dy, x))
    with pytest.raises(RuntimeError, match="acc must be a 2-D float32 or float64"):
        ops.accumulate_outer(acc.half(), dy, x, 1.0)
    with pytest.raises(RuntimeError, match="acc has shape"):
        ops.accumulate_outer(acc.t().contiguous(), dy, x, 1.0)
