"""Adapter state across operations (issue: loading, injecting, merging and importing never give a
silently wrong model). Each test runs a sequence that used to give a wrong model without an
error, and asserts the model computes a fresh base plus the last adapter, or that a clear error
left the model (every parameter, buffer and requires_grad flag) and optimizer as they were."""

from __future__ import annotations

import copy
import json
import os
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fastlora
from fastlora.io import AdapterFormatError
from fastlora.optim import LoRAPro

F64 = torch.float64
X = torch.randn(5, 6, dtype=F64, generator=torch.Generator().manual_seed(3))


def base_model(seed=0):
    """Layers "0" (6 -> 8) and "2.0" (8 -> 3): "2.0" ends in "0" and is narrower than r = 4."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 3))).to(F64)


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in fastlora.lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g, dtype=F64))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=F64))


def out(model):
    with torch.no_grad():
        return model.eval()(X)


def snapshot(model):
    """Every parameter and buffer (values, dtype, device), requires_grad flag, and the layers'
    adapter state."""
    tensors = {f"p:{n}": (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    tensors.update({f"b:{n}": (b.clone(), False) for n, b in model.named_buffers()})
    layers = {n: (layer.r, layer.lora_alpha, layer.lora_dropout, layer.use_rslora, layer.init_method, layer.merged,
                  getattr(layer, "lora_A0", None) is not None, layer.adapter_enabled, layer.detached)
              for n, layer in fastlora.lora_layers(model).items()}
    return tensors, layers, [type(m) for m in model.modules()]


def assert_unchanged(model, before):
    tensors, layers, types = snapshot(model)
    assert set(tensors) == set(before[0]), "parameters or buffers were added or removed"
    for name, (t, flag) in before[0].items():
        now, now_flag = tensors[name]
        assert torch.equal(now, t) and now.dtype == t.dtype, f"{name} changed"
        assert now_flag == flag, f"{name}.requires_grad changed"
    assert layers == before[1] and types == before[2]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def ga_model(seed, r=2, trained=True):
    """A model with LoRA-GA adapters (float64) on layer "0", and its fresh base."""
    base = base_model()
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(4, 6, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64))]
    stats = fastlora.collect_gradients(model, batches, "0", loss_fn=lambda m, b: (m(b[0]) - b[1]).pow(2).mean(),
                                       progress=False)
    fastlora.inject(model, "0", r=r, lora_alpha=2.0, adapter_dtype=F64, init="lora_ga", gradients=stats,
                    init_config={"svd": "exact", "direction": "ArB2r" if seed % 2 else "A2rBr"})
    if trained:
        randomise(model, seed + 100)
    return model, base


def expected(base, adapted):
    """What the fresh base plus ``adapted``'s adapters computes, from the factors alone."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in fastlora.lora_layers(adapted).items():
            delta = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
            if layer.base_offset is not None:
                a0, b0 = layer.base_offset
                delta = delta - layer.scaling * b0 @ a0
            ref.get_submodule(name).weight += delta
    return out(ref)


# ---- 1. LoRA-GA's offset does not stack -----------------------------------------------------------


def test_1_lora_ga_offsets_are_replaced_not_stacked(tmp_path):
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


def test_1_lora_ga_twice_starts_from_the_original_base():
    model, base = ga_model(1)
    stats = fastlora.collect_gradients(model, [(X,)], "0", loss_fn=lambda m, b: m(b[0]).pow(2).mean(), progress=False)
    fastlora.init.lora_ga(model, stats, {"svd": "exact"})
    close(out(model), out(base))


# ---- 2. nothing loads into, or resets, a merged model ---------------------------------------------


@pytest.mark.parametrize("operation", ["load", "import", "reset", "set_rank"])
def test_2_merged_models_refuse_adapter_changes(tmp_path, operation):
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


# ---- 3. a second inject keeps the first adapters trainable ---------------------------------------


