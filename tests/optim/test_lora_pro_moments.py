"""torch.ops.fastlora.lora_pro_moments (LoRA-Pro's fused moment pass) against the float64
reference, on every CPU kernel build, plus opcheck and argument errors."""

from __future__ import annotations

import itertools

import pytest
import torch

import fastlora
from conftest import assert_matches, available_isas, poisoned_allocations, requires_extension, using_isa

from helpers import HYPER, assert_moments_match, moment_bounds, moment_inputs, moment_reference

pytestmark = requires_extension
ops = torch.ops.fastlora if hasattr(torch.ops, "fastlora") else None

# (out, in, r): rank one, sizes that are not multiples of 8/16, panels of more than 512 columns,
# more rows than one row block, a rank above the vector width.
SHAPES = [(1, 1, 1), (1, 17, 1), (5, 7, 3), (33, 70, 16), (19, 1030, 5), (70, 300, 8), (129, 45, 31)]
MOMENT_DTYPES = (torch.float64, torch.float32, torch.bfloat16)


CASES = list(itertools.product(SHAPES, MOMENT_DTYPES, (torch.float32, torch.bfloat16)))


@pytest.mark.parametrize("shape,moment_dtype,factor_dtype", CASES)
def test_kernel_matches_reference(shape, moment_dtype, factor_dtype):
    if moment_dtype == torch.float64:
        factor_dtype = torch.float64
    inputs = moment_inputs(*shape, moment_dtype, factor_dtype)
    (ref_a, ref_b), ref_m, ref_v = moment_reference(*inputs, step=3)
    mag_a, mag_b = moment_bounds(inputs[2], inputs[3])
    compute = torch.float64 if moment_dtype == torch.float64 else torch.float32
    for isa in available_isas():
        exp_avg, exp_avg_sq = inputs[0].clone(), inputs[1].clone()
        with using_isa(isa), poisoned_allocations():
            grad_a, grad_b = ops.lora_pro_moments(exp_avg, exp_avg_sq, *inputs[2:], step=3, **HYPER)
        assert grad_a.dtype == compute and grad_b.dtype == compute
        assert_matches(grad_a, ref_a, compute, f"{isa} grad_A", magnitude=mag_a)
        assert_matches(grad_b, ref_b, compute, f"{isa} grad_B", magnitude=mag_b)
        assert exp_avg.dtype == moment_dtype and exp_avg_sq.dtype == moment_dtype
        assert_moments_match(exp_avg, exp_avg_sq, ref_m, ref_v, isa)


def test_fresh_moments_first_step_float64():
    # Step 1 from zero moments: D = g / (|g| + eps) exactly as the reference computes it.
    exp_avg, exp_avg_sq, a, b, ga0, gb0 = moment_inputs(21, 37, 4, torch.float64, torch.float64, seed=3)
    exp_avg.zero_(), exp_avg_sq.zero_()
    (ref_a, ref_b), ref_m, ref_v = moment_reference(exp_avg, exp_avg_sq, a, b, ga0, gb0, step=1)
    grad_a, grad_b = ops.lora_pro_moments(exp_avg, exp_avg_sq, a, b, ga0, gb0, step=1, **HYPER)
    assert_matches(grad_a, ref_a, torch.float64, "grad_A")
    assert_matches(grad_b, ref_b, torch.float64, "grad_B")
    assert_matches(exp_avg, ref_m, torch.float64, "exp_avg")
    assert_matches(exp_avg_sq, ref_v, torch.float64, "exp_avg_sq")


def test_strided_factors_and_determinism():
    inputs = moment_inputs(40, 90, 6, torch.float32, torch.float32, seed=5, layout="transposed")
    runs = []
    for _ in range(2):
        m, v = inputs[0].clone(), inputs[1].clone()
        runs.append((*ops.lora_pro_moments(m, v, *inputs[2:], step=2, **HYPER), m, v))
    for first, second in zip(*runs):
        assert torch.equal(first, second), "two runs on the same inputs differ"
    (ref_a, ref_b), _, _ = moment_reference(*inputs, step=2)
    mag_a, mag_b = moment_bounds(inputs[2], inputs[3])
    assert_matches(runs[0][0], ref_a, torch.float32, "grad_A", magnitude=mag_a)
    assert_matches(runs[0][1], ref_b, torch.float32, "grad_B", magnitude=mag_b)


def test_python_wrapper_dispatches():
    inputs = moment_inputs(9, 11, 2, torch.float32, torch.float32, seed=1)
    assert fastlora._ops.lora_pro_kernel_applies(inputs[0], 2)
    with fastlora.use_backend("reference"):
        assert not fastlora._ops.lora_pro_kernel_applies(inputs[0], 2)
        m, v = inputs[0].clone(), inputs[1].clone()
        ref = fastlora._ops.lora_pro_moments(m, v, *inputs[2:], step=1, **HYPER)
    m2, v2 = inputs[0].clone(), inputs[1].clone()
    fused = fastlora._ops.lora_pro_moments(m2, v2, *inputs[2:], step=1, **HYPER)
    for got, want in zip(fused, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_opcheck():
    exp_avg, exp_avg_sq, a, b, ga0, gb0 = moment_inputs(6, 13, 3, torch.bfloat16, torch.float32, seed=2)
    torch.library.opcheck(
        ops.lora_pro_moments.default, (exp_avg, exp_avg_sq, a, b, ga0, gb0, 1.5, 0.9, 0.999, 1e-8, 4)
    )


def _err_inputs():
    return moment_inputs(4, 6, 2, torch.float32, torch.float32)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda t: (t[0].half(), t[1].half(), *t[2:]), "moments must be float64, float32 or bfloat16"),
        (lambda t: (t[0], t[1].double(), *t[2:]), "must match exp_avg"),
        (lambda t: (t[0].t().contiguous(), t[1].t().contiguous(), *t[2:]), "lora_A has shape"),
        (lambda t: (t[0][:, ::2], t[1][:, ::2], t[2][:, ::2], t[3], t[4][:, ::2], t[5]), "must be contiguous"),
        (lambda t: (t[0], t[0], *t[2:]), "must be different tensors"),
        (lambda t: (t[0], t[1], t[2], t[3][:, :1], t[4], t[5]), "lora_B has shape"),
        (lambda t: (t[0], t[1], t[2], t[3], t[4][:1], t[5]), "grad_A0 has shape"),
        (lambda t: (t[0], t[1], t[2].int(), *t[3:]), "lora_A must be float64"),
    ],
)
def test_op_errors(mutate, message):
    args = mutate(_err_inputs())
    with pytest.raises(RuntimeError, match=message):
        ops.lora_pro_moments(*args, step=1, **HYPER)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(step=0), "step counts from 1"),
        (dict(beta1=1.0), r"betas must be in \[0, 1\)"),
        (dict(eps=-1.0), "eps must be finite"),
        (dict(scale=float("inf")), "scale must be finite"),
    ],
)
def test_op_hyperparameter_errors(kwargs, message):
    args = {**HYPER, "step": 1, **kwargs}
    with pytest.raises(RuntimeError, match=message):
        ops.lora_pro_moments(*_err_inputs(), **args)
