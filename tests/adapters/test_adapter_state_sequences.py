"""Random sequences of user operations on adapter state (hypothesis): after every step the model
computes the base plus the adapter the sequence last gave it, head included (the base alone
inside an open ``disable_adapter``, base plus what was merged while merged), or the step raised
and left the model exactly as it was. The expected function comes from a small model of the rules
in docs/adapters.md, kept by the test itself (ΔW per layer relative to the base, the head's
values). Operations include adapters with and without a trained ``modules_to_save`` head, saves
of every format (``save_adapter``, ``export_peft``, ``save_pretrained``) into the same folders and
loads of them by each reader, merges, ``disable_adapter`` blocks left open across other
operations, re-ranking, unloading, and optimizer steps (AdamW, LoRA-Pro, LoRA-Pro SGD) from an
optimizer built at some earlier point, also while merged and after unload. One machine runs on a
float64 base (exact up to float64 rounding), one on a float16 base (within a bound derived from
float16 rounding)."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

import fastlora
from fastlora.optim import LoRAPro, LoRAProSGD
from helpers import F64, X, assert_unchanged, base_model, ga_model, snapshot

ALPHA = 2.0
ERRORS = (ValueError, RuntimeError, TypeError)
OPTIMIZERS = {
    "adamw": lambda model: torch.optim.AdamW(fastlora.trainable_parameters(model), lr=0.05),
    "lora_pro": lambda model: LoRAPro(model, lr=0.05),
    "lora_pro_sgd": lambda model: LoRAProSGD(model, lr=0.05),
}


def _delta(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's ΔW on its original base, and a bound on its terms' magnitudes (float64)."""
    s = layer.scaling
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    delta, size = s * b @ a, s * b.abs() @ a.abs()
    if layer.base_offset is not None:
        a0, b0 = (t.double() for t in layer.base_offset)
        delta, size = delta - s * b0 @ a0, size + s * b0.abs() @ a0.abs()
    return delta, size


@dataclasses.dataclass
class SavedAdapter:
    format: str  # "fastlora", "peft" or "pretrained" (both)
    path: Path
    ranks: dict[str, dict[str, int]]  # by reader format
    delta: dict[str, tuple[torch.Tensor, torch.Tensor]]
    head: dict[str, torch.Tensor] | None

    def readable_by(self, reader: str) -> bool:
        return self.format in (reader, "pretrained")


@pytest.fixture(scope="module", autouse=True)
def lora_ga_files():
    """A trained LoRA-GA adapter on layer "0" (rank 2, base offset) in both formats."""
    root = Path(tempfile.mkdtemp())
    model, _ = ga_model(1)
    layer = fastlora.lora_layers(model)["0"]
    delta, size = _delta(layer)
    fastlora.save_adapter(model, root / "ga")
    fastlora.export_peft(model, root / "ga_peft")
    ranks = {"fastlora": {"0": 2}, "peft": {"0": 4}}  # PEFT holds LoRA-GA as a rank-2r adapter
    Adapters.seed_files = {
        "ga": SavedAdapter("fastlora", root / "ga", ranks, {"0": (delta, size)}, None),
        "ga_peft": SavedAdapter("peft", root / "ga_peft", ranks, {"0": (delta, size)}, None),
    }
    yield
    shutil.rmtree(root, ignore_errors=True)


