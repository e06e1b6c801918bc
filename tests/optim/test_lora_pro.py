"""fastlora.optim.LoRAPro / LoRAProSGD: against a plain float64 implementation of the algorithm,
checkpoints, clipping, other parameters, batching, logging and errors."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from torch import nn

import fastlora
from fastlora.optim import LoRAPro, LoRAProSGD
from helpers import X, base_model, randomise

F64 = torch.float64


def _model(dtype=F64, adapter_dtype=F64, b_init="zero", seed=0):
    """Three adapted layers with different ranks and scales (as GoRA gives), a trainable
    LayerNorm in between and an untouched frozen layer."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(12, 20), nn.Tanh(), nn.LayerNorm(20), nn.Linear(20, 9), nn.Tanh(), nn.Linear(9, 7), nn.Linear(7, 3)
    ).to(dtype)
    fastlora.inject(
        model, target_modules=["0", "3", "5"], r=4, lora_alpha=8, rank_pattern={"3": 2, "5": 1},
        alpha_pattern={"5": 3.0}, adapter_dtype=adapter_dtype, trainable_modules=["2"],
        generator=torch.Generator().manual_seed(seed),
    )
    if b_init == "random":
        with torch.no_grad():
            for layer in fastlora.lora_layers(model).values():
                layer.lora_B.normal_(0, 0.3)
    return model


def _data(step, dtype=F64):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 12, generator=g).to(dtype), torch.randn(16, 3, generator=g).to(dtype)


def _backward(model, step):
    x, y = _data(step, model[-1].weight.dtype)
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    return loss


def _train(model, opt, steps, first=0):
    for t in range(first, first + steps):
        _backward(model, t)
        opt.step()
        opt.zero_grad()


# ---- a plain float64 implementation of the algorithm (lora_pro.md, steps 1-5) ----------------


def _pinv(m):
    return torch.linalg.pinv(m, hermitian=True)


def _sylvester(p, q, c):
    """P X + X Q = C through the Kronecker form (row-major vec), least squares when singular."""
    r = p.shape[0]
    eye = torch.eye(r, dtype=F64)
    k = torch.kron(p, eye) + torch.kron(eye, q.mT.flatten().reshape(r, r))
    return torch.linalg.lstsq(k, c.reshape(-1, 1), driver="gelsd").solution.reshape(r, r)


def _closed_form(a, b, g_a, g_b, s, x_mode):
    btb_inv, aat_inv = _pinv(b.mT @ b), _pinv(a @ a.mT)
    proj_b = b @ btb_inv @ b.mT  # out x out: fine for a reference
    h_a0 = btb_inv @ g_a / s**2
    h_b0 = (torch.eye(b.shape[0], dtype=F64) - proj_b) @ g_b @ aat_inv / s**2
    if x_mode == "sylvester":
        x = _sylvester(b.mT @ b, a @ a.mT, -btb_inv @ g_a @ a.mT / s**2)
    elif x_mode == "symmetry":
        x = -0.5 * btb_inv @ b.mT @ g_b @ (a @ a.mT) / s**2
    else:
        x = torch.zeros(a.shape[0], a.shape[0], dtype=F64)
    return h_a0, h_b0, x


def _adam(state, key, g, b1, b2, eps, t):
    m, v = state.setdefault(key, (torch.zeros_like(g), torch.zeros_like(g)))
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    state[key] = (m, v)
    return (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)


def _reference_step(model, state, t, mode, lr, wd, betas=(0.9, 0.999), eps=1e-8, x_mode="sylvester"):
    """One step of LoRA-Pro on ``model`` in float64, straight from the formulas."""
    b1, b2 = betas
    with torch.no_grad():
        for name, layer in fastlora.lora_layers(model).items():
            a, b, s = layer.lora_A, layer.lora_B, layer.scaling
            g_a, g_b = a.grad, b.grad
            if mode == "full":
                h_a0, h_b0, _ = _closed_form(a, b, g_a, g_b, s, x_mode)
                equivalent = s * (b @ h_a0 + h_b0 @ a)
                d = _adam(state, name, equivalent, b1, b2, eps, t)
                g_a, g_b = s * b.mT @ d, s * d @ a.mT
            h_a0, h_b0, x = _closed_form(a, b, g_a, g_b, s, x_mode)
            h_a, h_b = h_a0 + x @ a, h_b0 - b @ x
            if mode == "efficient":
                h_a = _adam(state, name + ".A", h_a, b1, b2, eps, t)
                h_b = _adam(state, name + ".B", h_b, b1, b2, eps, t)
            keep = (1 - lr * wd) ** 0.5
            a.mul_(keep).sub_(lr * h_a)
            b.mul_(keep).sub_(lr * h_b)


