"""LoRA-GA and GoRA initialisation (fastlora.init) and LoRA+ parameter groups."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fastlora
from fastlora.init.gora import allocate_ranks
from helpers import F64, X, assert_unchanged, base_model, make_mlp_problem, randomise, snapshot


def _one_layer_problem(out_f=12, in_f=10, n=7, dtype=torch.float64, seed=0):
    """A single linear layer, one batch, a loss whose weight gradient is a random dense matrix."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f, dtype=dtype))
    x = torch.randn(n, in_f, generator=g, dtype=dtype)
    target = torch.randn(n, out_f, generator=g, dtype=dtype)

    def loss_fn(m, batch):
        xb, tb = batch
        return ((m(xb) - tb) ** 2).sum()

    return model, [(x, target)], loss_fn


def _mean_grad(model, batches, loss_fn, name="0"):
    stats = fastlora.collect_gradients(model, batches, [name], loss_fn=loss_fn, progress=False)
    return stats, stats[name].mean.double()


# ---- LoRA-GA ----------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr", "random"])
@pytest.mark.parametrize("scale", ["stable", "gd", "unit"])
def test_lora_ga_factors_match_hand_computed_svd(direction, scale):
    model, batches, loss_fn = _one_layer_problem()
    stats, g = _mean_grad(model, batches, loss_fn)
    w0 = model[0].weight.detach().clone()
    r, alpha = 3, 6.0
    fastlora.inject(model, ["0"], r=r, lora_alpha=alpha, adapter_dtype=torch.float64, init="lora_ga",
                    gradients=stats, init_config={"direction": direction, "scale": scale, "svd": "exact", "seed": 5})
    layer = model[0]
    s = alpha / math.sqrt(r)  # rsLoRA by default for LoRA-GA
    assert layer.use_rslora and layer.scaling == pytest.approx(s)
    u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    u, vh = u.double(), vh.double()
    if direction == "ArB2r":
        ia, ib = list(range(r)), list(range(r, 2 * r))
    elif direction == "A2rBr":
        ia, ib = list(range(r, 2 * r)), list(range(r))
    elif direction == "ArBr":
        ia, ib = list(range(1, 2 * r, 2)), list(range(0, 2 * r, 2))
    else:
        perm = torch.randperm(2 * r, generator=torch.Generator().manual_seed(5)).tolist()
        ia, ib = perm[:r], perm[r:]
    c = {"stable": 12**0.25 / 16**0.5, "gd": 1 / s, "unit": 1.0}[scale]
    torch.testing.assert_close(layer.lora_A.detach(), c * vh[ia], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.detach(), c * u[:, ib], rtol=1e-5, atol=1e-6)
    # The base absorbed -s B0 A0: the model starts where it was.
    torch.testing.assert_close(layer.base_layer.weight.detach() + s * layer.lora_B.detach() @ layer.lora_A.detach(),
                               w0, rtol=0, atol=1e-12)
    assert layer.init_method == "lora_ga" and torch.equal(layer.lora_A0, layer.lora_A.detach())


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr", "random"])
@pytest.mark.parametrize("scale", ["stable", "gd"])
def test_lora_ga_first_sgd_step_is_rank_2r_gradient(direction, scale):
    """After one plain SGD step the merged weight moves, to first order in the learning rate, by
    -lr s^2 c^2 rank_2r(G): the paper's defining property."""
    model, batches, loss_fn = _one_layer_problem()
    stats, g = _mean_grad(model, batches, loss_fn)
    r, alpha = 2, 4.0
    fastlora.inject(model, ["0"], r=r, lora_alpha=alpha, adapter_dtype=torch.float64, init="lora_ga",
                    gradients=stats, init_config={"direction": direction, "scale": scale, "svd": "exact"})
    layer = model[0]
    loss_fn(model, batches[0]).backward()
    a0, b0 = layer.lora_A.detach(), layer.lora_B.detach()
    ga, gb = layer.lora_A.grad, layer.lora_B.grad
    s = layer.scaling
    first_order = s * (-gb @ a0 - b0 @ ga)  # d(s B A) for dA = -gA, dB = -gB (lr = 1)
    u, sv, vh = torch.linalg.svd(g)
    rank_2r = (u[:, : 2 * r] * sv[: 2 * r]) @ vh[: 2 * r]
    c = 12**0.25 / 16**0.5 if scale == "stable" else 1 / s
    torch.testing.assert_close(first_order, -(s**2) * c**2 * rank_2r, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_lora_ga_output_at_init_equals_base(dtype, tol):
    model, batches, loss_fn = make_mlp_problem(dtype)
    base = copy.deepcopy(model)
    stats = fastlora.collect_gradients(model, batches, loss_fn=loss_fn, progress=False)
    fastlora.inject(model, "all-linear", r=2, lora_alpha=4, init="lora_ga", gradients=stats)
    ids = batches[0][0]
    want = base(ids).float()
    got = model(ids).float()
    assert (got - want).abs().max().item() <= tol * want.abs().max().item()
    report = fastlora.init.lora_ga(copy.deepcopy(base_with_adapters(base)), stats, check_batch=(ids,))
    assert report["__model__"]["max_output_change"] <= tol * want.abs().max().item()
    assert all(v["max_weight_rounding"] <= tol for k, v in report.items() if k != "__model__")


def base_with_adapters(model):
    m = copy.deepcopy(model)
    fastlora.inject(m, "all-linear", r=2, lora_alpha=4, use_rslora=True)
    return m


def test_lora_ga_official_quantities_in_float32():
    """A^T A, B B^T and the first-step update match a float64 recomputation of the official
    fork's formulas (exact SVD, stable scale, ArB2r) to float32 tolerance."""
    model, batches, loss_fn = _one_layer_problem(out_f=20, in_f=16, n=40, dtype=torch.float32)  # G of full rank
    stats, g = _mean_grad(model, batches, loss_fn)
    r, alpha = 4, 8.0
    fastlora.inject(model, ["0"], r=r, lora_alpha=alpha, init="lora_ga", gradients=stats,
                    init_config={"svd": "exact"})
    a, b = model[0].lora_A.detach().double(), model[0].lora_B.detach().double()
    u, sv, vh = torch.linalg.svd(g)
    c = 20**0.25 / 16**0.5
    a_ref, b_ref = c * vh[:r], c * u[:, r : 2 * r]
    torch.testing.assert_close(a.t() @ a, a_ref.t() @ a_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b @ b.t(), b_ref @ b_ref.t(), rtol=1e-4, atol=1e-6)
    s = alpha / math.sqrt(r)
    step = -(s**2) * (g @ a.t() @ a + b @ b.t() @ g)
    step_ref = -(s**2) * (g @ a_ref.t() @ a_ref + b_ref @ b_ref.t() @ g)
    torch.testing.assert_close(step, step_ref, rtol=1e-4, atol=1e-5 * step_ref.abs().max().item())


def test_lora_ga_randomized_and_sketch_svd_run():
    model, batches, loss_fn = make_mlp_problem()
    exact = fastlora.collect_gradients(model, batches, loss_fn=loss_fn, progress=False)
    sketch = fastlora.collect_gradients(model, batches, loss_fn=loss_fn, mode="sketch", sketch_rank=8, progress=False)
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    fastlora.inject(m1, "all-linear", r=2, init="lora_ga", gradients=exact)  # randomized, seeded
    fastlora.inject(m2, "all-linear", r=2, init="lora_ga", gradients=sketch, init_config={"svd": "sketch"})
    for n in ("1", "3", "5"):
        # Same top-2r directions up to sign: compare the sign-invariant A^T A.
        a1, a2 = m1.get_submodule(n).lora_A.detach(), m2.get_submodule(n).lora_A.detach()
        assert (a1.t() @ a1 - a2.t() @ a2).norm() <= 0.3 * (a1.t() @ a1).norm()


def test_lora_ga_rank_limit_error_and_fallback():
    model, batches, loss_fn = make_mlp_problem()
    stats = fastlora.collect_gradients(model, batches, loss_fn=loss_fn, progress=False)
    untouched = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"2r <= min\(in, out\): layer 5 has r=8"):
        fastlora.inject(model, "all-linear", r=8, init="lora_ga", gradients=stats)
    assert not fastlora.lora_layers(model)  # nothing changed
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), untouched.parameters()))
    with pytest.warns(UserWarning, match="layer 5 keeps the plain LoRA init"):
        fastlora.inject(model, "all-linear", r=6, init="lora_ga", gradients=stats, init_config={"fallback": "lora"})
    assert model[5].init_method == "lora" and model[1].init_method == "lora_ga"


