"""LoRA-Pro as a gradient transform (docs/lora_pro.md, docs/distributed.md#deepspeed): each LoRA
layer's ``(∇A, ∇B)`` replaced by the closed form's adjusted gradients ``(hA, hB)``
(:mod:`fastlora.optim.closed_form`), so that any optimizer then steps. With AdamW this is
``LoRAPro(mode="efficient")``: Adam on the adjusted adapter gradients.

Two ways to apply it:

- :func:`adjust_gradients` rewrites ``lora_A.grad`` / ``lora_B.grad`` after backward (the
  gradients as the optimizer will see them: after DDP's or FSDP2's averaging);
- :func:`lora_pro_gradient_hooks` adjusts them inside backward, before any gradient hook of a
  distributed engine runs: what DeepSpeed ZeRO-1/2/3 needs, whose partitioned optimizer never sees
  a layer's whole gradients. For fixed ``A``, ``B`` the closed form is linear in the gradients
  (the trust region, not used in efficient mode, is the only nonlinear part), so adjusting each
  rank's gradient and then averaging gives the adjusted average, to rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .closed_form import DEFAULT_RIDGE, GramProjector, check_settings, lora_pro_gradients
from .lora_pro.discovery import ModelOrLayers, by_rank, discover, has_gradients, stack_blocks

__all__ = ["adjust_gradients", "lora_pro_gradient_hooks"]


@torch.no_grad()
def adjust_gradients(model: ModelOrLayers, x_mode: str = "sylvester", ridge: float = DEFAULT_RIDGE) -> int:
    """Replaces each trainable LoRA layer's ``lora_A.grad``, ``lora_B.grad`` by LoRA-Pro's adjusted
    gradients (computed in float32, float64 for float64 adapters; written back in the gradients'
    dtype), layers of one shape in one batched closed form. Layers without gradients are left
    alone; other parameters are not touched. Under FSDP2 the reduced gradients are gathered, every
    rank computes the same whole result and keeps its rows (a collective: every rank must call it).

    Call it between ``backward`` (and any gradient clipping) and ``optimizer.step()``; with
    ``torch.optim.AdamW`` (no weight decay) that is ``LoRAPro(mode="efficient")``.

    Returns:
        The number of layers adjusted.

    Raises:
        ValueError: an unknown ``x_mode``, a negative ridge, only one of a layer's two adapters
            has a gradient, or one is sparse (nothing is changed then).
    """
    check_settings(x_mode, ridge)
    layers, _ = discover(model)
    work = [layer for layer in layers if has_gradients(layer)]  # every layer checked before any is changed
    for same in by_rank(stack_blocks(((), layer, None) for layer in work)):
        projector = GramProjector([b.A for b in same], [b.B for b in same], [b.s for b in same], ridge)
        adjusted = projector.adjust([b.grad_A for b in same], [b.grad_B for b in same], x_mode)
        for block, (h_a, h_b) in zip(same, adjusted):
            block.write_rows(h_a, h_b, grads=True)
    return len(work)


class _Adjust(torch.autograd.Function):
    """Identity on ``(A, B)`` in forward; in backward the closed form on the two gradients. ``A``
    and ``B`` are saved as copies: a ZeRO-3 engine may release the parameters' values before this
    node runs."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, scale: float, x_mode: str, ridge: float) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(a.detach().clone(), b.detach().clone())
        ctx.settings = (scale, x_mode, ridge)
        return a.view_as(a), b.view_as(b)

    @staticmethod
    def backward(ctx: Any, grad_a: Tensor, grad_b: Tensor) -> tuple[Tensor | None, ...]:
        a, b = ctx.saved_tensors
        h_a, h_b = lora_pro_gradients(a, b, grad_a, grad_b, *ctx.settings)
        return h_a.to(grad_a.dtype), h_b.to(grad_b.dtype), None, None, None


@contextmanager
def lora_pro_gradient_hooks(
    model: ModelOrLayers, x_mode: str = "sylvester", ridge: float = DEFAULT_RIDGE
) -> Iterator[int]:
    """Inside the block, every forward of a trainable LoRA layer routes its ``lora_A``, ``lora_B``
    through an identity whose backward replaces the layer's gradients by LoRA-Pro's adjusted ones,
    before they reach the parameters (and any hook a distributed engine put on them: DeepSpeed
    ZeRO's reduction, DDP's all-reduce). Run forward *and* backward inside the block; yields the
    number of layers hooked; the hooks are removed when it ends.

    Each rank adjusts its own gradients and the engine averages the results: for fixed ``A``,
    ``B`` the closed form is linear in the gradients, so this equals adjusting the average (to
    rounding); with AdamW it is ``LoRAPro(mode="efficient")`` (no trust region, which only full
    mode uses). Gradient clipping then clips the adjusted gradients. Register it after
    ``deepspeed.initialize`` (its hooks gather ZeRO-3's parameters before this one reads them).

    Example:
        >>> engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params), config=cfg)
        >>> with fastlora.optim.lora_pro_gradient_hooks(model):
        ...     engine.backward(loss_fn(engine, batch))
        >>> engine.step()
    """
    check_settings(x_mode, ridge)
    layers, _ = discover(model)
    handles = []

    def pre(module: nn.Module, args: tuple) -> None:
        params = module._parameters
        a, b = _Adjust.apply(params["lora_A"], params["lora_B"], float(module.scaling), x_mode, ridge)
        module._fastlora_adapters = params["lora_A"], params["lora_B"]
        params["lora_A"], params["lora_B"] = a, b  # read by this forward only

    def post(module: nn.Module, args: tuple, output: Any) -> None:  # also when forward raised
        saved = module.__dict__.pop("_fastlora_adapters", None)
        if saved is not None:
            module._parameters["lora_A"], module._parameters["lora_B"] = saved

    try:
        for layer in layers:
            handles.append(layer.module.register_forward_pre_hook(pre))
            handles.append(layer.module.register_forward_hook(post, prepend=True, always_call=True))
        yield len(layers)
    finally:
        for handle in handles:
            handle.remove()
