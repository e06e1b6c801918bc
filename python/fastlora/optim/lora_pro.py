"""The LoRA-Pro optimizers (Wang et al., ICLR 2025; docs/lora_pro.md).

LoRA-Pro adjusts the LoRA gradients so that a step on ``(A, B)`` moves the merged weight
``W + s B A`` along the projection of the full gradient ``G`` onto the tangent space of rank-r
matrices (:mod:`fastlora.optim.closed_form`). :class:`LoRAPro` is the AdamW version: in the
default ``mode="full"`` it keeps Adam's moments of the *equivalent gradient* in weight space
(``out x in`` per layer) and pulls Adam's direction back to the adapters, one fused pass over the
moments per layer (``fastlora._ops.lora_pro_moments``); ``mode="efficient"`` runs AdamW on the
adjusted adapter gradients with adapter-sized moments. :class:`LoRAProSGD` is the plain SGD
version. Each layer's ``(A, B, s)`` comes from its :class:`~fastlora.LoRALinear`, so per-layer
ranks and scales (GoRA, rank_pattern) work; every other trainable parameter gets ordinary AdamW
(or SGD).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import _ops
from .._distributed import check_row_sharded, full, gather_rows, is_dtensor, local, row_range, rows_like, sum_over_mesh
from ..layer import check_no_peft_layers, decay_bases, lora_layers
from ..layer import LoRALinear
from .._numerics import adam_directions
from .closed_form import DEFAULT_RIDGE, X_MODES, GramProjector, compute_dtype

__all__ = ["DEFAULT_TRUST_REGION", "LoRAPro", "LoRAProSGD", "MODES", "MOMENT_DTYPES"]

logger = logging.getLogger("fastlora")

MODES = ("full", "efficient")
_WATCHED_STEPS = 3  # steps whose large lora_A changes are logged at INFO
MOMENT_DTYPES = (torch.bfloat16, torch.float32, torch.float64)
DEFAULT_TRUST_REGION = 0.5  # chosen on the main job's ablation (docs/composition.md)

ModelOrLayers = nn.Module | Mapping[str, LoRALinear] | Iterable[LoRALinear]


@dataclass
class _Layer:
    """A LoRA layer. Under FSDP2 its adapters are DTensors sharded by rows; this rank holds rows
    ``rows_A`` of A and ``rows_B`` of B (and of the layer's out x in moments)."""

    name: str
    module: LoRALinear
    A: nn.Parameter
    B: nn.Parameter
    rows_A: tuple[int, int] = field(init=False)
    rows_B: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.rows_A, self.rows_B = row_range(self.A), row_range(self.B)

    @property
    def sharded(self) -> bool:
        return is_dtensor(self.B)


@dataclass
class _Block:
    """Layers of one shape (r, out, in) on one device, their tensors stacked in the compute dtype
    (whole tensors: sharded adapters and their reduced gradients are gathered, so the closed form
    runs identically on every rank)."""

    layers: list[_Layer]
    groups: list[dict]
    scales: list[float]
    A: Tensor = field(init=False)
    B: Tensor = field(init=False)
    grad_A: Tensor = field(init=False)
    grad_B: Tensor = field(init=False)
    s: Tensor = field(init=False)

    def stack(self, dtype: torch.dtype) -> None:
        self.A = torch.stack([full(layer.A.detach()) for layer in self.layers]).to(dtype)
        self.B = torch.stack([full(layer.B.detach()) for layer in self.layers]).to(dtype)
        self.grad_A = torch.stack([full(layer.A.grad) for layer in self.layers]).to(dtype)
        self.grad_B = torch.stack([full(layer.B.grad) for layer in self.layers]).to(dtype)
        self.s = torch.tensor(self.scales, dtype=dtype, device=self.A.device)

    def per_layer(self, key: str) -> Tensor:
        """A hyperparameter of each layer's group as a (K, 1, 1) tensor."""
        values = [float(g[key]) for g in self.groups]
        return torch.tensor(values, dtype=self.A.dtype, device=self.A.device).view(-1, 1, 1)

    def trust_radii(self) -> Tensor | None:
        """Per layer the largest allowed ``‖d_A‖_F`` of the X-free part of A's direction:
        ``trust_region * ‖A‖_F / lr`` (so the step ``lr d_A`` stays within that fraction of
        ``‖A‖``); None when the group has no trust region."""
        trust = self.groups[0]["trust_region"]
        if trust is None or self.groups[0]["mode"] == "efficient":  # Adam on the adapters bounds its step
            return None
        lr = self.per_layer("lr").reshape(-1)
        return torch.where(lr > 0, trust * self.A.flatten(1).norm(dim=1) / lr, torch.full_like(lr, math.inf))


def _discover(model: ModelOrLayers) -> tuple[list[_Layer], list[nn.Parameter]]:
    """The trainable LoRA layers and the other trainable parameters of ``model``."""
    if isinstance(model, LoRALinear):
        named, others_from = {"": model}, None
    elif isinstance(model, nn.Module):
        check_no_peft_layers(model)
        named, others_from = lora_layers(model), model
    elif isinstance(model, Mapping):
        named, others_from = dict(model), None
    elif isinstance(model, Iterable) and not isinstance(model, Tensor):
        named, others_from = {str(i): m for i, m in enumerate(model)}, None
    else:
        named, others_from = None, None
    if named is None or not all(isinstance(m, LoRALinear) for m in named.values()):
        raise TypeError(
            "LoRA-Pro needs the model (or its fastlora LoRALinear layers), not a list of parameters: it reads each "
            "layer's (lora_A, lora_B, scaling) from the layer. Pass the model, e.g. LoRAPro(model, lr=...)."
        )
    layers, adapter_ids = [], set()
    for name, module in named.items():
        a, b = module.lora_A, module.lora_B
        adapter_ids.update((id(a), id(b)))
        if is_dtensor(a) != is_dtensor(b):
            raise ValueError(
                f"layer {name!r}: only one of lora_A and lora_B is sharded (a DTensor); shard the whole LoRALinear "
                "(fully_shard on it or on a module that contains it) or neither"
            )
        if is_dtensor(a):
            check_row_sharded(a, f"layer {name!r}: lora_A")
            check_row_sharded(b, f"layer {name!r}: lora_B")
            if a.device_mesh != b.device_mesh:
                raise ValueError(f"layer {name!r}: lora_A and lora_B are sharded over different device meshes")
        if a.requires_grad and b.requires_grad:
            layers.append(_Layer(name, module, a, b))
        elif a.requires_grad or b.requires_grad:
            frozen = "lora_B" if a.requires_grad else "lora_A"
            raise ValueError(
                f"layer {name!r} has a frozen {frozen}: LoRA-Pro adjusts lora_A and lora_B together, so both must "
                "require gradients (or neither, to leave the layer out)"
            )
    if not layers:
        raise ValueError(
            "no trainable fastlora LoRA layers found; add adapters with fastlora.inject(model, ...) first "
            "(LoRA-Pro optimises LoRALinear layers; use torch.optim.AdamW for anything else)"
        )
    others = []
    if others_from is not None:
        others = [p for p in others_from.parameters() if p.requires_grad and id(p) not in adapter_ids]
    return layers, others


def _check_steppable(layer: _Layer) -> None:
    """RuntimeError unless the layer's adapter can be stepped: not unloaded, not merged (a step
    would not reach the merged weight), its base layer not wrapped by PEFT since."""
    module = layer.module
    if module.detached:
        raise RuntimeError(f"layer {layer.name!r} was unloaded (fastlora.unload) after this optimizer was built; "
                           "build a new optimizer for the model's current LoRA layers")
    if module.merged:
        raise RuntimeError(f"layer {layer.name!r} is merged: a step would change adapters the merged weight does not "
                           "follow; fastlora.unmerge(model) before training")
    module.check_base_unchanged()


def _check_hyperparameters(
    lr: float, weight_decay: float, betas: tuple[float, float] | None = None, eps: float | None = None
) -> None:
    if not isinstance(lr, numbers.Real) or not lr >= 0.0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if not isinstance(weight_decay, numbers.Real) or not weight_decay >= 0.0 or not math.isfinite(weight_decay):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if betas is not None:
        if len(betas) != 2 or not all(isinstance(b, numbers.Real) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if eps is not None and (not isinstance(eps, numbers.Real) or not eps >= 0.0 or not math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


_GROUP_MODIFIED = (
    "the LoRA parameter group was modified: it no longer holds the layers' (lora_A, lora_B) pairs. DeepSpeed ZeRO "
    "(stages 1-3) does this, replacing the parameters by flat partitions, which LoRA-Pro cannot work on: under ZeRO "
    "use torch.optim.AdamW with LoRA-Pro as a gradient transform (run backward inside "
    "fastlora.optim.lora_pro_gradient_hooks(model): LoRA-Pro's efficient mode), or FSDP2, DDP or ZeRO stage 0 "
    "(docs/distributed.md#deepspeed). Otherwise build a new optimizer"
)


class _LoRAProBase(torch.optim.Optimizer):
    """Layer discovery, batching of the closed form, weight decay, the finite-gradient check and
    checkpoints; subclasses say how adjusted gradients become updates."""

    def __init__(self, model: ModelOrLayers, defaults: dict[str, Any], check_finite: bool) -> None:
        if defaults["x_mode"] not in X_MODES:
            raise ValueError(f"unknown x_mode {defaults['x_mode']!r}; choose one of {X_MODES}")
        ridge = defaults["ridge"]
        if not isinstance(ridge, numbers.Real) or not ridge >= 0.0:
            raise ValueError(f"ridge must be a number >= 0, got {ridge!r}")
        trust = defaults["trust_region"]
        if trust is not None and (not isinstance(trust, numbers.Real) or isinstance(trust, bool) or not trust > 0.0
                                  or not math.isfinite(trust)):
            raise ValueError(f"trust_region must be None or a finite number > 0, got {trust!r}")
        layers, others = _discover(model)
        if defaults.get("decay_base_weight"):
            quantized = [layer.name for layer in layers if layer.module.quantized]
            if quantized:
                raise ValueError(f"decay_base_weight=True: layers {quantized[:4]} have quantized bases, whose weights "
                                 "cannot decay in place; use decay_base_weight=False")
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

    def _lora_work(self) -> list[_Block]:
        """Blocks of the layers that have gradients this step, grouped by shape and settings."""
        blocks: dict[tuple, _Block] = {}
        for group in self.param_groups:
            if not group["lora_pro"]:
                continue
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
                _check_steppable(layer)
                if layer.module.lora_A is not a or layer.module.lora_B is not b:
                    raise RuntimeError(
                        f"layer {layer.name!r}'s lora_A/lora_B were replaced after the optimizer was built; "
                        "copy new values into them in place (load_state_dict does) or build a new optimizer"
                    )
                if a.grad is None and b.grad is None:
                    continue
                for pname, p in (("lora_A", a), ("lora_B", b)):
                    if p.grad is None:
                        raise ValueError(
                            f"layer {layer.name!r}: {pname}.grad is None but the other adapter has a gradient; "
                            "LoRA-Pro needs both (set it to zeros if that is what you mean)"
                        )
                    if p.grad.is_sparse:
                        raise ValueError(f"layer {layer.name!r}: {pname}.grad is sparse; LoRA-Pro needs it dense")
                key = (group["mode"], group["x_mode"], group["trust_region"], a.shape, b.shape, a.device,
                       compute_dtype(a.dtype))
                block = blocks.setdefault(key, _Block([], [], []))
                block.layers.append(layer)
                block.groups.append(group)
                block.scales.append(float(layer.module.scaling))
        for key, block in blocks.items():
            block.stack(key[-1])
        return list(blocks.values())

    def _rediscover(self) -> None:
        """The layers again, from their modules' current adapters: ``accelerate.prepare`` shards the
        model (``fully_shard`` replaces its parameters) after the optimizer was built, and puts the
        new parameters in the param groups."""
        layers, _ = _discover({layer.name: layer.module for layer in self._layers.values()})
        self._layers = {id(layer.A): layer for layer in layers}

    def _plain_work(self) -> list[tuple[dict, list[Tensor]]]:
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

    def _raise_if_not_finite(self, blocks: list[_Block], plain: list[tuple[dict, list[Tensor]]]) -> None:
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
        for group in self.param_groups:
            if group["lr"] * group["weight_decay"] > 1.0:
                product = group["lr"] * group["weight_decay"]
                raise ValueError(f"lr * weight_decay = {product:g} > 1 would flip the weights' sign")
        blocks = self._lora_work()
        plain = self._plain_work()
        if self.check_finite:
            self._raise_if_not_finite(blocks, plain)
        by_rank: dict[tuple, list[_Block]] = {}
        for block in blocks:
            first = block.groups[0]
            key = (first["mode"], first["x_mode"], first["trust_region"], block.A.shape[1], block.A.device, block.A.dtype)
            by_rank.setdefault(key, []).append(block)
        self._steps_taken += 1
        changes = []
        for (mode, x_mode, *_), rank_blocks in by_rank.items():
            projector = GramProjector(
                [b.A for b in rank_blocks], [b.B for b in rank_blocks], [b.s for b in rank_blocks],
                rank_blocks[0].groups[0]["ridge"],
            )
            directions = self._directions(projector, rank_blocks, mode, x_mode)
            for block, (d_a, d_b) in zip(rank_blocks, directions):
                changes.append(self._apply(block, d_a, d_b))
        for group, params in plain:
            self._plain_step(group, params)
        # An entry for every adapter stepped, also where it keeps nothing of its own (full mode's
        # lora_B, SGD): torch.distributed.checkpoint's set_state_dict requires one per trainable parameter.
        for layer in (layer for block in blocks for layer in block.layers):
            self.state.setdefault(layer.A, {})
            self.state.setdefault(layer.B, {})
        self._report_changes(blocks, changes)
        return loss

    def _report_changes(self, blocks: list[_Block], changes: list[Tensor | None]) -> None:
        """Logs the largest relative change of a layer's lora_A in this step: at DEBUG every step,
        at INFO in the first steps when it is large (the jump right after B leaves 0)."""
        changes = [c for c in changes if c is not None]
        if not changes:
            return
        change, index = torch.cat([c.cpu() for c in changes]).max(0)
        layer = [layer for b in blocks for layer in b.layers][int(index)]
        level = logging.INFO if self._steps_taken <= _WATCHED_STEPS and change > 0.2 else logging.DEBUG
        logger.log(
            level,
            "fastlora: %s step %d: the largest relative change of a lora_A was %.1f%% (layer %r)%s",
            type(self).__name__, self._steps_taken, 100 * float(change), layer.name,
            "; large changes are expected in the first steps after lora_B leaves 0 (docs/lora_pro.md)"
            if level == logging.INFO else "",
        )

    def _directions(
        self, projector: GramProjector, blocks: list[_Block], mode: str, x_mode: str
    ) -> list[tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def _plain_step(self, group: dict, params: list[Tensor]) -> None:
        raise NotImplementedError

    def _apply(self, block: _Block, d_a: Tensor, d_b: Tensor) -> Tensor | None:
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
        # Every rank computed the same whole new_a, new_b; each writes the rows it holds.
        torch._foreach_copy_(
            [local(layer.A) for layer in block.layers],
            [a[slice(*layer.rows_A)] for layer, a in zip(block.layers, new_a.unbind(0))],
        )
        torch._foreach_copy_(
            [local(layer.B) for layer in block.layers],
            [b[slice(*layer.rows_B)] for layer, b in zip(block.layers, new_b.unbind(0))],
        )
        decayed = [(layer.module, 1.0 - g["lr"] * g["weight_decay"]) for layer, g in zip(block.layers, block.groups)
                   if g.get("decay_base_weight") and g["weight_decay"] > 0]
        if decayed:
            decay_bases(*map(list, zip(*decayed)))
        return change

    # ---- checkpoints -----------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state from :meth:`state_dict`. The LoRA layers' moments keep the dtype they
        were saved in (``torch.optim.Optimizer`` would cast them to the parameters' dtype), so a
        resumed run continues bit for bit. A state that does not fit raises and leaves this
        optimizer as it was."""
        saved_groups = state_dict["param_groups"]
        exact = {}
        for saved, group in zip(saved_groups, self.param_groups):
            if not saved.get("lora_pro"):
                continue
            if not group["lora_pro"] or len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    "this optimizer state was saved for a different set of LoRA layers; load it into an optimizer "
                    "built on the same model"
                )
            for index, param in zip(saved["params"], group["params"]):
                exact[id(param)] = state_dict["state"].get(index, {})
        for saved, group in zip(saved_groups, self.param_groups):
            if saved.get("lora_pro"):
                for a, b in zip(group["params"][0::2], group["params"][1::2]):
                    self._check_moments(a, b, saved.get("mode", group["mode"]), exact)
        before = self.state, self.param_groups
        try:
            super().load_state_dict(state_dict)
            for group in self.param_groups:
                if not group["lora_pro"]:
                    continue
                for param in group["params"]:
                    saved_state = exact.get(id(param), {})
                    for key, value in saved_state.items():
                        if isinstance(value, Tensor) and key != "step":
                            self.state[param][key] = self._placed(param, group["mode"], value)
        except BaseException:
            self.state, self.param_groups = before  # Optimizer.load_state_dict builds new ones
            raise

    def _placed(self, param: Tensor, mode: str, value: Tensor) -> Tensor:
        """A loaded LoRA moment laid out as this optimizer keeps it: a full-mode ``out x in``
        moment of a sharded layer as a DTensor sharded by rows like lora_B (taking this rank's rows
        of a whole tensor), every other one whole (gathered if it was saved sharded)."""
        layer = self._layers.get(id(param))
        if mode != "full" or layer is None or not layer.sharded:
            return full(value).to(device=local(param).device)
        like = layer.B
        if is_dtensor(value) and value.device_mesh == like.device_mesh and value.placements == like.placements:
            return value.to(device=local(like).device)
        start, stop = layer.rows_B
        rows = full(value)[start:stop].to(device=local(like).device).clone()
        return rows_like(rows, like, tuple(value.shape))

    def _check_moments(self, a: Tensor, b: Tensor, mode: str, states: dict[int, dict[str, Any]]) -> None:
        """ValueError unless the saved moments of the layer (A, B) fit it in ``mode``: ``out x in``
        on A in full mode, each adapter's own shape in efficient mode."""
        layer = self._layers[id(a)]
        expected = {id(a): (layer.B.shape[0], layer.A.shape[1])} if mode == "full" else {id(a): a.shape, id(b): b.shape}
        for key, shape in expected.items():
            for name in ("exp_avg", "exp_avg_sq"):
                moment = states.get(key, {}).get(name)
                if moment is not None and (not isinstance(moment, Tensor) or tuple(moment.shape) != tuple(shape)):
                    found = tuple(moment.shape) if isinstance(moment, Tensor) else type(moment).__name__
                    raise ValueError(
                        f"layer {layer.name!r}: saved {name} has shape {found}, expected {tuple(shape)} for "
                        f"mode={mode!r}; was the state saved with another mode or model?"
                    )


class LoRAPro(_LoRAProBase):
    """LoRA-Pro with AdamW (the paper's final algorithm), a ``torch.optim.Optimizer``.

    Example:
        >>> fastlora.inject(model, target_modules="all-linear", r=16, lora_alpha=32)
        >>> opt = fastlora.optim.LoRAPro(model, lr=2e-5)
        >>> loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()

    Args:
        model: the model (its :class:`~fastlora.LoRALinear` layers are found with
            :func:`fastlora.lora_layers`; its other trainable parameters get ordinary AdamW),
            or LoRA layers (a dict from ``lora_layers`` or a list; then only those are optimised).
        lr: learning rate.
        betas, eps: Adam's coefficients; bias correction starts at step 1.
        weight_decay: decoupled weight decay of the merged weight: ``A, B *= sqrt(1 - lr wd)`` so
            that ``s B A`` shrinks by ``1 - lr wd``; plain AdamW decay for the other parameters.
        mode: "full" (default): Adam moments of the equivalent gradient, ``out x in`` per layer
            (the memory of full fine-tuning's Adam state), one fused pass per layer; the merged
            weight moves along the tangent-space projection of Adam's direction. "efficient":
            AdamW on the adjusted adapter gradients with adapter-sized moments.
        x_mode: how the free r x r matrix X is chosen: "sylvester" (closest to the LoRA gradients,
            the paper's choice), "symmetry" or "zero".
        moment_dtype: storage of the LoRA layers' moments (math is float32, or float64 for
            float64 moments): torch.bfloat16 (default), torch.float32 or torch.float64.
        ridge: the ridge added to the Gram matrices' eigenvalues before inverting them.
        decay_base_weight: also multiply each adapted layer's frozen base weight by
            ``1 - lr wd`` (the older official code's behaviour; off by default: it modifies the
            base model).
        check_finite: raise ValueError, before changing anything, if a gradient holds NaN/Inf
            (costs one device synchronisation per step).
        trust_region: τ > 0 (default 0.5) or None (the paper's closed form): each step of a
            layer's ``lora_A`` stays within ``τ ‖A‖_F`` for the closed form's X-free part
            (``2 τ ‖A‖_F`` with X), by damping ``BᵀB`` by the smallest ``δ`` that achieves it; the
            faithful step wherever it already fits. Where ``B`` is small next to its step (right
            after a GoRA init, or after ``B`` leaves 0) the faithful step moves ``A`` by many
            times its norm and the realised merged-weight step is mostly the second-order term
            ``s ΔB ΔA``; the region keeps it first order (docs/composition.md). Not used in
            efficient mode, whose Adam normalises each adapter's step.

    State (``optimizer.state``): for a LoRA layer, under its ``lora_A``: ``step`` and, in full
    mode, ``exp_avg`` / ``exp_avg_sq`` of shape ``out x in``; in efficient mode each adapter holds
    its own moments. ``state_dict()`` / ``load_state_dict()`` include them.
    """

    def __init__(
        self,
        model: ModelOrLayers,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mode: str = "full",
        x_mode: str = "sylvester",
        moment_dtype: torch.dtype = torch.bfloat16,
        ridge: float = DEFAULT_RIDGE,
        decay_base_weight: bool = False,
        check_finite: bool = True,
        trust_region: float | None = DEFAULT_TRUST_REGION,
    ) -> None:
        _check_hyperparameters(lr, weight_decay, betas, eps)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if moment_dtype not in MOMENT_DTYPES:
            raise TypeError(
                f"moment_dtype must be one of {MOMENT_DTYPES}, got {moment_dtype!r} (float16 cannot hold the second "
                "moment's range)"
            )
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, mode=mode, x_mode=x_mode,
            moment_dtype=moment_dtype, ridge=ridge, decay_base_weight=bool(decay_base_weight),
            trust_region=trust_region,
        )
        super().__init__(model, defaults, check_finite)
        if mode == "full":
            elements = sum(layer.A.shape[1] * layer.B.shape[0] for layer in self._layers.values())
            logger.info(
                "fastlora: LoRAPro full mode keeps %.2f GiB of %s moments (2 x out x in per layer)",
                2 * elements * torch.tensor([], dtype=moment_dtype).element_size() / 2**30, moment_dtype,
            )

    def _directions(
        self, projector: GramProjector, blocks: list[_Block], mode: str, x_mode: str
    ) -> list[tuple[Tensor, Tensor]]:
        if mode == "efficient":
            adjusted = projector.adjust([b.grad_A for b in blocks], [b.grad_B for b in blocks], x_mode)
            return [self._adam_on_adapters(block, h_a, h_b) for block, (h_a, h_b) in zip(blocks, adjusted)]
        pulled_A, pulled_B = [], []
        for i, block in enumerate(blocks):
            h_a0, h_b0 = projector.base(i, block.grad_A, block.grad_B)
            out_a, out_b = [], []
            for k, (layer, group) in enumerate(zip(block.layers, block.groups)):
                state = self.state[layer.A]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = _new_moment(layer, group["moment_dtype"])
                    state["exp_avg_sq"] = _new_moment(layer, group["moment_dtype"])
                state["step"] += 1
                beta1, beta2 = group["betas"]
                rows = slice(*layer.rows_B)  # the moments' rows this rank holds (all without FSDP)
                g_a, g_b = _ops.lora_pro_moments(
                    local(state["exp_avg"]), local(state["exp_avg_sq"]), block.A[k], block.B[k][rows], h_a0[k],
                    h_b0[k][rows], block.scales[k], beta1, beta2, group["eps"], state["step"],
                )
                if layer.sharded:  # s B^T D sums over all rows; s D A^T has one row per row of B
                    g_a = sum_over_mesh(g_a, layer.B)
                    g_b = gather_rows(g_b, layer.B, tuple(layer.B.shape))
                out_a.append(g_a)
                out_b.append(g_b)
            pulled_A.append(torch.stack(out_a).to(block.A.dtype))
            pulled_B.append(torch.stack(out_b).to(block.A.dtype))
        return projector.adjust(pulled_A, pulled_B, x_mode, _trust_radii(blocks))

    def _adam_on_adapters(self, block: _Block, h_a: Tensor, h_b: Tensor) -> tuple[Tensor, Tensor]:
        """Efficient mode: AdamW's direction for each adapter from its adjusted gradient."""
        moments, grads, steps = [], [], []
        for k, (layer, group) in enumerate(zip(block.layers, block.groups)):
            state_a, state_b = self.state[layer.A], self.state[layer.B]
            if not state_a:
                state_a["step"] = 0
                for state, p in ((state_a, layer.A), (state_b, layer.B)):
                    state["exp_avg"] = torch.zeros(p.shape, dtype=group["moment_dtype"], device=p.device)
                    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=group["moment_dtype"], device=p.device)
            state_a["step"] += 1
            moments += [state_a, state_b]
            grads += [h_a[k], h_b[k]]
            steps += [state_a["step"]] * 2
        directions = _grouped_adam(moments, grads, steps, [g for g in block.groups for _ in range(2)])
        return torch.stack(directions[0::2]), torch.stack(directions[1::2])

    def _plain_step(self, group: dict, params: list[Tensor]) -> None:
        """Ordinary AdamW (moments in each parameter's dtype, math in float32)."""
        states = []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            states.append(state)
        directions = _grouped_adam(states, [p.grad for p in params], [s["step"] for s in states], [group] * len(params))
        if group["weight_decay"] > 0:
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(params, [d.to(p.dtype) for d, p in zip(directions, params)], alpha=-group["lr"])


def _new_moment(layer: _Layer, dtype: torch.dtype) -> Tensor:
    """A zero ``out x in`` moment of the layer's weight; under FSDP2 a DTensor sharded by rows as
    lora_B (and the weight) is, so each rank stores ``out x in / world`` elements."""
    shape = (layer.B.shape[0], layer.A.shape[1])
    start, stop = layer.rows_B
    rows = torch.zeros((stop - start, shape[1]), dtype=dtype, device=local(layer.B).device)
    return rows_like(rows, layer.B, shape) if layer.sharded else rows


def _trust_radii(blocks: list[_Block]) -> list[Tensor] | None:
    """The blocks' trust radii for :meth:`GramProjector.adjust` (blocks of one call share the setting)."""
    radii = [b.trust_radii() for b in blocks]
    return None if radii[0] is None else radii


def _grouped_adam(states: list[dict], grads: list[Tensor], steps: list[int], groups: list[dict]) -> list[Tensor]:
    """:func:`fastlora._numerics.adam_directions` over tensors whose groups may differ in betas/eps."""
    out: list[Tensor | None] = [None] * len(grads)
    by_hyper: dict[tuple, list[int]] = {}
    for i, g in enumerate(groups):
        by_hyper.setdefault((tuple(g["betas"]), g["eps"]), []).append(i)
    for ((beta1, beta2), eps), idx in by_hyper.items():
        directions = adam_directions(
            [states[i]["exp_avg"] for i in idx], [states[i]["exp_avg_sq"] for i in idx], [grads[i] for i in idx],
            beta1, beta2, eps, [steps[i] for i in idx],
        )
        for i, d in zip(idx, directions):
            out[i] = d
    return out  # type: ignore[return-value]


class LoRAProSGD(_LoRAProBase):
    """LoRA-Pro with plain SGD (no momentum), as in the official code: each step moves ``A, B``
    along the closed form's adjusted gradients, so the merged weight moves along the
    tangent-space projection of ``G``. Other trainable parameters get plain SGD.

    Args:
        model, x_mode, ridge, decay_base_weight, check_finite, trust_region: as :class:`LoRAPro`.
        lr: learning rate.
        weight_decay: ``A, B *= sqrt(1 - lr wd)`` (for plain SGD decoupled and L2 decay coincide);
            ``p *= 1 - lr wd`` for the other parameters.
    """

    def __init__(
        self,
        model: ModelOrLayers,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        x_mode: str = "sylvester",
        ridge: float = DEFAULT_RIDGE,
        decay_base_weight: bool = False,
        check_finite: bool = True,
        trust_region: float | None = DEFAULT_TRUST_REGION,
    ) -> None:
        _check_hyperparameters(lr, weight_decay)
        defaults = dict(
            lr=lr, weight_decay=weight_decay, mode="sgd", x_mode=x_mode, ridge=ridge,
            decay_base_weight=bool(decay_base_weight), trust_region=trust_region,
        )
        super().__init__(model, defaults, check_finite)

    def _directions(
        self, projector: GramProjector, blocks: list[_Block], mode: str, x_mode: str
    ) -> list[tuple[Tensor, Tensor]]:
        return projector.adjust([b.grad_A for b in blocks], [b.grad_B for b in blocks], x_mode, _trust_radii(blocks))

    def _plain_step(self, group: dict, params: list[Tensor]) -> None:
        if group["weight_decay"] > 0:
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(params, [p.grad for p in params], alpha=-group["lr"])
