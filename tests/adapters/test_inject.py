"""fastlora.inject and the model-level helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlora
from helpers import assert_unchanged, base_model, randomise, snapshot


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + self.q_proj(x) * self.v_proj(x) + self.mlp(x))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(16, 10, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def test_suffix_targets_freeze_and_helpers():
    model = Model()
    ids = torch.randint(0, 10, (2, 5))
    before = model(ids)
    out = fastlora.inject(model, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    assert out is model
    layers = fastlora.lora_layers(model)
    assert list(layers) == [f"layers.{i}.{n}" for i in range(2) for n in ("q_proj", "v_proj")]
    assert torch.equal(model(ids), before)  # B = 0 at init
    trainable = fastlora.trainable_parameters(model)
    assert len(trainable) == 8 and all(p.requires_grad for p in trainable)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"{k}.lora_{ab}" for k in layers for ab in "AB"}
    state = fastlora.adapter_state_dict(model)
    assert set(state) == names and state["layers.0.q_proj.lora_A"].shape == (4, 16)
    # The base module is kept (state-dict keys stay valid under .base_layer).
    assert "layers.0.q_proj.base_layer.weight" in model.state_dict()


def test_all_linear_skips_output_head_and_regex_targets():
    model = fastlora.inject(Model(), "all-linear", r=2)
    assert "lm_head" not in fastlora.lora_layers(model)
    assert len(fastlora.lora_layers(model)) == 8
    regex = fastlora.inject(Model(), target_modules=r"layers\.1\.mlp\.[02]", r=2)
    assert list(fastlora.lora_layers(regex)) == ["layers.1.mlp.0", "layers.1.mlp.2"]


def test_rank_and_alpha_patterns_exclude_and_trainable_modules():
    model = fastlora.inject(
        Model(),
        "all-linear",
        r=4,
        lora_alpha=8,
        rank_pattern={"layers.0.q_proj": 2, r"mlp\.0": 8},
        alpha_pattern={"v_proj": 1},
        exclude_modules=["layers.1.v_proj"],
        trainable_modules=["norm"],
        use_rslora=True,
    )
    layers = fastlora.lora_layers(model)
    assert layers["layers.0.q_proj"].r == 2 and layers["layers.1.q_proj"].r == 4
    assert layers["layers.0.mlp.0"].r == 8 and layers["layers.0.mlp.2"].r == 4
    assert layers["layers.0.v_proj"].lora_alpha == 1 and layers["layers.0.v_proj"].scaling == 0.5
    assert "layers.1.v_proj" not in layers
    assert model.layers[0].norm.weight.requires_grad and not model.embed.weight.requires_grad


def test_merge_and_unmerge_model():
    model = fastlora.inject(Model(), ["q_proj"], r=2).eval()
    for layer in fastlora.lora_layers(model).values():
        nn.init.normal_(layer.lora_B)
    ids = torch.randint(0, 10, (3, 4))
    y = model(ids)
    fastlora.merge(model)
    torch.testing.assert_close(model(ids), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        fastlora.merge(model)
    fastlora.unmerge(model)
    torch.testing.assert_close(model(ids), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="not merged"):
        fastlora.unmerge(model)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(target_modules=["k_proj"]), ValueError, "no module matched"),
        (dict(target_modules=["mlp"]), ValueError, "adapts nn.Linear layers only"),
        (dict(target_modules=["q_proj"], r=17), ValueError, r"layers\.0\.q_proj: rank r=17"),
        (dict(target_modules=["q_proj"], rank_pattern={"q_proj": 0}), ValueError, "rank r=0"),
        (dict(target_modules=["q_proj"], lora_alpha=-1), ValueError, "lora_alpha must be a positive"),
        (dict(target_modules=["q_proj"], lora_dropout=1.5), ValueError, "lora_dropout"),
        (dict(target_modules="(", r=2), ValueError, "not a valid regular expression"),
        (dict(target_modules=3, r=2), TypeError, "target_modules must be"),
        (dict(init="nope"), ValueError, "unknown init"),
    ],
)
def test_inject_errors_leave_the_model_untouched(kwargs, error, message):
    model = Model()
    with pytest.raises(error, match=message):
        fastlora.inject(model, **kwargs)
    assert not fastlora.lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_inject_twice_and_helpers_without_adapters():
    model = fastlora.inject(Model(), ["q_proj"], r=2)
    with pytest.raises(ValueError, match="already adapted"):
        fastlora.inject(model, ["q_proj"], r=2)
    with pytest.raises(ValueError, match="no LoRA layers"):
        fastlora.merge(Model())


# ---- refusals, and failed calls that leave the model as it was -----------------------------------


def test_second_inject_keeps_the_first_adapters_trainable():
    model = fastlora.inject(base_model(), "0", r=2)
    fastlora.inject(model, ["2.0"], r=1)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags == {"0.base_layer.weight": False, "0.base_layer.bias": False, "0.lora_A": True, "0.lora_B": True,
                     "2.0.base_layer.weight": False, "2.0.base_layer.bias": False, "2.0.lora_A": True,
                     "2.0.lora_B": True}



def test_inject_refuses_a_peft_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(base_model(), peft.LoraConfig(r=2, target_modules=["0"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="merge_and_unload.*import_peft"):
        fastlora.inject(model, "all-linear", r=2)
    assert_unchanged(model, before)



@pytest.mark.parametrize("kwargs,error", [
    (dict(adapter_dtype=torch.int32), TypeError),
    (dict(generator="seed"), TypeError),
])
def test_inject_errors_change_nothing(kwargs, error):
    model = base_model()
    before = snapshot(model)
    with pytest.raises(error):
        fastlora.inject(model, "0", r=2, **kwargs)
    assert_unchanged(model, before)



class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 6)
        self.body = nn.Linear(6, 6)
        self.lm_head = nn.Linear(6, 7, bias=False)
        self.lm_head.weight = self.embed.weight


    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.embed(ids))))



def test_tied_head_is_refused_and_merge_leaves_embeddings_alone():
    model = Tied()
    before = snapshot(model)
    with pytest.raises(ValueError, match="tied to embed.weight"):
        fastlora.inject(model, ["lm_head"], r=2)
    assert_unchanged(model, before)
    fastlora.inject(model, ["body"], r=2)
    embeddings = model.embed.weight.detach().clone()
    randomise(model, 1)
    fastlora.merge(model)
    assert torch.equal(model.embed.weight, embeddings)



class QuantizedLinear(nn.Linear):
    """Stands in for a bitsandbytes layer: an nn.Linear subclass with its own forward."""


    def forward(self, x):
        return super().forward(x).round()



def test_quantized_or_custom_linear_layers_are_refused():
    model = nn.Sequential(QuantizedLinear(6, 4))
    before = snapshot(model)
    with pytest.raises(TypeError, match="its own forward"):
        fastlora.inject(model, "all-linear", r=2)
    assert_unchanged(model, before)



@pytest.mark.parametrize("kind", ["Linear8bitLt", "Linear4bit"])
def test_bitsandbytes_layers_are_adapted_unless_unquantized(kind):
    bnb = pytest.importorskip("bitsandbytes")


    def layer():
        if kind == "Linear8bitLt":
            return bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False)
        return bnb.nn.Linear4bit(16, 16)


    model = nn.Sequential(layer())  # not quantized until moved to a device
    before = snapshot(model)
    with pytest.raises(TypeError, match="not quantized"):
        fastlora.inject(model, "all-linear", r=2)
    assert_unchanged(model, before)
    model = fastlora.inject(nn.Sequential(layer().to("cpu")), "all-linear", r=2)
    assert model[0].quantized



def test_meta_weights_complex_bases_and_infinite_alpha_are_refused():
    w = torch.empty(4, 6, device="meta")
    with pytest.raises(ValueError, match="meta"):
        fastlora.lora_linear(torch.randn(3, 6), w, None, torch.randn(2, 6), torch.randn(4, 2), 1.0)
    with pytest.raises(TypeError, match="dtype torch.complex64"):
        fastlora.LoRALinear(nn.Linear(6, 4, dtype=torch.complex64), r=2)
    with pytest.raises(ValueError, match="finite"):
        fastlora.LoRALinear(nn.Linear(6, 4), r=2, lora_alpha=float("inf"))
    with pytest.raises(ValueError, match="scale must be finite"):
        fastlora.lora_linear(torch.randn(3, 6), torch.randn(4, 6), None, torch.randn(2, 6), torch.randn(4, 2),
                             float("nan"))


# ---- the package's import structure and model hooks ------------------------------------------------


def _run_python(code: str) -> str:
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


HEAVY = "[m for m in sys.modules if m.split('.')[:2] in (['fastlora', 'gradients'], ['fastlora', 'init'])]"


@pytest.mark.parametrize("statement", ["import fastlora.inject", "import fastlora", "import fastlora.init.pissa"])
def test_inject_and_the_package_import_without_the_gradient_engine_or_the_initialisers(statement):
    # A fresh interpreter: this one has imported everything already.
    out = _run_python(f"import sys; {statement}; print({HEAVY})")
    expected = ["fastlora.init", "fastlora.init.pissa"] if statement.endswith("pissa") else []
    assert sorted(eval(out)) == expected  # pissa needs neither the gradient engine nor the other inits


def test_lazy_public_names_load_on_first_use_and_are_the_modules_objects():
    out = _run_python(
        "import sys, fastlora; assert 'fastlora.gradients' not in sys.modules\n"
        "from fastlora import GradientStats\n"
        "import fastlora.gradients as g, fastlora.optim.lora_pro as lp\n"
        "assert GradientStats is g.GradientStats and fastlora.collect_gradients is g.collect_gradients\n"
        "assert fastlora.optim.LoRAPro is lp.LoRAPro and fastlora.param_groups is fastlora.optim.param_groups\n"
        "from fastlora.init.gora import allocate_ranks  # binds the submodule gora on the package...\n"
        "assert callable(fastlora.init.gora) and fastlora.init.gora.__name__ == 'gora'  # ...the function stays\n"
        "assert callable(fastlora.init.lora_ga) and fastlora.init.principal_init.__name__ == 'principal_init'\n"
        "assert {'collect_gradients', 'init', 'optim', 'GradientStats'} <= set(dir(fastlora))\n"
        "assert 'ops' not in fastlora.__all__ and 'reference' not in fastlora.__all__\n"
        "print('ok')")
    assert out.strip() == "ok"
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        fastlora.no_such_name  # noqa: B018


def test_model_hooks_are_registered_once_by_name_and_a_reload_replaces_them():
    import importlib

    inject_module = importlib.import_module("fastlora.inject")  # fastlora.inject is the function
    hf, peft_methods = importlib.import_module("fastlora.hf"), importlib.import_module("fastlora.peft_methods")
    saved = dict(inject_module.MODEL_HOOKS)
    try:
        assert list(saved) == ["hf", "peft_methods"]
        assert saved["hf"] == (hf.attach, hf.detach) and saved["peft_methods"] == (peft_methods.attach,
                                                                                    peft_methods.detach)
        importlib.reload(fastlora)  # registers again: replaces, never appends
        assert inject_module.MODEL_HOOKS == saved
        calls = []
        inject_module.register_model_hooks("probe", lambda m: calls.append("added"), lambda m: calls.append("x"))
        inject_module.register_model_hooks("probe", lambda m: calls.append("added again"),
                                           lambda m: calls.append("removed"))
        assert list(inject_module.MODEL_HOOKS) == ["hf", "peft_methods", "probe"]
        model = fastlora.inject(Model(), ["q_proj"], r=2)
        assert callable(model.__dict__["merge_and_unload"])  # PEFT's methods, from the registered hook
        fastlora.unload(model)
        assert calls == ["added again", "removed"] and "merge_and_unload" not in model.__dict__
        with pytest.raises(TypeError, match="callables"):
            inject_module.register_model_hooks("probe", None, None)
    finally:
        inject_module.MODEL_HOOKS.clear()
        inject_module.MODEL_HOOKS.update(saved)
