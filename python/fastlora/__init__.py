"""fastlora: fast, faithful LoRA fine-tuning for PyTorch.

Quick start::

    import fastlora
    model = fastlora.inject(model, target_modules=["q_proj", "v_proj"], r=16, lora_alpha=32)
    optimizer = torch.optim.AdamW(fastlora.trainable_parameters(model), lr=2e-4)
    # or LoRA-Pro: optimizer = fastlora.optim.LoRAPro(model, lr=2e-5)

See docs/quickstart.md and docs/api.md.
"""

import torch  # noqa: F401  (the compiled extension needs torch's libraries loaded first)

from . import backends, copies, init, optim, quantized
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
from .functional import lora_linear, lora_update
from .gradients import GradientSketch, GradientStats, LayerGradient, collect_gradients
from .config import LoraConfig
from .inject import (
    adapter_state_dict,
    count_parameters,
    get_peft_model,
    disable_adapter,
    initialize_lora_eva_weights,
    inject,
    merge,
    merge_and_unload,
    print_trainable_parameters,
    trainable_parameters,
    unload,
    unmerge,
)
from .progress import enable_logging
from .io import AdapterFormatError, export_peft, import_peft, load_adapter, save_adapter
from . import hf  # noqa: F401  (registers the Hugging Face save hook)
from . import peft_methods  # noqa: F401  (registers PEFT's model methods)
from .optim import param_groups
from .layer import AdapterConfig, LoRALinear, check_no_peft_layers, lora_layers

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
