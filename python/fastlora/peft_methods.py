"""PEFT's model methods on a fastlora model: ``model.merge_and_unload()``,
``model.disable_adapter()``, ``model.print_trainable_parameters()``, ...

Attached to the model instance when adapters are added (as ``save_pretrained`` is, see
:mod:`fastlora.hf`) and removed again when :func:`fastlora.unload` takes them out. Each is the
module-level function of the same meaning (:mod:`fastlora.inject`); a method a model's class
defines itself is left alone. See docs/from_peft.md.
"""

from __future__ import annotations

import types
from contextlib import AbstractContextManager

from torch import nn

from .inject import PEFT_RECORD, count_parameters
from .inject import disable_adapter as inject_disable_adapter
from .inject import merge as inject_merge
from .inject import print_trainable_parameters as inject_print_trainable_parameters
from .inject import unload as inject_unload
from .inject import unmerge as inject_unmerge
from .layer import LoRALinear

__all__ = ["METHODS", "attach", "detach"]


def _no_adapter_names(adapter_names) -> None:
    if adapter_names not in (None, ["default"], ("default",)):
        raise ValueError(f"adapter_names={adapter_names!r}: fastlora keeps one adapter per model ('default')")


def merge_and_unload(self: nn.Module, progressbar: bool = False, safe_merge: bool = False, adapter_names=None,
                     allow_requantize: bool = False) -> nn.Module:
    """Merges the adapter into the base weights and returns the plain model (PEFT's
    ``merge_and_unload``; ``safe_merge`` is implied: a merge that is not finite is refused).
    A quantized base needs ``allow_requantize=True``."""
    _no_adapter_names(adapter_names)
    return inject_unload(self, merge=True, allow_requantize=allow_requantize)


def unload(self: nn.Module) -> nn.Module:
    """Takes the adapters out without merging and returns the original model (PEFT's ``unload``)."""
    return inject_unload(self, merge=False)


def disable_adapter(self: nn.Module) -> AbstractContextManager[nn.Module]:
    """Context manager inside which the model computes its base (PEFT's ``disable_adapter``)."""
    return inject_disable_adapter(self)


def merge_adapter(self: nn.Module, adapter_names=None, safe_merge: bool = False) -> None:
    """Folds the adapter into the base weights, keeping the LoRA layers (PEFT's ``merge_adapter``)."""
    _no_adapter_names(adapter_names)
    inject_merge(self)


def unmerge_adapter(self: nn.Module) -> None:
    """Subtracts a merged adapter from the base weights again (PEFT's ``unmerge_adapter``)."""
    inject_unmerge(self)


def get_nb_trainable_parameters(self: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, counted as PEFT counts them (4-bit weights included)."""
    return count_parameters(self)


def print_trainable_parameters(self: nn.Module) -> None:
    """Prints the trainable and all parameter counts, as PEFT does."""
    inject_print_trainable_parameters(self)


METHODS = {f.__name__: f for f in (merge_and_unload, unload, disable_adapter, merge_adapter, unmerge_adapter,
                                    get_nb_trainable_parameters, print_trainable_parameters)}


def attach(model: nn.Module) -> None:
    """Binds :data:`METHODS` to a model with new adapters (those its class does not define);
    registered by the package as a model hook (:func:`fastlora.inject.register_model_hooks`)."""
    if isinstance(model, LoRALinear):  # a layer on its own has its own merge / unwrap
        return
    for name, function in METHODS.items():
        if not hasattr(type(model), name):
            model.__dict__[name] = types.MethodType(function, model)


def detach(model: nn.Module) -> None:
    """Takes :data:`METHODS` and the LoraConfig record off a model whose adapters were all removed."""
    for name, function in METHODS.items():
        bound = model.__dict__.get(name)
        if isinstance(bound, types.MethodType) and bound.__func__ is function:
            del model.__dict__[name]
    model.__dict__.pop(PEFT_RECORD, None)