class Adapters(RuleBasedStateMachine):
    """The model, the expected function and the transitions every machine runs; the file and
    optimizer rules below are mixed in."""

    seed_files: dict = {}
    dtype = F64

    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        self.base = base_model().to(self.dtype)
        self.model = copy.deepcopy(self.base)
        self.ranks: dict[str, int] = {}  # the adapted layers and their ranks
        self.head: dict[str, torch.Tensor] | None = None  # the trained copy of module "2", if any
        self.delta: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (ΔW on the base, magnitude bound)
        self.merged: dict | None = None  # the deltas merge folded in, while merged
        self.disabled = None  # an open disable_adapter context
        self.opt = None
        self.roundings = 0  # how often a base weight was rounded to its dtype (float16 bound)
        self.files = dict(self.seed_files)

    def teardown(self):
        if self.disabled is not None:
            self.disabled.__exit__(None, None, None)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the check every step ends with --

    def expect(self, succeeds: bool, action) -> bool:
        before = snapshot(self.model)
        try:
            action()
        except ERRORS as exc:
            assert not succeeds, f"unexpected error: {exc!r}"
            assert_unchanged(self.model, before)
            return False
        assert succeeds, "the operation should have raised"
        return True

    def check_function(self):
        if self.disabled is not None:
            self.check_output(self.model, {}, None)
        elif self.merged is None:
            self.check_output(self.model, self.delta, self.head)
        else:
            self.check_output(self.model, self.merged, self.head)
            unmerged = fastlora.unmerge(copy.deepcopy(self.model))  # and what unmerging would give
            self.check_output(unmerged, self.delta, self.head, roundings=1)

    def check_output(self, model, deltas, head, roundings=0):
        ref = copy.deepcopy(self.base).double()
        with torch.no_grad():
            if head is not None:
                for key, value in head.items():
                    ref[2].get_parameter(key).copy_(value)
            size = copy.deepcopy(ref)
            for m in size.modules():
                for p in m.parameters(recurse=False):
                    p.abs_()
            for name, (delta, bound) in deltas.items():
                ref.get_submodule(name).weight += delta
                size.get_submodule(name).weight += bound
            want, got = ref(X), model.eval()(X.to(self.dtype)).double()
            if self.dtype == F64:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
                return
            # float16: each weight rounding, the input's and each output's rounding add at most
            # u·magnitude per layer; a layer's error passes on through the next layer's |W|.
            u = torch.finfo(self.dtype).eps / 2
            err = torch.zeros_like(X)
            h = X.abs()
            for layer in (size[0], size[2][0]):
                mag = h @ layer.weight.t() + layer.bias
                err = err @ layer.weight.t() + (self.roundings + roundings + 4) * u * mag
                h = mag.clamp(max=1.0)  # tanh: |tanh z| <= min(|z|, 1), 1-Lipschitz
            assert bool(((got - want).abs() <= err).all()), f"error {(got - want).abs().max():.3g} beyond the bound"

    def layers(self):
        return fastlora.lora_layers(self.model)

    def read_deltas(self):
        """The adapters' ΔW and the head's values as the model holds them now."""
        self.delta = {name: _delta(layer) for name, layer in self.layers().items()}
        if any(n == "2" or n.startswith("2.") for n in fastlora.copies.trainable_copies(self.model)):
            # module "2" as it computes with its copy switched on (a PEFT import copies "2.0" instead)
            self.head = {k.replace("trained.", ""): v.detach().double().clone()
                         for k, v in self.model[2].named_parameters() if "original_module" not in k}

    # -- operations --

    @initialize(pattern=st.sampled_from([None, "0", "0+head", "all-linear"]),
                kind=st.sampled_from([None, *sorted(OPTIMIZERS)]))
    def start(self, pattern, kind):
        """Most sequences start from trained adapters (and head), in machines with optimizer rules
        also with an optimizer and gradients waiting for a step (short sequences reach further)."""
        if pattern is not None:
            self.inject(pattern.removesuffix("+head"), 2, head=pattern.endswith("+head"))
            self.train(0)
            if kind is not None and isinstance(self, OptimizerRules):
                self.build_optimizer(kind)
                self.backward(0, kind)

    @rule(pattern=st.sampled_from(["0", "2.0", "all-linear"]), r=st.integers(1, 2), head=st.booleans())
    def inject(self, pattern, r, head=False):
        """New adapters, with ``head`` also a modules_to_save copy of module "2" (which holds "2.0")."""
        names = [n for n in ("0", "2.0") if n == pattern or pattern == "all-linear"]
        new = [n for n in names if n not in self.ranks and not (n == "2.0" and self.head is not None)]
        ok = bool(new) and self.merged is None and self.disabled is None
        if head:  # a copy of "2" cannot hold a LoRA layer, nor be made twice
            ok = ok and self.head is None and "2.0" not in self.ranks and "2.0" not in new
        kwargs = {"modules_to_save": ["2"]} if head else {}
        if self.expect(ok, lambda: fastlora.inject(self.model, pattern, r=r, lora_alpha=ALPHA, adapter_dtype=F64,
                                                   **kwargs)):
            for n in new:
                self.ranks[n] = r
            self.read_deltas()
        self.check_function()

    @precondition(lambda self: self.ranks and self.merged is None)
    @rule(seed=st.integers(0, 2**16))
    def train(self, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.layers().values():
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g, dtype=F64))
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=F64))
            for copied in fastlora.copies.trainable_copies(self.model).values():
                for p in copied.trained.parameters():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
        self.read_deltas()
        self.check_function()

    @rule()
    def merge(self):
        ok = bool(self.ranks) and self.merged is None and self.disabled is None
        if self.expect(ok, lambda: fastlora.merge(self.model)):
            self.merged = dict(self.delta)
            self.roundings += 1
        self.check_function()

    @rule()
    def unmerge(self):
        if self.expect(self.merged is not None and bool(self.ranks), lambda: fastlora.unmerge(self.model)):
            self.merged = None
            self.roundings += 1
        self.check_function()

    @precondition(lambda self: self.disabled is None)
    @rule()
    def open_disable_adapter(self):
        context = fastlora.disable_adapter(self.model)
        if self.expect(bool(self.ranks) and self.merged is None, context.__enter__):
            self.disabled = context
        self.check_function()

    @precondition(lambda self: self.disabled is not None)
    @rule()
    def close_disable_adapter(self):
        self.disabled.__exit__(None, None, None)
        self.disabled = None
        self.check_function()

    @precondition(lambda self: self.ranks)
    @rule(data=st.data())
    def reset(self, data):
        name = data.draw(st.sampled_from(sorted(self.ranks)))
        layer = self.layers()[name]
        if self.expect(self.merged is None, layer.reset_lora_parameters):
            self.read_deltas()
            self.delta[name] = (torch.zeros_like(self.delta[name][0]), self.delta[name][1])
            self.roundings += 1
        self.check_function()

    @precondition(lambda self: self.ranks)
    @rule(data=st.data(), r=st.integers(1, 3))
    def set_rank(self, data, r):
        name = data.draw(st.sampled_from(sorted(self.ranks)))
        layer = self.layers()[name]
        if self.expect(self.merged is None and r <= min(layer.in_features, layer.out_features),
                       lambda: layer.set_rank(r)):
            self.ranks[name] = r
            self.read_deltas()
            self.roundings += 1
        self.check_function()

    @rule(merge=st.booleans())
    def unload(self, merge):
        ok = bool(self.ranks) and not (merge and self.disabled is not None)
        if self.expect(ok, lambda: fastlora.unload(self.model, merge=merge)):
            folded = (self.merged if self.merged is not None else self.delta) if merge else {}
            with torch.no_grad():  # the plain model is the base from now on
                for name, (delta, _) in folded.items():
                    weight = self.base.get_submodule(name).weight
                    weight.copy_(weight.double() + delta)
            if merge and self.head is not None:
                with torch.no_grad():
                    for key, value in self.head.items():
                        self.base[2].get_parameter(key).copy_(value)
            self.ranks, self.delta, self.merged, self.head = {}, {}, None, None
            self.roundings += 1
            if self.disabled is not None:  # the block still ends cleanly
                self.disabled.__exit__(None, None, None)
                self.disabled = None
        self.check_function()

