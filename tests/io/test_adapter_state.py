"""Adapter state across loads, imports and saves: they never give a silently wrong model. Each test
runs a sequence that used to give a wrong model without an error, and asserts the model computes a
fresh base plus the last adapter, or that a clear error left the model (every parameter, buffer and
requires_grad flag) and the files as they were. (inject's refusals live in tests/adapters/test_inject.py,
LoRA-Pro's in tests/optim/test_lora_pro.py.)"""

from __future__ import annotations

import copy
import json
import os
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastlora
from fastlora.io import AdapterFormatError
from helpers import F64, X, assert_unchanged, base_model, close, expected, ga_model, out, randomise, rewrite_fastlora, snapshot


# ---- LoRA-GA's offset does not stack -----------------------------------------------------------


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


# ---- nothing loads into, or resets, a merged model ---------------------------------------------


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


# ---- exact names when loading -----------------------------------------------------------------


def test_adapters_load_by_exact_module_name(tmp_path):
    model = fastlora.inject(base_model(), "0", r=4, adapter_dtype=F64)  # "2.0" is narrower than 4
    randomise(model, 1)
    fastlora.save_adapter(model, tmp_path / "a")
    fastlora.export_peft(model, tmp_path / "p")
    for load in (fastlora.load_adapter, fastlora.import_peft):
        loaded = load(base_model(), tmp_path / ("a" if load is fastlora.load_adapter else "p"))
        assert list(fastlora.lora_layers(loaded)) == ["0"]
        close(out(loaded), expected(base_model(), model))


# ---- import_peft ignores base weights in the file ---------------------------------------------


def test_import_peft_ignores_frozen_base_weights(tmp_path):
    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64)
    randomise(model, 1)
    fastlora.export_peft(model, tmp_path / "p")
    tensors = load_file(tmp_path / "p" / "adapter_model.safetensors")
    tensors["base_model.model.0.weight"] = torch.zeros(8, 6, dtype=F64)
    tensors["base_model.model.2.0.bias"] = torch.zeros(3, dtype=F64)
    save_file(tensors, tmp_path / "p" / "adapter_model.safetensors")
    loaded = fastlora.import_peft(base_model(), tmp_path / "p")
    assert not loaded[0].base_layer.weight.requires_grad and not loaded[2][0].bias.requires_grad
    close(out(loaded), expected(base_model(), model))


# ---- adapters that need an adjusted base are refused ------------------------------------------


# PiSSA and OLoRA are recomputed from the original base (tests/init/test_peft_inits.py)
@pytest.mark.parametrize("init", ["pissa_niter_4", "corda", "loftq", "lora_ga", "mica"])
def test_import_refuses_inits_that_changed_the_base(tmp_path, init):
    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64)
    fastlora.export_peft(model, tmp_path / "p")
    cfg_path = tmp_path / "p" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["init_lora_weights"] = init
    cfg_path.write_text(json.dumps(cfg))
    target = base_model()
    before = snapshot(target)
    with pytest.raises(AdapterFormatError, match="path_initial_model_for_weight_conversion"):
        fastlora.import_peft(target, tmp_path / "p")
    assert_unchanged(target, before)


# ---- config values and tensors from files are validated ---------------------------------------


BAD_VALUES = [("lora_alpha", float("nan")), ("lora_alpha", 0), ("lora_alpha", -1.0), ("lora_alpha", "x"),
              ("lora_alpha", float("inf")), ("lora_dropout", 5), ("use_rslora", "false"), ("r", 2.0), ("r", True)]


