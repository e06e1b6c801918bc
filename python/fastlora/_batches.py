"""Calling a model on a batch of any of the usual shapes (one helper for the gradient engine,
LoRA-GA and measured dispatch's ``tune``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["call_model"]


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)``, ``model(*batch)`` or ``model(batch)`` by the batch's type."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)
