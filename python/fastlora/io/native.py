"""fastlora's own format: one ``adapter_model.safetensors`` whose metadata holds the per-layer
configuration (rank, alpha, scale mode, dropout, init method, LoRA-GA offsets), plus a readable
copy of it in ``fastlora_config.json``. A load checks everything, values in the dtypes they end
in and a LoRA-GA offset's effect on the base weight included, before the model changes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._numerics import accumulation_dtype
from ..copies import trainable_copies
from ..functional import SUPPORTED_DTYPES
from ..inject import add_layers, refuse_merged, refuse_peft_model
from ..layer import RECORDED_INITS, AdapterConfig, LoRALinear, lora_layers
from ..quantized import is_quantized
from ..transaction import transaction
from . import files
from .checks import adapter_config, dtype_name, factor_problems, field, target_problems
from .files import (CONFIG, HF_WEIGHTS, WEIGHTS, AdapterFormatError, Generation, parse_safetensors, read_consistently,
                    write_directory)
from .heads import apply_heads, head_problems, layers_to_write, trainable_extras

logger = logging.getLogger("fastlora")

FORMAT = "fastlora-adapter"
VERSION = 1
# A saved layer, as _saved_layers checked it: (config, in_features, out_features, adapter dtype, has a base offset).
SavedLayer = tuple[AdapterConfig, int, int, torch.dtype, bool]


def fastlora_state(model: nn.Module) -> tuple[dict[str, Tensor], str]:
    """The tensors and the JSON configuration of fastlora's format for ``model``'s adapters."""
    layers = layers_to_write(model, "save")
    tensors: dict[str, Tensor] = {}
    config: dict[str, Any] = {"format": FORMAT, "version": VERSION, "layers": {}, "trainable": []}
    for name, layer in layers.items():
        tensors[f"{name}.lora_A"] = layer.lora_A
        tensors[f"{name}.lora_B"] = layer.lora_B
        has_offset = layer.base_offset is not None
        if has_offset:
            tensors[f"{name}.lora_A0"], tensors[f"{name}.lora_B0"] = layer.base_offset
        config["layers"][name] = {
            "r": layer.r,
            "lora_alpha": layer.lora_alpha,
            "use_rslora": layer.use_rslora,
            "scaling": layer.scaling,
            "lora_dropout": layer.lora_dropout,
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "adapter_dtype": dtype_name(layer.lora_A.dtype),
            "init": layer.init_method,
            "base_offset": has_offset,
            "merged": layer.merged,
        }
    for name, p in trainable_extras(model).items():
        tensors[f"trainable.{name}"] = p
        config["trainable"].append(name)
    config["modules_to_save"] = list(trainable_copies(model))
    return tensors, json.dumps(config, indent=2, sort_keys=True)


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Saves every LoRA layer's adapters and configuration, and the model's other trainable
    parameters, to the directory ``path`` (created or replaced atomically).

    LoRA-GA layers also store ``A0``, ``B0``: loading onto the original base model re-applies the
    base offset, and :func:`export_peft` can express the adapter relative to the original base.
    """
    tensors, text = fastlora_state(model)

    def write(tmp: Path) -> None:
        files.save_safetensors(tmp / WEIGHTS, tensors, {"fastlora": text})  # looked up here: tests patch it
        (tmp / CONFIG).write_text(text)

    path = Path(path)
    write_directory(path, write)
    logger.info("fastlora: saved %d LoRA layers to %s", len(lora_layers(model)), path)
    return path


