"""The layer's implementations (``lora_linear`` and the quantized branch's ``lora_update``), how
a call picks one, and :func:`tune`.

| name | ``lora_linear`` | ``lora_update`` | runs on | validated on |
| --- | --- | --- | --- | --- |
| composed | ``composed.lora_linear`` (library GEMMs) | ``composed.lora_update`` | any | every device |
| fused | ``fused.lora_linear`` (Triton GEMMs) | none | CUDA; CPU emulated | CPU (interpreter) |
| kernels | ``torch.ops.fastlora.lora_forward`` (C++/CUDA) | ``lora_down`` + ``lora_up`` | CPU, CUDA | CPU |

The float64 oracle (:mod:`fastlora.testing.reference`, plain autograd) registers itself as a
fourth, "reference", when :mod:`fastlora.testing` is imported; it runs only when pinned.

A call's choice is memoised per shape key (one dict lookup per call). Under "auto" with
measured dispatch on, a key where more than the composed path applies is settled on the device
(:func:`fastlora.backends.measured.settle`); under ``torch.compile``, fake tensors or CUDA-graph
capture nothing is timed: the choice made before (by an eager call or :func:`tune`) or the
composed path.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor

from .. import _ops, composed, fused
from .._batches import call_model
from . import measured, registry
from .registry import Implementation, register

__all__ = ["choose_linear", "choose_update", "tune", "tune_shape", "decisions"]

logger = logging.getLogger("fastlora")

_EXTENSION_LINEAR = ("lora_forward", "lora_dy_products", "lora_grad_A", "lora_grad_x")
_EVERYWHERE = None  # validated on every device type (library GEMMs)
_TRITON_DTYPES = frozenset((torch.float32, torch.bfloat16, torch.float16))


def _kernels_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scale: float,
                    dropout_p: float, seed: Tensor | None) -> Tensor:
    return _ops.lora_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)[0]


def _kernels_update(x: Tensor, y: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, dropout_p: float,
                    seed: Tensor | None) -> Tensor:
    xa = torch.ops.fastlora.lora_down(x, lora_A, dropout_p, seed)
    return torch.ops.fastlora.lora_up(y.to(x.dtype), xa, lora_B, scale)


for _impl in (
    Implementation("composed", "linear", validated=_EVERYWHERE, fn=composed.lora_linear),
    Implementation(
        "fused", "linear", devices=frozenset(("cuda", "cpu")), interpreted=frozenset(("cpu",)), dtypes=_TRITON_DTYPES,
        available=lambda: fused.available(), unavailable="it needs Triton: pip install triton",
        validated=frozenset(("cpu",)), fn=fused.lora_linear),
    Implementation(
        "kernels", "linear", devices=frozenset(("cpu", "cuda")), needs_extension=_EXTENSION_LINEAR, weight_grad=False,
        experimental_cuda=True, fn=_kernels_linear),
    Implementation("composed", "update", validated=_EVERYWHERE, fn=composed.lora_update),
    Implementation(
        "kernels", "update", devices=frozenset(("cpu", "cuda")), experimental_cuda=True, fn=_kernels_update,
        needs_extension=("lora_down", "lora_up", "lora_dy_products", "lora_grad_A")),
):
    register(_impl)
del _impl
_BY_OP = {"linear": registry.implementations("linear"), "update": registry.implementations("update")}

# key -> the implementation a call of that key runs (cleared when a switch changes)
_memo: dict[tuple, Implementation] = {}
registry.on_change(_memo.clear)
_recording: dict[tuple, None] | None = None  # keys met during tune()'s pass


def _eligible(key: tuple, impl: Implementation, pinned: bool = False) -> str | None:
    op, device, dtype, adtype, t, n_in, n_out, r, dropout, bias, wgrad, huge = key
    index = _HUGE if huge else (t or 1) * max(n_in, n_out)
    return registry.ineligibility(impl, device.type, dtype, r, dropout, wgrad, index, pinned)


def _static(key: tuple) -> Implementation:
    """The first implementation that applies and is trusted on the device, in the static order."""
    impls = _BY_OP[key[0]]
    for name in registry.STATIC_ORDER:
        impl = impls.get(name)
        if impl is not None and _eligible(key, impl) is None and registry.trusted(impl, key[1].type):
            return impl
    return impls["composed"]


def _pinned(key: tuple, name: str) -> Implementation:
    impl = _BY_OP[key[0]].get(name)
    if impl is None:
        why = registry.unregistered(name)  # FASTLORA_BACKEND=reference without fastlora.testing imported
        if why is not None:
            raise RuntimeError(why)
        return _BY_OP[key[0]]["composed"]  # e.g. "fused" for lora_update, which has no fused form
    why = _eligible(key, impl, pinned=True)
    if why is not None:
        raise RuntimeError(f"fastlora: the pinned backend {name!r} cannot take this call ({measured.key_text(key)} on "
                           f"{key[1]}): {why}. Pin another with fastlora.set_backend / FASTLORA_BACKEND, or use "
                           "'auto'.")
    return impl


def _candidates(key: tuple) -> list[Implementation]:
    """What measured dispatch weighs for ``key``: the composed path and every implementation that
    applies (validated or not: the self-check guards the user's device), never the oracle."""
    impls = _BY_OP[key[0]]
    return [impls["composed"]] + [impl for name, impl in impls.items() if name not in ("composed", "reference")
                                  and _eligible(key, impl) is None]


def _untimeable(x: Tensor) -> bool:
    """Fake tensors (tracing outside torch.compile) or CUDA-graph capture: nothing may be timed."""
    return isinstance(x, FakeTensor) or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _decide(key: tuple, untimeable: bool) -> Implementation:
    """The implementation for ``key``; raises _Unsettled where it would have to time candidates
    but may not (``untimeable``, or during tune()'s recording pass)."""
    backend = registry.get_backend()
    if backend != "auto":
        return _pinned(key, backend)
    if not registry.measured():
        return _static(key)
    candidates = _candidates(key)
    if len(candidates) == 1:
        return candidates[0]
    record = measured.cached_choice(key)
    if record is not None and record.get("choice") in {c.name for c in candidates}:
        return _BY_OP[key[0]][record["choice"]]
    if untimeable or _recording is not None:
        raise _Unsettled
    return _settle(key, candidates)[0]


class _Unsettled(Exception):
    """A key measured dispatch has not settled yet, met where nothing may be timed."""


@torch._dynamo.assume_constant_result
def _traced_choice(key: tuple, backend: str, measured_on: bool, cuda_trusted: bool) -> str:
    """The choice for ``key`` while torch.compile traces, made outside the trace: the result is
    a constant of the graph, not guarded on the memo (which grows with every new shape and would
    make each call recompile). The switches are arguments, read in the trace, so that changing
    one does re-trace."""
    impl = _memo.get(key)
    if impl is None:
        try:
            impl = _decide(key, untimeable=True)
        except _Unsettled:
            return "composed"
        _memo[key] = impl
    return impl.name


def _choose(key: tuple, x: Tensor) -> Implementation:
    if torch.compiler.is_compiling():
        name = _traced_choice(key, registry.get_backend(), registry.measured(), registry.cuda_layer_kernels())
        return _BY_OP[key[0]][name]
    if _recording is not None:
        _recording[key] = None
    impl = _memo.get(key)
    if impl is not None:
        return impl
    try:
        impl = _decide(key, _untimeable(x))
    except _Unsettled:
        return _BY_OP[key[0]]["composed"]  # not memoised: an eager call settles the key later
    _memo[key] = impl
    return impl


_HUGE = 2**31  # operands of this many elements or more need 64-bit offsets


def _key(op: str, t: Any, device: torch.device, dtype: torch.dtype, adapter_dtype: torch.dtype, n_in: int, n_out: int,
         r: int, dropout_p: float, bias: bool, weight_grad: bool) -> tuple:
    """The shape key of a call with ``t`` tokens (a symbolic size under torch.compile's dynamic shapes)."""
    if not isinstance(t, int):  # a symbolic T: no bucket
        return (op, device, dtype, adapter_dtype, None, n_in, n_out, r, dropout_p > 0.0, bias, weight_grad, False)
    # the exact size decides the index range: T beyond the bucket cap shares its key otherwise
    huge = t * max(n_in, n_out) >= _HUGE
    return (op, device, dtype, adapter_dtype, measured.bucket(t), n_in, n_out, r, dropout_p > 0.0, bias, weight_grad,
            huge)


def choose_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, dropout_p: float) -> Implementation:
    """The implementation :func:`fastlora.lora_linear` runs for a 2-D x and these operands."""
    wgrad = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    key = _key("linear", x.shape[0], x.device, x.dtype, lora_A.dtype, weight.shape[1], weight.shape[0], lora_A.shape[0],
               dropout_p, bias is not None, wgrad)
    return _choose(key, x)


