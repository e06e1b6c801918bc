"""Random sequences of user operations on adapter state (hypothesis): after every step the model
computes the fresh base plus the adapter the sequence last gave it, or the step raised and left
the model exactly as it was. The expected function comes from a small model of the rules in
docs/adapters.md, kept by the test itself (ΔW per layer relative to the fresh base)."""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

import fastlora
from test_adapter_state import X, assert_unchanged, base_model, ga_model, snapshot

F64 = torch.float64
ALPHA = 2.0
ERRORS = (ValueError, RuntimeError, TypeError)


@pytest.fixture(scope="module", autouse=True)
def lora_ga_files():
    """A trained LoRA-GA adapter on layer "0" (rank 2, base offset) in both formats."""
    root = Path(tempfile.mkdtemp())
    model, _ = ga_model(1)
    layer = fastlora.lora_layers(model)["0"]
    a0, b0 = layer.base_offset
    delta = layer.scaling * (layer.lora_B.detach() @ layer.lora_A.detach() - b0 @ a0)
    fastlora.save_adapter(model, root / "ga")
    fastlora.export_peft(model, root / "ga_peft")
    AdapterSequences.seed_files = {
        "ga": ("fastlora", root / "ga", {"0": 2}, {"0": layer.scaling}, {"0": delta}),
        "ga_peft": ("peft", root / "ga_peft", {"0": 4}, {"0": layer.scaling}, {"0": delta}),
    }
    yield
    shutil.rmtree(root, ignore_errors=True)


class AdapterSequences(RuleBasedStateMachine):
    seed_files: dict = {}

    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        self.base = base_model()
        self.model = copy.deepcopy(self.base)
        self.ranks: dict[str, int] = {}  # the adapted layers and their ranks
        self.scaling: dict[str, float] = {}
        self.delta: dict[str, torch.Tensor] = {}  # the adapter's ΔW on the fresh base
        self.merged = False
        self.files = dict(self.seed_files)

    def teardown(self):
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
        ref = copy.deepcopy(self.base)
        with torch.no_grad():
            for name, delta in self.delta.items():
                ref.get_submodule(name).weight += delta
            want, got = ref(X), self.model.eval()(X)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

    # -- operations --

    @rule(pattern=st.sampled_from(["0", "2.0", "all-linear"]), r=st.integers(1, 2))
    def inject(self, pattern, r):
        names = [n for n in ("0", "2.0") if n == pattern or pattern == "all-linear"]
        new = [n for n in names if n not in self.ranks]
        if self.expect(bool(new) and not self.merged, lambda: fastlora.inject(self.model, pattern, r=r, lora_alpha=ALPHA,
                                                          adapter_dtype=F64)):
            for n in new:
                self.ranks[n], self.scaling[n], self.delta[n] = r, ALPHA / r, torch.zeros_like(
                    self.base.get_submodule(n).weight)
        self.check_function()

    @precondition(lambda self: self.ranks and not self.merged)
    @rule(seed=st.integers(0, 2**16))
    def train(self, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, layer in fastlora.lora_layers(self.model).items():
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g, dtype=F64))
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=F64))
                offset = 0.0
                if layer.base_offset is not None:  # the base keeps -s·B0 A0; the factors are new
                    a0, b0 = layer.base_offset
                    offset = self.scaling[name] * b0 @ a0
                self.delta[name] = self.scaling[name] * layer.lora_B.detach() @ layer.lora_A.detach() - offset
        self.check_function()

    @precondition(lambda self: self.ranks)
    @rule()
    def save(self):
        key = f"s{len(self.files)}"
        fastlora.save_adapter(self.model, self.dir / key)
        self.files[key] = ("fastlora", self.dir / key, dict(self.ranks), dict(self.scaling),
                           {n: d.clone() for n, d in self.delta.items()})
        self.check_function()

    @precondition(lambda self: self.ranks)
    @rule()
    def export(self):
        key = f"p{len(self.files)}"
        layers = fastlora.lora_layers(self.model)
        ranks = {n: 2 * r if layers[n].base_offset is not None else r for n, r in self.ranks.items()}
        if self.expect(not self.merged, lambda: fastlora.export_peft(self.model, self.dir / key)):
            self.files[key] = ("peft", self.dir / key, ranks, dict(self.scaling),
                               {n: d.clone() for n, d in self.delta.items()})
        self.check_function()

    @rule(data=st.data())
    def load(self, data):
        key = data.draw(st.sampled_from(sorted(self.files)))
        kind, path, ranks, scaling, delta = self.files[key]
        fits = not self.ranks or self.ranks == ranks
        load = fastlora.load_adapter if kind == "fastlora" else fastlora.import_peft
        if self.expect(fits and not self.merged, lambda: load(self.model, path)):
            self.ranks, self.scaling = dict(ranks), dict(scaling)
            self.delta = {n: d.clone() for n, d in delta.items()}
        self.check_function()

    @rule()
    def merge(self):
        if self.expect(bool(self.ranks) and not self.merged, lambda: fastlora.merge(self.model)):
            self.merged = True
        self.check_function()

    @rule()
    def unmerge(self):
        if self.expect(self.merged, lambda: fastlora.unmerge(self.model)):
            self.merged = False
        self.check_function()

    @precondition(lambda self: self.ranks)
    @rule()
    def disable_adapter(self):
        def look():
            with fastlora.disable_adapter(self.model):
                torch.testing.assert_close(self.model.eval()(X), self.base(X), rtol=1e-10, atol=1e-10)

        self.expect(not self.merged, look)
        self.check_function()

    @precondition(lambda self: self.ranks)
    @rule(data=st.data())
    def reset(self, data):
        name = data.draw(st.sampled_from(sorted(self.ranks)))
        layer = fastlora.lora_layers(self.model)[name]
        if self.expect(not self.merged, layer.reset_lora_parameters):
            self.delta[name] = torch.zeros_like(self.delta[name])
        self.check_function()


AdapterSequences.TestCase.settings = settings(
    max_examples=300, stateful_step_count=10, deadline=None, suppress_health_check=list(HealthCheck)
)
TestAdapterSequences = AdapterSequences.TestCase
