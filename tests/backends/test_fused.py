"""The fused Triton path (fastlora.fused) under Triton's interpreter on the CPU: the dropout mask
bit for bit, what it saves, the dispatch, torch.compile, autotuning and offsets. Its values and
gradients against the float64 oracle are in the layer conformance suite (tests/layer/test_conformance.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastlora
from fastlora import fused, skinny
from fastlora.testing import reference
from conftest import autograd_node, seed_tensor, small_lora_model
from helpers import check_against_the_oracle, layer_problem

# Triton's interpreter on the CPU: slow
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not fused.available(), reason="needs Triton (pip install triton)")]


@pytest.mark.parametrize("n_in", [41, 42])  # odd: a hash per element; even: one per column pair
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_grad_x_regenerates_dropout_mask_bit_for_bit(p, n_in):
    """With W = 0, dx = mask/(1-p) ⊙ (dxa A): its zeros are exactly the dropped elements."""
    T, r = 23, 3
    g = torch.Generator().manual_seed(0)
    dy, w = torch.randn(T, 7, generator=g), torch.zeros(7, n_in)
    dxa, a = torch.randn(T, r, generator=g), torch.randn(r, n_in, generator=g)
    seed = seed_tensor(99)
    dx = fused.grad_x(dy, w, dxa, a, seed, p)
    keep = reference.dropout_mask(seed, T, n_in, p)
    assert torch.equal(dx != 0, keep)
    torch.testing.assert_close(dx, torch.where(keep, dxa @ a / (1 - p), 0.0), rtol=1e-6, atol=1e-6)


def test_fused_saves_only_x_xa_and_seed():
    T, n_in, n_out, r = 12, 16, 10, 2
    x, w, b, a, bb, _ = layer_problem(T, n_in, n_out, r, torch.float32, "contiguous", True, 0)
    x.requires_grad_(True)
    a.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with fastlora.use_backend("fused"):
            y = fastlora.lora_linear(x, w, b, a, bb, 1.0, 0.2, seed_tensor(1))
    params = {t.data_ptr() for t in (w, b, a, bb)}
    activations = [t for t in saved if t.data_ptr() not in params]
    assert not any(t.dtype == torch.bool for t in saved)
    assert sum(t.numel() * t.element_size() for t in activations) == (T * n_in + T * r) * 4 + 8
    y.sum().backward()


def test_dispatch_of_the_fused_path(monkeypatch):
    # CPU tensors run it only when pinned (the interpreter emulates it); on CUDA it is a candidate
    # of measured dispatch, not trusted on its own (tests/backends/test_dispatch.py).
    x, w, b, a, bb, _ = layer_problem(4, 8, 6, 2, torch.float32, "contiguous", True, 0)
    with fastlora.use_backend("auto"):
        assert autograd_node(fastlora.lora_linear(x, w, b, a.requires_grad_(True), bb, 1.0)) != "_FusedLoRABackward"
    with fastlora.use_backend("fused"):
        assert autograd_node(fastlora.lora_linear(x, w, b, a, bb, 1.0)) == "_FusedLoRABackward"
        with pytest.raises(RuntimeError, match="does not take torch.float64"):  # float64 is not a Triton dtype
            fastlora.lora_linear(x.double(), w.double(), b.double(), a, bb, 1.0)
    monkeypatch.setattr(fused, "available", lambda: False)  # no Triton: pinning it says what to install
    with fastlora.use_backend("fused"), pytest.raises(RuntimeError, match="pip install triton"):
        fastlora.lora_linear(x, w, b, a, bb, 1.0)


@pytest.mark.parametrize("with_skinny", [False, True])
def test_torch_compile_fullgraph_through_the_fused_ops(with_skinny):
    """Without and with the skinny kernels (as on CUDA): no graph break, same values."""
    model = small_lora_model()
    x = torch.randn(2, 9, 32)
    params = fastlora.trainable_parameters(model)
    torch._dynamo.reset()  # its compilations (2 variants x 2 modes) count against no later test's limit
    try:
        with fastlora.use_backend("fused"), (skinny.forced() if with_skinny else contextlib.nullcontext()):
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break raises
            for training in (False, True):
                model.train(training)
                torch.manual_seed(1)
                want = model(x)
                g_want = torch.autograd.grad(want.square().sum(), params)
                torch.manual_seed(1)
                got = compiled(x)
                g_got = torch.autograd.grad(got.square().sum(), params)
                torch.testing.assert_close(got, want)
                for u, v in zip(g_got, g_want):
                    torch.testing.assert_close(u, v)
    finally:
        torch._dynamo.reset()


def test_64_bit_offsets_forced_on_small_tensors(monkeypatch):
    """The INDEX_64 variant (chosen where offsets reach 2^31) computes the same results."""
    monkeypatch.setattr(fused, "needs_index_64", lambda *tensors: True)
    for p in (0.0, 0.3):
        check_against_the_oracle("fused", 37, 45, 29, 3, torch.float32, "transposed", True, p, seed=8)


def test_bias_stride_is_honoured():
    g = torch.Generator().manual_seed(2)
    T, n_in, n_out, r = 19, 23, 21, 3
    x, w = torch.randn(T, n_in, generator=g), torch.randn(n_out, n_in, generator=g)
    bias = torch.randn(3 * n_out, generator=g)[1::3]  # every third element of a longer vector
    xa, b = torch.randn(T, r, generator=g), torch.randn(n_out, r, generator=g)
    y = fused.forward(x, w, bias, xa, b, 0.5)
    want = x.double() @ w.double().t() + bias.double() + 0.5 * xa.double() @ b.double().t()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_float32_input_precision_follows_torch_setting(monkeypatch):
    """TF32 unless torch's float32 matmul precision is "highest" (the interpreter runs IEEE
    either way, so the choice itself is what is checked)."""
    launched = []
    monkeypatch.setattr(fused, "_launch", lambda name, out, k, r, *args, **flags: launched.append(flags["PRECISION"]))
    x, w, xa, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(4, 2), torch.randn(6, 2)
    previous = torch.get_float32_matmul_precision()
    try:
        for setting, want in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            fused._forward_impl(x, w, None, xa, b, 1.0)
            fused._grad_x_impl(torch.randn(4, 6), w, xa, torch.randn(2, 8), None, 0.0)
            assert launched[-2:] == [want, want], setting
    finally:
        torch.set_float32_matmul_precision(previous)


def test_kernels_are_named_for_the_sanitizers_filter():
    from fastlora import fused_kernels, skinny_kernels

    names = [n for module in (fused_kernels, skinny_kernels) for n in vars(module) if n.endswith("_kernel")]
    assert len(names) == 6 and all(n.startswith("fastlora_") for n in names), names


def test_autotuning_keys_on_a_bucket_of_m_and_prunes_by_it():
    assert [fused._m_bucket(m) for m in (1, 2, 3, 1000, 1024, 1025)] == [1, 2, 4, 1024, 1024, 2048]
    for capability, limit in (((9, 0), 227), ((8, 0), 163), ((8, 6), 99)):
        configs = fused._configs(capability)
        for bucket in (1, 64, 8192):
            for element_size in (2, 4):
                kept = fused._prune(configs, bucket, element_size, capability)
                assert kept
                shortest = min(c.kwargs["BLOCK_M"] for c in configs)
                assert all(c.kwargs["BLOCK_M"] <= max(bucket, shortest) for c in kept)
                assert all(fused._smem_kib(c, element_size) <= limit for c in kept) or len(kept) == 1
        assert len(fused._prune(configs, 8192, 2, capability)) > len(fused._prune(configs, 16, 2, capability))


def test_no_autotuning_under_cuda_graph_capture(monkeypatch):
    """Captured launches use the config tuned earlier for the key, else the smallest that fits;
    outside capture the autotuner decides (None)."""
    key = ("forward", (9, 0), 128, 64, 64, 16, torch.bfloat16, ())
    assert fused._capture_config(key, 128, 2, (9, 0)) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert fused._capture_config(key, 128, 2, (9, 0)) is None
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    default = fused._capture_config(key, 128, 2, (9, 0))
    assert default in fused._prune(fused._configs((9, 0)), 128, 2, (9, 0))
    assert all(fused._smem_kib(default, 2) <= fused._smem_kib(c, 2) for c in fused._configs((9, 0)))
    tuned = fused._configs((9, 0))[0]
    monkeypatch.setitem(fused._TUNED, key, tuned)
    assert fused._capture_config(key, 128, 2, (9, 0)) is tuned
