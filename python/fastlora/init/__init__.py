"""Adapter initialisation from the gradient engine's mean gradients (LoRA-GA, GoRA) and from the
base weights (PiSSA, OLoRA), and EVA from the inputs of calibration batches.

Either through :func:`fastlora.inject` (``init="lora_ga"`` / ``init="gora"`` with
``gradients=stats``) or on an already-injected model::

    stats = fastlora.collect_gradients(model, batches)
    fastlora.inject(model, "all-linear", r=8, lora_alpha=16)
    fastlora.init.lora_ga(model, stats)          # or fastlora.init.gora(model, stats)

The names below are loaded on first use (PEP 562), so ``import fastlora.init.pissa`` does not
import the gradient engine that LoRA-GA, GoRA and EVA use.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# public name -> the submodule that defines it
_LAZY = {
    "EvaConfig": "eva", "get_eva_state_dict": "eva",
    "Allocation": "gora", "GoRAConfig": "gora", "allocate_ranks": "gora", "gora": "gora", "gora_a_max": "gora",
    "LoraGAConfig": "lora_ga", "lora_ga": "lora_ga",
    "principal_init": "pissa",
}

__all__ = ["Allocation", "EvaConfig", "get_eva_state_dict", "GoRAConfig", "LoraGAConfig", "allocate_ranks", "gora",
           "gora_a_max", "lora_ga", "principal_init"]

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs (never runs)
    from .eva import EvaConfig, get_eva_state_dict
    from .gora import Allocation, GoRAConfig, allocate_ranks, gora, gora_a_max
    from .lora_ga import LoraGAConfig, lora_ga
    from .pissa import principal_init


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``fastlora.init.gora`` and ``fastlora.init.lora_ga`` are the functions, as before the names
    were lazy: importing the submodule of the same name (``from fastlora.init.gora import ...``)
    makes the import system bind the submodule here, so the function is bound instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
