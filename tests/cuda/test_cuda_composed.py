"""GPU tests (skipped without CUDA): the composed path, the default on CUDA with the kernels off."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastlora
from fastlora.testing import reference
from conftest import RTOL, assert_matches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def kernels_off():
    previous = fastlora.set_cuda_layer_kernels(False)
    yield
    fastlora.set_cuda_layer_kernels(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_matches_float64_reference(dtype, p):
    T, n_in, n_out, r = 333, 200, 120, 7
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(n_out, n_in, generator=g) / n_in**0.5, torch.randn(n_out, generator=g)
    a, b = torch.randn(r, n_in, generator=g) / n_in**0.5, torch.randn(n_out, r, generator=g)
    x, dy = torch.randn(T, n_in, generator=g), torch.randn(T, n_out, generator=g)
    seed = torch.tensor([5])
    dtypes = (dtype, dtype, dtype, torch.float32, torch.float32)
    cuda = [t.to("cuda", dt) for t, dt in zip((x, w, bias, a, b), dtypes)]
    for i in (0, 3, 4):
        cuda[i].requires_grad_(True)
    y = fastlora.lora_linear(*cuda, 1.5, p, seed.cuda())
    got = [y] + list(torch.autograd.grad(y, (cuda[0], cuda[3], cuda[4]), dy.to("cuda", dtype)))

    ref = [t.to(dtype).double() for t in (x, w, bias)] + [a.double(), b.double()]
    for i in (0, 3, 4):
        ref[i].requires_grad_(True)
    y64 = reference.lora_linear(*ref, 1.5, p, seed)
    want = [y64] + list(torch.autograd.grad(y64, (ref[0], ref[3], ref[4]), dy.to(dtype).double()))
    assert_matches(got[0].cpu(), want[0], dtype, "y")
    # Gradients pass through rounded intermediates (xa, dxa in x's dtype): two roundings.
    for name, u, v in zip(("dx", "dA", "dB"), got[1:], want[1:]):
        err = (u.cpu().double() - v).abs().max() / v.abs().max()
        assert err <= 2 * RTOL[dtype], f"{name}: relative error {err:.3g}"


def test_memory_held_after_forward_is_frozen_plus_T_r():
    T, n, r = 4096, 1024, 16
    base = nn.Linear(n, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    layer = fastlora.LoRALinear(copy.deepcopy(base), r=r, lora_alpha=2 * r, lora_dropout=0.05).train()
    x = torch.randn(T, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def held(module):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = module(x)
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() - before, y

    frozen, _ = held(base)
    ours, _ = held(layer)
    # xa (T x r) and the one-element seed, each rounded up to the allocator's 512-byte blocks.
    assert ours - frozen <= T * r * 2 + 1024, f"the composed path holds {ours - frozen} bytes beyond the frozen layer"
