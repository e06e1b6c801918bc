"""What the formats save and load outside the LoRA layers: ``modules_to_save`` copies and
parameters trained in place (a classification head), named as in the model without adapters."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._distributed import is_dtensor
from ..copies import COPY, TrainableCopy, trainable_copies
from ..functional import SUPPORTED_DTYPES
from ..inject import swap_module
from ..layer import LoRALinear, check_no_peft_layers, finite_in, lora_layers
from ..transaction import write
from .checks import check_dtypes, dtype_name

def plain_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters outside the adapters by their names in the model without adapters (a LoRA
    layer's ``<name>.base_layer.weight`` is ``<name>.weight``, a ``modules_to_save`` copy's
    ``<name>.trained.weight`` is ``<name>.weight``), so names survive (un)injection."""
    layers = lora_layers(model)
    copies = trainable_copies(model)
    adapters = {id(p) for layer in layers.values() for p in (layer.lora_A, layer.lora_B)}
    originals = {id(p) for wrapper in copies.values() for p in wrapper.original_module.parameters()}
    out = {}
    for name, p in model.named_parameters():
        if id(p) in adapters or id(p) in originals:
            continue
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer") or owner == "base_layer":
            layer_name = owner.removesuffix("base_layer").removesuffix(".")
            if layer_name in layers:
                name = f"{layer_name}.{leaf}" if layer_name else leaf
        for copy_name in copies:
            if name.startswith(f"{copy_name}.{COPY}."):
                name = copy_name + name[len(copy_name) + len(COPY) + 1:]
        out[name] = p
    return out


def trainable_extras(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters outside the adapters (a classification head, say)."""
    return {n: p for n, p in plain_parameters(model).items() if p.requires_grad}


def layers_to_write(model: nn.Module, action: str) -> dict[str, LoRALinear]:
    """The model's LoRA layers for a save or export (``action``), checked as both formats need: no
    PEFT layers, at least one LoRA layer, every tensor whole on this process (:func:`check_whole`)."""
    check_no_peft_layers(model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"the model has no LoRA layers to {action}")
    check_whole(model, layers)
    return layers


def check_whole(model: nn.Module, layers: dict[str, LoRALinear]) -> None:
    """ValueError unless every tensor a save would write is whole on this process: a DeepSpeed
    ZeRO-3 parameter outside its gathering holds none (or a slice) of its elements and an FSDP2
    DTensor only this rank's rows, which would write an empty or partial adapter."""
    tensors = {f"{name}.{key}": t for name, layer in layers.items()
               for key, t in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B))}
    tensors.update({f"{name}.{key}": t for name, layer in layers.items() if layer.base_offset is not None
                    for key, t in zip(("lora_A0", "lora_B0"), layer.base_offset)})
    expected = {f"{name}.{key}": shape for name, layer in layers.items() for key, shape in (
        ("lora_A", (layer.r, layer.in_features)), ("lora_B", (layer.out_features, layer.r)),
        ("lora_A0", (layer.r, layer.in_features)), ("lora_B0", (layer.out_features, layer.r)))}
    tensors.update(trainable_extras(model))
    for name, t in tensors.items():
        if is_dtensor(t):
            raise ValueError(
                f"{name} is sharded (an FSDP2 DTensor): saving it would write this rank's rows only. Take the full "
                "state dict on rank 0, load it into an unsharded copy of the model and save from that "
                "(docs/distributed.md#checkpoints)")
        whole = getattr(t, "ds_numel", t.numel())  # DeepSpeed ZeRO-3 records the real size here
        if t.numel() != whole or t.numel() == 0 or (name in expected and tuple(t.shape) != expected[name]):
            raise ValueError(
                f"{name} holds {t.numel()} of its {whole} elements (shape {tuple(t.shape)}): DeepSpeed ZeRO-3 "
                "partitions parameters, so a save outside a gather would write an empty or partial adapter. "
                "Save inside `with deepspeed.zero.GatheredParameters(list(model.parameters())):` entered on "
                "every rank, writing from rank 0 (docs/distributed.md#deepspeed)")


