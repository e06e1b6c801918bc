"""The adapter's state machine at the model's boundary: the enabled flag, optimizers, partial
failures, a LoRALinear on its own, PEFT applied on top of fastlora, and argument types. Each test
ends with the model computing a fresh base plus the last adapter, or with a clear error and the
model (every parameter, buffer, flag and module) exactly as before."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
from torch import nn

import fastlora
from fastlora.optim import LoRAPro, LoRAProSGD
from helpers import F64, X, assert_unchanged, base_model, close, expected, ga_model, out, randomise, snapshot


inject_module = importlib.import_module("fastlora.inject")  # fastlora.inject is the function


def adapted(seed=1, **kwargs):
    model = fastlora.inject(base_model(), "all-linear", r=2, lora_alpha=2.0, adapter_dtype=F64, **kwargs)
    randomise(model, seed)
    return model


def refused(model, action, error=(RuntimeError, ValueError, TypeError), match=None):
    """``action()`` raises ``error`` (matching ``match``) and leaves ``model`` exactly as it was."""
    before = snapshot(model)
    with pytest.raises(error, match=match):
        action()
    assert_unchanged(model, before)


def gradients(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    model.train()
    model(torch.randn(7, 6, generator=g, dtype=F64)).pow(2).sum().backward()


# ---- the enabled flag ------------------------------------------------------------------------------


def test_merge_inside_disable_adapter_is_refused_and_the_block_still_ends_cleanly():
    model = adapted()
    base, want = out(base_model()), out(model)
    with fastlora.disable_adapter(model):
        refused(model, lambda: fastlora.merge(model), RuntimeError, "switched off")
        refused(model, lambda: fastlora.lora_layers(model)["0"].merge(), RuntimeError, "switched off")
        refused(model, lambda: fastlora.unload(model), RuntimeError, "switched off")
        close(out(model), base)
    close(out(model), want)
    assert all(layer.adapter_enabled for layer in fastlora.lora_layers(model).values())


def test_merge_after_switching_an_adapter_off_is_refused():
    model = adapted()
    fastlora.lora_layers(model)["2.0"].set_adapter_enabled(False)
    refused(model, lambda: fastlora.merge(model), RuntimeError, "2.0")
    fastlora.lora_layers(model)["2.0"].set_adapter_enabled(True)
    fastlora.merge(model)


def test_a_load_inside_disable_adapter_takes_effect_when_the_block_ends(tmp_path):
    source = adapted(seed=5)
    fastlora.save_adapter(source, tmp_path / "a")
    model = adapted(seed=1)
    with fastlora.disable_adapter(model):
        fastlora.load_adapter(model, tmp_path / "a")
        close(out(model), out(base_model()))
    close(out(model), out(source))


@pytest.mark.parametrize("fmt", ["fastlora", "peft"])
def test_a_head_loaded_inside_disable_adapter_stays_off_until_the_block_ends(tmp_path, fmt):
    source = fastlora.inject(base_model(), "0", r=2, lora_alpha=2.0, adapter_dtype=F64, modules_to_save=["2"])
    randomise(source, 5)
    with torch.no_grad():
        source[2].trained[0].weight.add_(1.0)
    save, load = ((fastlora.save_adapter, fastlora.load_adapter) if fmt == "fastlora"
                  else (fastlora.export_peft, fastlora.import_peft))
    save(source, tmp_path / "a")
    model = adapted(seed=1, exclude_modules=["2.0"])
    with fastlora.disable_adapter(model):
        load(model, tmp_path / "a")
        close(out(model), out(base_model()))
    close(out(model), out(source))


def test_inject_inside_disable_adapter_is_refused_and_unload_inside_it_gives_the_base():
    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64)
    randomise(model, 1)
    with fastlora.disable_adapter(model):
        refused(model, lambda: fastlora.inject(model, "2.0", r=1), RuntimeError, "disable_adapter")
        fastlora.unload(model, merge=False)
    assert not fastlora.lora_layers(model)
    torch.testing.assert_close(out(model), out(base_model()), rtol=0, atol=0)


# ---- optimizers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", [LoRAPro, LoRAProSGD])
def test_lora_pro_refuses_to_step_merged_layers(optimizer):
    model = adapted()
    opt = optimizer(model, lr=1e-2)
    gradients(model)
    fastlora.merge(model)
    refused(model, opt.step, RuntimeError, "merged")
    fastlora.unmerge(model)
    opt.step()


def test_an_adamw_step_while_merged_does_not_corrupt_the_unmerged_base():
    model = adapted()
    opt = torch.optim.AdamW(fastlora.trainable_parameters(model), lr=0.1)
    gradients(model)
    fastlora.merge(model)
    opt.step()  # torch's optimizers know nothing of merges: the adapters move under the merged weight
    fastlora.unmerge(model)
    close(out(model), expected(base_model(), model))


def test_an_optimizer_built_before_unload_still_steps_the_merged_head_after_a_new_inject():
    """As with PEFT: unload(merge=True) leaves the modules_to_save copy (the optimizer's own
    Parameters) trainable in the plain model; a later inject freezes it and keeps its gradient,
    which torch's optimizers still apply (zero_grad before the inject drops it)."""
    model = fastlora.inject(base_model(), "0", r=2, lora_alpha=2.0, adapter_dtype=F64, modules_to_save=["2"])
    opt = torch.optim.AdamW(fastlora.trainable_parameters(model), lr=0.05)
    head = model[2].trained[0].weight
    fastlora.unload(model, merge=True)
    assert model[2][0].weight is head and head.requires_grad
    gradients(model)
    fastlora.inject(model, "0", r=1, adapter_dtype=F64)
    assert not head.requires_grad and head.grad is not None
    before = head.detach().clone()
    opt.step()
    assert not torch.equal(head, before)