def test_gradient_init_argument_errors():
    model, batches, loss_fn = make_mlp_problem()
    stats = fastlora.collect_gradients(model, batches, ["1"], loss_fn=loss_fn, progress=False)
    with pytest.raises(ValueError, match="needs gradients"):
        fastlora.inject(model, "all-linear", init="lora_ga")
    with pytest.raises(ValueError, match=r"no gradient for LoRA layers \['3', '5'\]"):
        fastlora.inject(model, "all-linear", init="gora", gradients=stats)
    with pytest.raises(ValueError, match="direction must be one of"):
        fastlora.inject(model, ["1"], r=2, init="lora_ga", gradients=stats, init_config={"direction": "up"})
    with pytest.raises(ValueError, match="apply to init='lora_ga' or init='gora' only"):
        fastlora.inject(model, ["1"], r=2, gradients=stats)
    with pytest.raises(ValueError, match="importance must be one of"):
        fastlora.inject(model, ["1"], r=2, init="gora", gradients=stats, init_config={"importance": "x"})
    assert not fastlora.lora_layers(model)


# ---- GoRA ------------------------------------------------------------------------------------


def test_gora_allocation_hand_computed():
    # Three layers of in+out = 100, 200, 300, r_ref = 4 -> budget 2400; importances 1 : 3 : 6.
    features = {"a": 100, "b": 200, "c": 300}
    alloc = allocate_ranks({"a": 1.0, "b": 3.0, "c": 6.0}, features, r_ref=4, r_min=2, r_max=16)
    # round(2400 * .1) // 100 = 2, round(2400 * .3) // 200 = 3 (720 floors), 1440 // 300 = 4
    assert alloc.ranks == {"a": 2, "b": 3, "c": 4}
    assert alloc.budget == 2400 and alloc.used == 2 * 100 + 3 * 200 + 4 * 300
    # Clamping: a tiny importance gets r_min, a dominant one r_max; the cap min(in, out) binds too.
    alloc = allocate_ranks({"a": 1e-6, "b": 1.0, "c": 1e-6}, features, r_ref=4, r_min=2, r_max=5,
                           caps={"b": 3})
    assert alloc.ranks == {"a": 2, "b": 3, "c": 2}
    # strict_budget repairs the floors: the count comes within one layer's in+out of the budget.
    strict = allocate_ranks({"a": 1.0, "b": 3.0, "c": 6.0}, features, r_ref=4, r_min=2, r_max=16, strict_budget=True)
    assert strict.used <= strict.budget and strict.budget - strict.used < 300
    # Remainders 0.4, 0.6, 0.8: c gains first (2300 used), b no longer fits, a does: 2400 exactly.
    assert strict.ranks == {"a": 3, "b": 3, "c": 5} and strict.used == 2400
    # Zero importance everywhere: all at r_min.
    assert allocate_ranks({"a": 0.0, "b": 0.0}, features, 4, 2, 16).ranks == {"a": 2, "b": 2}


