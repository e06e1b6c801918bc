"""Adapter state across operations: loading, importing, merging and re-initialising never give a
silently wrong model. Each test runs a sequence that used to give a wrong model without an error,
and asserts the model computes a fresh base plus the last adapter, or that a clear error left the
model as it was. (The refusals of inject, of files and of LoRA-Pro's state live with inject, io and
optim; tests/adapters/test_adapter_transitions.py and test_adapter_state_sequences.py hold the rest.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastlora
from helpers import F64, X, assert_unchanged, base_model, close, expected, ga_model, out, randomise, snapshot


# ---- LoRA-GA's offset is replaced, never stacked ---------------------------------------------


def test_lora_ga_offsets_are_replaced_not_stacked(tmp_path):
    ga1, base = ga_model(1)
    ga2, _ = ga_model(2)
    fastlora.save_adapter(ga1, tmp_path / "ga1")
    fastlora.save_adapter(ga2, tmp_path / "ga2")
    twice = fastlora.load_adapter(fastlora.load_adapter(copy.deepcopy(base), tmp_path / "ga1"), tmp_path / "ga2")
    once = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "ga2")
    close(out(twice), out(once))
    close(out(once), expected(base, ga2))
    # The same adapter again moves nothing; a plain adapter or a PEFT import removes the offset.
    before = snapshot(once)
    fastlora.load_adapter(once, tmp_path / "ga2")
    assert_unchanged(once, before)
    plain = fastlora.inject(copy.deepcopy(base), "0", r=2, lora_alpha=2.0, adapter_dtype=F64)
    randomise(plain, 7)
    fastlora.save_adapter(plain, tmp_path / "plain")
    fastlora.export_peft(plain, tmp_path / "plain_peft")
    close(out(fastlora.load_adapter(copy.deepcopy(once), tmp_path / "plain")), expected(base, plain))
    imported = fastlora.import_peft(copy.deepcopy(once), tmp_path / "plain_peft")
    assert fastlora.lora_layers(imported)["0"].base_offset is None
    close(out(imported), expected(base, plain))
    # A reset also gives the base layer back.
    fastlora.lora_layers(once)["0"].reset_lora_parameters()
    close(out(once), out(base))


def test_lora_ga_twice_starts_from_the_original_base():
    model, base = ga_model(1)
    stats = fastlora.collect_gradients(model, [(X,)], "0", loss_fn=lambda m, b: m(b[0]).pow(2).mean(), progress=False)
    fastlora.init.lora_ga(model, stats, {"svd": "exact"})
    close(out(model), out(base))


# ---- nothing loads into, or resets, a merged model -------------------------------------------


@pytest.mark.parametrize("operation", ["load", "import", "reset", "set_rank"])
def test_merged_models_refuse_adapter_changes(tmp_path, operation):
    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64)
    randomise(model, 1)
    fastlora.save_adapter(model, tmp_path / "a")
    fastlora.export_peft(model, tmp_path / "p")
    randomise(model, 2)
    fastlora.merge(model)
    before = snapshot(model)
    layer = fastlora.lora_layers(model)["0"]
    action = {"load": lambda: fastlora.load_adapter(model, tmp_path / "a"),
              "import": lambda: fastlora.import_peft(model, tmp_path / "p"),
              "reset": layer.reset_lora_parameters, "set_rank": lambda: layer.set_rank(1)}[operation]
    with pytest.raises(RuntimeError, match="merged"):
        action()
    assert_unchanged(model, before)
    fastlora.unmerge(model)
    close(out(model), expected(base_model(), model))


# ---- merging rounds once ---------------------------------------------------------------------


def test_merge_rounds_once_into_a_low_precision_weight():
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(nn.Linear(64, 64, dtype=torch.bfloat16), r=8, lora_alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_(std=1e-2)
    w = layer.base_layer.weight.detach().clone()
    delta = layer.delta_weight()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, (w.float() + delta).to(torch.bfloat16))
    assert not torch.equal(layer.base_layer.weight, w + delta.to(torch.bfloat16))  # the test can tell them apart