def _read_fastlora(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The configuration and tensors of a fastlora directory, both from one save."""

    def read(generation: Generation) -> tuple[dict[str, Any], dict[str, Tensor]]:
        # A save_pretrained directory keeps fastlora's format beside PEFT's adapter_model.safetensors.
        name = HF_WEIGHTS
        data = generation.read(HF_WEIGHTS)
        if data is None:
            name, data = WEIGHTS, generation.read(WEIGHTS)
        if data is None:
            raise AdapterFormatError(f"{path / WEIGHTS} is missing")
        tensors, metadata = parse_safetensors(data, path / name)
        if "fastlora" not in metadata:
            raise AdapterFormatError(f"{path / name} has no fastlora configuration; for a PEFT adapter use import_peft")
        try:
            config = json.loads(metadata["fastlora"])
        except json.JSONDecodeError as exc:
            raise AdapterFormatError(f"{path / name}: unreadable configuration ({exc})") from exc
        if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("version") != VERSION:
            raise AdapterFormatError(f"{path}: not a {FORMAT} v{VERSION} directory")
        return config, tensors

    return read_consistently(path, read)


def _saved_layers(config: dict[str, Any], path: Path) -> dict[str, SavedLayer]:
    """The saved layers by name, checked."""
    layers = field(config, "layers", dict, str(path))
    if not layers:
        raise AdapterFormatError(f"{path}: the adapter has no layers")
    dtypes = {dtype_name(d): d for d in SUPPORTED_DTYPES}
    out = {}
    for name, cfg in layers.items():
        where = f"{path}: layer {name!r}"
        if not isinstance(cfg, dict):
            raise AdapterFormatError(f"{where}: its configuration is not a mapping")
        in_f, out_f = field(cfg, "in_features", int, where), field(cfg, "out_features", int, where)
        dtype = dtypes.get(field(cfg, "adapter_dtype", str, where))
        if dtype is None:
            raise AdapterFormatError(f"{where}: adapter_dtype {cfg['adapter_dtype']!r} is not one of {list(dtypes)}")
        init = field(cfg, "init", str, where)
        if init not in RECORDED_INITS:
            raise AdapterFormatError(f"{where}: init {init!r} is not one of {RECORDED_INITS}")
        adapter = adapter_config(field(cfg, "r", int, where), field(cfg, "lora_alpha", (int, float), where),
                                 field(cfg, "lora_dropout", (int, float), where),
                                 field(cfg, "use_rslora", bool, where), init, in_f, out_f, where)
        out[name] = (adapter, in_f, out_f, dtype, field(cfg, "base_offset", bool, where, False))
    for key in ("trainable", "modules_to_save"):
        names = field(config, key, list, str(path), [])
        if not all(isinstance(n, str) for n in names):
            raise AdapterFormatError(f"{path}: '{key}' must list names")
    return out


BASE_WEIGHTS = {None: "recorded", True: "original", False: "offset"}


def _offset_problems(module: nn.Module, offset: tuple[Tensor, Tensor], scaling: float, dtype: torch.dtype,
                     base_weights: str, name: str) -> list[str]:
    """Why a LoRA-GA offset cannot go into ``module``'s base weight: ``W − s·B0 A0`` (as the layer
    computes it: the offset in the adapter dtype, the product in float32, float64 for a float64
    base, rounded to the weight's dtype) is not finite. A quantized base never holds the offset."""
    layer = module if isinstance(module, LoRALinear) else None
    base = layer.base_layer if layer is not None else module
    if base_weights == "offset" or is_quantized(base):
        return []
    w = base.weight.detach()
    acc = accumulation_dtype(w.dtype)
    a0, b0 = (t.to(w.device, dtype) for t in offset)
    if layer is not None and base_weights == "recorded" and layer.base_offset is not None:
        old_a0, old_b0 = layer.base_offset
        if scaling == layer.scaling and torch.equal(old_a0, a0.to(old_a0)) and torch.equal(old_b0, b0.to(old_b0)):
            return []  # the same offset: the weight does not move
        w = (w.to(acc) + layer.delta_weight(old_a0, old_b0, layer.scaling)).to(w.dtype)
    shifted = (w.to(acc) - (b0.to(acc) @ a0.to(acc)) * scaling).to(w.dtype)
    if not bool(torch.isfinite(shifted).all()):
        return [f"{name}: the base weight minus the LoRA-GA offset s·B0 A0 is not finite in {dtype_name(w.dtype)}"]
    return []


def _layer_problems(module: nn.Module | None, name: str, saved: SavedLayer, tensors: dict[str, Tensor],
                    base_weights: str) -> list[str]:
    """Why the saved layer ``name`` cannot go into ``module``: no linear layer of its shape there, a
    LoRA layer of another rank, factors missing, misshapen or not finite in the dtype they end in, or
    a LoRA-GA offset the base weight cannot take."""
    cfg, in_f, out_f, saved_dtype, has_offset = saved
    if not isinstance(module, (nn.Linear, LoRALinear)):
        return [f"{name}: no such linear layer in the model"]
    if (module.in_features, module.out_features) != (in_f, out_f):
        return [f"{name}: the model's layer is {module.out_features}x{module.in_features}, "
                f"the adapter's {out_f}x{in_f}"]
    problems = target_problems(module, cfg.r, name)
    keys = ("lora_A", "lora_B") + (("lora_A0", "lora_B0") if has_offset else ())
    shapes = {"lora_A": (cfg.r, in_f), "lora_B": (out_f, cfg.r)}
    shapes.update({"lora_A0": shapes["lora_A"], "lora_B0": shapes["lora_B"]})
    dtype = module.lora_A.dtype if isinstance(module, LoRALinear) else saved_dtype  # what load_factors casts to
    factors = {k: tensors.get(f"{name}.{k}") for k in keys}
    found = factor_problems(factors, {k: shapes[k] for k in keys}, dtype, name)
    if not found and has_offset:
        found = _offset_problems(module, (factors["lora_A0"], factors["lora_B0"]), cfg.scaling, dtype,
                                 base_weights, name)
    return problems + found


def _saved_values(config: dict[str, Any], tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """The saved values of the parameters outside the LoRA layers, by name, and the names listed
    without a tensor in the file."""
    values, problems = {}, []
    for name in config.get("trainable", []):
        if f"trainable.{name}" not in tensors:
            problems.append(f"trainable parameter {name}: listed, but not in the file")
        else:
            values[name] = tensors[f"trainable.{name}"]
    return values, problems


def _load_problems(model: nn.Module, existing: dict[str, LoRALinear], saved: dict[str, SavedLayer],
                   tensors: dict[str, Tensor], base_weights: str, config: dict[str, Any]
                   ) -> tuple[dict[str, Tensor], list[str]]:
    """The saved values outside the LoRA layers, and why the model cannot become its base plus
    the saved adapter (nothing if it can)."""
    modules = dict(model.named_modules())
    problems = []
    if existing and set(existing) != set(saved):
        problems.append(f"the model's LoRA layers {sorted(set(existing) ^ set(saved))[:4]} differ from the adapter's")
    for name, layer in saved.items():
        problems += _layer_problems(existing.get(name, modules.get(name)), name, layer, tensors, base_weights)
    values, missing = _saved_values(config, tensors)
    problems += missing
    problems += head_problems(model, config.get("modules_to_save", []), values, list(saved), replaces=bool(existing))
    return values, problems


def _apply(model: nn.Module, saved: dict[str, SavedLayer], tensors: dict[str, Tensor], base_weights: str,
           copies: list[str], values: dict[str, Tensor]) -> None:
    """Writes the checked adapter into the model's LoRA layers (with their LoRA-GA offsets) and heads."""
    layers = lora_layers(model)
    for name, (cfg, *_, has_offset) in saved.items():
        offset = (tensors[f"{name}.lora_A0"], tensors[f"{name}.lora_B0"]) if has_offset else None
        layers[name].load_factors(tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"], cfg, offset, base_weights)
    apply_heads(model, copies, values)


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike, apply_base_offset: bool | None = None) -> nn.Module:
    """Loads an adapter saved by :func:`save_adapter` into ``model`` and returns it.

    A model without adapters gets them (on exactly the saved module names, with the saved ranks
    and scales); a model with adapters must have exactly the saved layers, ranks and shapes, and
    must not be merged. Afterwards the model computes the original base plus the loaded adapter,
    whatever adapter it held before, heads included: the adapter's ``modules_to_save`` are fresh
    copies of the original modules holding the saved values, copies it lacks are removed (the
    original back, frozen). Parameters the model trained in place (``trainable_modules``) must be
    in the adapter (their base values are lost). Everything is checked before anything changes
    (values also in the dtype they are cast to, and a LoRA-GA offset's effect on the base weight):
    on any mismatch the model is left as it was.

    ``apply_base_offset`` (LoRA-GA layers store ``A0``, ``B0``; the base must hold ``W − s·B0 A0``):
    ``None`` lets each layer's record decide (the offset it carries, if any, is replaced; nothing
    moves if it is the same); ``True`` says the base weights are the original ones (the offset is
    applied whatever is recorded); ``False`` says they already hold this adapter's offset (a
    model saved whole after LoRA-GA, say).
    """
    path = Path(path)
    if apply_base_offset is not None and not isinstance(apply_base_offset, bool):  # 0 == False, 1 == True
        raise TypeError(f"apply_base_offset must be None, True or False, got {apply_base_offset!r}")
    base_weights = BASE_WEIGHTS[apply_base_offset]
    refuse_peft_model(model)
    config, tensors = _read_fastlora(path)
    saved = _saved_layers(config, path)
    existing = lora_layers(model)
    refuse_merged(existing, "loading an adapter")
    values, problems = _load_problems(model, existing, saved, tensors, base_weights, config)
    if problems:
        raise AdapterFormatError(f"{path} does not fit this model: " + "; ".join(problems[:6]))
    copies = config.get("modules_to_save", [])

    def apply(model: nn.Module) -> None:
        _apply(model, saved, tensors, base_weights, copies, values)

    if existing:
        with transaction(model):  # a failure on layer k puts everything back
            apply(model)
    else:
        add_layers(model, {n: v[0] for n, v in saved.items()}, {n: v[3] for n, v in saved.items()}, then=apply,
                   copies=copies)
    logger.info("fastlora: loaded %d LoRA layers from %s", len(saved), path)
    return model
