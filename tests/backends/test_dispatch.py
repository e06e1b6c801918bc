"""The registry and measured dispatch (fastlora.backends): a poisoned candidate is disabled with
one warning, the fastest correct candidate is chosen and cached (in memory and on disk, and
reloaded), nothing is timed under torch.compile, tune() warms every key, FASTLORA_BACKEND pins.

Timings are injected (``measured.time_run`` is replaced), so no result here depends on the
machine's speed; the candidates' outputs are real."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora
from fastlora import composed
from fastlora.testing import reference
from fastlora.backends import layer as dispatch
from fastlora.backends import measured, registry
from conftest import assert_matches, seed_tensor, small_lora_model

ROOT = Path(__file__).resolve().parents[2]
REAL_TIME_RUN = measured.time_run  # the fixture below replaces it


class _DoubleGrad(torch.autograd.Function):
    """Identity whose backward doubles the gradient: a candidate with a wrong dA."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def _poisoned(x, w, b, a, bb, s, p, seed):
    return composed.lora_linear(x, w, b, _DoubleGrad.apply(a), bb, s, p, seed)


calls = {"alt": 0}


def _alt(x, w, b, a, bb, s, p, seed):
    """A correct candidate (the composed path, counted)."""
    calls["alt"] += 1
    return composed.lora_linear(x, w, b, a, bb, s, p, seed)


@pytest.fixture
def measuring(tmp_path, monkeypatch):
    """Measured dispatch on, an empty cache directory, timings injected from ``timings`` (name ->
    seconds; unknown names take 1 s) and every timed candidate recorded in ``timed``."""
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path))
    measured.forget()
    timed: list[str] = []
    timings: dict[str, float] = {}

    def fake_time(name, run, device):
        timed.append(name)
        run()  # the candidate really runs; only its duration is made up
        return timings.get(name, 1.0)

    monkeypatch.setattr(measured, "time_run", fake_time)
    previous = registry.set_measured(True)
    added: list[str] = []

    def add(name, fn, **fields):
        registry.register(registry.Implementation(name, "linear", devices=frozenset(("cpu",)), fn=fn, **fields))
        added.append(name)

    try:
        yield dict(timed=timed, timings=timings, add=add, dir=tmp_path)
    finally:
        for name in added:
            registry.unregister("linear", name)
        registry.set_measured(previous)
        measured.forget()


def _operands(T=24, n_in=40, n_out=36, r=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n_in, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(n_out, n_in, generator=g, dtype=dtype) / n_in**0.5
    b = torch.randn(n_out, generator=g, dtype=dtype)
    a = (torch.randn(r, n_in, generator=g) / n_in**0.5).requires_grad_(True)
    bb = torch.randn(n_out, r, generator=g).requires_grad_(True)
    return x, w, b, a, bb


def _check_against_reference(x, w, b, a, bb, p, seed):
    y = fastlora.lora_linear(x, w, b, a, bb, 1.5, p, seed)
    dy = torch.randn_like(y)
    got = (y, *torch.autograd.grad(y, (x, a, bb), dy))
    x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, a, bb))
    y64 = reference.lora_linear(x64, w.double(), b.double(), a64, b64, 1.5, p, seed)
    want = (y64, *torch.autograd.grad(y64, (x64, a64, b64), dy.double()))
    for name, u, v in zip(("y", "dx", "dA", "dB"), got, want):
        assert_matches(u, v, torch.float32, name, magnitude=float(v.detach().abs().max()) * 4)


def _record_file(directory: Path) -> dict:
    (path,) = directory.glob("dispatch-*.json")
    return json.loads(path.read_text())["devices"]


