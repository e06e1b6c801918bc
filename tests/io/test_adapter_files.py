"""Adapter files and heads: what a load leaves (the fresh base plus the loaded adapter, heads
included, or a clear error with the model unchanged), what a save leaves in its folder (that save,
readable by every reader of every format, or a clear error), and what a reader sees while another
process saves (one save, never one save's configuration with another's tensors)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import fastlora
import fastlora.hf
import fastlora.io
from fastlora.copies import TrainableCopy
from fastlora.io import AdapterFormatError
from helpers import F64, assert_unchanged, base_model, close, out, randomise, rewrite_fastlora, snapshot


def with_head(seed, head="copy", lora_alpha=3.0):
    """Adapters on "0" and a trained head "2.0": a modules_to_save copy, trained in place, or none."""
    kwargs = {"copy": dict(modules_to_save=["2.0"]), "in_place": dict(trainable_modules=["2.0"]), "none": {}}[head]
    model = fastlora.inject(base_model(), "0", r=2, lora_alpha=lora_alpha, adapter_dtype=F64, **kwargs)
    randomise(model, seed)
    if head != "none":
        with torch.no_grad():
            model[2][0].weight.normal_(generator=torch.Generator().manual_seed(seed))
    return model


def save(model, path, fmt):
    {"fastlora": fastlora.save_adapter, "peft": fastlora.export_peft, "hf": fastlora.hf.save_pretrained}[fmt](model, path)


def load_for(fmt):
    return fastlora.import_peft if fmt == "peft" else fastlora.load_adapter


def assert_is_base_plus(model, source):
    """``model`` computes what ``source`` (a fresh base plus an adapter) computes, holds a copy
    exactly where ``source`` does, and switching the adapter off or unloading it gives the base."""
    close(out(model), out(source))
    assert isinstance(model[2][0], TrainableCopy) == isinstance(source[2][0], TrainableCopy)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, p in source.named_parameters() if p.requires_grad}
    with fastlora.disable_adapter(model), fastlora.disable_adapter(source):
        close(out(model), out(source))
    close(out(fastlora.unload(model, merge=False)), out(fastlora.unload(source, merge=False)))


# ---- heads (modules_to_save) -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fastlora", "peft"])
def test_a_kept_copy_starts_again_from_the_original_module(tmp_path, fmt):
    """Loading an adapter with the same head into a model whose copy trained further: the copy
    holds the file's values (the same Parameter objects, so an optimizer keeps working)."""
    source = with_head(1, "copy")
    save(source, tmp_path / "a", fmt)
    model = with_head(3, "copy")
    weight = model[2][0].weight
    load_for(fmt)(model, tmp_path / "a")
    assert model[2][0].weight is weight
    assert_is_base_plus(model, source)


HEADS = ["copy", "in_place", "none"]


@pytest.mark.parametrize("fmt", ["fastlora", "peft"])
@pytest.mark.parametrize("held", HEADS)
@pytest.mark.parametrize("loaded", HEADS)
def test_every_head_combination_gives_base_plus_adapter_or_changes_nothing(tmp_path, fmt, held, loaded):
    """A model holding an adapter with a head of each kind, loading one with a head of each kind.
    PEFT's format keeps a head as modules_to_save, so it always becomes a copy."""
    source = with_head(1, loaded)
    save(source, tmp_path / "a", fmt)
    model = with_head(2, held)
    carried_in_place = fmt == "fastlora" and loaded == "in_place"
    if held == "in_place" and not carried_in_place:
        before = snapshot(model)
        with pytest.raises(AdapterFormatError, match="trained in place"):
            load_for(fmt)(model, tmp_path / "a")
        assert_unchanged(model, before)
        return
    load_for(fmt)(model, tmp_path / "a")
    if fmt == "peft" and loaded == "in_place":
        close(out(model), out(source))
        assert isinstance(model[2][0], TrainableCopy)
    else:
        assert_is_base_plus(model, source)


