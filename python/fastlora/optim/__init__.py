"""Optimizers and optimizer helpers for LoRA training."""

from .groups import param_groups

__all__ = ["param_groups"]