def _reference_other_params(model):
    adapters = {id(p) for layer in fastlora.lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in adapters]


def _assert_models_close(got, want, tol):
    for (name, p), q in zip(got.named_parameters(), want.parameters()):
        err = ((p.double() - q.double()).norm() / q.double().norm().clamp_min(1e-30)).item()
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("b_init", ["zero", "random"])
@pytest.mark.parametrize("mode", ["full", "efficient", "sgd"])
def test_matches_float64_reference(mode, b_init, backend):
    model = _model(b_init=b_init)
    ref = copy.deepcopy(model)
    lr, wd, steps = 1e-2, 0.1, 6
    if mode == "sgd":
        opt = LoRAProSGD(model, lr=lr, weight_decay=wd, ridge=0.0, trust_region=None)  # the paper's step
        ref_other = torch.optim.SGD(_reference_other_params(ref), lr=lr, weight_decay=wd)
    else:
        opt = LoRAPro(model, lr=lr, weight_decay=wd, mode=mode, moment_dtype=F64, ridge=0.0, trust_region=None)
        ref_other = torch.optim.AdamW(_reference_other_params(ref), lr=lr, weight_decay=wd)
    state = {}
    with fastlora.use_backend(backend):
        for t in range(steps):
            _backward(model, t)
            opt.step()
            opt.zero_grad()
            _backward(ref, t)
            _reference_step(ref, state, t + 1, mode, lr, wd)
            ref_other.step()
            ref.zero_grad()
    _assert_models_close(model, ref, 1e-9)
    if mode == "full":
        for name, layer in fastlora.lora_layers(model).items():
            moments = opt.state[layer.lora_A]
            assert moments["step"] == steps and moments["exp_avg"].shape == (layer.out_features, layer.in_features)
            torch.testing.assert_close(moments["exp_avg"], state[name][0], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(moments["exp_avg_sq"], state[name][1], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("x_mode", ["symmetry", "zero"])
def test_x_modes_match_reference(x_mode):
    model = _model(b_init="random")
    ref = copy.deepcopy(model)
    opt = LoRAPro(model, lr=1e-2, x_mode=x_mode, moment_dtype=F64, ridge=0.0, trust_region=None)
    ref_other = torch.optim.AdamW(_reference_other_params(ref), lr=1e-2, weight_decay=0.0)
    state = {}
    for t in range(3):
        _backward(model, t)
        opt.step()
        opt.zero_grad()
        _backward(ref, t)
        _reference_step(ref, state, t + 1, "full", 1e-2, 0.0, x_mode=x_mode)
        ref_other.step()
        ref.zero_grad()
    _assert_models_close(model, ref, 1e-9)


def test_fused_kernel_and_reference_backend_agree_in_float32():
    model = _model(dtype=torch.float32, adapter_dtype=torch.float32, b_init="random")
    twin = copy.deepcopy(model)
    opt, opt_twin = LoRAPro(model, lr=1e-3), LoRAPro(twin, lr=1e-3)
    for t in range(4):
        _train(model, opt, 1, first=t)
        with fastlora.use_backend("reference"):
            _train(twin, opt_twin, 1, first=t)
    _assert_models_close(model, twin, 2e-4)


def test_layers_are_batched_like_separate_optimizers():
    # One optimizer over all layers (batched by rank and shape) equals one optimizer per layer.
    model = _model(b_init="random")
    twin = copy.deepcopy(model)
    opt = LoRAPro(model, lr=1e-2, moment_dtype=F64)
    singles = [LoRAPro(layer, lr=1e-2, moment_dtype=F64) for layer in fastlora.lora_layers(twin).values()]
    plain = torch.optim.AdamW(_reference_other_params(twin), lr=1e-2, weight_decay=0.0)
    for t in range(3):
        _train(model, opt, 1, first=t)
        _backward(twin, t)
        for o in [*singles, plain]:
            o.step()
        twin.zero_grad()
    _assert_models_close(model, twin, 1e-12)


def test_eigh_runs_once_per_rank_not_per_layer(monkeypatch):
    model = nn.Sequential(*[nn.Linear(10, 10) for _ in range(6)]).double()
    fastlora.inject(model, r=3, rank_pattern={"4": 2, "5": 2})
    opt = LoRAPro(model, lr=1e-3)
    calls = []
    original = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m, *a, **k: calls.append(m.shape) or original(m, *a, **k))
    model(torch.randn(4, 10, dtype=F64)).sum().backward()
    opt.step()
    assert len(calls) == 2, f"expected one eigh per rank (2 ranks), got {calls}"
    assert sorted(c[0] for c in calls) == [4, 8]  # both Grams of all layers of a rank in one call


@pytest.mark.parametrize("mode", ["full", "efficient", "sgd"])
@pytest.mark.parametrize(
    "moment_dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
)
def test_state_dict_round_trip_resumes_bit_identically(mode, moment_dtype, adapter_dtype):
    def build():
        model = _model(dtype=torch.float32, adapter_dtype=adapter_dtype)
        if mode == "sgd":
            return model, LoRAProSGD(model, lr=1e-2, weight_decay=0.01)
        return model, LoRAPro(model, lr=1e-2, weight_decay=0.01, mode=mode, moment_dtype=moment_dtype)

    model, opt = build()
    _train(model, opt, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, 3, first=3)

    resumed, opt2 = build()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    if mode == "full":
        a = next(iter(fastlora.lora_layers(resumed).values())).lora_A
        assert opt2.state[a]["exp_avg"].dtype == moment_dtype, "load_state_dict changed the moments' dtype"
    _train(resumed, opt2, 3, first=3)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), f"{name} differs after resuming"
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            other = opt2.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


