"""What one collection will run, decided before anything runs: option checks, the target layers and
their weights, the memory budget, and the memory plan (where the exact accumulators live, the
staging pool, the layer groups and passes over the batches)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layer import LoRALinear
from ..quantized import check_quantized_layer, is_quantized
from ..targets import find_linear_targets
from .results import LayerGradient
from .staging import StagingPool

__all__ = ["MODES", "NONFINITE", "OFFLOADS", "Plan", "Target", "check_options", "frozen_weight", "make_plan"]

MODES = ("exact", "sketch")
OFFLOADS = ("auto", "device", "cpu", "passes")
NONFINITE = ("skip", "error")


def check_options(model, mode, offload, nonfinite, num_batches, sketch_rank, passes) -> None:
    """Raises a clear error for a bad option of :func:`collect_gradients`, before anything runs."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
    if mode == "sketch" and (not isinstance(sketch_rank, int) or sketch_rank < 1):
        raise ValueError(f"sketch_rank must be a positive int, got {sketch_rank!r}")
    if passes not in (1, 2) or (passes == 2 and mode != "sketch"):
        raise ValueError("passes must be 1, or 2 in sketch mode")


@dataclass(frozen=True)
class Target:
    """The weight a target layer's gradient is taken for (a LoRA layer's base weight; a quantized
    layer's dequantized weight, whose gradient is float32): its shape, device and dtype."""

    shape: tuple[int, int]
    device: torch.device
    dtype: torch.dtype


def frozen_weight(module: nn.Module) -> Target:
    """The weight whose gradient a target layer (``nn.Linear``, quantized or ``LoRALinear``) gives."""
    base = module.base_layer if isinstance(module, LoRALinear) else module
    dtype = torch.float32 if is_quantized(base) else base.weight.dtype
    return Target((base.out_features, base.in_features), base.weight.device, dtype)


def _parse_budget(budget: int | float | str | None, device: torch.device) -> float:
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return 0.5 * free
        return math.inf
    if isinstance(budget, str):
        units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
        text = budget.strip().lower().removesuffix("ib").removesuffix("b")
        factor = units.get(text[-1:], 1)
        try:
            budget = float(text[:-1] if text[-1:] in units else text) * factor
        except ValueError:
            raise ValueError(f"memory_budget={budget!r} is not a size like 8e9, '12GB' or '512MiB'") from None
    if not budget >= 0:
        raise ValueError(f"memory_budget must be a non-negative number of bytes, got {budget!r}")
    return float(budget)


def _plan_groups(sizes: list[int], budget: float) -> list[list[int]]:
    """Consecutive layers grouped so each group's accumulators fit the budget (one layer at least)."""
    groups, current, used = [], [], 0
    for i, size in enumerate(sizes):
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    if current:
        groups.append(current)
    return groups


@dataclass
class Plan:
    """What one collection runs: the target layers, their records, where the accumulators live,
    and the passes over the batches (a layer group and the pass number each)."""

    found: list[tuple[str, nn.Module]]
    records: dict[str, LayerGradient]
    products: dict[str, Tensor]
    device: torch.device
    placement: str
    pool: StagingPool | None
    runs: list[tuple[list[int], int]]


def make_plan(model, batches, targets, exclude_modules, mode, sketch_rank, passes, products, memory_budget,
          offload) -> Plan:
    """Targets, checks of ``products`` and the sketch rank, and the memory plan (placement of the
    exact accumulators, staging buffers, layer groups)."""
    found = find_linear_targets(model, targets, exclude_modules, include_adapted=True)
    for name, module in found:
        base = module.base_layer if isinstance(module, LoRALinear) else module
        if is_quantized(base):
            check_quantized_layer(base, name)
    products = dict(products or {})
    names = {name for name, _ in found}
    for name, m in products.items():
        if name not in names:
            raise ValueError(f"products has a matrix for {name!r}, which is not a target layer")
        in_f = frozen_weight(dict(found)[name]).shape[1]
        if not isinstance(m, Tensor) or m.dim() != 2 or m.shape[0] != in_f:
            raise ValueError(f"products[{name!r}] must be a tensor of shape ({in_f}, k), got "
                             f"{tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__}")
    if mode == "sketch":
        for name, module in found:
            if sketch_rank > min(frozen_weight(module).shape):
                raise ValueError(f"sketch_rank={sketch_rank} exceeds min(out, in) of layer {name}")
    reiterable = iter(batches) is not batches
    device = frozen_weight(found[0][1]).device
    budget = _parse_budget(memory_budget, device)

    records = {name: LayerGradient(name, *frozen_weight(m).shape) for name, m in found}
    sizes = [4 * r.out_features * r.in_features for r in records.values()]
    pool = None
    groups = [list(range(len(found)))]
    placement = "device"
    if mode == "exact":
        if offload == "auto":
            offload = "device" if sum(sizes) <= budget else ("cpu" if device.type == "cuda" else "passes")
        placement = offload
        if offload == "cpu":
            # Two staging slots of at most a quarter of the largest layer each (and 16 MiB): the
            # engine's device memory stays below half a layer's float32 gradient.
            largest = max(sizes) // 4
            widest = max(r.in_features for r in records.values())
            all_f64 = all(frozen_weight(m).dtype == torch.float64 for _, m in found)
            pool = StagingPool(device, max(widest, min(largest // 4, 4 * 2**20)),
                                torch.float64 if all_f64 else torch.float32)
        elif offload == "passes":
            groups = _plan_groups(sizes, budget)
    if (len(groups) > 1 or passes == 2) and not reiterable:
        raise ValueError("this collection runs over the batches more than once: pass a re-iterable "
                         "collection (a list or a DataLoader), not an iterator")
    runs = [(g, 1) for g in groups] + ([(groups[0], 2)] if passes == 2 else [])
    return Plan(found, records, products, device, placement, pool, runs)