@pytest.mark.parametrize("heads", [["0"], [""], ["nowhere"], ["2", "2.0"]])
def test_modules_to_save_that_cannot_be_copies_are_refused(tmp_path, heads):
    """An adapted layer, the whole model (it contains one), no module, or nested copies."""
    fastlora.save_adapter(with_head(1, "copy"), tmp_path / "a")

    def edit(config, tensors):
        config["modules_to_save"] = heads
        return config

    rewrite_fastlora(tmp_path / "a", edit)
    for target in (base_model(), with_head(2, "none"), with_head(3, "copy")):
        before = snapshot(target)
        with pytest.raises(AdapterFormatError, match="modules_to_save"):
            fastlora.load_adapter(target, tmp_path / "a")
        assert_unchanged(target, before)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(fmt=st.sampled_from(["fastlora", "peft"]), cut=st.none() | st.integers(0, 10_000),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=4))
def test_a_corrupted_weights_file_loads_or_is_a_format_error_that_changes_nothing(tmp_path_factory, fmt, cut, flips):
    """Any truncation or flipped bytes (header, configuration or data): the load either succeeds
    with finite adapters or raises AdapterFormatError with the model as it was."""
    path = tmp_path_factory.mktemp("corrupt")
    save(with_head(1, "copy"), path, fmt)
    file = path / "adapter_model.safetensors"
    data = bytearray(file.read_bytes())
    for at, bits in flips:
        data[at % len(data)] ^= bits
    file.write_bytes(bytes(data[:cut]) if cut is not None else bytes(data))
    model = with_head(2, "copy")
    before = snapshot(model)
    try:
        load_for(fmt)(model, path)
    except AdapterFormatError:
        assert_unchanged(model, before)
    else:
        assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- finiteness in the dtype the values end in -------------------------------------------------------


def files_with_lora_b(model, tmp_path, lora_b):
    """Saves ``model`` in fastlora's format (tmp_path / "a") and PEFT's (tmp_path / "p"), each
    with layer "0"'s B replaced by ``lora_b`` in the file."""
    fastlora.save_adapter(model, tmp_path / "a")
    fastlora.export_peft(model, tmp_path / "p")

    def edit(config, tensors):
        tensors["0.lora_B"] = lora_b
        return config

    rewrite_fastlora(tmp_path / "a", edit)
    file = tmp_path / "p" / "adapter_model.safetensors"
    save_file({**load_file(file), "base_model.model.0.lora_B.weight": lora_b}, file)


def test_values_finite_in_the_file_but_not_in_the_adapter_dtype_are_refused(tmp_path):
    """float64 1e300 in a file whose adapters are float32 (or loaded into float32 layers) is inf."""
    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=torch.float32, modules_to_save=["2.0"])
    files_with_lora_b(model, tmp_path, torch.full((8, 2), 1e300, dtype=F64))
    for target, loads in ((base_model(), [fastlora.load_adapter]),  # new float32 layers from the saved dtype
                          (model, [fastlora.load_adapter, fastlora.import_peft])):  # existing float32 layers
        before = snapshot(target)
        for load in loads:
            with pytest.raises(AdapterFormatError, match="infinite values in float32"):
                load(target, tmp_path / ("a" if load is fastlora.load_adapter else "p"))
            assert_unchanged(target, before)


def test_a_head_value_that_overflows_the_heads_dtype_is_refused(tmp_path):
    model = fastlora.inject(base_model().float(), "0", r=2, modules_to_save=["2.0"])
    fastlora.save_adapter(model, tmp_path / "a")

    def edit(config, tensors):
        tensors["trainable.2.0.weight"] = torch.full((3, 8), 1e300, dtype=F64)
        return config

    rewrite_fastlora(tmp_path / "a", edit)
    for target in (base_model().float(), model):
        before = snapshot(target)
        with pytest.raises(AdapterFormatError, match="2.0.weight has NaN or infinite values in float32"):
            fastlora.load_adapter(target, tmp_path / "a")
        assert_unchanged(target, before)