@pytest.mark.parametrize("key,value", BAD_VALUES)
def test_bad_config_values_are_refused_with_adapters_present(tmp_path, key, value):
    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64)
    fastlora.save_adapter(model, tmp_path / "a")
    fastlora.export_peft(model, tmp_path / "p")

    def edit(config, tensors):
        config["layers"]["0"][key] = value
        return config

    rewrite_fastlora(tmp_path / "a", edit)
    cfg_path = tmp_path / "p" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))
    randomise(model, 3)
    before = snapshot(model)
    for load, where in ((fastlora.load_adapter, "a"), (fastlora.import_peft, "p")):
        with pytest.raises(AdapterFormatError):
            load(model, tmp_path / where)
        assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_float_tensors_are_refused(tmp_path, dtype):
    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64)
    fastlora.save_adapter(model, tmp_path / "a")
    fastlora.export_peft(model, tmp_path / "p")

    def edit(config, tensors):
        tensors["0.lora_B"] = torch.ones(8, 2).to(dtype)
        return config

    rewrite_fastlora(tmp_path / "a", edit)
    file = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.0.lora_B.weight"] = torch.ones(8, 2).to(dtype)
    save_file(tensors, file)
    before = snapshot(model)
    for load, where in ((fastlora.load_adapter, "a"), (fastlora.import_peft, "p")):
        with pytest.raises(AdapterFormatError, match="real floating-point"):
            load(model, tmp_path / where)
        assert_unchanged(model, before)


# ---- files ----------------------------------------------------------------------------------------


def test_a_fifo_config_fails_at_once(tmp_path):
    model = fastlora.inject(base_model(), "0", r=2)
    fastlora.export_peft(model, tmp_path / "p")
    cfg = tmp_path / "p" / "adapter_config.json"
    cfg.unlink()
    os.mkfifo(cfg)
    result = {}

    def run():
        try:
            fastlora.import_peft(base_model(), tmp_path / "p")
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # unblock the reader so the process can end
        fd = os.open(cfg, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("import_peft blocked on a FIFO")
    assert isinstance(result.get("error"), AdapterFormatError)


MALFORMED_PEFT = [
    lambda c: [],
    lambda c: "LORA",
    lambda c: {**c, "peft_type": None},
    lambda c: {**c, "r": "8"},
    lambda c: {**c, "r": None},
    lambda c: {**c, "rank_pattern": []},
    lambda c: {**c, "rank_pattern": {"0": "2"}},
    lambda c: {**c, "alpha_pattern": "x"},
    lambda c: {**c, "alpha_pattern": {"0": None}},
    lambda c: {**c, "modules_to_save": "2"},
    lambda c: {**c, "modules_to_save": [3]},
    lambda c: {**c, "lora_dropout": None},
    lambda c: {**c, "use_rslora": 1},
    lambda c: {**c, "init_lora_weights": "other"},
    lambda c: {**c, "use_dora": True},
]

MALFORMED_FASTLORA = [
    lambda c: [],
    lambda c: {**c, "layers": []},
    lambda c: {**c, "layers": {}},
    lambda c: {**c, "layers": {"0": 5}},
    lambda c: {**c, "layers": {"0": {}}},
    lambda c: {**c, "layers": {"0": {**c["layers"]["0"], "in_features": "6"}}},
    lambda c: {**c, "layers": {"0": {**c["layers"]["0"], "adapter_dtype": "int8"}}},
    lambda c: {**c, "layers": {"0": {**c["layers"]["0"], "init": 3}}},
    lambda c: {**c, "layers": {"0": {**c["layers"]["0"], "base_offset": "no"}}},
    lambda c: {**c, "trainable": "x"},
    lambda c: {**c, "trainable": [1]},
    lambda c: {**c, "version": 99},
]


@pytest.mark.parametrize("edit", range(len(MALFORMED_PEFT) + len(MALFORMED_FASTLORA)))
def test_malformed_configs_raise_adapter_format_error(tmp_path, edit):
    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64)
    if edit < len(MALFORMED_PEFT):
        fastlora.export_peft(model, tmp_path / "x")
        cfg_path = tmp_path / "x" / "adapter_config.json"
        cfg_path.write_text(json.dumps(MALFORMED_PEFT[edit](json.loads(cfg_path.read_text()))))
        load = fastlora.import_peft
    else:
        fastlora.save_adapter(model, tmp_path / "x")
        rewrite_fastlora(tmp_path / "x", lambda c, t: MALFORMED_FASTLORA[edit - len(MALFORMED_PEFT)](c))
        load = fastlora.load_adapter
    for target in (base_model(), model):
        before = snapshot(target)
        with pytest.raises(AdapterFormatError):
            load(target, tmp_path / "x")
        assert_unchanged(target, before)


