"""LoRA on quantized (bitsandbytes) bases: forward, gradients against PEFT's QLoRA layer, dropout,
saved memory, merge with and without re-quantisation. CPU; skipped without bitsandbytes."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import fastlora
from fastlora.testing import reference
from fastlora.quantized import cpu_repacking, dense_weight

from conftest import assert_matches, magnitude
from helpers import ALPHA, IN, KIND_IDS, KINDS, OUT, R, adapted, quantized_linear

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")

def branch(x, a, b, s):
    return s * (x @ a.t()) @ b.t()


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_forward_is_the_quantized_forward_plus_the_branch(kind):
    model = adapted(kind)
    layer = model[0]
    x = torch.randn(3, 5, IN)
    y = model(x)
    with torch.no_grad():
        base = layer.base_layer(x)
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    expected = base.double() + branch(x.double(), a, b, layer.scaling)
    assert y.dtype == x.dtype and y.shape == (3, 5, OUT)
    assert_matches(y, expected, torch.float32, "y", magnitude(branch, x, a, b, layer.scaling))


def peft_twin(kind, layer: fastlora.LoRALinear) -> nn.Module:
    """PEFT's QLoRA layer on an identical quantized base, with the same A and B."""
    peft = pytest.importorskip("peft")
    peft_bnb = pytest.importorskip("peft.tuners.lora.bnb")
    cls = peft_bnb.Linear8bitLt if kind[0] == "int8" else peft_bnb.Linear4bit
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0)
    twin = cls(quantized_linear(kind), "default", config, r=R, lora_alpha=ALPHA)
    twin.lora_A.float(), twin.lora_B.float()  # PEFT stores them in a bfloat16 compute dtype; ours are float32
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(layer.lora_A)
        twin.lora_B["default"].weight.copy_(layer.lora_B)
    return twin


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_gradients_match_peft_qlora(kind):
    model = adapted(kind)
    layer = model[0]
    twin = peft_twin(kind, layer)
    x = torch.randn(7, IN)
    dy = torch.randn(7, OUT)
    results = []
    for module, a, b in ((layer, layer.lora_A, layer.lora_B),
                         (twin, twin.lora_A["default"].weight, twin.lora_B["default"].weight)):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.backward(dy)
        results.append((y.detach(), xi.grad, a.grad, b.grad))
    s = layer.scaling
    w = dense_weight(layer.base_layer).double()
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    bounds = {  # the size of the summed terms of each result
        "y": magnitude(lambda x_, w_, a_, b_: x_ @ w_.t() + branch(x_, a_, b_, s), x, w, a, b),
        "dx": magnitude(lambda d, w_, a_, b_: d @ w_ + s * (d @ b_) @ a_, dy, w, a, b),
        "dA": magnitude(lambda d, x_, b_: s * (d @ b_).t() @ x_, dy, x, b),
        "dB": magnitude(lambda d, x_, a_: s * d.t() @ (x_ @ a_.t()), dy, x, a),
    }
    compute = kind[2] or torch.float32
    for what, ours, theirs in zip(("y", "dx", "dA", "dB"), results[0], results[1]):
        # dx runs through the base's backward, in its compute dtype in both layers
        dtype = compute if what in ("y", "dx") else torch.float32
        assert_matches(ours, theirs.double(), dtype, what, bounds[what])