@pytest.mark.parametrize("base_dtype,value", [(torch.float32, 1e20), (torch.float16, 300.0)])
def test_a_lora_ga_offset_that_overflows_the_base_weight_is_refused(tmp_path, base_dtype, value):
    """A0, B0 finite (float32) but W − s·B0 A0 is not in the base weight's dtype: it would be
    written into the base for good."""
    model = fastlora.inject(base_model().to(base_dtype), "0", r=2)
    fastlora.save_adapter(model, tmp_path / "a")

    def edit(config, tensors):
        config["layers"]["0"].update(base_offset=True, init="lora_ga")
        tensors["0.lora_A0"] = torch.full((2, 6), value)
        tensors["0.lora_B0"] = torch.full((8, 2), value)
        return config

    rewrite_fastlora(tmp_path / "a", edit)
    for target in (base_model().to(base_dtype), model):
        before = snapshot(target)
        for apply_base_offset in (None, True):
            with pytest.raises(AdapterFormatError, match="minus the LoRA-GA offset s·B0 A0 is not finite"):
                fastlora.load_adapter(target, tmp_path / "a", apply_base_offset=apply_base_offset)
            assert_unchanged(target, before)
    fastlora.load_adapter(model, tmp_path / "a", apply_base_offset=False)  # the base holds it already: nothing moves
    assert torch.isfinite(model[0].base_layer.weight).all()


# ---- clear errors for bad arguments and files ----------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, "yes", 0.0])
def test_apply_base_offset_takes_none_true_or_false_only(tmp_path, value):
    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64)
    fastlora.save_adapter(model, tmp_path / "a")
    before = snapshot(model)
    with pytest.raises(TypeError, match="apply_base_offset must be None, True or False"):
        fastlora.load_adapter(model, tmp_path / "a", apply_base_offset=value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_tensors_in_a_file_are_a_format_error(tmp_path, dtype):
    model = fastlora.inject(base_model(), "0", r=2, adapter_dtype=F64)
    files_with_lora_b(model, tmp_path, torch.ones(8, 2).to(dtype))
    for target in (base_model(), model):
        before = snapshot(target)
        for load, where in ((fastlora.load_adapter, "a"), (fastlora.import_peft, "p")):
            with pytest.raises(AdapterFormatError, match=f"dtype {dtype}; adapters are real floating-point"):
                load(target, tmp_path / where)
            assert_unchanged(target, before)


def test_export_refuses_layers_with_different_dropouts(tmp_path):
    """PEFT's adapter_config.json has one lora_dropout (no per-module pattern in peft 0.21)."""
    model = fastlora.inject(base_model(), ["0", "2.0"], r=2, adapter_dtype=F64)
    layer = model[0]
    layer.set_adapter(layer.lora_A, layer.lora_B, dataclasses.replace(layer.config, lora_dropout=0.25))
    for export in (fastlora.export_peft, fastlora.hf.save_pretrained):
        with pytest.raises(ValueError, match=r"different lora_dropout values \[0.0, 0.25\]"):
            export(model, tmp_path / "p")
        assert not (tmp_path / "p").exists()


def test_folded_export_keeps_float64_adapters_exact(tmp_path):
    model = fastlora.inject(base_model(), "0", r=2, lora_alpha=3.0, adapter_dtype=F64)
    randomise(model, 1)
    fastlora.export_peft(model, tmp_path / "f", fold_scaling=True)
    b = load_file(tmp_path / "f" / "adapter_model.safetensors")["base_model.model.0.lora_B.weight"]
    layer = model[0]
    assert b.dtype == F64 and torch.equal(b, layer.lora_B.detach() * layer.scaling)
    assert not torch.equal(b, (layer.lora_B.detach().float() * layer.scaling).double())  # the test can tell


# ---- files: every save owns the adapter files of its folder --------------------------------------------

FORMATS = ["fastlora", "peft", "hf"]


def _which(output, candidates):
    """The name of the candidate output ``output`` is (PEFT computes float64 adapters in float32)."""
    found = [name for name, want in candidates.items() if torch.allclose(output, want, rtol=1e-5, atol=1e-6)]
    assert len(found) == 1, found
    return found[0]


def _readers(path):
    """What each reader of each format gets from ``path``: "error" or the output it computes."""
    peft = pytest.importorskip("peft")
    got = {}
    for name, read in (("load_adapter", lambda: out(fastlora.load_adapter(base_model(), path))),
                       ("import_peft", lambda: out(fastlora.import_peft(base_model(), path))),
                       ("peft", lambda: out(peft.PeftModel.from_pretrained(base_model(), str(path))))):
        try:
            got[name] = read()
        except (AdapterFormatError, ValueError):
            got[name] = "error"
    resume = path / "model.safetensors"
    if resume.exists():  # what Trainer(resume_from_checkpoint=path) loads into the rebuilt model
        model = with_head(0, "copy")
        model.load_state_dict(load_file(resume), strict=False)
        got["trainer_resume"] = out(model)
    return got


@pytest.mark.parametrize("first", FORMATS)
@pytest.mark.parametrize("second", FORMATS)
def test_every_reader_gets_the_last_save_or_an_error(tmp_path, first, second):
    old, new = with_head(1, "copy"), with_head(2, "copy")
    outputs = {"old": out(old), "new": out(new), "base": out(base_model())}
    save(old, tmp_path / "d", first)
    save(new, tmp_path / "d", second)
    readable = {"fastlora": {"load_adapter"}, "peft": {"import_peft", "peft"},
                "hf": {"load_adapter", "import_peft", "peft", "trainer_resume"}}[second]
    for reader, got in _readers(tmp_path / "d").items():
        if reader in readable:
            assert not isinstance(got, str) and _which(got, outputs) == "new", reader
        else:
            assert isinstance(got, str), f"{reader} reads a stale file: {_which(got, outputs)}"


def test_a_save_keeps_the_users_files_and_replaces_only_adapter_files(tmp_path):
    """A Trainer checkpoint's state, a README and a folder stay; a model.safetensors that no fastlora
    save wrote (the user's) stays too."""
    d = tmp_path / "d"
    fastlora.hf.save_pretrained(with_head(1, "copy"), d)
    (d / "optimizer.pt").write_bytes(b"state")
    (d / "README.md").write_text("mine")
    (d / "runs").mkdir()
    (d / "runs" / "log.txt").write_text("log")
    (d / "latest").symlink_to("runs")
    fastlora.save_adapter(with_head(2, "copy"), d)
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "adapter_model.safetensors", "fastlora_config.json",
                                                  "latest", "optimizer.pt", "runs"]
    assert (d / "optimizer.pt").read_bytes() == b"state" and (d / "runs" / "log.txt").read_text() == "log"
    assert os.readlink(d / "latest") == "runs"
    users = tmp_path / "full"
    users.mkdir()
    save_file({"w": torch.ones(2)}, users / "model.safetensors")
    fastlora.export_peft(with_head(2, "copy"), users)
    assert torch.equal(load_file(users / "model.safetensors")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "full"]  # no temporary leftovers


