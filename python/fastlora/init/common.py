"""Helpers shared by the initialisers."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..inject import lora_layers
from ..layer import LoRALinear


def select_layers(model: nn.Module, names: Iterable[str] | None) -> dict[str, LoRALinear]:
    """The model's LoRA layers (all, or those named), unmerged; clear errors otherwise."""
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
    return layers
