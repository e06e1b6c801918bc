"""A PEFT user's LoraConfig: every field honoured (same adapted modules, ranks, scales, dropout and
outputs as PEFT's get_peft_model on the same model) or refused by name; PEFT's model methods;
parameter counts equal PEFT's on float, 4-bit and 8-bit bases; export writes what LoraConfig would."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

import fastlora
from fastlora import config as fconfig
from helpers import llama_logits, peft_layers, tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

def twins(config_kwargs, cls=None):
    """PEFT's and fastlora's model from the same base and the same LoraConfig, with the same
    (nonzero) adapters."""
    base = tiny_llama(cls)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config_kwargs))
    ours = fastlora.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config_kwargs))
    g = torch.Generator().manual_seed(1)
    twin_layers = peft_layers(theirs)
    with torch.no_grad():
        for name, layer in fastlora.lora_layers(ours).items():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
            twin = twin_layers[name]
            twin.lora_A["default"].weight.copy_(layer.lora_A)
            twin.lora_B["default"].weight.copy_(layer.lora_B)
    return theirs, ours, twin_layers


HONOURED = {
    "defaults": dict(target_modules=["q_proj", "v_proj"]),
    "r_alpha": dict(target_modules=["q_proj", "v_proj"], r=3, lora_alpha=5),
    "target_regex": dict(target_modules=r".*\.(k_proj|up_proj)"),
    "all_linear": dict(target_modules="all-linear"),
    "target_default_for_llama": dict(target_modules=None),
    "exclude_modules": dict(target_modules="all-linear", exclude_modules=["o_proj", "down_proj"]),
    "lora_dropout": dict(target_modules=["q_proj"], lora_dropout=0.25),
    "use_rslora": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=6, use_rslora=True),
    "rank_alpha_pattern": dict(target_modules="all-linear", r=2, rank_pattern={"q_proj": 4, "layers.1.mlp.up_proj": 5},
                               alpha_pattern={"v_proj": 3.0}),
    "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "task_type": dict(target_modules=["q_proj"], task_type="CAUSAL_LM"),
    "inference_mode": dict(target_modules=["q_proj"], inference_mode=True, modules_to_save=["lm_head"]),
    "gaussian": dict(target_modules=["q_proj"], init_lora_weights="gaussian"),
    "peft_defaults_spelled_out": dict(target_modules=["q_proj"], bias="none", fan_in_fan_out=False, use_dora=False,
                                      layers_to_transform=None, loftq_config={}, revision=None),
}


@pytest.mark.parametrize("kwargs", HONOURED.values(), ids=HONOURED.keys())
def test_an_honoured_field_adapts_as_peft_does(kwargs):
    theirs, ours, twin_layers = twins(kwargs)
    layers = fastlora.lora_layers(ours)
    assert sorted(layers) == sorted(twin_layers)  # the same adapted modules
    for name, layer in layers.items():
        twin = twin_layers[name]
        assert layer.r == twin.r["default"]
        assert layer.scaling == pytest.approx(twin.scaling["default"], rel=1e-12)
        dropout = twin.lora_dropout["default"]
        assert layer.lora_dropout == (dropout.p if isinstance(dropout, nn.Dropout) else 0.0)
    trainable = sorted(n.removeprefix("base_model.model.").replace(".default", "").replace(".weight", "")
                       .replace(".modules_to_save", "") for n, p in theirs.named_parameters() if p.requires_grad)
    ours_trainable = sorted(n.replace(".weight", "").replace(f".{fastlora.copies.COPY}", "")
                            for n, p in ours.named_parameters() if p.requires_grad)
    assert ours_trainable == trainable
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    expected, got = llama_logits(theirs), llama_logits(ours)
    assert (expected - llama_logits(tiny_llama())).abs().max() > 1e-3  # the adapters do change the output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_sequence_classification_task_trains_the_score_head_as_peft_does():
    kwargs = dict(target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    theirs, ours, _ = twins(kwargs, transformers.LlamaForSequenceClassification)
    assert "score" in fastlora.copies.trainable_copies(ours)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    torch.testing.assert_close(llama_logits(ours), llama_logits(theirs), rtol=1e-5, atol=1e-5)


# A non-default value for each PEFT field fastlora does not have; the error names the field.
REFUSED = {
    "use_dora": True, "fan_in_fan_out": True, "bias": "all", "layers_to_transform": [0], "layers_pattern": "layers",
    "megatron_config": {"x": 1}, "trainable_token_indices": [1, 2], "loftq_config": {"loftq_bits": 4},
    "corda_config": object(), "lora_ga_config": object(), "velora_config": object(),
    "monteclora_config": object(), "alora_invocation_tokens": [1], "use_qalora": True, "layer_replication": [[0, 1]],
    "lora_bias": True, "target_parameters": ["w"], "use_bdlora": object(), "arrow_config": object(),
    "kasa_config": object(), "ensure_weight_tying": True,
}


@pytest.mark.parametrize("field", REFUSED)
def test_a_peft_field_fastlora_lacks_is_refused_by_name_before_any_change(field):
    config = peft.LoraConfig(target_modules=["q_proj"])
    object.__setattr__(config, field, REFUSED[field])  # past PEFT's own checks of combinations
    model = tiny_llama()
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}=") as info:
        fastlora.get_peft_model(model, config)
    assert fconfig.REFUSED[field] in str(info.value)  # with what to do instead
    assert not fastlora.lora_layers(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("init, advice", [(False, "use True"), ("loftq", "LoftQ"),
                                          ("corda", "CorDA"), ("lora_ga", "init='lora_ga'"),
                                          ("orthogonal", "olora"), ("bogus", "not known")])
def test_refused_init_lora_weights_say_what_to_use(init, advice):
    config = peft.LoraConfig(target_modules=["q_proj"])
    object.__setattr__(config, "init_lora_weights", init)
    with pytest.raises(ValueError, match="init_lora_weights") as info:
        fastlora.inject(tiny_llama(), config)
    assert advice in str(info.value)


def test_every_peft_field_is_classified():
    known = set(fconfig.HONOURED) | set(fconfig.METADATA) | set(fconfig.REFUSED)
    assert {f.name for f in dataclasses.fields(peft.LoraConfig)} <= known


def test_an_unknown_field_of_a_newer_peft_is_refused_when_set():
    @dataclasses.dataclass
    class LoraConfig(fastlora.LoraConfig):  # stands for a future peft.LoraConfig
        shiny_new_feature: bool = False

    LoraConfig.__module__ = "peft.tuners.lora.config"
    with pytest.raises(ValueError, match=r"LoraConfig\.shiny_new_feature=True: not supported"):
        fastlora.inject(tiny_llama(), LoraConfig(target_modules=["q_proj"], shiny_new_feature=True))
    fastlora.inject(tiny_llama(), LoraConfig(target_modules=["q_proj"]))  # at its default it is fine


def test_fastlora_config_without_peft_fields_and_own_settings():
    model = tiny_llama()
    config = fastlora.LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=4, adapter_dtype=torch.float64,
                                 trainable_modules=["norm"])
    fastlora.inject(model, config)
    layer = fastlora.lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A.dtype == torch.float64 and layer.scaling == 2.0
    assert model.model.norm.weight.requires_grad


def test_config_and_keywords_together_are_refused():
    with pytest.raises(TypeError, match=r"\['r'\]"):
        fastlora.inject(tiny_llama(), fastlora.LoraConfig(target_modules=["q_proj"]), r=4)


def test_get_peft_model_arguments_fastlora_lacks_are_refused():
    config = fastlora.LoraConfig(target_modules=["q_proj"])
    for kwargs, name in ((dict(adapter_name="second"), "one adapter per model"), (dict(mixed=True), "mixed"),
                         (dict(autocast_adapter_dtype=False), "adapter_dtype"),
                         (dict(low_cpu_mem_usage=True), "low_cpu_mem_usage")):
        model = tiny_llama()
        with pytest.raises(ValueError, match=name):
            fastlora.get_peft_model(model, config, **kwargs)
        assert not fastlora.lora_layers(model)


def test_no_default_targets_without_a_model_type():
    with pytest.raises(ValueError, match="target_modules=None: no default targets"):
        fastlora.inject(nn.Sequential(nn.Linear(4, 4)), fastlora.LoraConfig())


# ---- methods -------------------------------------------------------------------------------------


def test_peft_methods_on_the_model_and_gone_after_unload(capsys):
    base = tiny_llama()
    reference = llama_logits(base)
    model = fastlora.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules="all-linear"))
    with torch.no_grad():
        for layer in fastlora.lora_layers(model).values():
            layer.lora_B.normal_()
    adapted = llama_logits(model)
    with model.disable_adapter():
        torch.testing.assert_close(llama_logits(model), reference, rtol=0, atol=0)
    model.merge_adapter()
    torch.testing.assert_close(llama_logits(model), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    assert capsys.readouterr().out.startswith(f"trainable params: {trainable:,d} || all params: {total:,d}")
    merged = model.merge_and_unload()
    assert merged is model and not fastlora.lora_layers(model)
    torch.testing.assert_close(llama_logits(model), adapted, rtol=1e-5, atol=1e-5)
    for name in ("merge_and_unload", "unload", "disable_adapter", "print_trainable_parameters",
                 "get_nb_trainable_parameters", "merge_adapter", "unmerge_adapter"):
        assert not hasattr(model, name), name
    again = fastlora.inject(copy.deepcopy(base), ["q_proj"])
    plain = again.unload()
    torch.testing.assert_close(llama_logits(plain), reference, rtol=0, atol=0)


def test_retargeting_an_adapted_layer_says_already_adapted():
    model = fastlora.inject(tiny_llama(), ["q_proj"])
    with pytest.raises(ValueError, match="already adapted"):
        fastlora.inject(model, ["q_proj"])


# ---- parameter counts on quantized bases -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "int8", "float"])
def test_parameter_counts_equal_peft_on_every_base(kind):
    bnb = pytest.importorskip("bitsandbytes")

    def build():
        torch.manual_seed(0)
        layers = []
        for i, o in ((48, 40), (40, 24)):
            if kind == "int8":
                layers.append(bnb.nn.Linear8bitLt(i, o, has_fp16_weights=False))
            elif kind == "nf4":
                layers.append(bnb.nn.Linear4bit(i, o, compute_dtype=torch.float32, quant_type="nf4"))
            else:
                layers.append(nn.Linear(i, o))
            layers.append(nn.Tanh())
        return nn.Sequential(*layers).to("cpu")

    config = dict(target_modules=["0", "2"], r=4)
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**config))
    ours = fastlora.get_peft_model(build(), peft.LoraConfig(**config))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert fastlora.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    if kind == "nf4":
        with pytest.raises(ValueError, match=r"unload\(model, merge=True, allow_requantize=True\)"):
            ours.merge_and_unload()


# ---- export --------------------------------------------------------------------------------------


def test_export_writes_what_lora_config_would(tmp_path):
    kwargs = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.1, task_type="CAUSAL_LM")
    model = fastlora.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))
    fastlora.export_peft(model, tmp_path / "ours")
    peft.LoraConfig(**kwargs).save_pretrained(tmp_path / "theirs")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(ours) == set(theirs)
    differ = {k for k in theirs if ours[k] != theirs[k]}
    # fastlora names the modules it adapted and writes an inference-ready file, as PEFT's save does
    assert differ <= {"target_modules", "inference_mode"}, {k: (ours[k], theirs[k]) for k in differ}
    assert ours["task_type"] == "CAUSAL_LM" and ours["inference_mode"] is True
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert reloaded.peft_config["default"].lora_dropout == 0.1