def test_gora_b_is_the_least_squares_solution_and_norm_matched():
    torch.manual_seed(0)
    model, batches, loss_fn = make_mlp_problem()
    stats = fastlora.collect_gradients(model, batches, loss_fn=loss_fn, progress=False)
    alpha, gamma = 16.0, 0.05
    fastlora.inject(model, "all-linear", r=4, lora_alpha=alpha, init="gora", gradients=stats,
                    init_config={"gamma": gamma})
    for name, layer in fastlora.lora_layers(model).items():
        a = layer.lora_A.detach().double()
        g = stats[name].mean.double()
        xi = gamma * math.sqrt(layer.in_features) / alpha
        # argmin_B |B A - (-xi G)|_F, solved as a float64 least-squares problem on the transpose.
        b_ls = torch.linalg.lstsq(a.t(), (-xi * g).t()).solution.t()
        torch.testing.assert_close(layer.lora_B.detach().double(), b_ls, rtol=1e-4, atol=1e-6 * b_ls.abs().max())
        assert layer.use_rslora and layer.scaling == pytest.approx(alpha / math.sqrt(layer.r))
        assert layer.init_method == "gora"
    # Base weights untouched.
    fresh, _, _ = make_mlp_problem()
    for n in ("1", "3", "5"):
        assert torch.equal(model.get_submodule(n).base_layer.weight, fresh.get_submodule(n).weight)


@pytest.mark.parametrize("shape,r", [((512, 256), 4), ((256, 512), 8), ((384, 384), 16), ((512, 512), 32)])
def test_gora_delta_norm_is_gamma_times_gradient_norm(shape, r):
    """|ΔW_0|_F / (γ |Ḡ|_F) in [0.8, 1.25] for random A on realistic shapes."""
    out_f, in_f = shape
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(in_f, out_f))
    batches = [(torch.randn(64, in_f), torch.randn(64, out_f)) for _ in range(2)]
    loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    stats = fastlora.collect_gradients(model, batches, ["0"], loss_fn=loss_fn, progress=False)
    result = fastlora.init.gora(fastlora.inject(model, ["0"], r=r, lora_alpha=16), stats,
                                {"r_ref": r, "r_min": r, "r_max": r})
    ratio = result["layers"]["0"]["delta_over_gamma_grad"]
    assert 0.8 <= ratio <= 1.25, ratio


