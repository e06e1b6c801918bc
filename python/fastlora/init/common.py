"""Helpers shared by the initialisers."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..gradients import GradientStats
from ..inject import lora_layers
from ..layer import LoRALinear


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
    check_gradients(gradients, layers)
    return layers


def check_gradients(gradients: GradientStats, names: Iterable[str]) -> None:
    """Raises unless ``gradients`` is a :class:`GradientStats` with an entry for every name."""
    if not isinstance(gradients, GradientStats):
        raise TypeError("gradients must be the GradientStats that fastlora.collect_gradients returns")
    missing = [n for n in names if n not in gradients]
    if missing:
        raise ValueError(f"no gradient for LoRA layers {missing[:4]}: collect_gradients must target them "
                         "(the same targets as inject)")