@pytest.mark.parametrize("then_inject", [False, True])
def test_lora_pro_refuses_layers_taken_out_by_unload(then_inject):
    model = adapted()
    opt = LoRAPro(model, lr=1e-2, weight_decay=0.1, decay_base_weight=True)
    gradients(model)
    fastlora.unload(model, merge=False)
    if then_inject:  # new layers: the old optimizer would silently update nothing
        fastlora.inject(model, "all-linear", r=2, adapter_dtype=F64)
        gradients(model)
    refused(model, opt.step, RuntimeError, "unloaded")


def test_decay_base_weight_is_a_layer_transition_that_keeps_lora_ga_offsets_exact():
    model, base = ga_model(1)
    layer = fastlora.lora_layers(model)["0"]
    lr, wd = 0.1, 0.5
    opt = LoRAProSGD(model, lr=lr, weight_decay=wd, decay_base_weight=True)
    gradients(model)
    w0 = base.get_submodule("0").weight.detach().clone()
    opt.step()
    factor = 1.0 - lr * wd
    # the original base decays: with the adapter switched off, and after unload(merge=False)
    with fastlora.disable_adapter(model):
        scaled = copy.deepcopy(base)
        with torch.no_grad():
            scaled.get_submodule("0").weight.mul_(factor)
        close(out(model), out(scaled))
    close(out(model), expected(scaled, model))
    plain = fastlora.unload(model, merge=False)
    close(plain.get_submodule("0").weight, factor * w0)
    assert layer.detached


def test_decay_base_weight_is_refused_on_quantized_bases():
    pytest.importorskip("bitsandbytes")
    from helpers import adapted as quantized_model

    model = quantized_model()
    with pytest.raises(ValueError, match="quantized"):
        LoRAPro(model, lr=1e-3, weight_decay=0.1, decay_base_weight=True)
    LoRAPro(model, lr=1e-3, weight_decay=0.1)


# ---- partial changes -------------------------------------------------------------------------------


def test_loading_meta_factors_is_refused_before_the_offset_moves():
    model, _ = ga_model(1)
    layer = fastlora.lora_layers(model)["0"]
    meta = torch.empty(layer.lora_A.shape, device="meta", dtype=F64), torch.empty(layer.lora_B.shape, device="meta",
                                                                                      dtype=F64)
    refused(model, lambda: layer.load_factors(*meta, layer.config), ValueError, "meta")


def test_a_float16_merge_that_overflows_is_refused():
    model = fastlora.inject(base_model().half(), "all-linear", r=2, lora_alpha=2.0)
    with torch.no_grad():
        for layer in fastlora.lora_layers(model).values():
            layer.lora_A.fill_(300.0)
            layer.lora_B.fill_(300.0)
    refused(model, lambda: fastlora.merge(model), ValueError, "not finite")
    assert not any(layer.merged for layer in fastlora.lora_layers(model).values())


