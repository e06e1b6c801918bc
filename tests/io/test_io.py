"""Adapter save/load (fastlora format) and PEFT export/import."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import fastlora
from helpers import make_mlp_problem

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _randomise_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in fastlora.lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)


def _llama(seed=0, classifier=False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   num_labels=3, pad_token_id=0)
    cls = transformers.LlamaForSequenceClassification if classifier else transformers.LlamaForCausalLM
    return cls(cfg).eval()


IDS = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(9))


def _out(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _params(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _same_params(model, before):
    now = model.state_dict()
    return set(now) == set(before) and all(torch.equal(now[n], before[n]) for n in before)


# ---- fastlora's format ---------------------------------------------------------------------------


def test_save_load_round_trip_with_heterogeneous_ranks(tmp_path):
    model, batches, loss_fn = make_mlp_problem()
    base = copy.deepcopy(model)
    stats = fastlora.collect_gradients(model, batches, loss_fn=loss_fn, progress=False)
    fastlora.inject(model, "all-linear", r=4, lora_alpha=8, init="gora", gradients=stats,
                    init_config={"r_min": 1, "r_max": 9}, trainable_modules=["5"])
    _randomise_adapters(model)
    ranks = {n: layer.r for n, layer in fastlora.lora_layers(model).items()}
    assert len(set(ranks.values())) > 1
    with torch.no_grad():
        model[5].base_layer.bias.add_(1.0)  # a trained head parameter
    fastlora.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "fastlora_config.json").read_text())
    assert saved["layers"]["1"]["init"] == "gora" and saved["layers"]["1"]["use_rslora"]
    ids = batches[0][0]
    # Into the plain base: adapters are injected with the saved ranks.
    restored = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    assert {n: layer.r for n, layer in fastlora.lora_layers(restored).items()} == ranks
    torch.testing.assert_close(restored(ids), model(ids))
    # Into a model that already has the same adapters.
    twin = copy.deepcopy(model)
    _randomise_adapters(twin, seed=1)
    torch.testing.assert_close(fastlora.load_adapter(twin, tmp_path / "adapter")(ids), model(ids))


def test_lora_ga_adapter_reloads_on_the_original_base(tmp_path):
    model, batches, loss_fn = make_mlp_problem()
    original = copy.deepcopy(model)
    stats = fastlora.collect_gradients(model, batches, loss_fn=loss_fn, progress=False)
    fastlora.inject(model, "all-linear", r=2, init="lora_ga", gradients=stats)
    _randomise_adapters(model)  # "trained"
    fastlora.save_adapter(model, tmp_path / "ga")
    ids = batches[0][0]
    on_original = fastlora.load_adapter(copy.deepcopy(original), tmp_path / "ga")  # offset applied
    torch.testing.assert_close(on_original(ids), model(ids), rtol=1e-5, atol=1e-6)
    same = copy.deepcopy(model)
    fastlora.load_adapter(same, tmp_path / "ga")  # its base already carries the offset
    torch.testing.assert_close(same(ids), model(ids))


def test_corrupted_or_mismatched_adapters_fail_clearly_and_change_nothing(tmp_path):
    model, batches, _ = make_mlp_problem()
    fastlora.inject(model, ["1", "3"], r=2)
    fastlora.save_adapter(model, tmp_path / "good")
    target, _, _ = make_mlp_problem()
    before = _params(target)
    with pytest.raises(fastlora.AdapterFormatError, match="is missing"):
        fastlora.load_adapter(target, tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (tmp_path / "good" / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(fastlora.AdapterFormatError):
        fastlora.load_adapter(target, bad)
    wide = nn.Sequential(nn.Embedding(11, 16), nn.Linear(16, 30), nn.GELU(), nn.Linear(30, 20))
    with pytest.raises(fastlora.AdapterFormatError, match="the model's layer is 30x16"):
        fastlora.load_adapter(wide, tmp_path / "good")
    other = copy.deepcopy(target)
    fastlora.inject(other, ["1"], r=2)
    other_before = _params(other)
    with pytest.raises(fastlora.AdapterFormatError, match="differ from the adapter's"):
        fastlora.load_adapter(other, tmp_path / "good")
    assert _same_params(target, before) and not fastlora.lora_layers(target)
    assert _same_params(other, other_before)


SLOW_SAVE = """
import sys, time, torch
sys.path.insert(0, {tests!r})
import fastlora, fastlora.io
from helpers import make_mlp_problem
model, _, _ = make_mlp_problem()
fastlora.inject(model, ["1", "3"], r=2)
for layer in fastlora.lora_layers(model).values():
    torch.nn.init.normal_(layer.lora_B)
