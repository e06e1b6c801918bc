"""The optimizer base shared by :class:`~fastlora.optim.LoRAPro` and
:class:`~fastlora.optim.LoRAProSGD`: settings checks, the step (gather the layers with gradients
into blocks, check that every gradient is finite, one closed form per rank, apply the directions
with decoupled weight decay), the log of large changes, and checkpoint loading. Subclasses say how
adjusted gradients become directions (:meth:`LoRAProBase._directions`) and how the other
parameters step (:meth:`LoRAProBase._plain_step`).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..._distributed import full
from ...layer import decay_bases
from ..closed_form import GramProjector, check_settings
from .discovery import Block, Layer, ModelOrLayers, by_rank, check_steppable, discover, has_gradients, stack_blocks
from .state import check_saved_moments, restore_moments, saved_lora_states

__all__ = ["LoRAProBase"]

logger = logging.getLogger("fastlora")

_WATCHED_STEPS = 3  # steps whose large lora_A changes are logged at INFO

_GROUP_MODIFIED = (
    "the LoRA parameter group was modified: it no longer holds the layers' (lora_A, lora_B) pairs. DeepSpeed ZeRO "
    "(stages 1-3) does this, replacing the parameters by flat partitions, which LoRA-Pro cannot work on: under ZeRO "
    "use torch.optim.AdamW with LoRA-Pro as a gradient transform (run backward inside "
    "fastlora.optim.lora_pro_gradient_hooks(model): LoRA-Pro's efficient mode), or FSDP2, DDP or ZeRO stage 0 "
    "(docs/distributed.md#deepspeed). Otherwise build a new optimizer"
)

PlainWork = list[tuple[dict, list[Tensor]]]


class LoRAProBase(torch.optim.Optimizer):
    """Layer discovery, batching of the closed form, weight decay, the finite-gradient check and
    checkpoints; subclasses say how adjusted gradients become updates."""

    def __init__(self, model: ModelOrLayers, defaults: dict[str, Any], check_finite: bool) -> None:
        _check_settings(defaults)
        layers, others = discover(model)
        _check_base_decay(layers, defaults)
        self._layers = {id(layer.A): layer for layer in layers}
        self.check_finite = bool(check_finite)
        self._steps_taken = 0
        adapters = [p for layer in layers for p in (layer.A, layer.B)]
        groups: list[dict[str, Any]] = [{"params": adapters, "lora_pro": True}]
        if others:
            groups.append({"params": others})
        self._building = True
        super().__init__(groups, {**defaults, "lora_pro": False})
        self._building = False
        ranks = sorted({layer.module.r for layer in layers})
        logger.info(
            "fastlora: %s over %d LoRA layers (ranks %s) and %d other trainable parameters",
            type(self).__name__, len(layers), ranks, len(others),
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("trust_region", None)  # a state saved before the option existed

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group of ordinary parameters (they get plain AdamW / SGD). LoRA layers can only
        be given at construction, because the optimizer must know each layer's (A, B, s)."""
        if param_group.get("lora_pro") and not self._building:
            raise ValueError("LoRA layers can only be given when the optimizer is built; build a new one")
        super().add_param_group(param_group)

    # ---- gathering ------------------------------------------------------------------------

    def _lora_work(self) -> list[Block]:
        """Blocks of the layers that have gradients this step, grouped by shape and settings."""
        return stack_blocks(
            (_settings(group), layer, group)
            for group in self.param_groups if group["lora_pro"]
            for layer in self._layers_of(group) if has_gradients(layer)
        )

    def _layers_of(self, group: dict[str, Any]) -> Iterator[Layer]:
        """The layers of a LoRA group's ``(lora_A, lora_B)`` pairs, each checked to be steppable
        as it is reached; RuntimeError if the group or a layer's adapters were replaced."""
        params = group["params"]
        if len(params) % 2:  # else zip would silently leave the last one out
            raise RuntimeError(_GROUP_MODIFIED)
        for a, b in zip(params[0::2], params[1::2]):
            layer = self._layers.get(id(a))
            if layer is None:  # accelerate's FSDP2 prepare swaps in the sharded parameters
                self._rediscover()
                layer = self._layers.get(id(a))
            if layer is None or layer.B is not b:
                raise RuntimeError(_GROUP_MODIFIED)
            check_steppable(layer)
            if layer.module.lora_A is not a or layer.module.lora_B is not b:
                raise RuntimeError(
                    f"layer {layer.name!r}'s lora_A/lora_B were replaced after the optimizer was built; "
                    "copy new values into them in place (load_state_dict does) or build a new optimizer"
                )
            yield layer

    def _rediscover(self) -> None:
        """The layers again, from their modules' current adapters: ``accelerate.prepare`` shards the
        model (``fully_shard`` replaces its parameters) after the optimizer was built, and puts the
        new parameters in the param groups."""
        layers, _ = discover({layer.name: layer.module for layer in self._layers.values()})
        self._layers = {id(layer.A): layer for layer in layers}

    def _plain_work(self) -> PlainWork:
        work = []
        for group in self.param_groups:
            if group["lora_pro"]:
                continue
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} has a sparse gradient; use dense ones")
            if params:
                work.append((group, params))
        return work

    # ---- the step --------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step over every parameter that has a gradient.

        Raises:
            ValueError: a gradient holds NaN/Inf (with ``check_finite``; nothing is changed then),
                only one of a layer's two adapters has a gradient, or ``lr * weight_decay > 1``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_decay_products()
        blocks = self._lora_work()
        plain = self._plain_work()
        if self.check_finite:
            _raise_if_not_finite(blocks, plain)
        self._steps_taken += 1
        changes = self._step_layers(blocks)
        for group, params in plain:
            self._plain_step(group, params)
        # An entry for every adapter stepped, also where it keeps nothing of its own (full mode's
        # lora_B, SGD): torch.distributed.checkpoint's set_state_dict requires one per trainable parameter.
        for layer in (layer for block in blocks for layer in block.layers):
            self.state.setdefault(layer.A, {})
            self.state.setdefault(layer.B, {})
        _report_changes(type(self).__name__, self._steps_taken, blocks, changes)
        return loss

    def _check_decay_products(self) -> None:
        """ValueError if a group's ``lr * weight_decay`` exceeds 1."""
        for group in self.param_groups:
            if group["lr"] * group["weight_decay"] > 1.0:
                product = group["lr"] * group["weight_decay"]
                raise ValueError(f"lr * weight_decay = {product:g} > 1 would flip the weights' sign")

    def _step_layers(self, blocks: list[Block]) -> list[Tensor | None]:
        """Steps the blocks, one closed form per rank and settings; each block's relative changes of A."""
        changes = []
        for rank_blocks in by_rank(blocks, lambda block: _settings(block.groups[0])):
            first = rank_blocks[0].groups[0]
            mode, x_mode = first["mode"], first["x_mode"]
            projector = GramProjector(
                [b.A for b in rank_blocks], [b.B for b in rank_blocks], [b.s for b in rank_blocks], first["ridge"]
            )
            directions = self._directions(projector, rank_blocks, mode, x_mode)
            for block, (d_a, d_b) in zip(rank_blocks, directions):
                changes.append(self._apply(block, d_a, d_b))
        return changes

    def _directions(
        self, projector: GramProjector, blocks: list[Block], mode: str, x_mode: str
    ) -> list[tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def _plain_step(self, group: dict, params: list[Tensor]) -> None:
        raise NotImplementedError

    def _apply(self, block: Block, d_a: Tensor, d_b: Tensor) -> Tensor | None:
        """A, B <- sqrt(1 - lr wd) (A, B) - lr (d_a, d_b): decoupled weight decay of the merged
        weight's adapter part (s B A shrinks by 1 - lr wd), then the step; optionally the base
        weight decays by 1 - lr wd too. Returns each layer's relative change of A when it is
        to be logged."""
        lr, wd = block.per_layer("lr"), block.per_layer("weight_decay")
        keep = (1.0 - lr * wd).sqrt()
        new_a = block.A * keep - lr * d_a
        new_b = block.B * keep - lr * d_b
        change = None
        if self._steps_taken <= _WATCHED_STEPS or logger.isEnabledFor(logging.DEBUG):
            change = (new_a - block.A).flatten(1).norm(dim=1) / block.A.flatten(1).norm(dim=1).clamp_min(1e-30)
        block.write_rows(new_a, new_b)
        _decay_base_weights(block)
        return change

    # ---- checkpoints -----------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state from :meth:`state_dict`. The LoRA layers' moments keep the dtype they
        were saved in (``torch.optim.Optimizer`` would cast them to the parameters' dtype), so a
        resumed run continues bit for bit. A state that does not fit raises and leaves this
        optimizer as it was."""
        states = saved_lora_states(state_dict, self.param_groups)
        check_saved_moments(state_dict, self.param_groups, self._layers, states)
        before = self.state, self.param_groups
        try:
            super().load_state_dict(state_dict)
            restore_moments(self.state, self.param_groups, self._layers, states)
        except BaseException:
            self.state, self.param_groups = before  # Optimizer.load_state_dict builds new ones
            raise


def _settings(group: dict[str, Any]) -> tuple:
    """The group settings that layers of one closed form share."""
    return group["mode"], group["x_mode"], group["trust_region"]


def _check_settings(defaults: dict[str, Any]) -> None:
    """ValueError unless the closed form's settings (x_mode, ridge, trust_region) are valid."""
    check_settings(defaults["x_mode"], defaults["ridge"])
    trust = defaults["trust_region"]
    if trust is not None and (not isinstance(trust, numbers.Real) or isinstance(trust, bool) or not trust > 0.0
                              or not math.isfinite(trust)):
        raise ValueError(f"trust_region must be None or a finite number > 0, got {trust!r}")


def _check_base_decay(layers: list[Layer], defaults: dict[str, Any]) -> None:
    """ValueError if the base weights are to decay but some are quantized."""
    if defaults.get("decay_base_weight"):
        quantized = [layer.name for layer in layers if layer.module.quantized]
        if quantized:
            raise ValueError(f"decay_base_weight=True: layers {quantized[:4]} have quantized bases, whose weights "
                             "cannot decay in place; use decay_base_weight=False")


def _raise_if_not_finite(blocks: list[Block], plain: PlainWork) -> None:
    """One device sync: every gradient is finite, or ValueError naming the first bad one."""
    flags = [torch.isfinite(t).all() for b in blocks for t in (b.grad_A, b.grad_B)]
    grads = [p.grad for _, params in plain for p in params]
    if grads:
        norms = torch._foreach_norm(grads)  # the norm of a sharded gradient is reduced by full()
        flags += [torch.isfinite(full(n)) for n in norms]
    if not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):
        return
    for b in blocks:  # the stacked gradients are whole (gathered) on every rank: no collectives here
        for k, layer in enumerate(b.layers):
            for pname, grad in (("lora_A", b.grad_A[k]), ("lora_B", b.grad_B[k])):
                if not torch.isfinite(grad).all():
                    raise ValueError(
                        f"layer {layer.name!r}: {pname}.grad contains NaN or Inf; the step was not applied. Lower "
                        "the learning rate, clip gradients, or use a GradScaler with float16 (it skips such steps)."
                    )
    for _, params in plain:
        for p in params:
            if not torch.isfinite(full(p.grad)).all():
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} has a gradient with NaN or Inf; "
                    "the step was not applied"
                )


