"""Hugging Face integration: a fastlora model's ``save_pretrained`` (and so ``Trainer.save_model``
and every Trainer checkpoint) writes the adapter only.

``inject`` (and ``load_adapter`` / ``import_peft`` when they add layers) give a transformers model
an instance-level ``save_pretrained`` that writes, atomically, into one directory:

- ``adapter_model.safetensors`` + ``adapter_config.json``: PEFT's format (``task_type`` and
  ``base_model_name_or_path`` filled in), so ``PeftModel.from_pretrained``, ``AutoPeftModelFor*``,
  transformers' ``AutoModel*.from_pretrained(dir)`` (with PEFT installed) and serving engines
  read it;
- ``fastlora_adapter.safetensors`` + ``fastlora_config.json``: fastlora's format, for an exact
  restore with :func:`fastlora.load_adapter` (LoRA-GA's base offset, GoRA's ranks, dtypes);
- ``model.safetensors``: only the trainable tensors under the model's own parameter names, which
  is what ``Trainer(resume_from_checkpoint=...)`` loads (non-strictly) into the rebuilt model.

There is no ``config.json``, so nothing loads this directory as a full model by mistake. The save
replaces every adapter file of an earlier save of any format (a ``model.safetensors`` only if a
fastlora save wrote it) and keeps the folder's other files (a Trainer checkpoint's optimizer and
trainer state, a README); see :func:`fastlora.io.write_directory`.

A quantized transformers model (``BitsAndBytesConfig``) also gets transformers' mark of attached
adapters (``_hf_peft_config_loaded``), without which Trainer refuses to train it; it goes when
the adapters do.
See docs/adapters.md.
"""

from __future__ import annotations

import json
import logging
import os
import types
from pathlib import Path

from torch import nn

from .io import (CONFIG, HF_WEIGHTS, PEFT_CONFIG, RESUME_MARK, RESUME_WEIGHTS, WEIGHTS, fastlora_state, peft_state,
                 save_safetensors, write_directory)
from .layer import lora_layers

__all__ = ["save_pretrained", "RESUME_WEIGHTS", "attach", "detach"]

logger = logging.getLogger("fastlora")


def _base_name(model: nn.Module) -> str | None:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                    push_to_hub: bool = False, **kwargs) -> None:
    """Writes ``model``'s adapter (see the module docstring) to ``save_directory``; the
    signature takes ``PreTrainedModel.save_pretrained``'s arguments (``state_dict``,
    ``safe_serialization`` and the others do not apply and are ignored)."""
    if push_to_hub:
        raise NotImplementedError("fastlora saves adapters locally: save_pretrained(dir), then upload dir "
                                  "(huggingface_hub.upload_folder)")
    if not is_main_process:
        return
    tensors, text = fastlora_state(model)
    peft_tensors, peft_config = peft_state(model, base_model_name_or_path=_base_name(model))
    resume = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def write(tmp: Path) -> None:
        save_safetensors(tmp / WEIGHTS, peft_tensors, {"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2))
        save_safetensors(tmp / HF_WEIGHTS, tensors, {"fastlora": text})
        (tmp / CONFIG).write_text(text)
        save_safetensors(tmp / RESUME_WEIGHTS, resume, {"format": "pt", RESUME_MARK[0]: RESUME_MARK[1]})

    write_directory(Path(save_directory), write)
    logger.info("fastlora: saved the adapter of %d LoRA layers to %s", len(lora_layers(model)), save_directory)


def _is_transformers_model(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


# transformers' mark of a model with adapters attached: Trainer trains a quantized model only with it.
ADAPTERS_MARK = "_hf_peft_config_loaded"


def attach(model: nn.Module) -> None:
    """Gives a transformers model with new adapters its adapter-only ``save_pretrained`` (and, if
    quantized, transformers' mark of attached adapters); registered by the package as a model hook
    (:func:`fastlora.inject.register_model_hooks`)."""
    if _is_transformers_model(model):
        model.save_pretrained = types.MethodType(save_pretrained, model)
        if getattr(model, "is_quantized", False):
            setattr(model, ADAPTERS_MARK, True)


def detach(model: nn.Module) -> None:
    """Takes what :func:`attach` gave back off a model whose adapters were all removed."""
    if isinstance(model.__dict__.get("save_pretrained"), types.MethodType):
        del model.save_pretrained
    model.__dict__.pop(ADAPTERS_MARK, None)
