"""Optimizers for LoRA adapters: LoRA-Pro (:class:`LoRAPro`, :class:`LoRAProSGD`) and the
closed form they use (:mod:`fastlora.optim.closed_form`), LoRA-Pro as a gradient transform for
any optimizer (:func:`adjust_gradients`, :func:`lora_pro_gradient_hooks`), and LoRA+ parameter groups
(:func:`param_groups`)."""

from .closed_form import equivalent_gradient, lora_pro_gradients, solve_sylvester
from .groups import param_groups
from .lora_pro import DEFAULT_TRUST_REGION, MODES, MOMENT_DTYPES, LoRAPro, LoRAProSGD
from .transform import adjust_gradients, lora_pro_gradient_hooks

__all__ = [
    "DEFAULT_TRUST_REGION",
    "MODES",
    "MOMENT_DTYPES",
    "LoRAPro",
    "LoRAProSGD",
    "adjust_gradients",
    "equivalent_gradient",
    "lora_pro_gradient_hooks",
    "lora_pro_gradients",
    "param_groups",
    "solve_sylvester",
]