def test_load_state_dict_rejects_another_model():
    model, other = _model(), nn.Sequential(nn.Linear(5, 5))
    fastlora.inject(other, r=2)
    opt = LoRAPro(model, lr=1e-2)
    _train(model, opt, 1)
    with pytest.raises(ValueError, match="different set of LoRA layers"):
        LoRAPro(other, lr=1e-2).load_state_dict(opt.state_dict())


def test_clipping_before_step_is_what_the_step_uses():
    model = _model(b_init="random")
    twin = copy.deepcopy(model)
    opt, opt_twin = LoRAPro(model, lr=1e-2, mode="efficient"), LoRAPro(twin, lr=1e-2, mode="efficient")
    for t in range(3):
        _backward(model, t)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        assert norm > 0.05  # clipping is active
        opt.step()
        opt.zero_grad()
        _backward(twin, t)
        factor = 0.05 / (norm + 1e-6)
        for p in twin.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
        opt_twin.step()
        opt_twin.zero_grad()
    _assert_models_close(model, twin, 1e-12)


def test_other_parameters_get_torch_adamw():
    model = _model(dtype=torch.float32, adapter_dtype=torch.float32)
    opt = LoRAPro(model, lr=3e-3, weight_decay=0.05)
    others = _reference_other_params(model)
    assert len(others) == 2  # the LayerNorm's weight and bias; frozen layers stay out
    copies = [p.detach().clone().requires_grad_(True) for p in others]
    adamw = torch.optim.AdamW(copies, lr=3e-3, weight_decay=0.05)
    for t in range(4):
        _backward(model, t)
        for c, p in zip(copies, others):
            c.grad = p.grad.clone()
        opt.step()
        adamw.step()
        opt.zero_grad()
        for c, p in zip(copies, others):
            torch.testing.assert_close(p, c, rtol=1e-6, atol=1e-7)