def _decay_base_weights(block: Block) -> None:
    """Multiplies the base weights by ``1 - lr wd`` where the group asks for it."""
    decayed = [(layer.module, 1.0 - g["lr"] * g["weight_decay"]) for layer, g in zip(block.layers, block.groups)
               if g.get("decay_base_weight") and g["weight_decay"] > 0]
    if decayed:
        decay_bases(*map(list, zip(*decayed)))


def _report_changes(optimizer: str, step: int, blocks: list[Block], changes: list[Tensor | None]) -> None:
    """Logs the largest relative change of a layer's lora_A in this step: at DEBUG every step,
    at INFO in the first steps when it is large (the jump right after B leaves 0)."""
    changes = [c for c in changes if c is not None]
    if not changes:
        return
    change, index = torch.cat([c.cpu() for c in changes]).max(0)
    layer = [layer for b in blocks for layer in b.layers][int(index)]
    level = logging.INFO if step <= _WATCHED_STEPS and change > 0.2 else logging.DEBUG
    logger.log(
        level,
        "fastlora: %s step %d: the largest relative change of a lora_A was %.1f%% (layer %r)%s",
        optimizer, step, 100 * float(change), layer.name,
        "; large changes are expected in the first steps after lora_B leaves 0 (docs/lora_pro.md)"
        if level == logging.INFO else "",
    )