def choose_update(x: Tensor, lora_A: Tensor, lora_B: Tensor, dropout_p: float) -> Implementation:
    """The implementation :func:`fastlora.lora_update` runs for a 2-D x and these adapters."""
    key = _key("update", x.shape[0], x.device, x.dtype, lora_A.dtype, lora_A.shape[1], lora_B.shape[0],
               lora_A.shape[0], dropout_p, False, False)
    return _choose(key, x)


# ---- settling a key on synthetic tensors --------------------------------------------------------

def _problem(key: tuple) -> tuple[Callable[[Callable], list], list[str], int]:
    """Synthetic operands of ``key``'s shape and ``run(fn)``: one forward and backward of an
    implementation's ``fn``, returning the output and every gradient."""
    op, device, dtype, adtype, _, n_in, n_out, r, dropout, has_bias, wgrad, _ = key
    rows = measured.synthetic_rows(key)
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int, dt: torch.dtype = dtype, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dt)

    x, dy = rand(rows, n_in), rand(rows, n_out)
    a, bb = rand(r, n_in, dt=adtype, scale=n_in**-0.5), rand(n_out, r, dt=adtype, scale=r**-0.5)
    p, s, seed = (0.1 if dropout else 0.0), 1.5, torch.tensor([20240607], dtype=torch.int64, device=device)
    if op == "linear":
        w, b = rand(n_out, n_in, scale=n_in**-0.5), (rand(n_out) if has_bias else None)
        leaves = [x, a, bb] + ([w] + ([b] if has_bias else []) if wgrad else [])
        names = ["y", "dx", "dA", "dB"] + (["dW"] + (["db"] if has_bias else []) if wgrad else [])
        args = lambda: (x, w, b, a, bb, s, p, seed)  # noqa: E731
    else:
        y = rand(rows, n_out)
        leaves, names = [x, y, a, bb], ["out", "dx", "dy", "dA", "dB"]
        args = lambda: (x, y, a, bb, s, p, seed)  # noqa: E731
    for leaf in leaves:
        leaf.requires_grad_(True)

    def run(fn: Callable) -> list:
        out = fn(*args())
        return [out, *torch.autograd.grad(out, leaves, dy)]

    return run, names, max(n_in, n_out, rows)


