"""Optimizer parameter groups for LoRA+ style learning rates."""

from __future__ import annotations

from torch import nn

from ..layer import lora_layers

__all__ = ["param_groups"]


def param_groups(
    model: nn.Module, lr: float, b_lr_ratio: float = 16.0, weight_decay: float = 0.0,
    other_weight_decay: float | None = None,
) -> list[dict]:
    """Parameter groups for a torch optimizer: LoRA ``A`` at ``lr``, LoRA ``B`` at
    ``lr * b_lr_ratio`` (LoRA+, Hayou et al. 2024; GoRA's runs use 16), and every other trainable
    parameter (heads, biases) at ``lr``.

    ``weight_decay`` applies to A and B; ``other_weight_decay`` (default: the same) to the rest.
    Frozen parameters are left out. Empty groups are dropped.

    Example:
        >>> opt = torch.optim.AdamW(fastlora.param_groups(model, lr=5e-5, weight_decay=5e-4))
    """
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not b_lr_ratio > 0:
        raise ValueError(f"b_lr_ratio must be positive, got {b_lr_ratio!r}")
    if weight_decay < 0 or (other_weight_decay is not None and other_weight_decay < 0):
        raise ValueError("weight decay must be non-negative")
    layers = lora_layers(model).values()
    a = [layer.lora_A for layer in layers if layer.lora_A.requires_grad]
    b = [layer.lora_B for layer in layers if layer.lora_B.requires_grad]
    adapters = {id(p) for p in a + b}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in adapters]
    other_wd = weight_decay if other_weight_decay is None else other_weight_decay
    groups = [
        {"params": a, "lr": lr, "weight_decay": weight_decay, "name": "lora_A"},
        {"params": b, "lr": lr * b_lr_ratio, "weight_decay": weight_decay, "name": "lora_B"},
        {"params": rest, "lr": lr, "weight_decay": other_wd, "name": "other"},
    ]
    return [g for g in groups if g["params"]]
