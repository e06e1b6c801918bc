"""fastlora: fast, faithful LoRA fine-tuning for PyTorch.

Quick start::

    import fastlora
    model = fastlora.inject(model, target_modules=["q_proj", "v_proj"], r=16, lora_alpha=32)
    optimizer = torch.optim.AdamW(fastlora.trainable_parameters(model), lr=2e-4)
    # or LoRA-Pro: optimizer = fastlora.optim.LoRAPro(model, lr=2e-5)

See docs/quickstart.md and docs/api.md.
"""

import importlib
from typing import TYPE_CHECKING, Any

import torch  # noqa: F401  (the compiled extension needs torch's libraries loaded first)

from . import backends, copies, hf, peft_methods, quantized
from ._extension import cpu_isa, extension_available, extension_error
from ._version import __version__
from .backends.layer import tune
from .backends.registry import (
    cuda_layer_kernels,
    get_backend,
    set_backend,
    set_cuda_layer_kernels,
    set_measured,
    use_backend,
)
from .config import LoraConfig
from .functional import lora_linear, lora_update
from .inject import (
    adapter_state_dict,
    count_parameters,
    disable_adapter,
    get_peft_model,
    initialize_lora_eva_weights,
    inject,
    merge,
    merge_and_unload,
    print_trainable_parameters,
    register_model_hooks,
    trainable_parameters,
    unload,
    unmerge,
)
from .io import AdapterFormatError, export_peft, import_peft, load_adapter, save_adapter
from .layer import AdapterConfig, LoRALinear, check_no_peft_layers, lora_layers
from .progress import enable_logging

# The model hooks, registered once, here: a transformers model's adapter-only save_pretrained and
# PEFT's model methods (merge_and_unload, ...). Keyed by name, so a reload replaces them.
register_model_hooks("hf", hf.attach, hf.detach)
register_model_hooks("peft_methods", peft_methods.attach, peft_methods.detach)
del register_model_hooks

# The heavy parts, imported on first use (PEP 562): the gradient engine and the initialisers built
# on it, and the optimizers. ``import fastlora`` (and so ``inject``) does not load them.
# public name -> (submodule, attribute or None for the submodule itself)
_LAZY = {
    "gradients": ("gradients", None),
    "GradientSketch": ("gradients", "GradientSketch"),
    "GradientStats": ("gradients", "GradientStats"),
    "LayerGradient": ("gradients", "LayerGradient"),
    "collect_gradients": ("gradients", "collect_gradients"),
    "init": ("init", None),
    "optim": ("optim", None),
    "param_groups": ("optim", "param_groups"),
}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs (never runs)
    from . import gradients, init, optim
    from .gradients import GradientSketch, GradientStats, LayerGradient, collect_gradients
    from .optim import param_groups


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = importlib.import_module(f".{module}", __name__)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "AdapterConfig",
    "AdapterFormatError",
    "__version__",
    "GradientSketch",
    "GradientStats",
    "LayerGradient",
    "LoRALinear",
    "LoraConfig",
    "adapter_state_dict",
    "backends",
    "collect_gradients",
    "copies",
    "count_parameters",
    "check_no_peft_layers",
    "cpu_isa",
    "cuda_layer_kernels",
    "disable_adapter",
    "enable_logging",
    "extension_available",
    "export_peft",
    "extension_error",
    "import_peft",
    "init",
    "get_backend",
    "get_peft_model",
    "initialize_lora_eva_weights",
    "inject",
    "lora_layers",
    "load_adapter",
    "lora_linear",
    "lora_update",
    "merge",
    "merge_and_unload",
    "optim",
    "param_groups",
    "print_trainable_parameters",
    "quantized",
    "save_adapter",
    "set_backend",
    "set_cuda_layer_kernels",
    "set_measured",
    "trainable_parameters",
    "tune",
    "unload",
    "unmerge",
    "use_backend",
]
