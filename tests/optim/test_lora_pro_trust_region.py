"""LoRA-Pro's trust region (``trust_region=``, docs/composition.md): the damped closed form against
its definition in float64, the bound on A's step, that it is inactive where it should be, that a
GoRA init no longer makes A jump, and its errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fastlora
from fastlora.optim import LoRAPro, LoRAProSGD
from fastlora.optim.closed_form import GramProjector

F64 = torch.float64


def _problem(out, n_in, r, b_scale, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(1, r, n_in, dtype=F64, generator=g)
    b = b_scale * torch.randn(1, out, r, dtype=F64, generator=g)
    full = torch.randn(1, out, n_in, dtype=F64, generator=g)
    return a, b, full


def _damped_reference(a, b, g_a, g_b, s, delta, x_mode):
    """The damped closed form straight from its formulas: (B^T B + delta I) replaces B^T B."""
    r = a.shape[0]
    eye = torch.eye(r, dtype=F64)
    m_b = b.mT @ b + delta * eye
    h_a0 = torch.linalg.solve(m_b, g_a) / s**2
    p_b = b @ torch.linalg.solve(m_b, b.mT)
    h_b0 = (g_b - p_b @ g_b) @ torch.linalg.pinv(a @ a.mT) / s**2
    if x_mode == "sylvester":  # (B^T B + delta) X + X A A^T = -(1/s^2) (B^T B + delta)^-1 gA A^T
        k = torch.kron(m_b, eye) + torch.kron(eye, (a @ a.mT).mT.contiguous())
        x = torch.linalg.solve(k, (-h_a0 @ a.mT).reshape(-1, 1)).reshape(r, r)
    else:
        x = torch.zeros(r, r, dtype=F64)
    return h_a0 + x @ a, h_b0 - b @ x, h_a0


def _reference_delta(b, g_a, s, radius):
    """The smallest delta with ‖(B^T B + delta)^-1 gA‖ / s^2 <= radius, by bisection on explicit solves."""
    eye = torch.eye(b.shape[1], dtype=F64)

    def norm(delta):
        return (torch.linalg.solve(b.mT @ b + delta * eye, g_a) / s**2).norm().item()

    if norm(0.0) <= radius:
        return 0.0
    lo, hi = 0.0, 1.0
    while norm(hi) > radius:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if norm(mid) > radius else (lo, mid)
    return hi


@pytest.mark.parametrize("x_mode", ["sylvester", "zero"])
@pytest.mark.parametrize("shape", [(7, 5, 1), (20, 15, 4), (9, 33, 7)])
def test_damped_closed_form_matches_its_definition(shape, x_mode):
    a, b, full = _problem(*shape, b_scale=1e-3, seed=sum(shape))
    s = 1.3
    g_a, g_b = s * b.mT @ full, s * full @ a.mT
    projector = GramProjector([a], [b], [torch.tensor([s], dtype=F64)], ridge=0.0)
    faithful = projector.base(0, g_a, g_b)[0].norm().item()
    radius = torch.tensor([0.05 * faithful], dtype=F64)
    (delta,) = projector.trust_damping([g_a], [radius])
    want_delta = _reference_delta(b[0], g_a[0], s, radius.item())
    assert want_delta > 0 and abs(delta.item() - want_delta) <= 1e-9 * want_delta
    (h_a, h_b), = projector.adjust([g_a], [g_b], x_mode, [radius])
    ref_a, ref_b, ref_a0 = _damped_reference(a[0], b[0], g_a[0], g_b[0], s, delta.item(), x_mode)
    torch.testing.assert_close(h_a[0], ref_a, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(h_b[0], ref_b, rtol=1e-9, atol=1e-12)
    # the X-free part sits on the trust region's boundary (the smallest damping that fits)
    assert abs(ref_a0.norm().item() - radius.item()) <= 1e-8 * radius.item()


def test_an_inactive_trust_region_is_the_faithful_closed_form():
    a, b, full = _problem(12, 10, 3, b_scale=1.0, seed=3)
    s = torch.tensor([0.7], dtype=F64)
    g_a, g_b = 0.7 * b.mT @ full, 0.7 * full @ a.mT
    projector = GramProjector([a], [b], [s], ridge=0.0)
    faithful = projector.adjust([g_a], [g_b], "sylvester")[0]
    roomy = projector.adjust([g_a], [g_b], "sylvester", [torch.tensor([1e6], dtype=F64)])[0]
    for got, want in zip(roomy, faithful):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@settings(max_examples=60, deadline=None)
@given(
    out=st.integers(1, 24), n_in=st.integers(1, 24), r=st.integers(1, 6), b_exp=st.integers(-8, 1),
    frac=st.floats(1e-4, 2.0), seed=st.integers(0, 2**16), x_mode=st.sampled_from(["sylvester", "zero"]),
)
def test_a_step_is_at_most_twice_the_radius(out, n_in, r, b_exp, frac, seed, x_mode):
    a, b, full = _problem(out, n_in, r, b_scale=10.0**b_exp, seed=seed)
    s = 2.0
    g_a, g_b = s * b.mT @ full, s * full @ a.mT
    projector = GramProjector([a], [b], [torch.tensor([s], dtype=F64)], ridge=0.0)
    radius = frac * a.norm()
    (h_a, _), = projector.adjust([g_a], [g_b], x_mode, [radius.reshape(1)])
    # ‖X A‖_F <= ‖X-free part‖_F <= radius for the Sylvester X (docs/composition.md)
    assert h_a.norm().item() <= 2 * radius.item() * (1 + 1e-9)


def _gora_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(32, 24, generator=g, dtype=F64), torch.randn(32, 4, generator=g, dtype=F64))
               for _ in range(3)]

    def loss_fn(m, batch):
        return (m(batch[0]) - batch[1]).pow(2).mean()

    stats = fastlora.collect_gradients(model, batches, loss_fn=loss_fn, progress=False)
    fastlora.inject(model, r=4, lora_alpha=8, init="gora", gradients=stats, adapter_dtype=F64,
                    init_config={"gamma": 0.05, "r_min": 2, "r_max": 8})
    return model, batches, loss_fn


def _first_step_changes(trust_region):
    model, batches, loss_fn = _gora_model()
    layers = list(fastlora.lora_layers(model).values())
    before = [m.lora_A.detach().clone() for m in layers]
    opt = LoRAPro(model, lr=1e-3, moment_dtype=F64, trust_region=trust_region)
    loss_fn(model, batches[0]).backward()
    opt.step()
    return [((m.lora_A - a).norm() / a.norm()).item() for m, a in zip(layers, before)]


def test_after_a_gora_init_the_first_step_of_a_stays_within_twice_the_trust_region():
    faithful = _first_step_changes(None)
    assert max(faithful) > 2.0, f"the faithful step no longer jumps ({faithful}); the test would prove nothing"
    for tau in (0.1, 0.5):
        changes = _first_step_changes(tau)
        assert max(changes) <= 2 * tau * (1 + 1e-9), (tau, changes)


@pytest.mark.parametrize("opt_cls", [LoRAPro, LoRAProSGD])
def test_from_b_zero_the_first_step_is_the_faithful_one(opt_cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 5)).double()
    fastlora.inject(model, r=3, lora_alpha=6, adapter_dtype=F64)
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 10, dtype=F64), torch.randn(8, 5, dtype=F64)
    for m, trust in ((model, None), (twin, 0.1)):
        opt = opt_cls(m, lr=1e-2, trust_region=trust)
        (m(x) - y).pow(2).mean().backward()
        opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)  # B = 0: A does not move, so the region is not touched


@pytest.mark.parametrize("opt_cls", [LoRAPro, LoRAProSGD])
def test_resume_with_a_trust_region_is_bit_identical(opt_cls):
    def build():
        model, batches, loss_fn = _gora_model(seed=1)
        return model, opt_cls(model, lr=1e-3, trust_region=0.5), batches, loss_fn

    def train(model, opt, batches, loss_fn, steps):
        for t in range(steps):
            loss_fn(model, batches[t % len(batches)]).backward()
            opt.step()
            opt.zero_grad()

    model, opt, batches, loss_fn = build()
    train(model, opt, batches, loss_fn, 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, batches, loss_fn, 2)
    resumed, opt2, _, _ = build()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["trust_region"] == 0.5
    train(resumed, opt2, batches, loss_fn, 2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(trust_region=0.0), "trust_region must be"),
        (dict(trust_region=-1.0), "trust_region must be"),
        (dict(trust_region=float("nan")), "trust_region must be"),
        (dict(trust_region=float("inf")), "trust_region must be"),
        (dict(trust_region="0.5"), "trust_region must be"),
    ],
)
def test_trust_region_errors(kwargs, message):
    model = nn.Sequential(nn.Linear(4, 4))
    fastlora.inject(model, r=2)
    with pytest.raises(ValueError, match=message):
        LoRAPro(model, **kwargs)


def test_a_state_saved_before_the_option_existed_loads_as_faithful():
    model, batches, loss_fn = _gora_model()
    opt = LoRAPro(model, lr=1e-3, trust_region=None)
    loss_fn(model, batches[0]).backward()
    opt.step()
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["trust_region"]
    fresh = LoRAPro(model, lr=1e-3)
    fresh.load_state_dict(state)
    assert all(group["trust_region"] is None for group in fresh.param_groups)
    loss_fn(model, batches[1]).backward()
    fresh.step()


def test_efficient_mode_does_not_use_the_trust_region():
    model, batches, loss_fn = _gora_model()
    twin = copy.deepcopy(model)
    for m, trust in ((model, None), (twin, 0.1)):
        opt = LoRAPro(m, lr=1e-3, mode="efficient", trust_region=trust)
        for t in range(2):
            loss_fn(m, batches[t]).backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_the_default_is_the_trust_region():
    model, _, _ = _gora_model()
    assert LoRAPro(model).param_groups[0]["trust_region"] == fastlora.optim.DEFAULT_TRUST_REGION == 0.5
    assert LoRAProSGD(model).param_groups[0]["trust_region"] == 0.5