def test_3_second_inject_keeps_the_first_adapters_trainable():
    model = fastlora.inject(base_model(), "0", r=2)
    fastlora.inject(model, ["2.0"], r=1)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags == {"0.base_layer.weight": False, "0.base_layer.bias": False, "0.lora_A": True, "0.lora_B": True,
                     "2.0.base_layer.weight": False, "2.0.base_layer.bias": False, "2.0.lora_A": True,
                     "2.0.lora_B": True}


# ---- 4. exact names when loading -----------------------------------------------------------------


def test_4_adapters_load_by_exact_module_name(tmp_path):
    model = fastlora.inject(base_model(), "0", r=4, adapter_dtype=F64)  # "2.0" is narrower than 4
    randomise(model, 1)
    fastlora.save_adapter(model, tmp_path / "a")
    fastlora.export_peft(model, tmp_path / "p")
    for load in (fastlora.load_adapter, fastlora.import_peft):
        loaded = load(base_model(), tmp_path / ("a" if load is fastlora.load_adapter else "p"))
        assert list(fastlora.lora_layers(loaded)) == ["0"]
        close(out(loaded), expected(base_model(), model))


# ---- 5. import_peft ignores base weights in the file ---------------------------------------------


def test_5_import_peft_ignores_frozen_base_weights(tmp_path):
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


# ---- 6. adapters that need an adjusted base are refused ------------------------------------------


# PiSSA and OLoRA are recomputed from the original base (tests/test_peft_inits.py)
@pytest.mark.parametrize("init", ["pissa_niter_4", "corda", "loftq", "lora_ga", "mica"])
def test_6_import_refuses_inits_that_changed_the_base(tmp_path, init):
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


# ---- 7. a PEFT-wrapped model is refused ------------------------------------------------------------


def test_7_inject_refuses_a_peft_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(base_model(), peft.LoraConfig(r=2, target_modules=["0"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="merge_and_unload.*import_peft"):
        fastlora.inject(model, "all-linear", r=2)
    assert_unchanged(model, before)


# ---- 8. config values and tensors from files are validated ---------------------------------------


BAD_VALUES = [("lora_alpha", float("nan")), ("lora_alpha", 0), ("lora_alpha", -1.0), ("lora_alpha", "x"),
              ("lora_alpha", float("inf")), ("lora_dropout", 5), ("use_rslora", "false"), ("r", 2.0), ("r", True)]


def _rewrite_fastlora(path, edit):
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        config = json.loads(f.metadata()["fastlora"])
    config = edit(config, tensors)
    save_file(tensors, file, metadata={"fastlora": json.dumps(config, allow_nan=True)})


@pytest.mark.parametrize("key,value", BAD_VALUES)
def test_8_bad_config_values_are_refused_with_adapters_present(tmp_path, key, value):
    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64)
    fastlora.save_adapter(model, tmp_path / "a")
    fastlora.export_peft(model, tmp_path / "p")

    def edit(config, tensors):
        config["layers"]["0"][key] = value
        return config

    _rewrite_fastlora(tmp_path / "a", edit)
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
def test_8_non_float_tensors_are_refused(tmp_path, dtype):
    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64)
    fastlora.save_adapter(model, tmp_path / "a")
    fastlora.export_peft(model, tmp_path / "p")

    def edit(config, tensors):
        tensors["0.lora_B"] = torch.ones(8, 2).to(dtype)
        return config

    _rewrite_fastlora(tmp_path / "a", edit)
    file = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.0.lora_B.weight"] = torch.ones(8, 2).to(dtype)
    save_file(tensors, file)
    before = snapshot(model)
    for load, where in ((fastlora.load_adapter, "a"), (fastlora.import_peft, "p")):
        with pytest.raises(AdapterFormatError, match="real floating-point"):
            load(model, tmp_path / where)
        assert_unchanged(model, before)


# ---- 9. failing operations change nothing ---------------------------------------------------------


