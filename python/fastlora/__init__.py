"""fastlora: fast, faithful LoRA fine-tuning for PyTorch.

Quick start::

    import fastlora
    model = fastlora.inject(model, target_modules=["q_proj", "v_proj"], r=16, lora_alpha=32)
    optimizer = torch.optim.AdamW(fastlora.trainable_parameters(model), lr=2e-4)

See docs/quickstart.md and docs/api.md.
"""

import torch  # noqa: F401  (the compiled extension needs torch's libraries loaded first)

from . import ops, reference
from ._extension import (
    cpu_isa,
    cuda_layer_kernels,
    extension_available,
    extension_error,
    get_backend,
    set_backend,
    set_cuda_layer_kernels,
    use_backend,
)
from .functional import lora_linear
from .gradients import GradientSketch, GradientStats, LayerGradient, collect_gradients
from .inject import adapter_state_dict, inject, lora_layers, merge, trainable_parameters, unmerge
from .layer import LoRALinear

__version__ = "0.1.0"

__all__ = [
    "GradientSketch",
    "GradientStats",
    "LayerGradient",
    "LoRALinear",
    "adapter_state_dict",
    "collect_gradients",
    "cpu_isa",
    "cuda_layer_kernels",
    "extension_available",
    "extension_error",
    "get_backend",
    "inject",
    "lora_layers",
    "lora_linear",
    "merge",
    "ops",
    "reference",
    "set_backend",
    "set_cuda_layer_kernels",
    "trainable_parameters",
    "unmerge",
    "use_backend",
]
