"""Adding LoRA adapters to a whole model and working with them afterwards."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .layer import INITS, LoRALinear, validate_lora_config
from .targets import Targets, check_targets, find_linear_targets, name_matches, pattern_value

__all__ = [
    "inject",
    "lora_layers",
    "merge",
    "unmerge",
    "trainable_parameters",
    "adapter_state_dict",
]

if TYPE_CHECKING:
    from .gradients import GradientStats

logger = logging.getLogger("fastlora")

GRADIENT_INITS = ("lora_ga", "gora")


def inject(
    model: nn.Module,
    target_modules: Targets = "all-linear",
    r: int = 8,
    lora_alpha: float = 8.0,
    lora_dropout: float = 0.0,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_rslora: bool | None = None,
    adapter_dtype: torch.dtype = torch.float32,
    init: str = "lora",
    exclude_modules: Targets | None = None,
    trainable_modules: Targets | None = None,
    generator: torch.Generator | None = None,
    gradients: GradientStats | None = None,
    init_config: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Replaces the matching ``nn.Linear`` modules of ``model`` by :class:`LoRALinear` in place,
    freezes every other parameter, and returns the model.

    Args:
        model: any ``nn.Module`` (a Hugging Face model included).
        target_modules: "all-linear" (every linear layer except the output head:
            ``get_output_embeddings()`` and layers named lm_head/score/classifier), a regex
            that must match a module's full name, or a list of names / name suffixes
            (``["q_proj", "v_proj"]`` matches ``model.layers.0.self_attn.q_proj``).
        r, lora_alpha, lora_dropout, adapter_dtype: see :class:`LoRALinear`.
        use_rslora: scale ``lora_alpha / sqrt(r)``; default False, True for LoRA-GA and GoRA.
        init: "lora", "gaussian" (see :class:`LoRALinear`), "lora_ga" or "gora" (from
            ``gradients``, see :mod:`fastlora.init`; for GoRA ``r`` is the reference rank and each
            layer's rank is allocated).
        gradients: :func:`fastlora.collect_gradients` result covering the targets (LoRA-GA, GoRA).
        init_config: settings of the gradient init (fields of :class:`fastlora.init.LoraGAConfig`
            or :class:`fastlora.init.GoRAConfig`).
        rank_pattern, alpha_pattern: per-module overrides of r / lora_alpha, keyed by a name or
            a regex matched against the end of the module name (as PEFT).
        exclude_modules: names, suffixes or a regex of modules never to adapt.
        trainable_modules: names, suffixes or a regex of modules whose parameters stay
            trainable (a classification head, say); everything else but the adapters is frozen.
        generator: RNG for the adapters' initial values.

    Raises:
        ValueError: nothing matched, a matched module is not an ``nn.Linear``, a layer's
            settings are invalid, or the gradients do not cover the targets (all checked before
            anything is changed).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    gradient_init = init in GRADIENT_INITS
    if init not in INITS and not gradient_init:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS + GRADIENT_INITS}")
    if gradient_init and gradients is None:
        raise ValueError(f"init={init!r} needs gradients: stats = fastlora.collect_gradients(model, batches, "
                         "targets), then inject(..., gradients=stats)")
    if not gradient_init and (gradients is not None or init_config is not None):
        raise ValueError("gradients and init_config apply to init='lora_ga' or init='gora' only")
    if use_rslora is None:
        use_rslora = gradient_init
    for what, value in (("exclude_modules", exclude_modules), ("trainable_modules", trainable_modules)):
        if value is not None:
            check_targets(value, what)
    plan: list[tuple[str, nn.Linear, int, float]] = []
    for name, module in find_linear_targets(model, target_modules, exclude_modules):
        layer_r = pattern_value(name, rank_pattern, r)
        layer_alpha = pattern_value(name, alpha_pattern, lora_alpha)
        validate_lora_config(layer_r, layer_alpha, lora_dropout, module.in_features, module.out_features, where=name)
        plan.append((name, module, layer_r, layer_alpha))

    init_fn = _gradient_init(init, plan, gradients, init_config, r) if gradient_init else None

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
            init="lora" if gradient_init else init,
            generator=generator,
        )
        setattr(parent, child, lora)
    if trainable_modules is not None:
        for name, module in model.named_modules():
            if name and name_matches(name, trainable_modules):
                for param in module.parameters():
                    param.requires_grad_(True)
    if init_fn is not None:
        init_fn(model)
    ranks = sorted({layer.r for layer in lora_layers(model).values()})
    logger.info("fastlora: added adapters to %d linear layers (init %s, ranks %s)", len(plan), init, ranks)
    return model


def _gradient_init(init: str, plan: list, gradients, init_config, r: int) -> Callable[[nn.Module], Any]:
    """Checks a LoRA-GA / GoRA init against the planned layers before the model changes, and
    returns the function that applies it once the layers exist."""
    from .init import GoRAConfig, LoraGAConfig, gora, lora_ga
    from .init.common import check_gradients
    from .init.lora_ga import rank_fits

    names = [name for name, *_ in plan]
    check_gradients(gradients, names)
    options = dict(init_config or {})
    if init == "lora_ga":
        cfg = LoraGAConfig(**options)
        cfg.validate()
        for name, module, layer_r, _ in plan:
            rank_fits(name, layer_r, module.out_features, module.in_features, cfg)
        return lambda model: lora_ga(model, gradients, cfg, layers=names)
    options.setdefault("r_ref", r)
    cfg = GoRAConfig(**options)
    cfg.validate()
    return lambda model: gora(model, gradients, cfg, layers=names)


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