fastlora.{fn}(model, {path!r})
torch.save({{n: p.detach() for n, p in model.named_parameters()}}, {path!r} + ".pt")
for layer in fastlora.lora_layers(model).values():
    torch.nn.init.normal_(layer.lora_B)
real = fastlora.io.files.save_safetensors
def slow(path, tensors, metadata):
    real(path, tensors, metadata)
    print("writing", flush=True)
    time.sleep(60)
fastlora.io.files.save_safetensors = slow
fastlora.{fn}(model, {path!r})
"""


@pytest.mark.parametrize("fn", ["save_adapter", "export_peft"])
def test_sigkill_during_a_save_leaves_the_previous_adapter(tmp_path, fn):
    path = tmp_path / "adapter"
    code = textwrap.dedent(SLOW_SAVE.format(tests=str(Path(__file__).resolve().parents[1]), fn=fn, path=str(path)))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "writing", line
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    first = torch.load(str(path) + ".pt")
    model, batches, _ = make_mlp_problem()
    (fastlora.load_adapter if fn == "save_adapter" else fastlora.import_peft)(model, path)
    for name in ("1.lora_A", "1.lora_B", "3.lora_B"):
        assert torch.equal(dict(model.named_parameters())[name], first[name])
    # The killed writer's temporary directory is there until the next save of that target.
    assert [p.name for p in tmp_path.glob(".adapter.tmp-*")]
    getattr(fastlora, fn)(model, path)
    assert not list(tmp_path.glob(".adapter.tmp-*"))


def test_writes_keep_other_files_in_the_directory(tmp_path):
    model, _, _ = make_mlp_problem()
    fastlora.inject(model, ["1"], r=2)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "README.md").write_text("mine")
    fastlora.export_peft(model, tmp_path / "a")
    fastlora.export_peft(model, tmp_path / "a")
    assert (tmp_path / "a" / "README.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary leftovers


# ---- PEFT ------------------------------------------------------------------------------------------


def _gradients(model):
    """Exact-mode gradient statistics of two seeded language-modelling batches."""
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(1, 64, (2, 8), generator=g)), "labels": ids} for _ in range(2)]
    return fastlora.collect_gradients(model, batches, progress=False)


def _peft_load(path):
    return peft.PeftModel.from_pretrained(_llama(), str(path)).eval()


def test_export_plain_lora_loads_in_peft(tmp_path):
    model = fastlora.inject(_llama(), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    _randomise_adapters(model)
    fastlora.export_peft(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and not cfg["use_rslora"] and not cfg["rank_pattern"]
    torch.testing.assert_close(_out(_peft_load(tmp_path / "p")), _out(model), rtol=1e-5, atol=1e-5)


def test_export_gora_mixed_ranks_rslora_loads_in_peft(tmp_path):
    model = _llama()
    stats = _gradients(model)
    fastlora.inject(model, "all-linear", r=4, lora_alpha=16, init="gora", gradients=stats,
                    init_config={"r_min": 2, "r_max": 12})
    _randomise_adapters(model)
    fastlora.export_peft(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["rank_pattern"] and len(set(cfg["rank_pattern"].values())) >= 2
    torch.testing.assert_close(_out(_peft_load(tmp_path / "p")), _out(model), rtol=1e-5, atol=1e-5)


def test_export_lora_ga_is_a_rank_2r_adapter_on_the_original_base(tmp_path):
    model = _llama()
    stats = _gradients(model)
    fastlora.inject(model, ["q_proj", "o_proj", "up_proj"], r=3, lora_alpha=6, init="lora_ga", gradients=stats)
    _randomise_adapters(model)  # "trained"
    fastlora.export_peft(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["use_rslora"]
    torch.testing.assert_close(_out(_peft_load(tmp_path / "p")), _out(model), rtol=1e-4, atol=1e-5)


def test_folded_export_is_right_for_loaders_that_ignore_patterns(tmp_path):
    model = fastlora.inject(_llama(), ["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
                            rank_pattern={"v_proj": 2, "down_proj": 8}, alpha_pattern={"v_proj": 5},
                            use_rslora=True)
    _randomise_adapters(model)
    fastlora.export_peft(model, tmp_path / "f", fold_scaling=True)
    cfg = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] and cfg["alpha_pattern"] == cfg["rank_pattern"] and not cfg["use_rslora"]
    torch.testing.assert_close(_out(_peft_load(tmp_path / "f")), _out(model), rtol=1e-5, atol=1e-5)
    # A loader that reads only the global lora_alpha / r (as serving engines do) merges correctly.
    from safetensors.torch import load_file

    naive = _llama()
    tensors = load_file(str(tmp_path / "f" / "adapter_model.safetensors"))
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith("lora_A.weight"):
                b = tensors[key.replace("lora_A", "lora_B")]
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                naive.get_submodule(name).weight.add_(cfg["lora_alpha"] / cfg["r"] * (b @ a))
    torch.testing.assert_close(_out(naive), _out(model), rtol=1e-5, atol=1e-5)


def test_export_with_a_trained_head_and_import_back(tmp_path):
    model = fastlora.inject(_llama(classifier=True), ["q_proj", "v_proj"], r=2, trainable_modules=["score"])
    _randomise_adapters(model)
    with torch.no_grad():
        model.score.weight.normal_()
    fastlora.export_peft(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["score"]
    loaded = peft.PeftModel.from_pretrained(_llama(classifier=True), str(tmp_path / "p")).eval()
    torch.testing.assert_close(_out(loaded), _out(model), rtol=1e-5, atol=1e-5)
    back = fastlora.import_peft(_llama(classifier=True), tmp_path / "p")
    torch.testing.assert_close(_out(back), _out(model), rtol=1e-5, atol=1e-5)
    assert back.score.weight.requires_grad


def test_import_a_peft_trained_adapter(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "gate_proj"], use_rslora=True,
                          rank_pattern={"k_proj": 2}, alpha_pattern={"gate_proj": 3})
    theirs = peft.get_peft_model(_llama(), cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = fastlora.import_peft(_llama(), tmp_path / "p")
    layers = fastlora.lora_layers(ours)
    assert layers["model.layers.0.self_attn.k_proj"].r == 2 and layers["model.layers.1.mlp.gate_proj"].lora_alpha == 3
    torch.testing.assert_close(_out(ours), _out(theirs.eval()), rtol=1e-5, atol=1e-5)


def test_import_errors_change_nothing(tmp_path):
    model = fastlora.inject(_llama(), ["q_proj"], r=2)
    fastlora.export_peft(model, tmp_path / "p")
    cfg_path = tmp_path / "p" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    target = _llama()
    before = _params(target)
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(fastlora.AdapterFormatError, match="use_dora"):
        fastlora.import_peft(target, tmp_path / "p")
    cfg_path.write_text(json.dumps(cfg))
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(fastlora.AdapterFormatError, match="do not fit"):
        fastlora.import_peft(small, tmp_path / "p")
    cfg_path.write_text("{not json")
    with pytest.raises(fastlora.AdapterFormatError, match="unreadable"):
        fastlora.import_peft(target, tmp_path / "p")
    assert _same_params(target, before) and not fastlora.lora_layers(target)
