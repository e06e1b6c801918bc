"""The composed path (fastlora.composed): what it saves for backward, torch.compile, where it is
the default, and the quantized branch's update. Its values and gradients against the float64
oracle and its gradchecks are in the layer conformance suite (tests/layer/test_conformance.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastlora
from fastlora.testing import reference
from conftest import assert_matches, autograd_node, seed_tensor, small_lora_model, traced_graphs
from helpers import layer_input, layer_params

COMPOSED = "_ComposedLoRABackward"  # the composed path's autograd Function


@pytest.fixture(autouse=True)
def composed_backend():
    with fastlora.use_backend("composed"):
        yield


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_only_x_xa_and_seed(p, dtype):
    T, n_in, n_out, r = 48, 64, 40, 4
    w, b, a, bb, s = layer_params(n_in, n_out, r, dtype=dtype, adapter_dtype=torch.float32)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    x = torch.randn(2, T // 2, n_in, dtype=dtype, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fastlora.lora_linear(x, w, b, a, bb, s, p, seed_tensor(3))
    params = {t.data_ptr() for t in (w, b, a, bb)}
    activations = [t for t in saved if t.data_ptr() not in params]
    assert not any(t.dtype == torch.bool for t in saved), "no mask is kept"
    assert sum(t.data_ptr() == x.data_ptr() for t in activations) == 1, "x is saved once, by reference"
    elsize = x.element_size()
    seed_bytes = 8 if p > 0 else 0
    assert sum(t.numel() * t.element_size() for t in activations) == x.numel() * elsize + T * r * elsize + seed_bytes
    y.sum().backward()


def test_torch_compile_fullgraph_matches_eager():
    model = small_lora_model()
    params = fastlora.trainable_parameters(model)
    x = torch.randn(2, 9, 32)
    compiled = torch.compile(model, fullgraph=True)  # a graph break raises
    model.eval()
    torch.testing.assert_close(compiled(x), model(x))
    g_eager = torch.autograd.grad(model(x).square().sum(), params)
    g_comp = torch.autograd.grad(compiled(x).square().sum(), params)
    for u, v in zip(g_comp, g_eager):  # inductor fuses and reorders the float32 arithmetic
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4 * v.abs().max().item())
    model.train()  # with dropout: same mask as eager for the same torch seed, fresh masks per call
    torch.manual_seed(4)
    y_eager = model(x)
    torch.manual_seed(4)
    y1 = compiled(x)
    torch.testing.assert_close(y1, y_eager)
    assert not torch.equal(y1, compiled(x))
    torch.autograd.grad(y1.sum(), params)
    assert traced_graphs(model, x)


def test_default_on_devices_without_kernels():
    # The meta device stands for any device fastlora has no kernels for (CUDA with the kernels
    # off goes the same way: the registry finds no trusted kernel there).
    with fastlora.use_backend("auto"):
        w, b, a, bb, s = (t.to("meta") if isinstance(t, torch.Tensor) else t for t in layer_params(8, 6, 2))
        x = torch.empty(5, 8, dtype=torch.float64, device="meta", requires_grad=True)
        assert autograd_node(fastlora.lora_linear(x, w, b, a, bb, s, 0.1, seed_tensor().to("meta"))) == COMPOSED
        # and on the CPU where the kernels do not apply (the base weight requires grad)
        w, b, a, bb, s = layer_params(8, 6, 2)
        x = torch.randn(5, 8, dtype=torch.float64)
        assert autograd_node(fastlora.lora_linear(x, w.requires_grad_(True), b, a, bb, s)) == COMPOSED


def test_default_without_the_extension():
    code = (
        "import torch, fastlora\n"
        "assert not fastlora.extension_available()\n"
        "layer = fastlora.LoRALinear(torch.nn.Linear(8, 6), r=2, lora_dropout=0.1)\n"
        "print(type(layer(torch.randn(3, 8, requires_grad=True)).grad_fn.next_functions[0][0]).__name__)\n"
    )
    env = dict(os.environ, FASTLORA_DISABLE_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "_ComposedLoRABackward"


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_update_of_a_base_output_matches_reference_and_saves_x_xa_seed(p):
    """fastlora.lora_update (a quantized base's branch) on the composed path: values and gradients
    of x, y, A, B against the reference's lora_down/lora_up, gradcheck, and what it saves."""
    T, n_in, n_out, r = 9, 13, 7, 3
    _, _, a, bb, s = layer_params(n_in, n_out, r)
    x = layer_input(T, n_in, (T,), "strided").requires_grad_(True)
    y = torch.randn(T, n_out, dtype=torch.float64, requires_grad=True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    seed = seed_tensor(17)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = fastlora.lora_update(x, y, a, bb, s, p, seed)
    assert autograd_node(got) == "_ComposedUpdateBackward"
    activations = [t for t in saved if t.data_ptr() not in {a.data_ptr(), bb.data_ptr()}]
    assert not any(t.dtype == torch.bool for t in saved), "no mask is kept"
    assert sum(t.numel() for t in activations) == T * n_in + T * r + (1 if p > 0 else 0)
    want = reference.lora_up(y, reference.lora_down(x, a, p, seed), bb, s)
    assert_matches(got, want, torch.float64, "y")
    g = torch.randn(T, n_out, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for name, u, v in zip(("dx", "dy", "dA", "dB"), torch.autograd.grad(got, (x, y, a, bb), g),
                          torch.autograd.grad(want, (x, y, a, bb), g)):
        assert_matches(u, v, torch.float64, name)
    assert torch.autograd.gradcheck(lambda *t: fastlora.lora_update(*t, s, p, seed), (x, y, a, bb))