def _settle(key: tuple, candidates: list[Implementation]) -> tuple[Implementation, dict]:
    device = key[1]
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        if torch.amp.is_autocast_available(device.type):
            stack.enter_context(torch.autocast(device.type, enabled=False))
        run, names, depth = _problem(key)
        return measured.settle(key, candidates, _BY_OP[key[0]]["composed"], run, names, depth)


def tune_shape(tokens: int, in_features: int, out_features: int, r: int, *, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cuda", dropout_p: float = 0.0, bias: bool = False,
               adapter_dtype: torch.dtype = torch.float32, op: str = "linear") -> dict:
    """Settles one layer shape now (checking and timing every candidate, whatever the cache
    holds) and returns its record: {"choice", "ms" per candidate, "rejected" with reasons}."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = _key(op, tokens, device, dtype, adapter_dtype, in_features, out_features, r, dropout_p, bias, False)
    impl, record = _settle(key, _candidates(key))
    if registry.get_backend() == "auto" and registry.measured():
        _memo[key] = impl
    return record


def decisions() -> dict[str, str]:
    """The implementation each shape key met in this process runs (key text on its device -> name)."""
    return {f"{measured.key_text(k)} on {k[1]}": impl.name for k, impl in _memo.items()}


def _loss(out: Any) -> Tensor | None:
    loss = getattr(out, "loss", None)
    if isinstance(loss, Tensor):
        return loss
    if isinstance(out, Tensor):
        return out
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, Tensor) and v.is_floating_point()), None)


def tune(model: nn.Module, example_batch: Any, *, verbose: bool = True) -> dict[str, str]:
    """Settles every LoRA layer shape ``model`` meets on ``example_batch`` before compiling or
    capturing it (where nothing is timed and unsettled shapes run the composed path).

    Runs one forward and backward of the model (``model(**batch)`` for a mapping,
    ``model(*batch)`` for a tuple or list, else ``model(batch)``; the backward from the output's
    ``loss`` or its first floating tensor) recording each layer's shape key, then checks and
    times the candidates of every key not settled before, on synthetic tensors of its shape.
    Leaves the model as it was: no ``.grad`` is written, buffers and the RNG state are restored.
    Keep the model in the mode it will run in (dropout counts only in training mode).
    Prints one line (``verbose``) and returns {shape key: chosen implementation}.
    """
    global _recording
    if registry.get_backend() != "auto" or not registry.measured():
        logger.info("fastlora.tune: nothing to measure (backend %r, measured dispatch %s)", registry.get_backend(),
                    "on" if registry.measured() else "off")
        return {}
    started = time.perf_counter()
    measured.forget()  # read the choices file again: another process (rank 0) may have added to it
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    cpu_rng = torch.random.get_rng_state()
    _recording = {}
    try:
        loss = _loss(call_model(model, example_batch))
        if loss is not None and loss.requires_grad and params:
            torch.autograd.grad(loss.float().sum(), params, allow_unused=True)
        keys = list(_recording)
    finally:
        _recording = None
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    chosen = {}
    for key in keys:
        impl = _memo.get(key) or _settle(key, _candidates(key))[0]
        _memo[key] = impl
        chosen[f"{measured.key_text(key)} on {key[1]}"] = impl.name
    counts = Counter(chosen.values())
    message = (f"fastlora: chose {', '.join(f'{name} for {n}' for name, n in counts.most_common()) or 'nothing new'} "
               f"of {len(chosen)} layer shapes in {time.perf_counter() - started:.1f} s")
    logger.info(message)
    if verbose:
        print(message, file=sys.stderr)
    return chosen