def test_dropout_mask_is_the_same_in_forward_and_backward():
    p = 0.5
    model = adapted(dropout=p).train()
    layer = model[0]
    x = torch.randn(9, IN, requires_grad=True)
    dy = torch.randn(9, OUT)
    torch.manual_seed(123)
    y = model(x)
    y.backward(dy)
    torch.manual_seed(123)  # the seed the layer drew (the quantized forward draws no random numbers)
    seed = fastlora.functional.new_dropout_seed("cpu")
    keep = reference.dropout_mask(seed, 9, IN, p).double() / (1 - p)
    s = layer.scaling
    w = dense_weight(layer.base_layer).double()
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    xd, dyd = x.detach().double(), dy.double()
    with torch.no_grad():
        base = layer.base_layer(x).double()
    assert keep.min() == 0 and keep.max() > 0  # some dropped, some kept
    assert_matches(y, base + branch(xd * keep, a, b, s), torch.float32, "y", magnitude(branch, xd, a, b, s))
    assert_matches(layer.lora_A.grad, s * (dyd @ b).t() @ (xd * keep), torch.float32, "dA",
                   magnitude(lambda d, x_, b_: s * (d @ b_).t() @ x_, dyd, xd, b))
    assert_matches(layer.lora_B.grad, s * dyd.t() @ ((xd * keep) @ a.t()), torch.float32, "dB",
                   magnitude(lambda d, x_, a_: s * d.t() @ (x_ @ a_.t()), dyd, xd, a))
    assert_matches(x.grad, dyd @ w + s * ((dyd @ b) @ a) * keep, torch.float32, "dx",
                   magnitude(lambda d, w_, a_, b_: d @ w_ + s * (d @ b_) @ a_, dyd, w, a, b))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("offset", [False, True], ids=["lora", "lora_ga_offset"])