class FileRules:
    """Saves of every format into two folders (the last save of a folder owns it) and loads of any
    file made so far by either reader."""

    @precondition(lambda self: self.ranks)
    @rule(fmt=st.sampled_from(["fastlora", "peft", "pretrained"]), slot=st.sampled_from(["a", "b"]))
    def save(self, fmt, slot):
        path = self.dir / slot
        save = {"fastlora": fastlora.save_adapter, "peft": fastlora.export_peft,
                "pretrained": fastlora.hf.save_pretrained}[fmt]
        ranks = {"fastlora": dict(self.ranks),
                 "peft": {n: 2 * r if self.layers()[n].base_offset is not None else r for n, r in self.ranks.items()}}
        if self.expect(fmt == "fastlora" or self.merged is None, lambda: save(self.model, path)):
            self.files[slot] = SavedAdapter(fmt, path, ranks, dict(self.delta), self.head)
        self.check_function()

    @rule(data=st.data(), reader=st.sampled_from(["fastlora", "peft"]))
    def load(self, data, reader):
        saved = self.files[data.draw(st.sampled_from(sorted(self.files)))]
        ranks = saved.ranks[reader]
        fits = saved.readable_by(reader) and (not self.ranks or self.ranks == ranks) and self.merged is None
        load = fastlora.load_adapter if reader == "fastlora" else fastlora.import_peft
        if self.expect(fits, lambda: load(self.model, saved.path)):
            self.ranks, self.delta, self.head = dict(ranks), dict(saved.delta), saved.head
            self.roundings += 2  # an offset removed, another applied
        self.check_function()