def _fail_on_second(monkeypatch, method, error=RuntimeError("CUDA out of memory (simulated)")):
    """Makes LoRALinear.<method> raise on its second call."""
    original = getattr(fastlora.LoRALinear, method)
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 2:
            raise error
        return original(self, *args, **kwargs)

    monkeypatch.setattr(fastlora.LoRALinear, method, failing)


@pytest.mark.parametrize("operation", ["merge", "unmerge", "unload", "unload_plain"])
@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory (simulated)"), KeyboardInterrupt()])
def test_a_failure_on_the_second_layer_puts_the_first_back(monkeypatch, operation, error):
    model, _ = ga_model(1)
    fastlora.inject(model, "2.0", r=1, adapter_dtype=F64)
    randomise(model, 3)
    if operation == "unmerge":
        fastlora.merge(model)
    method = {"merge": "merge", "unmerge": "unmerge", "unload": "unwrap", "unload_plain": "unwrap"}[operation]
    call = {"merge": fastlora.merge, "unmerge": fastlora.unmerge, "unload": fastlora.unload,
            "unload_plain": lambda m: fastlora.unload(m, merge=False)}[operation]
    _fail_on_second(monkeypatch, method, error)
    refused(model, lambda: call(model), type(error))
    assert not any(layer.detached for layer in fastlora.lora_layers(model).values())


@pytest.mark.parametrize("init", ["lora_ga", "gora"])
def test_a_gradient_init_failing_on_the_second_layer_puts_the_first_base_weight_back(monkeypatch, init):
    model = base_model()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 6, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64))]
    stats = fastlora.collect_gradients(model, batches, "all-linear", progress=False,
                                       loss_fn=lambda m, b: (m(b[0]) - b[1]).pow(2).mean())
    fastlora.inject(model, "all-linear", r=1, adapter_dtype=F64)
    _fail_on_second(monkeypatch, "load_factors")
    options = {"svd": "exact"} if init == "lora_ga" else {"r_ref": 1, "r_min": 1, "r_max": 1}
    call = fastlora.init.lora_ga if init == "lora_ga" else fastlora.init.gora
    refused(model, lambda: call(model, stats, options), RuntimeError, "simulated")


def test_inject_failing_after_lora_ga_restores_the_shifted_base_weight_and_every_flag(monkeypatch):
    model = base_model()
    model[0].bias.requires_grad_(False)  # a flag the first inject would otherwise set
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 6, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64))]
    stats = fastlora.collect_gradients(model, batches, "0", progress=False,
                                       loss_fn=lambda m, b: (m(b[0]) - b[1]).pow(2).mean())

    def failing_hook(m):
        raise KeyboardInterrupt

    monkeypatch.setitem(inject_module.MODEL_HOOKS, "failing", (failing_hook, lambda m: None))
    refused(model, lambda: fastlora.inject(model, "0", r=1, adapter_dtype=F64, init="lora_ga", gradients=stats,
                                           init_config={"svd": "exact"}), KeyboardInterrupt)
    assert not fastlora.lora_layers(model)


def test_layers_inside_a_modules_to_save_copy_are_never_adapted():
    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64, modules_to_save=["2"])
    for pattern in ("all-linear", "2.0", r".*\.0"):
        refused(model, lambda: fastlora.inject(model, pattern, r=1), ValueError, "modules_to_save copies")
    assert list(fastlora.lora_layers(model)) == ["0"]
    # nor is a module that contains LoRA layers copied
    refused(model := base_model(), lambda: fastlora.inject(model, "all-linear", r=1, modules_to_save=["2"]),
            ValueError, "which contains")
    model = fastlora.inject(base_model(), "2.0", r=1)
    refused(model, lambda: fastlora.inject(model, "0", r=1, modules_to_save=["2"]), ValueError, "which contains")


# ---- a LoRALinear on its own ------------------------------------------------------------------------


def test_model_functions_take_a_lora_layer_on_its_own():
    torch.manual_seed(0)
    base = nn.Linear(6, 4).double()
    layer = fastlora.LoRALinear(copy.deepcopy(base), r=2, adapter_dtype=F64)
    randomise(layer, 1)
    want = layer.eval()(X)
    fastlora.merge(layer)
    close(layer(X), want)
    fastlora.unmerge(layer)
    with fastlora.disable_adapter(layer):
        close(layer(X), base(X))
    merged = fastlora.unload(layer)
    assert type(merged) is nn.Linear and layer.detached
    close(merged(X), want)