def test_the_branch_saves_x_and_a_T_by_r_tensor_only(offset, dropout):
    model = adapted(dropout=dropout).train()
    layer = model[0]
    if offset:  # without dropout the offset term shares the branch (T x 2r), with it keeps its own T x r
        config = dataclasses.replace(layer.config, init="lora_ga")
        layer.load_factors(layer.lora_A.detach(), layer.lora_B.detach(), config,
                            (layer.lora_A.detach(), layer.lora_B.detach()))
    x = torch.randn(11, IN, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    own = {t.data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    activations = {t.data_ptr(): t for t in saved if t.data_ptr() not in own and t.data_ptr() != x.data_ptr()
                   and t.numel() > 1 and t.shape[0] == x.shape[0]}  # T rows: what grows with the batch
    factors = [t for t in saved if t.data_ptr() not in own and t.data_ptr() not in activations
               and t.data_ptr() != x.data_ptr() and t.numel() > 1]
    want = [(11, R)] if not offset else ([(11, 2 * R)] if dropout == 0.0 else [(11, R), (11, R)])
    assert sorted(tuple(t.shape) for t in activations.values()) == want
    # Nothing else but the concatenated factors [A; A0], [B, -B0] of the shared branch.
    assert all(t.numel() <= 2 * R * max(t.shape) for t in factors), [tuple(t.shape) for t in factors]


@pytest.mark.parametrize("kind", [KINDS[0], KINDS[-1]], ids=[KIND_IDS[0], KIND_IDS[-1]])
def test_merge_is_refused_and_explains_rounding(kind):
    model = adapted(kind)
    x = torch.randn(4, IN)
    before = model(x).detach()
    weight = dense_weight(model[0].base_layer).clone()
    with pytest.raises(ValueError, match="rounds W"):
        fastlora.merge(model)
    with pytest.raises(ValueError, match="allow_requantize=True"):
        fastlora.merge_and_unload(model)
    assert not model[0].merged and isinstance(model[0], fastlora.LoRALinear)
    assert torch.equal(dense_weight(model[0].base_layer), weight)
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("kind", [KINDS[0], KINDS[3], KINDS[-1]], ids=[KIND_IDS[0], KIND_IDS[3], KIND_IDS[-1]])
def test_merge_with_requantize_reports_its_error_and_unmerges_exactly(kind):
    model = adapted(kind)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.mul_(1e-2)
    x = torch.randn(4, IN)
    before = model(x).detach()
    quantized = dense_weight(layer.base_layer).clone()
    target = quantized + layer.delta_weight()
    with pytest.warns(RuntimeWarning, match="re-quantized 1 merged layers"):
        fastlora.merge(model, allow_requantize=True)
    assert layer.merged
    merged = dense_weight(layer.base_layer)
    error = merged - target
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge(allow_requantize=True)
    fastlora.unmerge(model)
    report = layer.merge(allow_requantize=True)  # the same merge again gives the same report
    assert report["max_abs_error"] == pytest.approx(error.abs().max().item(), rel=1e-6)
    assert report["relative_error"] == pytest.approx((error.norm() / target.norm()).item(), rel=1e-5)
    assert 0 < report["relative_error"] < 1
    # merged, the layer is the re-quantized base alone
    y = model(x)
    with torch.no_grad():
        assert torch.equal(y, layer.base_layer(x))
    fastlora.unmerge(model)
    assert torch.equal(dense_weight(layer.base_layer), quantized)
    assert torch.equal(model(x), before)


def test_merge_and_unload_with_requantize_gives_a_quantized_layer():
    model = adapted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fastlora.unload(model, merge=True, allow_requantize=True)
    assert type(model[0]) is bnb.nn.Linear4bit


def test_an_adapted_layer_is_never_repacked_and_a_repacked_one_is_refused():
    model = adapted().eval()
    x = torch.randn(3, IN)
    with torch.no_grad():  # bitsandbytes would repack the weight for CPU inference here
        model(x)
    assert not getattr(model[0].base_layer.weight.quant_state, "packing_format_for_cpu", False)
    layer = quantized_linear(in_f=64, out_f=32).eval()  # shapes bitsandbytes' CPU layout takes
    layer.support_avx512bf16_for_cpu = True  # as on an AVX512-BF16 CPU (the repacking runs on any CPU)
    with torch.no_grad():
        layer(torch.randn(3, 64))
    assert layer.weight.quant_state.absmax.dtype == torch.bfloat16  # the scales were rounded
    with pytest.raises(TypeError, match="repacked"):
        fastlora.inject(nn.Sequential(layer), "all-linear", r=2)


# ---- gradients and gradient inits on quantized bases -------------------------------------------------

HIDDEN, TOKENS, BATCHES = 32, 16, 3


def quantized_mlp(kind=KINDS[0]) -> nn.Sequential:
    return nn.Sequential(quantized_linear(kind, 0, IN, HIDDEN), nn.Tanh(), quantized_linear(kind, 1, HIDDEN, OUT))


def dequantized_twin(model: nn.Sequential, dtype=torch.float32) -> nn.Sequential:
    """The same network with plain layers holding the dequantized weights."""
    twin = []
    for m in model:
        if isinstance(m, nn.Linear):
            plain = nn.Linear(m.in_features, m.out_features, dtype=dtype)
            with torch.no_grad():
                plain.weight.copy_(dense_weight(m))
                plain.bias.copy_(m.bias)
            m = plain
        twin.append(m)
    return nn.Sequential(*twin)


def problem():
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(TOKENS, IN, generator=g), torch.randn(TOKENS, OUT, generator=g)) for _ in range(BATCHES)]
    return batches, lambda model, batch: nn.functional.mse_loss(model(batch[0]), batch[1])


def reference_gradients(model: nn.Sequential, batches, loss_fn):
    """{layer name: (mean gradient, mean of |dy|^T |x|)} in float64 through the dequantized weights."""
    twin = dequantized_twin(model, torch.float64)
    sums = {}
    for x, t in batches:
        inputs, outputs = {}, {}

        def keep(module, args, y, name):
            y.retain_grad()
            inputs[name], outputs[name] = args[0], y

        hooks = [m.register_forward_hook(lambda m, a, y, n=n: keep(m, a, y, n))
                 for n, m in twin.named_children() if isinstance(m, nn.Linear)]
        loss_fn(twin, (x.double(), t.double())).backward()
        for h in hooks:
            h.remove()
        for n in inputs:
            dy, xi = outputs[n].grad, inputs[n].detach()
            g, size = sums.get(n, (0, 0))
            sums[n] = (g + dy.t() @ xi, size + dy.abs().t() @ xi.abs())
    return {n: (g / len(batches), size / len(batches)) for n, (g, size) in sums.items()}