def test_gora_memory_lean_variant_equals_plain():
    model, batches, loss_fn = make_mlp_problem()
    plain_model, lean_model = copy.deepcopy(model), copy.deepcopy(model)
    r_ref = 4
    a_max = fastlora.init.gora_a_max(model, "all-linear", r_max=4 * r_ref, seed=3)
    exact = fastlora.collect_gradients(model, batches, loss_fn=loss_fn, progress=False)
    lean = fastlora.collect_gradients(model, batches, loss_fn=loss_fn, mode="sketch", sketch_rank=4,
                                      products={n: a.t() for n, a in a_max.items()}, progress=False)
    fastlora.inject(plain_model, "all-linear", r=r_ref, init="gora", gradients=exact, init_config={"seed": 3})
    with pytest.warns(RuntimeWarning, match="importances from sketches are estimates"):
        fastlora.init.gora(fastlora.inject(lean_model, "all-linear", r=r_ref), lean,
                           {"r_ref": r_ref, "seed": 3, "a_max": a_max})
    for name, layer in fastlora.lora_layers(plain_model).items():
        other = fastlora.lora_layers(lean_model)[name]
        r = min(layer.r, other.r)
        assert torch.equal(layer.lora_A[:r], other.lora_A[:r])  # A_i = A_max[:r_i] in both
        # Same A, same B: the streamed Ḡ A_max^T gives B exactly (where the ranks agree).
        if layer.r == other.r:
            torch.testing.assert_close(layer.lora_B, other.lora_B, rtol=1e-4, atol=1e-7)


def test_gora_zero_gradient_layer_gets_r_min_and_a_warning():
    model, batches, loss_fn = make_mlp_problem()

    def loss_without_layer_1(m, batch):  # layer 1's output is not used: zero gradient there
        ids, labels = batch
        m[1](m[0](ids))
        h = m[0](ids).new_zeros(*ids.shape, 24)
        logits = m[5](m[4](m[3](m[2](h))))
        return nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1))

    with pytest.warns(RuntimeWarning):
        stats = fastlora.collect_gradients(model, batches, loss_fn=loss_without_layer_1, progress=False)
    with pytest.warns(RuntimeWarning, match="zero importance get r_min=2"):
        fastlora.inject(model, "all-linear", r=4, init="gora", gradients=stats)
    assert model[1].r == 2 and torch.all(model[1].lora_B == 0)


def test_param_groups():
    model, _, _ = make_mlp_problem()
    fastlora.inject(model, ["1", "3"], r=2, trainable_modules=["5"])
    groups = fastlora.param_groups(model, lr=1e-3, b_lr_ratio=16, weight_decay=0.01)
    by = {g["name"]: g for g in groups}
    assert by["lora_A"]["lr"] == 1e-3 and by["lora_B"]["lr"] == pytest.approx(1.6e-2)
    assert len(by["lora_A"]["params"]) == 2 and len(by["other"]["params"]) == 2  # the head's weight and bias
    assert by["lora_B"]["weight_decay"] == 0.01
    torch.optim.AdamW(groups)  # a valid torch optimizer argument
    with pytest.raises(ValueError, match="lr must be positive"):
        fastlora.param_groups(model, lr=0)


# ---- non-finite gradients change nothing ---------------------------------------------------------


def _nan_stats(model):
    batches = [(X, torch.zeros(5, 3, dtype=F64))]
    stats = fastlora.collect_gradients(model, batches, "all-linear", loss_fn=lambda m, b: (m(b[0]) - b[1]).pow(2).mean(),
                                       progress=False)
    stats["0"].mean[0, 0] = float("nan")
    return stats



@pytest.mark.parametrize("init", ["lora_ga", "gora"])
def test_gradient_inits_with_nan_gradients_change_nothing(init):
    model = base_model()
    stats = _nan_stats(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fastlora.inject(model, "all-linear", r=1, init=init, gradients=stats)
    assert_unchanged(model, before)
    fastlora.inject(model, "all-linear", r=1, adapter_dtype=F64)
    randomise(model, 1)
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or infinite"):
        getattr(fastlora.init, init)(model, stats)
    assert_unchanged(model, before)