def test_a_file_another_process_writes_into_the_folder_during_a_save_is_kept(tmp_path, monkeypatch):
    """In DDP, Trainer's other ranks write rng_state_<rank>.pth into the checkpoint folder while
    rank 0 saves the model into it (no barrier between them)."""
    d = tmp_path / "checkpoint-1"
    fastlora.hf.save_pretrained(with_head(1, "copy"), d)
    real_exchange = fastlora.io.files._exchange

    def other_rank_writes_then_exchange(a, b):
        (d / "rng_state_1.pth").write_bytes(b"rank 1")
        real_exchange(a, b)

    monkeypatch.setattr(fastlora.io.files, "_exchange", other_rank_writes_then_exchange)
    fastlora.hf.save_pretrained(with_head(2, "copy"), d)
    assert (d / "rng_state_1.pth").read_bytes() == b"rank 1"
    close(out(fastlora.load_adapter(base_model(), d)), out(with_head(2, "copy")))


def test_a_directory_created_meanwhile_by_another_save_is_swapped_not_an_error(tmp_path, monkeypatch):
    """Two processes creating the same new directory: the other one's save lands between this
    one's check and its rename (simulated here), and the later save wins."""
    target = tmp_path / "a"
    first, second = with_head(1, "none"), with_head(2, "none")
    real_fsync = fastlora.io.files._fsync

    def other_save_meanwhile(path):
        real_fsync(path)
        if Path(path).name.startswith(".a.tmp-") and not target.exists():
            monkeypatch.setattr(fastlora.io.files, "_fsync", real_fsync)
            fastlora.save_adapter(first, target)

    monkeypatch.setattr(fastlora.io.files, "_fsync", other_save_meanwhile)
    fastlora.save_adapter(second, target)
    assert fastlora.io.files._fsync is real_fsync  # the other save did run in between
    close(out(fastlora.load_adapter(base_model(), target)), out(second))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_load_overtaken_by_a_save_reads_one_save_whole(tmp_path, monkeypatch, fmt):
    """A save swaps a new folder in (and empties the old one) after the load read its first file:
    the load gets the first save whole if it had it all, else starts over on the new one."""
    first, second = with_head(1, "copy", lora_alpha=3.0), with_head(2, "copy", lora_alpha=5.0)
    save(first, tmp_path / "d", fmt)
    real = fastlora.io.files.Generation.read

    def read_then_save(self, name):
        data = real(self, name)
        monkeypatch.setattr(fastlora.io.files.Generation, "read", real)
        save(second, tmp_path / "d", fmt)
        return data

    monkeypatch.setattr(fastlora.io.files.Generation, "read", read_then_save)
    loaded = load_for(fmt)(base_model(), tmp_path / "d")
    assert fastlora.io.files.Generation.read is real  # the save did run in between
    # save_pretrained's folder has fastlora's whole format in its first file; the others need a second file
    close(out(loaded), out(first if fmt == "hf" else second))


