"""Adding LoRA adapters to a whole model and working with them afterwards."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from .layer import INITS, LoRALinear, validate_lora_config

__all__ = [
    "inject",
    "lora_layers",
    "merge",
    "unmerge",
    "trainable_parameters",
    "adapter_state_dict",
]

logger = logging.getLogger("fastlora")

# Leaf names of output heads that "all-linear" leaves alone (besides get_output_embeddings()).
_HEAD_NAMES = ("lm_head", "score", "classifier")

Targets = str | Iterable[str]


def _name_matches(name: str, targets: Targets) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list matches a name
    equal to an entry or ending in "." + entry."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _pattern_value(name: str, patterns: Mapping[str, float] | None, default):
    """Value for ``name`` from a rank/alpha pattern dict (exact name first, then the first key
    that matches the end of the name as a regex, as PEFT does), else ``default``."""
    if not patterns:
        return default
    if name in patterns:
        return patterns[name]
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", name):
            return value
    return default


def _output_heads(model: nn.Module) -> set[str]:
    heads = set()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for name, module in model.named_modules():
        if (head is not None and module is head) or name.rsplit(".", 1)[-1] in _HEAD_NAMES:
            heads.add(name)
    return heads


def _check_targets(targets, what: str) -> None:
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise ValueError(f"{what}={targets!r} is not a valid regular expression: {exc}") from None
    elif not isinstance(targets, Iterable) or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"{what} must be a regex string, 'all-linear' or a list of module names, got {targets!r}")


def inject(
    model: nn.Module,
    target_modules: Targets = "all-linear",
    r: int = 8,
    lora_alpha: float = 8.0,
    lora_dropout: float = 0.0,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_rslora: bool = False,
    adapter_dtype: torch.dtype = torch.float32,
    init: str = "lora",
    exclude_modules: Targets | None = None,
    trainable_modules: Targets | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Replaces the matching ``nn.Linear`` modules of ``model`` by :class:`LoRALinear` in place,
    freezes every other parameter, and returns the model.

    Args:
        model: any ``nn.Module`` (a Hugging Face model included).
        target_modules: "all-linear" (every linear layer except the output head:
            ``get_output_embeddings()`` and layers named lm_head/score/classifier), a regex
            that must match a module's full name, or a list of names / name suffixes
            (``["q_proj", "v_proj"]`` matches ``model.layers.0.self_attn.q_proj``).
        r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, init: see :class:`LoRALinear`.
        rank_pattern, alpha_pattern: per-module overrides of r / lora_alpha, keyed by a name or
            a regex matched against the end of the module name (as PEFT).
        exclude_modules: names, suffixes or a regex of modules never to adapt.
        trainable_modules: names, suffixes or a regex of modules whose parameters stay
            trainable (a classification head, say); everything else but the adapters is frozen.
        generator: RNG for the adapters' initial values.

    Raises:
        ValueError: nothing matched, a matched module is not an ``nn.Linear``, or a layer's
            settings are invalid (checked for all layers before anything is changed).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    all_linear = target_modules == "all-linear"
    if not all_linear:
        _check_targets(target_modules, "target_modules")
    for what, value in (("exclude_modules", exclude_modules), ("trainable_modules", trainable_modules)):
        if value is not None:
            _check_targets(value, what)
    excluded = _output_heads(model) if all_linear else set()

    plan: list[tuple[str, nn.Linear, int, float]] = []
    for name, module in model.named_modules():
        if not name or name in excluded or isinstance(module, LoRALinear) or name.endswith(".base_layer"):
            continue
        if exclude_modules is not None and _name_matches(name, exclude_modules):
            continue
        if all_linear:
            if not isinstance(module, nn.Linear):
                continue
        elif not _name_matches(name, target_modules):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) matches target_modules={target_modules!r}, "
                "but fastlora adapts nn.Linear layers only; name the linear layers themselves"
            )
        layer_r = _pattern_value(name, rank_pattern, r)
        layer_alpha = _pattern_value(name, alpha_pattern, lora_alpha)
        validate_lora_config(layer_r, layer_alpha, lora_dropout, module.in_features, module.out_features, where=name)
        plan.append((name, module, layer_r, layer_alpha))

    if not plan:
        adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith(".base_layer")]
        hint = "they already have adapters" if adapted and not linear else f"linear layers: {linear[:8]}"
        raise ValueError(f"no module matched target_modules={target_modules!r} ({hint})")

    for param in model.parameters():
        param.requires_grad_(False)
    for name, module, layer_r, layer_alpha in plan:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = LoRALinear(
            module,
            r=layer_r,
            lora_alpha=layer_alpha,
            lora_dropout=lora_dropout,
            use_rslora=use_rslora,
            adapter_dtype=adapter_dtype,
            init=init,
            generator=generator,
        )
        setattr(parent, child, lora)
    if trainable_modules is not None:
        for name, module in model.named_modules():
            if name and _name_matches(name, trainable_modules):
                for param in module.parameters():
                    param.requires_grad_(True)
    ranks = sorted({p[2] for p in plan})
    logger.info("fastlora: added adapters to %d linear layers (ranks %s)", len(plan), ranks)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All :class:`LoRALinear` modules of ``model`` by name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _layers_or_raise(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call fastlora.inject(model, ...) first")
    return layers


def merge(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight (see :meth:`LoRALinear.merge`)."""
    layers = _layers_or_raise(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"already merged: {merged[:4]}; call fastlora.unmerge(model) first")
    for layer in layers.values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtracts every merged adapter from its base weight again."""
    layers = _layers_or_raise(model)
    unmerged = [name for name, layer in layers.items() if not layer.merged]
    if unmerged:
        raise RuntimeError(f"not merged: {unmerged[:4]}; call fastlora.merge(model) first")
    for layer in layers.values():
        layer.unmerge()
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require gradients (the adapters, plus any ``trainable_modules``),
    ready for an optimizer."""
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``{"<module>.lora_A": A, "<module>.lora_B": B}`` for every LoRA layer (detached, not copied)."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
    return state