def test_zero_gradient_decays_the_merged_weight():
    model = _model(b_init="random")
    layers = fastlora.lora_layers(model)
    before = {n: (layer.delta_weight(), layer.base_layer.weight.clone()) for n, layer in layers.items()}
    opt = LoRAPro(model, lr=0.5, weight_decay=0.2, decay_base_weight=True)
    (model(_data(0)[0]) * 0).sum().backward()  # zero gradients: D = 0, only weight decay acts
    opt.step()
    for name, layer in layers.items():
        delta, base = before[name]
        torch.testing.assert_close(layer.delta_weight(), 0.9 * delta, rtol=1e-12, atol=0)
        torch.testing.assert_close(layer.base_layer.weight, 0.9 * base, rtol=1e-12, atol=0)
    frozen = model[6].weight.clone()
    opt2 = LoRAPro(model, lr=0.5, weight_decay=0.2)  # base weights untouched by default
    (model(_data(0)[0]) * 0).sum().backward()
    bases = {n: layer.base_layer.weight.clone() for n, layer in layers.items()}
    opt2.step()
    assert all(torch.equal(layer.base_layer.weight, bases[n]) for n, layer in layers.items())
    assert torch.equal(model[6].weight, frozen)


def test_first_steps_from_b_zero_are_finite_and_logged(caplog):
    model = _model(dtype=torch.float32, adapter_dtype=torch.float32)
    opt = LoRAPro(model, lr=1e-3)
    a0 = {n: layer.lora_A.detach().clone() for n, layer in fastlora.lora_layers(model).items()}
    with caplog.at_level(logging.INFO, logger="fastlora"):
        _backward(model, 0)
        opt.step()
        opt.zero_grad()
        for n, layer in fastlora.lora_layers(model).items():
            assert torch.equal(layer.lora_A, a0[n]), "step 1 from B = 0 must leave A alone (gA = 0)"
            assert layer.lora_B.abs().sum() > 0 and torch.isfinite(layer.lora_B).all()
        _train(model, opt, 2, first=1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any("step 2: the largest relative change of a lora_A" in r.getMessage() for r in caplog.records)


def test_works_with_an_lr_scheduler_and_bfloat16_adapters():
    model = _model(dtype=torch.float32, adapter_dtype=torch.bfloat16)
    opt = LoRAPro(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    _train(model, opt, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == 5e-3
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 1, first=1)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert next(iter(fastlora.lora_layers(model).values())).lora_A.dtype == torch.bfloat16


def test_nan_gradient_raises_and_changes_nothing():
    model = _model(b_init="random")
    opt = LoRAPro(model, lr=1e-2)
    _train(model, opt, 1)
    before = copy.deepcopy(model.state_dict())
    moments = {k: v.clone() for k, v in opt.state[model[3].lora_A].items() if isinstance(v, torch.Tensor)}
    _backward(model, 1)
    model[3].lora_B.grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer '3': lora_B.grad contains NaN or Inf; the step was not applied"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in moments.items():
        assert torch.equal(opt.state[model[3].lora_A][k], v), k
    model[3].lora_B.grad.zero_()
    model[2].weight.grad[0] = float("inf")
    with pytest.raises(ValueError, match="gradient with NaN or Inf"):
        opt.step()
    opt.check_finite = False  # opting out skips the check (and its device sync)
    opt.step()


def test_layers_without_gradients_are_skipped():
    model = _model(b_init="random")
    opt = LoRAPro(model, lr=1e-2)
    x, _ = _data(0)
    model[5].lora_A.requires_grad_(False)
    model[5].lora_B.requires_grad_(False)
    model(x).sum().backward()
    model[5].lora_A.requires_grad_(True)
    model[5].lora_B.requires_grad_(True)
    frozen = model[5].lora_A.detach().clone()
    opt.step()
    assert torch.equal(model[5].lora_A, frozen) and model[5].lora_A not in opt.state


@pytest.mark.parametrize(
    "build,error,message",
    [
        (lambda m: LoRAPro(m.parameters()), TypeError, "not a list of parameters"),
        (lambda m: LoRAPro(nn.Linear(3, 3)), ValueError, "no trainable fastlora LoRA layers"),
        (lambda m: LoRAPro(m, mode="fast"), ValueError, "unknown mode 'fast'"),
        (lambda m: LoRAPro(m, x_mode="exact"), ValueError, "unknown x_mode 'exact'"),
        (lambda m: LoRAPro(m, moment_dtype=torch.float16), TypeError, "float16 cannot hold"),
        (lambda m: LoRAPro(m, lr=-1.0), ValueError, "lr must be"),
        (lambda m: LoRAPro(m, betas=(0.9, 1.0)), ValueError, "betas must be"),
        (lambda m: LoRAPro(m, eps=float("nan")), ValueError, "eps must be"),
        (lambda m: LoRAPro(m, weight_decay=-0.1), ValueError, "weight_decay must be"),
        (lambda m: LoRAProSGD(m, ridge=-1.0), ValueError, "ridge must be"),
    ],
)
def test_construction_errors(build, error, message):
    with pytest.raises(error, match=message):
        build(_model())


def test_frozen_half_adapter_is_rejected():
    model = _model()
    model[3].lora_B.requires_grad_(False)
    with pytest.raises(ValueError, match="layer '3' has a frozen lora_B"):
        LoRAPro(model)


def test_step_errors():
    model = _model()
    opt = LoRAPro(model, lr=1e-2)
    _backward(model, 0)
    model[0].lora_A.grad = None
    with pytest.raises(ValueError, match=r"layer '0': lora_A.grad is None"):
        opt.step()
    model[0].lora_A.grad = torch.zeros_like(model[0].lora_A)
    opt.param_groups[0]["weight_decay"] = 200.0
    with pytest.raises(ValueError, match="would flip the weights' sign"):
        opt.step()
    with pytest.raises(ValueError, match="only be given when the optimizer is built"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lora_pro": True})
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})  # plain parameters are fine


# ---- foreign state changes nothing; the ridge and pseudo-inverse of the grams --------------------


def test_lora_pro_foreign_state_changes_nothing():
    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64)
    randomise(model, 1)
    opt = LoRAPro(model, lr=1e-2)
    model(X).sum().backward()
    opt.step()
    other = fastlora.inject(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Sequential(nn.Linear(5, 3))).to(F64), "0",
                            r=2, adapter_dtype=F64)
    foreign = LoRAPro(other, lr=1e-2)
    other(X).sum().backward()
    foreign.step()
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="saved exp_avg has shape"):
        opt.load_state_dict(foreign.state_dict())
    now = opt.state_dict()
    assert now["param_groups"] == state["param_groups"]
    for key, values in state["state"].items():
        for k, v in values.items():
            assert torch.equal(torch.as_tensor(now["state"][key][k]), torch.as_tensor(v))
    model(X).sum().backward()
    opt.step()  # still works