# ---- what a load does outside the LoRA layers -----------------------------------------------------------


def inside(name: str, modules: Any) -> bool:
    """Whether ``name`` is strictly inside one of ``modules``."""
    return any(name.startswith(f"{m}.") for m in modules)


def base_module_names(model: nn.Module) -> set[str]:
    """The names of the model's modules without adapters (a copy's original module under the
    copy's name; a LoRA layer's inner modules and a copy's trained modules left out)."""
    copies, layers = trainable_copies(model), lora_layers(model)
    names = set()
    for name, _ in model.named_modules():
        owner = next((c for c in copies if name.startswith(f"{c}.")), None)
        if owner is not None:
            rest = name[len(owner) + 1:].split(".", 1)
            if rest[0] != "original_module":
                continue
            name = ".".join([owner] + rest[1:])
        elif inside(name, layers):
            continue
        names.add(name)
    return names


def head_problems(model: nn.Module, copies: list[str], values: dict[str, Tensor], adapted: list[str],
                  replaces: bool) -> list[str]:
    """Why the model cannot end as its fresh base plus these heads: ``copies`` (modules_to_save,
    made afresh from the original modules) and ``values`` (named as in the model without adapters:
    the copies' parameters, and parameters trained in place). ``replaces``: the model holds an
    adapter now, whose parameters trained in place must all be among ``values`` outside the
    copies (their base values are lost, so nothing else could give the fresh base)."""
    problems = []
    names = base_module_names(model)
    for c in copies:
        if not c or c not in names:
            problems.append(f"modules_to_save {c!r}: not a module of the model")
        elif c in adapted or inside(c, adapted) or any(a.startswith(f"{c}.") for a in adapted):
            problems.append(f"modules_to_save {c!r}: is, contains or is inside a LoRA layer")
        elif inside(c, copies):
            problems.append(f"modules_to_save {c!r}: inside another of the modules to save")
    params = plain_parameters(model)
    problems += check_dtypes(values, "trainable parameters")
    for name, t in values.items():
        p = params.get(name)
        if p is None or p.shape != t.shape:
            problems.append(f"trainable parameter {name}: not a parameter of the model with shape {tuple(t.shape)}")
        elif t.dtype in SUPPORTED_DTYPES and not finite_in(t, p.dtype):
            problems.append(f"trainable parameter: {name} has NaN or infinite values in {dtype_name(p.dtype)}")
    if replaces:
        current = trainable_copies(model)
        lost = [n for n, p in params.items()
                if p.requires_grad and not inside(n, current) and (n not in values or inside(n, copies))]
        if lost:
            problems.append(
                f"the model's {lost[:4]} were trained in place (trainable_modules) and this adapter does not carry them "
                "in place: their base values are lost, so the model cannot become its base plus this adapter. Load it "
                "into a freshly loaded base model (train heads with modules_to_save to keep their originals)")
    return problems


@torch.no_grad()
def apply_heads(model: nn.Module, copies: list[str], values: dict[str, Tensor]) -> None:
    """Makes the model's modules_to_save exactly ``copies``, each a fresh copy of its original
    module (a copy not among them gives its original back, frozen), then writes ``values`` and makes
    them trainable. Checked by :func:`head_problems` first."""
    for name, wrapper in trainable_copies(model).items():
        if name in copies:
            wrapper.reset()
        else:
            swap_module(model, name, wrapper.original_module)
            wrapper.original_module.requires_grad_(False)
    kept = trainable_copies(model)
    layers = lora_layers(model).values()
    inside_disable = bool(layers) and not any(layer.adapter_enabled for layer in layers)
    for name in copies:
        if name not in kept:
            copied = TrainableCopy(model.get_submodule(name))
            copied.set_enabled(not inside_disable)  # a new head follows an open disable_adapter block
            swap_module(model, name, copied)
    params = plain_parameters(model)  # a new copy's parameters are new Parameters
    for name, t in values.items():
        write(params[name], t)
        params[name].requires_grad_(True)
