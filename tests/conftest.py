"""Shared helpers: tolerances per dtype, operand layouts, poisoned allocations, ISA selection."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile

# Before fastlora is imported (here and in the subprocesses tests start): measured dispatch off,
# so which implementation a call runs never depends on a timing (tests/backends/test_dispatch.py turns it
# on with injected timings), and no choice is read from or written to the user's cache.
os.environ["FASTLORA_MEASURED"] = "0"
os.environ["FASTLORA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastlora-test-cache-")
atexit.register(shutil.rmtree, os.environ["FASTLORA_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

import fastlora  # noqa: E402
import fastlora.testing  # noqa: E402,F401  (registers the float64 oracle as the "reference" backend)

requires_extension = pytest.mark.skipif(
    not fastlora.extension_available(), reason=f"compiled extension unavailable: {fastlora.extension_error()}"
)

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

# Relative tolerance of a result computed in `dtype` against the float64 reference on the same
# input values, measured against the reference's largest magnitude: output rounding plus
# float32 accumulation over a few hundred terms.
RTOL = {torch.float64: 1e-11, torch.float32: 3e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}

LAYOUTS = ("contiguous", "transposed", "strided")


def assert_matches(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "", magnitude: float = 0.0
) -> None:
    """actual is within rtol * max(max|expected|, magnitude) of the float64 ``expected``, rtol
    being that of the compute dtype or of actual's own dtype, whichever is coarser. ``magnitude``
    bounds the size of the summed terms where results may cancel (see :func:`magnitude`)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten output?)"
    a, e = actual.double(), expected.double()
    scale = max(e.abs().max().item() if e.numel() else 0.0, magnitude)
    tol = max(RTOL[dtype], RTOL[actual.dtype]) * max(scale, 1e-30)
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g} (dtype {dtype}, max|ref| {scale:.3g})"


def magnitude(fn, *args) -> float:
    """max |result| of ``fn`` on the absolute values of its tensor and float arguments: the size
    of the terms a sum of products adds up, a floor for tolerances when the result cancels."""
    def absolute(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.double().abs()
        return abs(a) if isinstance(a, float) else a

    out = fn(*(absolute(a) for a in args))
    out = out[0] if isinstance(out, tuple) else out
    return out.abs().max().item() if out.numel() else 0.0


def make_matrix(
    rows: int, cols: int, dtype: torch.dtype, layout: str = "contiguous", generator: torch.Generator | None = None
) -> torch.Tensor:
    """A random (never zero) rows x cols matrix in the given memory layout:
    contiguous, transposed (column-major storage) or strided (every other column of a wider one)."""
    def draw(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator).to(dtype)

    if layout == "contiguous":
        return draw(rows, cols)
    if layout == "transposed":
        return draw(cols, rows).t()
    if layout == "strided":
        return draw(rows, 2 * cols + 1)[:, 1::2]
    if layout == "broadcast":  # every row the same storage (stride 0), as the gradient of a sum
        return draw(1, cols).expand(rows, cols)
    raise ValueError(layout)


@contextlib.contextmanager
def poisoned_allocations():
    """Every uninitialised allocation torch makes (the ops' outputs included) starts as NaN,
    so an element a kernel forgets to write shows up as NaN."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def available_isas() -> list[str]:
    if not fastlora.extension_available():
        return []
    found = []
    for name in ("baseline", "avx2", "avx512"):
        try:
            fastlora.cpu_isa(name)
            found.append(name)
        except RuntimeError:
            pass
    fastlora.cpu_isa("auto")
    return found


@contextlib.contextmanager
def using_isa(name: str):
    fastlora.cpu_isa(name)
    try:
        yield
    finally:
        fastlora.cpu_isa("auto")


def seed_tensor(value: int = 1234) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64)


def small_lora_model(dropout: float = 0.1) -> torch.nn.Module:
    """Linear(32, 48), GELU, Linear(48, 16) with both linears adapted (r = 4) and B drawn from
    N(0, 1), so the adapters change the output and every gradient."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 16))
    fastlora.inject(model, target_modules=["0", "2"], r=4, lora_alpha=8, lora_dropout=dropout)
    for layer in fastlora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B)
    return model


def autograd_node(y: torch.Tensor) -> str:
    """The name of the backward node that made ``y``, past the views restoring x's leading
    dimensions: which autograd Function (which implementation of the layer) ran."""
    node = y.grad_fn
    while type(node).__name__ == "ViewBackward0":
        node = node.next_functions[0][0]
    return type(node).__name__


def traced_graphs(module, *args) -> list[str]:
    """The FX graphs (as text) that torch.compile(fullgraph=True) traces for module(*args)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch.compile(module, fullgraph=True, backend=capture)(*args)
    return graphs