def test_collect_gradients_on_a_quantized_model_is_the_gradient_through_the_dequantized_weights():
    model = quantized_mlp()
    batches, loss_fn = problem()
    expected = reference_gradients(model, batches, loss_fn)
    exact = fastlora.collect_gradients(model, batches, loss_fn=loss_fn, progress=False)
    sketch = fastlora.collect_gradients(model, batches, loss_fn=loss_fn, mode="sketch", sketch_rank=4,
                                        progress=False)
    assert set(exact) == set(expected) == {"0", "2"}
    for name, (g, size) in expected.items():
        assert exact[name].mean.dtype == torch.float32 and exact[name].mean.shape == g.shape
        assert_matches(exact[name].mean, g, torch.float32, name, size.max().item())
        omega = sketch[name].sketch.omega.double()
        assert_matches(sketch[name].sketch.range, g @ omega, torch.float32, f"{name} sketch",
                       (size @ omega.abs()).max().item())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def merged_change_of_one_step(model, batches, loss_fn, lr=0.1):
    """{layer: s·(B1 A1 - B0 A0)} in float64 after one SGD step on the first batch, and the size
    of the terms it is the difference of."""
    layers = fastlora.lora_layers(model)
    before = {n: (l.lora_A.detach().double().clone(), l.lora_B.detach().double().clone()) for n, l in layers.items()}
    opt = torch.optim.SGD(fastlora.trainable_parameters(model), lr=lr)
    loss_fn(model, batches[0]).backward()
    opt.step()
    out = {}
    for n, l in layers.items():
        a0, b0 = before[n]
        a1, b1 = l.lora_A.detach().double(), l.lora_B.detach().double()
        out[n] = (l.scaling * (b1 @ a1 - b0 @ a0), l.scaling * (b0.abs() @ a0.abs()).max().item())
    return out


@pytest.mark.parametrize("init", ["lora_ga", "gora"])
def test_gradient_inits_on_a_quantized_base_match_the_dequantized_float_base(init):
    batches, loss_fn = problem()
    model = quantized_mlp()
    twin = dequantized_twin(model)
    x = batches[0][0]
    base_output = model(x).detach()
    options = dict(r=4, lora_alpha=8.0, init=init)
    if init == "gora":
        options["init_config"] = {"r_min": 2, "r_max": 8}
    for m in (model, twin):
        stats = fastlora.collect_gradients(m, batches, loss_fn=loss_fn, progress=False)
        fastlora.inject(m, "all-linear", gradients=stats, **options)
    layers, twin_layers = fastlora.lora_layers(model), fastlora.lora_layers(twin)
    assert all(layer.quantized for layer in layers.values())
    assert {n: l.r for n, l in layers.items()} == {n: l.r for n, l in twin_layers.items()}
    if init == "lora_ga":
        # the offset is exact: the model still computes its base
        assert all(layer.base_offset is not None for layer in layers.values())
        sizes = [l.scaling * (l.lora_B.abs() @ l.lora_A.abs()).max().item() for l in layers.values()]
        assert_matches(model(x), base_output.double(), torch.float32, "output at init",
                       max(sizes) * x.abs().sum(-1).max().item())
    ours = merged_change_of_one_step(model, batches, loss_fn)
    theirs = merged_change_of_one_step(twin, batches, loss_fn)
    for name, (delta, size) in ours.items():
        assert delta.abs().max() > 0
        assert_matches(delta, theirs[name][0], torch.float32, f"{name} first step", size)