def test_stale_temporary_directories_are_removed_live_ones_kept(tmp_path):
    import fcntl

    model = fastlora.inject(base_model(), "0", r=2)
    target = tmp_path / "adapter"
    stale = tmp_path / ".adapter.tmp-dead"
    (stale / "sub").mkdir(parents=True)
    live = tmp_path / ".adapter.tmp-live"
    live.mkdir()
    other = tmp_path / ".other.tmp-dead"
    other.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        fastlora.save_adapter(model, target)
    finally:
        os.close(fd)
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in target.iterdir()) == ["adapter_model.safetensors", "fastlora_config.json"]


def test_saving_through_a_symlink_writes_its_target(tmp_path):
    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64)
    real = tmp_path / "real"
    fastlora.save_adapter(model, real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    randomise(model, 4)
    fastlora.save_adapter(model, link)
    assert link.is_symlink() and link.resolve() == real.resolve()
    loaded = fastlora.load_adapter(base_model(), real)
    close(out(loaded), out(model))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---- saved settings, ranks, failed saves and nested modules_to_save --------------------------------


def test_load_adapter_restores_the_saved_rslora_setting(tmp_path):
    model = fastlora.inject(base_model(), "0", r=4, lora_alpha=4.0, use_rslora=True, adapter_dtype=F64)
    randomise(model, 1)
    fastlora.save_adapter(model, tmp_path / "a")
    target = fastlora.inject(base_model(), "0", r=4, lora_alpha=4.0, use_rslora=False, adapter_dtype=F64)
    fastlora.load_adapter(target, tmp_path / "a")
    assert fastlora.lora_layers(target)["0"].use_rslora
    close(out(target), out(model))


def test_import_peft_refuses_a_lower_rank_adapter_into_existing_layers(tmp_path):
    one = fastlora.inject(base_model(), "0", r=1, adapter_dtype=F64)
    fastlora.export_peft(one, tmp_path / "p")
    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64)
    before = snapshot(model)
    with pytest.raises(AdapterFormatError, match="rank 2 in the model, 1 in the adapter"):
        fastlora.import_peft(model, tmp_path / "p")
    assert_unchanged(model, before)


@pytest.mark.parametrize("step", ["save_safetensors", "_exchange"])
def test_a_failed_save_leaves_the_previous_adapter(tmp_path, monkeypatch, step):
    """A save that fails while writing its files, or at the swap itself (what the save really calls:
    renameat2 through _exchange), raises, and leaves the previous adapter whole and nothing else."""
    import fastlora.io

    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64)
    randomise(model, 1)
    fastlora.save_adapter(model, tmp_path / "a")
    saved = out(model)
    files = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    randomise(model, 2)
    assert not torch.equal(out(model), saved)  # the test can tell the two saves apart

    real = getattr(fastlora.io.files, step)

    def refuse(*args, **kwargs):
        if step == "save_safetensors":
            real(*args, **kwargs)  # the file is written, then the disk fills up
        raise OSError(f"no {step} today")

    monkeypatch.setattr(fastlora.io.files, step, refuse)
    with pytest.raises(OSError, match=f"no {step} today"):
        fastlora.save_adapter(model, tmp_path / "a")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary directory left
    assert torch.equal(out(fastlora.load_adapter(base_model(), tmp_path / "a")), saved)


def test_import_peft_takes_modules_to_save_with_nested_parameters(tmp_path):
    """PEFT saves a module_to_save's parameters under their own names ("2.0.weight" for
    modules_to_save=["2"]): they are imported into a trained copy, not ignored."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(base_model(), peft.LoraConfig(r=2, target_modules="0", modules_to_save=["2"]))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if p.requires_grad:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    wrapped.save_pretrained(tmp_path / "p")
    want = out(wrapped)
    loaded = fastlora.import_peft(base_model(), tmp_path / "p")
    assert isinstance(loaded[2], fastlora.copies.TrainableCopy)
    close(out(loaded), want)
