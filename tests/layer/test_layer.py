"""fastlora.LoRALinear and fastlora.lora_linear: semantics, gradients, dtypes, dropout, merge."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fastlora
from fastlora.testing import reference
from fastlora.functional import kernel_path_applies
from conftest import assert_matches, requires_extension, seed_tensor, traced_graphs


def _layer(n_in, n_out, r, dtype=torch.float64, adapter_dtype=torch.float64, p=0.0, bias=True, seed=0, rslora=False):
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
    layer = fastlora.LoRALinear(base, r=r, lora_alpha=2 * r + 1, lora_dropout=p, adapter_dtype=adapter_dtype,
                                use_rslora=rslora)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would hide most of the backward
    return layer


def _functional_args(layer):
    return (layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B, layer.scaling)


def test_trainable_base_leaves_the_kernel_path_and_gets_gradients():
    """The kernels give no gradient of the frozen weight: a trainable base goes another way (the
    composed path; its gradcheck with a trainable base is in test_conformance.py)."""
    layer = _layer(6, 5, 2, p=0.3)
    layer.base_layer.weight.requires_grad_(True)
    layer.base_layer.bias.requires_grad_(True)
    w, b, a, bb, s = _functional_args(layer)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert not kernel_path_applies(x, w, b, a, bb)
    y = fastlora.lora_linear(x, w, b, a, bb, s, 0.3, seed_tensor(5))
    dw, db = torch.autograd.grad(y.sum(), (w, b))
    assert torch.equal(db, torch.full_like(b, 4.0))  # every row of y adds the bias once
    torch.testing.assert_close(dw, x.detach().sum(0).expand_as(dw), rtol=1e-12, atol=1e-12)  # d(x W^T)/dW


def test_dropout_stores_no_mask_and_reproduces():
    layer = _layer(256, 64, 4, dtype=torch.float32, adapter_dtype=torch.float32, p=0.1).train()
    x = torch.randn(128, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.manual_seed(3)
        y = layer(x)
    # Saved: x (by reference), W, A, B, xa (T x r) and the one-element seed; no mask, no T x out.
    assert not any(t.dtype == torch.bool for t in saved)
    assert sum(t.numel() for t in saved if t.data_ptr() != x.data_ptr()) == (
        64 * 256 + 4 * 256 + 64 * 4 + 128 * 4 + 1
    )
    assert any(t.data_ptr() == x.data_ptr() for t in saved), "x should be saved by reference, not copied"
    y.sum().backward()
    # torch.manual_seed reproduces the mask, like nn.Dropout; eval mode disables dropout.
    torch.manual_seed(3)
    assert torch.equal(layer(x), y)
    assert not torch.equal(layer(x), y)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


@requires_extension
def test_dropout_keep_rate_through_the_layer():
    # With A = ones, B = I (r = in): xa = drop(x) summed; use x = 1 to count kept elements.
    layer = fastlora.LoRALinear(nn.Linear(1000, 1000, bias=False), r=1, lora_alpha=1, lora_dropout=0.2)
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(1.0)
    y = layer.train()(torch.ones(1000, 1000))
    kept = y[:, 0].sum().item() * (1 - 0.2)  # each row: (#kept) / (1 - p)
    assert abs(kept / 1e6 - 0.8) < 0.008


def test_default_init_starts_at_base_and_matches_peft_scaling():
    base = nn.Linear(20, 30)
    x = torch.randn(4, 20)
    expected = base(x)
    layer = fastlora.LoRALinear(base, r=4, lora_alpha=16)
    assert layer.base_layer is base and not base.weight.requires_grad and not base.bias.requires_grad
    assert torch.equal(layer(x), expected)
    assert torch.all(layer.lora_A.abs() <= 1 / math.sqrt(20)) and torch.all(layer.lora_B == 0)
    assert layer.scaling == 4.0
    assert fastlora.LoRALinear(nn.Linear(20, 30), r=4, lora_alpha=16, use_rslora=True).scaling == 8.0
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (30, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge(dtype):
    layer = _layer(24, 18, 3, dtype=dtype, adapter_dtype=torch.float32)
    layer.eval()
    x = torch.randn(5, 24).to(dtype)
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.delta_weight()
    y = layer(x)
    layer.merge()
    assert layer.merged
    merged_ref = reference.lora_linear(x.double(), w0.double() + delta.double(), layer.base_layer.bias.double(),
                                       layer.lora_A, torch.zeros_like(layer.lora_B), 0.0)
    assert_matches(layer(x), merged_ref, dtype, "merged forward")
    assert_matches(y, merged_ref, dtype, "unmerged forward")
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    # Each of merge and unmerge rounds once to the weight's dtype.
    bound = torch.finfo(dtype).eps * (w0.double().abs() + delta.double().abs())
    assert torch.all((layer.base_layer.weight.double() - w0.double()).abs() <= bound)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_no_grad_inference_and_frozen_input():
    layer = _layer(12, 7, 2, dtype=torch.float32, adapter_dtype=torch.float32)
    x = torch.randn(3, 12)
    with torch.no_grad():
        y = layer(x)
    with torch.inference_mode():
        assert torch.equal(layer(x), y)
    out = layer(x)  # x does not require grad: only the adapters get gradients
    out.sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.base_layer.weight.grad is None


def test_autocast_runs_in_low_precision():
    layer = _layer(32, 16, 4, dtype=torch.float32, adapter_dtype=torch.float32)
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = reference.lora_linear(x.double(), *(t.double() for t in _functional_args(layer)[:4]), layer.scaling)
    assert_matches(y, ref, torch.bfloat16, "autocast y")


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(r=0), ValueError, "between 1 and"),
        (dict(r=9), ValueError, "between 1 and"),
        (dict(r=2.0), TypeError, "r must be an int"),
        (dict(lora_alpha=0), ValueError, "lora_alpha must be a positive"),
        (dict(lora_dropout=1.0), ValueError, r"lora_dropout must be in \[0, 1\)"),
        (dict(lora_dropout=-0.1), ValueError, r"lora_dropout must be in \[0, 1\)"),
        (dict(adapter_dtype=torch.int32), TypeError, "adapter_dtype"),
        (dict(init="pissa"), ValueError, "unknown init"),
    ],
)
def test_constructor_errors(kwargs, error, message):
    args = dict(r=2)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        fastlora.LoRALinear(nn.Linear(10, 8), **args)


def test_forward_errors():
    layer = fastlora.LoRALinear(nn.Linear(10, 8), r=2)
    with pytest.raises(ValueError, match="in_features=10"):
        layer(torch.randn(3, 9))
    with pytest.raises(TypeError, match="float32, bfloat16, float16 or float64"):
        layer(torch.ones(3, 10, dtype=torch.int64))
    with pytest.raises(TypeError, match="does not match the layer's weight dtype"):
        layer(torch.randn(3, 10, dtype=torch.float64))
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        fastlora.LoRALinear(nn.Conv1d(3, 3, 1), r=1)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_peft(dtype, use_rslora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(48, 40, dtype=dtype))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"], use_rslora=use_rslora)
    )
    ours = fastlora.inject(copy.deepcopy(base), ["proj"], r=8, lora_alpha=16, use_rslora=use_rslora)
    peft_layer = theirs.base_model.model.proj
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_()
        ours.proj.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.proj.lora_B.copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(2, 7, 48).to(dtype)
    y_theirs, y_ours = theirs(x), ours(x)
    assert y_ours.dtype == y_theirs.dtype == dtype
    assert_matches(y_ours, y_theirs.detach().double(), dtype, "y vs peft")
    g = torch.randn_like(y_ours)
    y_theirs.backward(g)
    y_ours.backward(g)
    assert_matches(ours.proj.lora_A.grad, peft_layer.lora_A["default"].weight.grad.double(), dtype, "dA vs peft")
    assert_matches(ours.proj.lora_B.grad, peft_layer.lora_B["default"].weight.grad.double(), dtype, "dB vs peft")


@requires_extension
def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 48), nn.GELU(), nn.Linear(48, 16))
    fastlora.inject(model, target_modules=["0", "2", "4"], r=4, lora_alpha=8, lora_dropout=0.1)
    for layer in fastlora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 9, 32)
    model.eval()
    y_eager = model(x)
    y_comp = compiled(x)
    torch.testing.assert_close(y_comp, y_eager)
    params = fastlora.trainable_parameters(model)
    g_eager = torch.autograd.grad(model(x).square().sum(), params)
    g_comp = torch.autograd.grad(compiled(x).square().sum(), params)
    for u, v in zip(g_comp, g_eager):  # inductor fuses and reorders the float32 arithmetic
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4 * v.abs().max().item())
    # Training mode with dropout compiles without graph breaks too, and masks change per call.
    model.train()
    y1, y2 = compiled(x), compiled(x)
    assert not torch.equal(y1, y2)
    torch.autograd.grad(y1.sum(), params)

    # The traced graph calls the fused op, not the reference path.
    graphs = traced_graphs(model, x)
    assert graphs and graphs[0].count("fastlora.lora_forward") == 3


# ---- a failed constructor leaves the base layer; merging rounds once -----------------------------


def test_layer_constructor_error_leaves_the_base_layer():
    linear = nn.Linear(6, 4)
    with pytest.raises(ValueError, match="unknown init"):
        fastlora.LoRALinear(linear, r=2, init="foo")
    assert linear.weight.requires_grad and linear.bias.requires_grad


def test_merge_rounds_once_into_a_low_precision_weight():
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(nn.Linear(64, 64, dtype=torch.bfloat16), r=8, lora_alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_(std=1e-2)
    w = layer.base_layer.weight.detach().clone()
    delta = layer.delta_weight()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, (w.float() + delta).to(torch.bfloat16))
    assert not torch.equal(layer.base_layer.weight, w + delta.to(torch.bfloat16))  # the test can tell them apart