def test_poisoned_candidate_is_disabled_with_one_warning_and_a_correct_one_runs(measuring):
    measuring["add"]("poisoned", _poisoned)
    measuring["timings"].update(poisoned=0.001, composed=1.0, kernels=0.5)  # poisoned would win the timing
    x, w, b, a, bb = _operands()
    with pytest.warns(RuntimeWarning, match="the poisoned implementation disagrees with the composed path") as seen:
        _check_against_reference(x, w, b, a, bb, 0.2, seed_tensor(3))
    assert sum("disagrees" in str(m.message) for m in seen) == 1
    assert "poisoned" not in measuring["timed"]
    # the fastest correct one: the C++ kernels where the extension is built, else the composed path
    want = "kernels" if fastlora.extension_available() else "composed"
    assert set(dispatch.decisions().values()) == {want}
    (device,) = _record_file(measuring["dir"]).values()
    (record,) = device.values()
    assert record["choice"] == want and "dA differs" in record["rejected"]["poisoned"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the key is settled: no second warning, no timing
        n = len(measuring["timed"])
        _check_against_reference(x, w, b, a, bb, 0.2, seed_tensor(4))
    assert len(measuring["timed"]) == n


def test_a_candidate_that_raises_is_disabled(measuring):
    def broken(*args):
        raise RuntimeError("no kernel image")

    measuring["add"]("broken", broken)
    x, w, b, a, bb = _operands(T=5)
    with pytest.warns(RuntimeWarning, match="broken implementation disagrees.*raised RuntimeError: no kernel image"):
        y = fastlora.lora_linear(x, w, b, a, bb, 1.5)
    assert y.shape == (5, 36)


def test_fastest_correct_candidate_is_chosen_cached_and_reloaded(measuring):
    measuring["add"]("alt", _alt)
    measuring["timings"].update(alt=0.2, composed=1.0, kernels=0.6)
    x, w, b, a, bb = _operands(T=20)
    calls["alt"] = 0
    _check_against_reference(x, w, b, a, bb, 0.0, None)
    assert set(measuring["timed"]) == {"alt", "composed"} | ({"kernels"} if fastlora.extension_available() else set())
    assert calls["alt"] == 3  # checked, timed (the injected timer runs it once), then the call itself
    (device,) = _record_file(measuring["dir"]).values()
    assert [r["choice"] for r in device.values()] == ["alt"]
    assert device[next(iter(device))]["ms"]["alt"] == 200.0
    # T = 17..32 share the bucket: no new timing
    n = len(measuring["timed"])
    for T in (17, 29, 32):
        fastlora.lora_linear(*_operands(T=T)[:1], w, b, a, bb, 1.5)
    assert len(measuring["timed"]) == n
    # a fresh process: memo and file cache dropped, the choice comes back from disk untimed
    dispatch._memo.clear()
    measured.forget()
    before = calls["alt"]
    fastlora.lora_linear(x, w, b, a, bb, 1.5)
    assert len(measuring["timed"]) == n and calls["alt"] == before + 1
    # another shape is a new key
    fastlora.lora_linear(*_operands(T=40)[:1], w, b, a, bb, 1.5)
    assert len(measuring["timed"]) > n


def test_a_candidate_within_the_noise_does_not_replace_the_composed_path(measuring):
    measuring["add"]("alt", _alt)
    measuring["timings"].update(alt=0.99, composed=1.0, kernels=0.995)
    fastlora.lora_linear(*_operands(T=9), 1.5)
    assert set(dispatch.decisions().values()) == {"composed"}


@pytest.mark.skipif(not fastlora.extension_available(), reason="one candidate only: nothing to measure")
def test_real_timing_on_cpu_settles_a_key_in_milliseconds(measuring, monkeypatch):
    # the real timer (whichever candidate wins on this machine is fine: only that one is chosen)
    monkeypatch.setattr(measured, "time_run", REAL_TIME_RUN)
    record = dispatch.tune_shape(40, 24, 20, 2, dtype=torch.float32, device="cpu", dropout_p=0.1)
    assert set(record["ms"]) == {"composed", "kernels"} and record["rejected"] == {}
    assert record["choice"] in record["ms"] and all(0 < ms < 1000 for ms in record["ms"].values())


def test_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten(measuring):
    path = measured.cache_path()
    path.write_text("{not json")
    measuring["add"]("alt", _alt)
    x, w, b, a, bb = _operands(T=3)
    with pytest.warns(RuntimeWarning, match="ignoring the corrupt dispatch cache"):
        fastlora.lora_linear(x, w, b, a, bb, 1.5)
    assert json.loads(path.read_text())["devices"]  # valid again
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left no temporary


def test_nothing_is_timed_under_torch_compile_and_tune_warms_every_key(measuring):
    measuring["add"]("alt", _alt)
    measuring["timings"].update(alt=0.1)
    model, x = small_lora_model(), torch.randn(2, 9, 32)
    params = fastlora.trainable_parameters(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    y = compiled(x)
    torch.autograd.grad(y.square().sum(), params)
    assert measuring["timed"] == [] and dispatch.decisions() == {}  # composed path, nothing settled
    # tune(): one pass records both layers' keys, then settles them; no .grad, RNG unchanged
    state = torch.random.get_rng_state()
    chosen = fastlora.tune(model, x, verbose=False)
    assert len(chosen) == 2 and set(chosen.values()) == {"alt"}
    assert all(p.grad is None for p in params) and torch.equal(torch.random.get_rng_state(), state)
    timed = len(measuring["timed"])
    assert timed > 0
    torch._dynamo.reset()
    calls["alt"] = 0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(2)
    got = compiled(x)
    g_got = torch.autograd.grad(got.square().sum(), params)
    assert len(measuring["timed"]) == timed and calls["alt"] == 2  # the tuned choice, traced once per layer
    torch.manual_seed(2)
    with fastlora.use_backend("composed"):
        want = model(x)
    g_want = torch.autograd.grad(want.square().sum(), params)
    torch.testing.assert_close(got, want)
    for u, v in zip(g_got, g_want):
        torch.testing.assert_close(u, v)
    assert fastlora.tune(model, x, verbose=False) == chosen and len(measuring["timed"]) == timed  # nothing new
    torch._dynamo.reset()  # this test's recompiles do not count against later tests' compiles


def test_nothing_is_timed_on_fake_tensors(measuring):
    from torch._subclasses.fake_tensor import FakeTensorMode

    measuring["add"]("alt", _alt)
    mode = FakeTensorMode()
    fake = [mode.from_tensor(t) for t in _operands(T=5)]
    with mode:
        y = fastlora.lora_linear(*fake, 1.5)
    assert y.shape == (5, 36) and measuring["timed"] == [] and dispatch.decisions() == {}


def test_tune_prints_one_summary_line(measuring, capsys):
    measuring["add"]("alt", _alt)
    measuring["timings"].update(alt=0.1)
    fastlora.tune(small_lora_model().train(), torch.randn(3, 32))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastlora: chose alt for 2 of 2 layer shapes in ")


def test_the_choice_costs_one_dict_lookup_and_no_tensor_op(measuring):
    x, w, b, a, bb = _operands(T=6)
    fastlora.lora_linear(x, w, b, a, bb, 1.5)  # settles the key

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        impl = dispatch.choose_linear(x, w, b, a, 0.0)
    assert Count.n == 0 and impl.name in ("composed", "kernels")


def test_pinned_backend_that_cannot_take_the_call_says_why():
    x, w, b, a, bb = _operands(T=4)
    with fastlora.use_backend("kernels"):
        if fastlora.extension_available():
            with pytest.raises(RuntimeError, match="pinned backend 'kernels'.*gradients of the frozen weight"):
                fastlora.lora_linear(x, w.requires_grad_(True), b, a, bb, 1.5)
        else:
            with pytest.raises(RuntimeError, match="compiled extension"):
                fastlora.lora_linear(x, w, b, a, bb, 1.5)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "FASTLORA_BACKEND"}
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), full.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env={**full, **env}, capture_output=True, text=True)