@pytest.mark.parametrize("kwargs,error", [
    (dict(adapter_dtype=torch.int32), TypeError),
    (dict(generator="seed"), TypeError),
])
def test_9_inject_errors_change_nothing(kwargs, error):
    model = base_model()
    before = snapshot(model)
    with pytest.raises(error):
        fastlora.inject(model, "0", r=2, **kwargs)
    assert_unchanged(model, before)


def test_9_layer_constructor_error_leaves_the_base_layer():
    linear = nn.Linear(6, 4)
    with pytest.raises(ValueError, match="unknown init"):
        fastlora.LoRALinear(linear, r=2, init="foo")
    assert linear.weight.requires_grad and linear.bias.requires_grad


def _nan_stats(model):
    batches = [(X, torch.zeros(5, 3, dtype=F64))]
    stats = fastlora.collect_gradients(model, batches, "all-linear", loss_fn=lambda m, b: (m(b[0]) - b[1]).pow(2).mean(),
                                       progress=False)
    stats["0"].mean[0, 0] = float("nan")
    return stats


@pytest.mark.parametrize("init", ["lora_ga", "gora"])
def test_9_gradient_inits_with_nan_gradients_change_nothing(init):
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


def test_9_lora_pro_foreign_state_changes_nothing():
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


# ---- 10. tied and quantized targets are refused ----------------------------------------------------


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 6)
        self.body = nn.Linear(6, 6)
        self.lm_head = nn.Linear(6, 7, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.embed(ids))))


def test_10_tied_head_is_refused_and_merge_leaves_embeddings_alone():
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


def test_10_quantized_or_custom_linear_layers_are_refused():
    model = nn.Sequential(QuantizedLinear(6, 4))
    before = snapshot(model)
    with pytest.raises(TypeError, match="its own forward"):
        fastlora.inject(model, "all-linear", r=2)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kind", ["Linear8bitLt", "Linear4bit"])
def test_10_bitsandbytes_layers_are_adapted_unless_unquantized(kind):
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


# ---- 11. meta, complex and infinite values ---------------------------------------------------------


def test_11_meta_weights_complex_bases_and_infinite_alpha_are_refused():
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


# ---- 12. files ----------------------------------------------------------------------------------------


def test_12_a_fifo_config_fails_at_once(tmp_path):
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
def test_12_malformed_configs_raise_adapter_format_error(tmp_path, edit):
    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64)
    if edit < len(MALFORMED_PEFT):
        fastlora.export_peft(model, tmp_path / "x")
        cfg_path = tmp_path / "x" / "adapter_config.json"
        cfg_path.write_text(json.dumps(MALFORMED_PEFT[edit](json.loads(cfg_path.read_text()))))
        load = fastlora.import_peft
    else:
        fastlora.save_adapter(model, tmp_path / "x")
        _rewrite_fastlora(tmp_path / "x", lambda c, t: MALFORMED_FASTLORA[edit - len(MALFORMED_PEFT)](c))
        load = fastlora.load_adapter
    for target in (base_model(), model):
        before = snapshot(target)
        with pytest.raises(AdapterFormatError):
            load(target, tmp_path / "x")
        assert_unchanged(target, before)


def test_12_stale_temporary_directories_are_removed_live_ones_kept(tmp_path):
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


def test_12_saving_through_a_symlink_writes_its_target(tmp_path):
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


# ---- tests that each catch one mutation the suite used to miss ------------------------------------


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

    real = getattr(fastlora.io, step)

    def refuse(*args, **kwargs):
        if step == "save_safetensors":
            real(*args, **kwargs)  # the file is written, then the disk fills up
        raise OSError(f"no {step} today")

    monkeypatch.setattr(fastlora.io, step, refuse)
    with pytest.raises(OSError, match=f"no {step} today"):
        fastlora.save_adapter(model, tmp_path / "a")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary directory left
    assert torch.equal(out(fastlora.load_adapter(base_model(), tmp_path / "a")), saved)


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