def test_lora_pro_ridge_regularises_both_grams():
    from fastlora.optim import lora_pro_gradients


    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    ga, gb = torch.randn(3, 7, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    s, ridge = 1.5, 0.3
    h_a, h_b = lora_pro_gradients(a, b, ga, gb, s, x_mode="zero", ridge=ridge)
    bp = torch.linalg.inv(b.mT @ b + ridge * torch.eye(3, dtype=F64))
    ap = torch.linalg.inv(a @ a.mT + ridge * torch.eye(3, dtype=F64))
    torch.testing.assert_close(h_a, bp @ ga / s**2, rtol=1e-10, atol=0)
    torch.testing.assert_close(h_b, (gb - b @ bp @ b.mT @ gb) @ ap / s**2, rtol=1e-10, atol=0)



def test_lora_pro_pseudo_inverse_keeps_small_but_numerically_nonzero_directions():
    """An eigenvalue of B^T B at 1e-13 of the largest is far above r·eps (float64): it must be
    inverted (a cutoff 1e4 times larger would drop it)."""
    from fastlora.optim import lora_pro_gradients


    q = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=F64)).Q
    b = q * torch.tensor([1.0, 1e-13**0.5], dtype=F64)
    a = torch.eye(2, 4, dtype=F64)
    ga = torch.ones(2, 4, dtype=F64)
    h_a, _ = lora_pro_gradients(a, b, ga, torch.zeros(6, 2, dtype=F64), 1.0, x_mode="zero", ridge=0.0)
    lam, vec = torch.linalg.eigh(b.mT @ b)
    cutoff = 2 * torch.finfo(F64).eps * lam.max()
    assert cutoff < lam.min() < 1e4 * cutoff
    want = vec @ torch.diag(1.0 / lam) @ vec.mT @ ga
    assert want.abs().max() > 1e10
    torch.testing.assert_close(h_a, want, rtol=1e-2, atol=0)  # the small eigenvalue carries ~eps/1e-13 error