# ---- PEFT applied on top of fastlora ---------------------------------------------------------------


def test_peft_on_top_of_a_fastlora_model_is_caught():
    peft = pytest.importorskip("peft")
    model = adapted()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(target_modules="all-linear", r=2))
    with pytest.raises(TypeError, match="PEFT was applied on top"):
        wrapped(X)
    with pytest.raises(TypeError, match="PEFT"):
        LoRAPro(wrapped, lr=1e-3)


def test_peft_layers_injected_into_a_fastlora_model_are_caught(tmp_path):
    """What transformers' ``model.add_adapter(LoraConfig)`` does (PEFT's ``inject_adapter_in_model``)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(0)
    model = fastlora.inject(transformers.LlamaForCausalLM(config), ["q_proj", "v_proj"], r=2)
    peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["k_proj", "o_proj"], r=2), model)
    with pytest.raises(TypeError, match="PEFT module inside a fastlora model"):
        fastlora.check_no_peft_layers(model)
    with pytest.raises(TypeError, match="PEFT module inside a fastlora model"):
        LoRAPro(model, lr=1e-3)
    for save in (fastlora.save_adapter, fastlora.export_peft, lambda m, d: m.save_pretrained(d)):
        with pytest.raises(TypeError, match="PEFT module inside a fastlora model"):
            save(model, tmp_path / "adapter")
        assert not (tmp_path / "adapter").exists()


# ---- argument types and values ---------------------------------------------------------------------


def test_non_bool_switches_and_bad_hyperparameters_are_refused():
    model = adapted()
    refused(model, lambda: fastlora.unload(model, merge="false"), TypeError, "merge must be True or False")
    with pytest.raises(ValueError, match="trust_region"):
        LoRAPro(model, lr=1e-3, trust_region=True)
    with pytest.raises(ValueError, match="weight_decay"):
        LoRAPro(model, lr=0.0, weight_decay=math.inf)
    with pytest.raises(TypeError, match="shard must be True or False"):
        fastlora.collect_gradients(model, [X], "all-linear", shard="no", progress=False,
                                   loss_fn=lambda m, b: m(b).sum())


# ---- transitions that must not keep an old offset or scale -----------------------------------------


def test_set_rank_removes_the_lora_ga_offset_and_its_init():
    model, base = ga_model(1)
    layer = fastlora.lora_layers(model)["0"]
    layer.set_rank(1)
    assert layer.base_offset is None and layer.init_method == "lora"
    close(out(model), out(base))


def test_unload_without_merge_removes_the_lora_ga_offset():
    model, base = ga_model(1)
    fastlora.unload(model, merge=False)
    close(out(model), out(base))


def test_the_same_offset_under_another_scale_moves_the_base_weight():
    model, base = ga_model(1)
    layer = fastlora.lora_layers(model)["0"]
    a0, b0 = (t.clone() for t in layer.base_offset)
    config = fastlora.AdapterConfig(layer.r, 2 * layer.lora_alpha, use_rslora=layer.use_rslora, init="lora_ga")
    layer.load_factors(layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), config, (a0, b0))
    close(out(model), expected(base, model))


def test_set_adapter_is_a_deprecated_alias_of_load_factors():
    model = adapted()
    layer = fastlora.lora_layers(model)["0"]
    with pytest.deprecated_call():
        layer.set_adapter(torch.zeros_like(layer.lora_A), torch.zeros_like(layer.lora_B), layer.config)
    assert not layer.lora_A.detach().any()


def test_a_state_dict_carries_the_lora_ga_offset_with_the_weight_that_holds_it():
    model, base = ga_model(1)
    other, _ = ga_model(2)  # the same layers, another offset
    assert {"0.lora_A0", "0.lora_B0"} <= set(model.state_dict())
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(out(other), out(model), rtol=0, atol=0)
    for mine, theirs in zip(fastlora.lora_layers(model)["0"].base_offset, fastlora.lora_layers(other)["0"].base_offset):
        assert torch.equal(mine, theirs)
    fastlora.unload(other, merge=False)  # the original base comes back: the record came with the weight
    close(out(other), out(base))
    with pytest.raises(RuntimeError, match="lora_A0"):  # a model without the offset cannot take that state
        fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64).load_state_dict(model.state_dict())
