"""Adapter initialisation from the gradient engine's mean gradients (LoRA-GA, GoRA) and from the
base weights (PiSSA, OLoRA), and EVA from the inputs of calibration batches.

Either through :func:`fastlora.inject` (``init="lora_ga"`` / ``init="gora"`` with
``gradients=stats``) or on an already-injected model::

    stats = fastlora.collect_gradients(model, batches)
    fastlora.inject(model, "all-linear", r=8, lora_alpha=16)
    fastlora.init.lora_ga(model, stats)          # or fastlora.init.gora(model, stats)
"""

from .eva import EvaConfig, get_eva_state_dict
from .gora import Allocation, GoRAConfig, allocate_ranks, gora, gora_a_max
from .lora_ga import LoraGAConfig, lora_ga
from .pissa import principal_init

__all__ = ["Allocation", "EvaConfig", "get_eva_state_dict", "GoRAConfig", "LoraGAConfig", "allocate_ranks", "gora", "gora_a_max", "lora_ga", "principal_init"]
