"""Generic batch helpers: moving a batch of any of the usual shapes to a device and calling a model
on it (one place for the gradient engine, the initialisers and measured dispatch's ``tune``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["call_model", "to_device"]


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)``, ``model(*batch)`` or ``model(batch)`` by the batch's type."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch with its tensors (also inside Mappings, tuples and lists) on ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        if hasattr(batch, "to"):  # transformers' BatchEncoding
            return batch.to(device)
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
