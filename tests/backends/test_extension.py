"""Loading the compiled extension: version check, fallback to the reference path, backends."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastlora
from fastlora.backends.registry import kernel_used
from conftest import requires_extension

BLOCK_EXTENSION = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fastlora._C":
            raise ImportError("blocked by the test")
sys.meta_path.insert(0, _Block())
"""


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLORA_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=300)


@requires_extension
def test_torch_version_mismatch_says_how_to_rebuild():
    res = _run("import torch; torch.__version__ = '0.0.1'; import fastlora")
    assert res.returncode != 0
    assert "built against torch" in res.stderr and "--no-build-isolation" in res.stderr


def test_missing_extension_warns_once_and_falls_back():
    res = _run(BLOCK_EXTENSION + """
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastlora
    import fastlora.layer
messages = [str(w.message) for w in caught if "composed path" in str(w.message)]
assert len(messages) == 1, messages
assert not fastlora.extension_available() and "blocked by the test" in fastlora.extension_error()
layer = fastlora.LoRALinear(torch.nn.Linear(8, 4), r=2, lora_dropout=0.1)
torch.nn.init.normal_(layer.lora_B)
x = torch.randn(3, 8, requires_grad=True)
layer(x).sum().backward()
assert layer.lora_A.grad is not None and x.grad is not None
print("ok")
""")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_require_extension_turns_the_fallback_into_an_error():
    res = _run(BLOCK_EXTENSION + "import fastlora", FASTLORA_REQUIRE_EXTENSION="1")
    assert res.returncode != 0 and "FASTLORA_REQUIRE_EXTENSION" in res.stderr


def test_disable_extension_is_quiet():
    res = _run("import warnings; warnings.simplefilter('error'); import fastlora; "
               "assert not fastlora.extension_available(); print(fastlora.extension_error())",
               FASTLORA_DISABLE_EXTENSION="1")
    assert res.returncode == 0, res.stderr
    assert "FASTLORA_DISABLE_EXTENSION" in res.stdout


@requires_extension
def test_reference_backend_switch_gives_the_same_layer():
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(torch.nn.Linear(16, 12, dtype=torch.float64), r=3, lora_dropout=0.2,
                                adapter_dtype=torch.float64)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16, dtype=torch.float64)
    seed = torch.tensor([17])
    args = (layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B, layer.scaling, 0.2, seed)
    fast = fastlora.lora_linear(x, *args)
    with fastlora.use_backend("reference"):
        assert fastlora.get_backend() == "reference"
        slow = fastlora.lora_linear(x, *args)
        # Every caller asks the registry, the gradient engine included.
        assert not any(kernel_used(op, "cpu") for op in ("lora_forward", "lora_pro_moments", "accumulate_outer"))
        assert fastlora.gradients.strategies._op("accumulate_outer", x.device) is fastlora.backends.library.accumulate_outer
    assert kernel_used("lora_forward", "cpu")
    assert fastlora.get_backend() == "auto"
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unknown backend"):
        fastlora.set_backend("fast")


@requires_extension
def test_cpu_isa_selection():
    assert fastlora.cpu_isa() in ("baseline", "avx2", "avx512")
    assert fastlora.cpu_isa("baseline") == "baseline"
    fastlora.cpu_isa("auto")
    with pytest.raises(RuntimeError, match="unknown or not supported"):
        fastlora.cpu_isa("sse9")


def test_cuda_layer_kernels_switch(monkeypatch):
    # Off by default; FASTLORA_CUDA_LAYER=1 turns it on at import. It gates only the experimental
    # CUDA kernels (the layer's ops and the dropout mask); CPU kernels and the validated CUDA
    # accumulate_outer are used whatever it says. Every kernel is taken as compiled, so the answers
    # do not depend on whether this build has CUDA.
    code = """
        import fastlora
        from fastlora.backends import registry
        registry.compiled_kernel = lambda op, device: True
        print(fastlora.cuda_layer_kernels(), registry.kernel_used("dropout_mask", "cuda"),
              registry.kernel_used("lora_forward", "cpu"))
    """
    assert _run(code).stdout.split() == ["False", "False", "True"]
    assert _run(code, FASTLORA_CUDA_LAYER="1").stdout.split() == ["True", "True", "True"]
    from fastlora.backends import registry

    monkeypatch.setattr(registry, "compiled_kernel", lambda op, device: True)
    previous = fastlora.set_cuda_layer_kernels(False)
    try:
        assert not kernel_used("lora_dy_products", "cuda") and not kernel_used("dropout_mask", "cuda")
        assert kernel_used("accumulate_outer", "cuda") and kernel_used("lora_dy_products", "cpu")
        assert fastlora.set_cuda_layer_kernels(True) is False and fastlora.cuda_layer_kernels()
        assert kernel_used("lora_dy_products", "cuda") and kernel_used("dropout_mask", "cuda")
    finally:
        fastlora.set_cuda_layer_kernels(previous)
