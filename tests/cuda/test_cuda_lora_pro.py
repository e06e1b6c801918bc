"""GPU tests (skipped without CUDA): the CUDA lora_pro_moments kernel against the float64
reference, its rank limit, determinism, and LoRAPro on CUDA against the CPU."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import fastlora
from fastlora._extension import compiled_kernel
from conftest import assert_matches
from helpers import HYPER, assert_moments_match, moment_bounds, moment_inputs, moment_reference

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not compiled_kernel("lora_pro_moments", "cuda"), reason="extension built without CUDA"),
]

# Rank one, odd sizes, partial tiles and regions, the rank-chunk boundary, the rank limits.
SHAPES = [(1, 1, 1), (5, 7, 3), (33, 70, 16), (130, 257, 17), (300, 1030, 8), (64, 4100, 64), (200, 300, 128)]
MOMENT_DTYPES = (torch.float64, torch.float32, torch.bfloat16)


@pytest.mark.parametrize("shape,moment_dtype", list(itertools.product(SHAPES, MOMENT_DTYPES)))
def test_cuda_kernel_matches_reference(shape, moment_dtype):
    if moment_dtype == torch.float64 and shape[2] > 32:
        pytest.skip("float64 moments run ranks up to 32 on CUDA")
    factor_dtype = torch.float64 if moment_dtype == torch.float64 else torch.float32
    inputs = moment_inputs(*shape, moment_dtype, factor_dtype)
    (ref_a, ref_b), ref_m, ref_v = moment_reference(*inputs, step=3)
    mag_a, mag_b = moment_bounds(inputs[2], inputs[3])
    cuda = [t.cuda() for t in inputs]
    grad_a, grad_b = torch.ops.fastlora.lora_pro_moments(*cuda, step=3, **HYPER)
    compute = torch.float64 if moment_dtype == torch.float64 else torch.float32
    assert grad_a.dtype == compute and grad_a.is_cuda
    assert_matches(grad_a.cpu(), ref_a, compute, "grad_A", magnitude=mag_a)
    assert_matches(grad_b.cpu(), ref_b, compute, "grad_B", magnitude=mag_b)
    assert_moments_match(cuda[0], cuda[1], ref_m, ref_v)


def test_cuda_kernel_is_deterministic():
    inputs = [t.cuda() for t in moment_inputs(1000, 3000, 16, torch.bfloat16, torch.float32)]
    runs = []
    for _ in range(2):
        m, v = inputs[0].clone(), inputs[1].clone()
        runs.append((*torch.ops.fastlora.lora_pro_moments(m, v, *inputs[2:], step=2, **HYPER), m, v))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_rank_above_the_cuda_limit_falls_back_to_the_reference():
    inputs = [t.cuda() for t in moment_inputs(50, 60, 129, torch.float32, torch.float32)]
    with pytest.raises(RuntimeError, match="above the CUDA kernel's limit"):
        torch.ops.fastlora.lora_pro_moments(inputs[0].clone(), inputs[1].clone(), *inputs[2:], step=1, **HYPER)
    assert not fastlora._ops.lora_pro_kernel_applies(inputs[0], 129)
    grad_a, _ = fastlora._ops.lora_pro_moments(inputs[0], inputs[1], *inputs[2:], step=1, **HYPER)
    assert grad_a.is_cuda and torch.isfinite(grad_a).all()


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_lora_pro_on_cuda_matches_cpu(mode):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 200), torch.nn.Tanh(), torch.nn.Linear(200, 40))
    fastlora.inject(model, r=8, lora_alpha=16, rank_pattern={"2": 4})
    gpu = copy.deepcopy(model).cuda()
    opts = [fastlora.optim.LoRAPro(m, lr=1e-3, mode=mode, moment_dtype=torch.float32) for m in (model, gpu)]
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 96, generator=g), torch.randn(32, 40, generator=g)
        for m, opt, dev in ((model, opts[0], "cpu"), (gpu, opts[1], "cuda")):
            (m(x.to(dev)) - y.to(dev)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(model.parameters(), gpu.parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-3, atol=1e-5)