def test_lora_ga_on_a_quantized_base_saves_loads_and_exports(tmp_path):
    peft = pytest.importorskip("peft")
    batches, loss_fn = problem()
    model = quantized_mlp()
    stats = fastlora.collect_gradients(model, batches, loss_fn=loss_fn, progress=False)
    fastlora.inject(model, "all-linear", r=4, lora_alpha=8.0, init="lora_ga", gradients=stats)
    merged_change_of_one_step(model, batches, loss_fn)  # trained: A != A0
    x = batches[1][0]
    model.eval()
    with torch.no_grad():
        expected = model(x)
    fastlora.save_adapter(model, tmp_path / "fl")
    loaded = fastlora.load_adapter(quantized_mlp(), tmp_path / "fl")
    assert all(l.base_offset is not None for l in fastlora.lora_layers(loaded).values())
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), expected)
    fastlora.export_peft(model, tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(quantized_mlp(), str(tmp_path / "peft")).eval()
    for m in peft_model.modules():  # the same (portable) weight layout as fastlora's layers
        cpu_repacking(m, False)
    with torch.no_grad():
        theirs = peft_model(x)
    size = max(l.scaling * (l.lora_B.abs() @ l.lora_A.abs()).max().item()
               for l in fastlora.lora_layers(model).values()) * x.abs().sum(-1).max().item()
    assert_matches(theirs, expected.double(), torch.float32, "PEFT's output", size)


def lora_ga_model():
    batches, loss_fn = problem()
    model = quantized_mlp()
    stats = fastlora.collect_gradients(model, batches, loss_fn=loss_fn, progress=False)
    return fastlora.inject(model, "all-linear", r=4, lora_alpha=8.0, init="lora_ga", gradients=stats), batches


def test_transitions_of_a_lora_ga_layer_on_a_quantized_base():
    model, batches = lora_ga_model()
    x = batches[0][0]
    base = quantized_mlp()
    with torch.no_grad():
        original = base(x)
        with fastlora.disable_adapter(model):  # the weight never held the offset
            assert torch.equal(model(x), original)
        layer = model[0]
        layer.lora_B.add_(0.1)
        target = dense_weight(layer.base_layer) + layer.delta_weight() - layer.delta_weight(*layer.base_offset)
        report = layer.merge(allow_requantize=True)  # the offset is merged too
        assert report["max_abs_error"] == pytest.approx((dense_weight(layer.base_layer) - target).abs().max().item(),
                                                        rel=1e-6)
        layer.unmerge()
        assert layer.base_offset is not None and torch.equal(dense_weight(layer.base_layer), dense_weight(base[0]))
        layer.reset_lora_parameters()
        model[2].set_rank(2)
        assert all(l.base_offset is None for l in fastlora.lora_layers(model).values())
        assert torch.equal(model(x), original)  # B = 0, no offset left


def test_lora_pro_trains_on_a_quantized_base():
    model, batches = lora_ga_model()
    _, loss_fn = problem()
    opt = fastlora.optim.LoRAPro(model, lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn(model, batches[0])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_unsupported_quantized_layers_are_refused_before_any_change():
    fp16_compute = bnb.nn.Linear4bit(IN, OUT, compute_dtype=torch.float16).to("cpu")
    float_int8 = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=True).to("cpu")
    for layer, match in ((fp16_compute, "compute dtype"), (float_int8, "has_fp16_weights")):
        model = nn.Sequential(layer)
        with pytest.raises(TypeError, match=match):
            fastlora.inject(model, "all-linear", r=2)
        assert model[0] is layer and all(not p.requires_grad or p.grad is None for p in model.parameters())


@pytest.mark.parametrize("cls", ["LinearNF4", "LinearFP4"])
def test_the_4bit_subclasses_with_an_unset_compute_dtype(cls):
    torch.manual_seed(0)
    model = fastlora.inject(nn.Sequential(getattr(bnb.nn, cls)(IN, OUT).to("cpu")), "all-linear", r=R, lora_alpha=ALPHA)
    layer = model[0]
    assert layer.base_layer.compute_dtype is None and layer.quantized
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, IN)
    y = model(x)
    with torch.no_grad():
        base = layer.base_layer(x)
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    assert_matches(y, base.double() + branch(x.double(), a, b, layer.scaling), torch.float32, "y",
                   magnitude(branch, x, a, b, layer.scaling))