class OptimizerRules:
    """Optimizers built at some point and stepped later: after merges, loads, unloads."""


    @precondition(lambda self: self.ranks)
    @rule(kind=st.sampled_from(sorted(OPTIMIZERS)))
    def build_optimizer(self, kind):
        self.opt = (kind, OPTIMIZERS[kind](self.model))

    @rule(seed=st.integers(0, 2**16), kind=st.sampled_from(sorted(OPTIMIZERS)))
    def backward(self, seed, kind):
        """Gradients for the adapters, left in place for a later step (merges may come between);
        the first adapters get an optimizer of ``kind``, kept until another is built."""
        if self.opt is None and self.ranks:
            self.build_optimizer(kind)
        g = torch.Generator().manual_seed(seed)
        loss = self.model.train()(torch.randn(4, 6, generator=g, dtype=F64).to(self.dtype)).float().pow(2).sum()
        if loss.requires_grad:  # not when merged, disabled or unloaded: no adapter in the graph
            loss.backward()
        self.check_function()

    @precondition(lambda self: self.opt is not None)
    @rule()
    def optimizer_step(self):
        kind, opt = self.opt
        held = list(opt._layers.values()) if kind != "adamw" else []
        steppable = all(not h.module.merged and not h.module.detached and h.module.lora_A is h.A for h in held)
        # torch's optimizers (and LoRA-Pro's plain groups) step every parameter they hold that has a
        # gradient, whatever its requires_grad: a head that unload(merge=True) left in the plain model
        # keeps a gradient taken there after a later inject froze it (as PEFT's get_peft_model does)
        stepped = {id(p) for group in opt.param_groups for p in group["params"] if p.grad is not None}
        if self.expect(steppable, opt.step):
            if self.ranks:
                self.read_deltas()  # whatever the step did to the adapters and a copy's head
            self.read_plain(stepped)
        opt.zero_grad(set_to_none=True)
        self.check_function()

    def read_plain(self, stepped: set[int]):
        """The model's plain parameters in ``stepped`` (not adapters, not a copy's trained head) as
        the base from now on: only module "2" can have them (a head merged by unload); every base
        layer stays frozen from the first inject on, so never gets a gradient."""
        base = dict(self.base.named_parameters())
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if id(p) in stepped and ".lora_" not in name and f".{fastlora.copies.COPY}." not in name:
                    assert name.startswith("2."), f"the step moved {name}"
                    base[name.replace("base_layer.", "").replace("original_module.", "")].copy_(p)



class FileSequences(FileRules, Adapters):
    pass


class OptimizerSequences(OptimizerRules, Adapters):
    pass


class HalfPrecisionSequences(FileRules, OptimizerRules, Adapters):
    dtype = torch.float16


@pytest.mark.parametrize("machine", [OptimizerSequences, HalfPrecisionSequences])
def test_an_optimizer_built_before_unload_steps_the_merged_head_frozen_by_a_later_inject(machine):
    """Found by the float16 machine: unload(merge=True) leaves the head trainable in the plain model
    (the optimizer's own parameters), backward gives it a gradient, inject freezes it and keeps the
    gradient (as PEFT does); the earlier AdamW's step moves it, and the machine must expect that."""
    state = machine()
    try:
        state.start(pattern="0+head", kind=None)
        state.build_optimizer(kind="adamw")
        state.unload(merge=True)
        state.backward(seed=0, kind="adamw")
        state.inject(pattern="0", r=1, head=False)
        head = state.base[2][0].weight.detach().clone()
        state.optimizer_step()
        assert not torch.equal(state.base[2][0].weight, head)  # the machine followed the head's step
    finally:
        state.teardown()


def _settings(examples):
    return settings(max_examples=examples, stateful_step_count=12, deadline=None,
                    suppress_health_check=list(HealthCheck))


FileSequences.TestCase.settings = _settings(200)
OptimizerSequences.TestCase.settings = _settings(200)
HalfPrecisionSequences.TestCase.settings = _settings(100)
TestFileSequences = FileSequences.TestCase
TestOptimizerSequences = OptimizerSequences.TestCase
TestHalfPrecisionSequences = HalfPrecisionSequences.TestCase
