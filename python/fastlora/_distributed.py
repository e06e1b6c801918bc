"""What fastlora needs to know about sharded tensors (``DTensor``, as FSDP2's ``fully_shard``
makes them), without importing ``torch.distributed`` for programs that do not use it.

A tensor can only be a DTensor once ``torch.distributed.tensor`` (``torch.distributed._tensor``
before torch 2.5) has been imported, so :func:`is_dtensor` looks the class up in ``sys.modules``
instead of importing it (importing it costs most of a second).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

__all__ = ["is_dtensor", "full"]

_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (a sharded or replicated distributed tensor)."""
    for name in _DTENSOR_MODULES:
        module = sys.modules.get(name)
        if module is not None and isinstance(t, getattr(module, "DTensor", ())):
            return True
    return False


def full(t: Tensor) -> Tensor:
    """The whole tensor: ``t`` itself, or a DTensor gathered (a collective: every rank must call it)."""
    return t.full_tensor() if is_dtensor(t) else t
