"""Helpers shared by the initialisers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields

import torch
from torch import Tensor, nn

from .._distributed import is_dtensor, sum_in_rank_order, world_size
from ..gradients import GradientStats
from ..layer import LoRALinear, lora_layers


def select_layers(model: nn.Module, names: Iterable[str] | None, gradients: GradientStats) -> dict[str, LoRALinear]:
    """The model's LoRA layers (all, or those named), unmerged and covered by ``gradients``;
    clear errors otherwise."""
    check_gradients(gradients, [] if names is None else names)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call fastlora.inject(model, ...) first")
    if names is not None:
        names = list(names)
        unknown = [n for n in names if n not in layers]
        if unknown:
            raise ValueError(f"not LoRA layers of this model: {unknown[:4]}")
        layers = {n: layers[n] for n in names}
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"unmerge layers {merged[:4]} before initialising them")
    # LoRA-GA rewrites W and GoRA resizes the adapters: whole tensors on every rank are needed.
    sharded = [n for n, layer in layers.items() if any(is_dtensor(p) for p in layer.parameters())]
    if sharded:
        raise ValueError(f"layers {sharded[:4]} are sharded (fully_shard): initialise the unsharded model "
                         "(collect_gradients on every rank, then lora_ga / gora), then call fully_shard; "
                         "see docs/distributed.md")
    check_gradients(gradients, layers)
    return layers


def collecting_ranks(gradients: GradientStats) -> int:
    """How many ranks collected ``gradients``: all of them must run the initialisation (it uses
    collectives when there are several)."""
    world = gradients.summary.get("world_size", 1)
    if world > 1 and world_size() != world:
        raise RuntimeError(f"these gradients were collected on {world} ranks; initialise on the same {world} "
                           f"ranks (torch.distributed has {world_size()})")
    return world


def check_gradients(gradients: GradientStats, names: Iterable[str]) -> None:
    """Raises unless ``gradients`` is a :class:`GradientStats` with a finite entry for every name."""
    if not isinstance(gradients, GradientStats):
        raise TypeError("gradients must be the GradientStats that fastlora.collect_gradients returns")
    names = list(names)
    missing = [n for n in names if n not in gradients]
    if missing:
        raise ValueError(f"no gradient for LoRA layers {missing[:4]}: collect_gradients must target them "
                         "(the same targets as inject)")
    bad = [n for n in names if not all(bool(torch.isfinite(t).all()) for t in _tensors(gradients[n]))]
    if collecting_ranks(gradients) > 1 and names:  # each rank checks its own rows: all stop, or none
        if sum_in_rank_order(torch.tensor([float(len(bad))])).item() and not bad:
            bad = ["(rows on another rank)"]
    if bad:
        raise ValueError(f"the gradients of layers {bad[:4]} have NaN or infinite values; collect them again "
                         "(collect_gradients(..., nonfinite='skip') leaves such batches out)")


def _tensors(record) -> list[Tensor]:
    out = [record.mean] if record.mean is not None else []
    if record.sketch is not None:
        out += [getattr(record.sketch, f.name) for f in fields(record.sketch)]
    out += list(record.products.values())
    return [t for t in out if isinstance(t, Tensor)]
