"""GPU tests (skipped without CUDA and Triton): the fused Triton path's dropout mask on CUDA bit for
bit, the Triton ops under torch.compile (Inductor) and under CUDA graphs after fastlora.tune, and
measured dispatch on the device (every candidate checked, nothing timed while capturing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlora
from fastlora import fused
from fastlora.testing import reference
from fastlora.backends import layer as dispatch
from fastlora.backends import measured, registry

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not fused.available(), reason="needs Triton"),
]


@pytest.fixture
def measuring(tmp_path, monkeypatch):
    """Measured dispatch on (the suite runs with it off), an empty cache, timing calls counted."""
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path))
    measured.forget()
    timed = []
    real = measured.time_run
    monkeypatch.setattr(measured, "time_run", lambda name, run, device: timed.append(name) or real(name, run, device))
    previous = registry.set_measured(True)
    yield timed
    registry.set_measured(previous)
    measured.forget()


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_grad_x_regenerates_dropout_mask_bit_for_bit_on_cuda(p):
    """The CUDA twin of tests/backends/test_fused.py's: with W = 0, dx = mask/(1-p) ⊙ (dxa A), its zeros
    exactly the dropped elements of the reference hash's mask."""
    T, n_in, r = 1023, 1041, 3  # more than one tile in each direction, ragged edges
    g = torch.Generator().manual_seed(0)
    dy, w = torch.randn(T, 7, generator=g).cuda(), torch.zeros(7, n_in, device="cuda")
    dxa, a = torch.randn(T, r, generator=g).cuda(), torch.randn(r, n_in, generator=g).cuda()
    seed = torch.tensor([99], device="cuda")
    dx = fused.grad_x(dy, w, dxa, a, seed, p)
    keep = reference.dropout_mask(seed.cpu(), T, n_in, p).cuda()
    assert torch.equal(dx != 0, keep)
    want = torch.where(keep, dxa @ a / (1 - p), 0.0)
    torch.testing.assert_close(dx, want, rtol=1e-5, atol=1e-5)


def _model(p=0.1, dtype=torch.bfloat16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 384), nn.GELU(), nn.Linear(384, 128)).to("cuda", dtype)
    fastlora.inject(model, target_modules=["0", "2"], r=8, lora_alpha=16, lora_dropout=p)
    for layer in fastlora.lora_layers(model).values():
        nn.init.normal_(layer.lora_B)
    return model


def _step(model, x, params):
    y = model(x)
    return (y, *torch.autograd.grad(y.float().square().sum(), params))


def _close(got, want):
    for u, v in zip(got, want):
        scale = v.float().abs().max().item()
        assert (u.float() - v.float()).abs().max().item() <= 3e-2 * scale, "differs beyond bf16 rounding"


def test_fused_ops_under_inductor():
    model, x = _model(), torch.randn(4, 77, 256, device="cuda", dtype=torch.bfloat16)
    params = fastlora.trainable_parameters(model)
    with fastlora.use_backend("composed"):
        torch.manual_seed(1)
        want = _step(model, x, params)
    with fastlora.use_backend("fused"):
        compiled = torch.compile(model, fullgraph=True)  # Inductor; a graph break raises
        torch.manual_seed(1)
        got = _step(compiled, x, params)
    _close(got, want)


@pytest.mark.parametrize("backend", ["fused", "auto"])
def test_cuda_graph_capture_after_tune(backend, measuring):
    # no dropout: a replay reuses the captured seeds, so only p = 0 compares with an eager step
    model, x = _model(p=0.0), torch.randn(4, 77, 256, device="cuda", dtype=torch.bfloat16)
    params = fastlora.trainable_parameters(model)
    with fastlora.use_backend(backend):
        chosen = fastlora.tune(model, x, verbose=False)  # settles both layers' shapes under "auto"
        assert (chosen == {}) == (backend == "fused")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton's autotuner runs here, not while capturing
            for _ in range(3):
                _step(model, x, params)
        torch.cuda.current_stream().wait_stream(stream)
        timed = len(measuring)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = _step(model, x, params)
        assert len(measuring) == timed  # nothing timed while capturing
        graph.replay()
        torch.cuda.synchronize()
    with fastlora.use_backend("composed"):
        want = _step(model, x, params)
    _close(static, want)


def test_measured_dispatch_checks_every_candidate_on_the_device(measuring):
    record = dispatch.tune_shape(1000, 512, 768, 16, dtype=torch.bfloat16, device="cuda", dropout_p=0.05)
    assert record["choice"] in ("composed", "fused", "kernels")
    assert set(record["ms"]) | set(record["rejected"]) >= {"composed", "fused"}
    print(record)