# ---- a reader while another process saves ----------------------------------------------------------------

# Two adapters that differ in every tensor and in lora_alpha; a load that mixes one's configuration with the
# other's tensors shows as a pair that is neither.
GENERATIONS = {2.0: 1.0, 5.0: 3.0}  # lora_alpha -> the value of every entry of A (B holds it + 0.5)

WRITER = """
import os, sys, torch
import fastlora, fastlora.hf
from torch import nn
models = []
for alpha, value in {generations!r}.items():
    model = fastlora.inject(nn.Sequential(nn.Linear(4, 4)).double(), "0", r=1, lora_alpha=alpha, adapter_dtype=torch.float64)
    with torch.no_grad():
        model[0].lora_A.fill_(value)
        model[0].lora_B.fill_(value + 0.5)
    models.append(model)
saves = dict(fastlora=fastlora.save_adapter, peft=fastlora.export_peft, hf=fastlora.hf.save_pretrained)
for fmt, path in {pairs!r}:
    n = 0
    while not os.path.exists(path + ".stop"):
        saves[fmt](models[n % 2], path)
        n += 1
    print(fmt, n, flush=True)
"""

LOADS = 1000


def test_a_reader_gets_one_save_while_another_process_saves(tmp_path):
    pairs = [(fmt, str(tmp_path / fmt)) for fmt in FORMATS]
    code = textwrap.dedent(WRITER.format(generations=GENERATIONS, pairs=pairs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    report = {}
    try:
        for fmt, path in pairs:
            load = load_for(fmt)
            model = fastlora.inject(nn.Sequential(nn.Linear(4, 4)).double(), "0", r=1, adapter_dtype=F64)
            layer = model[0]
            deadline = time.monotonic() + 120
            while not os.path.isdir(path):  # the writer starts (imports) in the meantime
                assert time.monotonic() < deadline and writer.poll() is None, "the writer did not start"
                time.sleep(0.01)
            loads, mixed, switches, last = 0, [], 0, None
            while loads < LOADS or switches < 20:
                assert time.monotonic() < deadline, f"{fmt}: {loads} loads, {switches} new saves seen in 120 s"
                load(model, path)
                loads += 1
                alpha, a, b = layer.lora_alpha, layer.lora_A.detach(), layer.lora_B.detach()
                value = GENERATIONS.get(alpha)
                if value is None or not (torch.all(a == value) and torch.all(b == value + 0.5)):
                    mixed.append((alpha, a.flatten()[:2].tolist(), b.flatten()[:2].tolist()))
                switches += last is not None and alpha != last
                last = alpha
            Path(path + ".stop").touch()
            report[fmt] = f"{len(mixed)} of {loads} loads mixed two saves ({switches} new saves seen), e.g. {mixed[:2]}"
    finally:
        for _, path in pairs:
            Path(path + ".stop").touch()
        writer.wait(timeout=60)
    assert all(r.startswith("0 of") for r in report.values()), report
