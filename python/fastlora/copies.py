"""``modules_to_save`` with PEFT's semantics: a module replaced by a trainable copy while the
original stays, frozen, for :func:`fastlora.disable_adapter` and ``unload(merge=False)``."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .transaction import preserve

__all__ = ["TrainableCopy", "trainable_copies", "COPY"]

COPY = "trained"  # the attribute holding the trained copy; saved files name its tensors as the module's


class TrainableCopy(nn.Module):
    """Runs a trainable copy of ``original`` (``self.trained``); ``original_module`` is kept frozen
    and runs instead while the adapter is disabled. Attributes the wrapper lacks are read from
    the copy (``head.weight``, ``head.out_features``)."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        trained = copy.deepcopy(original)
        self.original_module = original
        setattr(self, COPY, trained)
        for p in original.parameters():
            p.requires_grad_(False)
        for p in trained.parameters():
            p.requires_grad_(True)
        self._enabled = True

    @torch.no_grad()
    def reset(self) -> None:
        """Makes the trained copy equal to the original module again (parameters and buffers, in
        place: the same Parameter objects), every parameter trainable, as a new copy starts."""
        trained = getattr(self, COPY)
        for t in [*trained.parameters(), *trained.buffers()]:
            preserve(t)
        trained.load_state_dict(self.original_module.state_dict())
        trained.requires_grad_(True)

    def set_enabled(self, enabled: bool) -> None:
        """Whether forward runs the trained copy (True) or the original module."""
        self._enabled = bool(enabled)

    @property
    def enabled(self) -> bool:
        return self._enabled

    def forward(self, *args, **kwargs):
        return (getattr(self, COPY) if self._enabled else self.original_module)(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in (COPY, "original_module"):
                raise
            return getattr(super().__getattr__(COPY), name)


def trainable_copies(model: nn.Module) -> dict[str, TrainableCopy]:
    """The model's :class:`TrainableCopy` modules by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TrainableCopy)}