def test_fastlora_backend_pins_and_an_unknown_name_is_a_clear_error():
    code = ("import torch, fastlora\n"
            "layer = fastlora.LoRALinear(torch.nn.Linear(8, 6), r=2)\n"
            "y = layer(torch.randn(3, 8, requires_grad=True))\n"
            "print(fastlora.get_backend(), type(y.grad_fn.next_functions[0][0]).__name__)\n")
    out = _python(code, FASTLORA_BACKEND="composed", FASTLORA_MEASURED="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["composed", "_ComposedLoRABackward"]
    out = _python(code, FASTLORA_BACKEND="reference")  # the oracle is registered by fastlora.testing only
    assert out.returncode != 0 and "import fastlora.testing" in out.stderr
    out = _python("import fastlora.testing\n" + code, FASTLORA_BACKEND="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "reference"
    out = _python(code, FASTLORA_BACKEND="fastest")
    assert out.returncode != 0 and "unknown backend 'fastest'" in out.stderr and "'auto'" in out.stderr
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        fastlora.set_backend("cuda")


def test_the_oracle_is_off_the_production_path():
    """fastlora and a layer's forward and backward (static and measured dispatch) never import
    the oracle; pinning it without fastlora.testing says what to do."""
    code = ("import sys, torch, fastlora\n"
            "from fastlora.backends import registry\n"
            "layer = fastlora.LoRALinear(torch.nn.Linear(8, 6), r=2, lora_dropout=0.1)\n"
            "layer(torch.randn(3, 8, requires_grad=True)).sum().backward()\n"
            "assert 'fastlora.testing' not in sys.modules, 'production imported the oracle'\n"
            "assert 'reference' not in registry.implementations('linear')\n"
            "try:\n    fastlora.set_backend('reference')\nexcept RuntimeError as exc:\n    print(exc)\n")
    for measured_on in ("0", "1"):
        out = _python(code, FASTLORA_MEASURED=measured_on)
        assert out.returncode == 0, out.stderr
        assert "import fastlora.testing" in out.stdout


def test_registry_declares_every_implementation():
    linear = registry.implementations("linear")
    assert {"reference", "composed", "fused", "kernels"} <= set(linear)
    assert set(registry.implementations("update")) >= {"reference", "composed", "kernels"}
    for op in registry.KERNEL_OPS:
        assert set(registry.implementations(op)) == {"library", "kernels"}
    # the experimental CUDA kernels and the fused GEMMs are not trusted on a GPU without a check
    for name in ("fused", "kernels"):
        assert not linear[name].validated or "cuda" not in linear[name].validated
    assert not linear["kernels"].weight_grad and linear["fused"].max_index is None  # 64-bit offsets where needed
    assert "emulated" in registry.ineligibility(linear["fused"], "cpu")  # never chosen on CPU, only pinned
    assert registry.ineligibility(linear["fused"], "cpu", pinned=True) in (None, "it needs Triton: pip install triton")
    narrow = dataclasses.replace(linear["fused"], max_index=2**31)
    assert "index range" in registry.ineligibility(narrow, "cuda", torch.float16, index=2**31)
    moments = dataclasses.replace(registry.implementations("lora_pro_moments")["kernels"], needs_extension=())
    assert "rank limit" in registry.ineligibility(moments, "cuda", torch.float32, rank=129)


def test_bucket_of_tokens():
    assert [measured.bucket(t) for t in (1, 2, 3, 4, 5, 1000, 1024, 1025)] == [1, 2, 4, 4, 8, 1024, 1024, 2048]
    assert measured.bucket(10**6) == measured.T_CAP


def test_check_tolerance_follows_the_dtype():
    # the agreement check accepts a candidate's own rounding and rejects an error of a few units more
    want = [torch.ones(64, 64, dtype=torch.float64)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ok = [want[0] * (1 + 2 * measured._UNIT[dtype])]
        bad = [want[0] * (1 + 64 * measured._UNIT[dtype])]
        assert measured._disagreement(ok, want, ["y"], dtype, 64) is None
        assert "y differs" in measured._disagreement(bad, want, ["y"], dtype, 64)
    assert "non-finite" in measured._disagreement([want[0] * float("nan")], want, ["y"], torch.float32, 1)


def test_index_range_is_decided_by_the_exact_token_count():
    # T beyond the bucket cap shares a key, except across 2^31 elements, where 32-bit offsets wrap
    fused = dataclasses.replace(registry.implementations("linear")["fused"], max_index=2**31)  # a 32-bit one
    meta, f32 = torch.device("meta"), torch.float32
    small = dispatch._key("linear", 2**17, meta, f32, f32, 2048, 2048, 8, 0.0, False, False)
    huge = dispatch._key("linear", 2**20, meta, f32, f32, 2048, 2048, 8, 0.0, False, False)
    assert small[4] == huge[4] == measured.T_CAP and small != huge
    on_cuda = [(k[0], torch.device("cuda"), torch.float16, *k[3:]) for k in (small, huge)]
    assert dispatch._eligible(on_cuda[0], fused) in (None, "it needs Triton: pip install triton")
    assert "index range" in (dispatch._eligible(on_cuda[1], dataclasses.replace(fused, available=None)) or "")


@pytest.mark.skipif(not fastlora.extension_available(), reason="one candidate only: nothing to measure")
def test_the_quantized_branch_is_measured_too(measuring):
    measuring["timings"].update(kernels=0.1, composed=1.0)
    x, _, _, a, bb = _operands(T=7)
    y = torch.randn(7, 36, requires_grad=True)
    out = fastlora.lora_update(x, y, a, bb, 1.5, 0.2, seed_tensor(5))
    assert sorted(measuring["timed"]) == ["composed", "kernels"]
    assert [name for key, name in dispatch.decisions().items() if key.startswith("update")] == ["kernels"]
    want = reference.lora_up(y, reference.lora_down(x, a, 0.2, seed_tensor(5)), bb, 1.5)
    assert_matches(out, want, torch.float32, "out", magnitude=float(want.detach().abs().max()) * 4)
