"""Adding LoRA adapters to a whole model and working with them afterwards."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .config import eva_config_from, inject_arguments, is_lora_config
from .copies import COPY, TrainableCopy, trainable_copies
from .functional import SUPPORTED_DTYPES
from .layer import INITS, AdapterConfig, LoRALinear, check_base_layer, check_generator, lora_layers, peft_modules
from .principal import PRINCIPAL_INITS, is_principal_init
from .targets import Targets, check_targets, find_linear_targets, name_matches, pattern_value
from .transaction import transaction

__all__ = [
    "inject",
    "get_peft_model",
    "count_parameters",
    "lora_layers",
    "merge",
    "unmerge",
    "unload",
    "merge_and_unload",
    "disable_adapter",
    "trainable_parameters",
    "print_trainable_parameters",
    "adapter_state_dict",
]

logger = logging.getLogger("fastlora")

GRADIENT_INITS = ("lora_ga", "gora")
# What a model adapted from a LoraConfig records for its exports (task_type, base_model_name_or_path).
PEFT_RECORD = "_fastlora_peft_config"

# The one place inject reaches up: the initialisers sit above this module (LoRA-GA, GoRA and EVA
# use the gradient engine), so the step an ``init=`` asks for is looked up when it is asked for.
# What inject calls -> (module, name).
_INIT_STEPS = {
    "check_gradients": ("fastlora.init.common", "check_gradients"),
    "LoraGAConfig": ("fastlora.init.lora_ga", "LoraGAConfig"),
    "rank_fits": ("fastlora.init.lora_ga", "rank_fits"),
    "lora_ga": ("fastlora.init.lora_ga", "lora_ga"),
    "GoRAConfig": ("fastlora.init.gora", "GoRAConfig"),
    "gora": ("fastlora.init.gora", "gora"),
    "principal_init": ("fastlora.init.pissa", "principal_init"),
    "get_eva_state_dict": ("fastlora.init.eva", "get_eva_state_dict"),
}


def _init_step(name: str) -> Any:
    """The initialiser function or class ``name`` of :data:`_INIT_STEPS`, imported now."""
    module, attribute = _INIT_STEPS[name]
    return getattr(importlib.import_module(module), attribute)


ModelHook = Callable[[nn.Module], None]
# name -> (called with the model after adapters were added to it, after all were removed). The
# package registers the Hugging Face save hook and PEFT's model methods here (modules above this one).
MODEL_HOOKS: dict[str, tuple[ModelHook, ModelHook]] = {}


def register_model_hooks(name: str, added: ModelHook, removed: ModelHook) -> None:
    """Calls ``added(model)`` whenever adapters are added to a model and ``removed(model)`` when
    they are all taken out (inside the same transaction: a hook that raises undoes the change).
    Registering a name again replaces its hooks (a reload does not register twice); hooks run in
    the order their names were first registered."""
    if not callable(added) or not callable(removed):
        raise TypeError(f"register_model_hooks({name!r}, ...): added and removed must be callables taking the model")
    MODEL_HOOKS[name] = (added, removed)


def inject(
    model: nn.Module,
    target_modules: Targets | Any = "all-linear",
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
    modules_to_save: Targets | None = None,
    generator: torch.Generator | None = None,
    gradients: Any = None,
    init_config: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Replaces the matching ``nn.Linear`` modules of ``model`` by :class:`LoRALinear` in place
    and returns the model. The first call freezes every other parameter; a later call (more
    targets) leaves the existing adapters and flags as they are. Layers that already have an
    adapter are skipped.

    ``inject(model, config)`` with a ``LoraConfig`` (:class:`fastlora.LoraConfig` or
    ``peft.LoraConfig``) in place of ``target_modules`` takes every setting from it (no other
    argument may be given): see :func:`get_peft_model` and :mod:`fastlora.config`.

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
            layer's rank is allocated), or "pissa", "pissa_niter_<n>", "olora" (from the base
            weights, as PEFT's ``init_lora_weights``; see :mod:`fastlora.init.pissa`).
        gradients: a :class:`fastlora.GradientStats` (:func:`fastlora.collect_gradients`) covering the
            targets (LoRA-GA, GoRA).
        init_config: settings of the gradient init (fields of :class:`fastlora.init.LoraGAConfig`
            or :class:`fastlora.init.GoRAConfig`).
        rank_pattern, alpha_pattern: per-module overrides of r / lora_alpha, keyed by a name or
            a regex matched against the end of the module name (as PEFT).
        exclude_modules: names, suffixes or a regex of modules never to adapt.
        trainable_modules: names, suffixes or a regex of modules whose parameters stay
            trainable in place (a classification head, say); everything else but the adapters is
            frozen.
        modules_to_save: names, suffixes or a regex of modules trained as a copy, as PEFT's
            ``modules_to_save``: the original is kept (frozen) for :func:`disable_adapter` and
            ``unload(merge=False)``; the copy is saved and exported with the adapter.
        generator: RNG for the adapters' initial values.

    Raises:
        ValueError: nothing matched, a matched module is not an ``nn.Linear`` or its weight is
            tied to another module's, a layer's settings are invalid, the gradients do not cover
            the targets or are not finite, or PEFT has wrapped the model.
        TypeError: a matched layer has its own forward and is not a supported bitsandbytes
            layer; bad ``adapter_dtype`` or ``generator``.
        RuntimeError: the model's adapters are merged.
        Everything is checked before anything changes; an error leaves the model as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if is_lora_config(target_modules):
        given = [name for name, value in locals().items() if name in _INJECT_DEFAULTS
                 and not _is_default(value, _INJECT_DEFAULTS[name])]
        if given:
            raise TypeError(f"inject(model, config) takes every setting from the config; {given} were given too. "
                            "Set them in the LoraConfig (fastlora.LoraConfig has fastlora's own fields)")
        return _inject_config(model, target_modules)
    refuse_peft_model(model)
    gradient_init = init in GRADIENT_INITS
    weight_init = is_principal_init(init)
    if init not in INITS and not gradient_init and not weight_init:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS + GRADIENT_INITS + PRINCIPAL_INITS} "
                         "or 'pissa_niter_<n>'")
    if gradient_init and gradients is None:
        raise ValueError(f"init={init!r} needs gradients: stats = fastlora.collect_gradients(model, batches, "
                         "targets), then inject(..., gradients=stats)")
    if not gradient_init and (gradients is not None or init_config is not None):
        raise ValueError("gradients and init_config apply to init='lora_ga' or init='gora' only")
    if adapter_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"adapter_dtype must be one of {SUPPORTED_DTYPES}, got {adapter_dtype}")
    if use_rslora is None:
        use_rslora = gradient_init
    for what, value in (("exclude_modules", exclude_modules), ("trainable_modules", trainable_modules),
                        ("modules_to_save", modules_to_save)):
        if value is not None:
            check_targets(value, what)
    refuse_merged(lora_layers(model), "adding adapters")
    disabled = [name for name, layer in lora_layers(model).items() if not layer.adapter_enabled]
    if disabled:
        raise RuntimeError(f"the adapters of {disabled[:4]} are switched off (inside fastlora.disable_adapter): add "
                           "adapters after the disable_adapter block")
    found = find_linear_targets(model, target_modules, exclude_modules)
    check_generator(generator, found[0][1].weight.device)
    configs: dict[str, AdapterConfig] = {}
    for name, module in found:
        check_base_layer(module, name)
        config = AdapterConfig(pattern_value(name, rank_pattern, r), pattern_value(name, alpha_pattern, lora_alpha),
                               lora_dropout, use_rslora, init if init in INITS else "lora")
        config.check(module.in_features, module.out_features, name)
        configs[name] = config
    copies = _modules_to_save(model, modules_to_save, configs) if modules_to_save is not None else []
    init_fn = _gradient_init(init, found, configs, gradients, init_config, r) if gradient_init else None
    if weight_init:
        names = list(configs)
        principal_init = _init_step("principal_init")
        init_fn = lambda model: principal_init(model, init, names)  # noqa: E731
    add_layers(model, configs, adapter_dtype, generator, trainable_modules, init_fn, copies)
    ranks = sorted({layer.r for layer in lora_layers(model).values()})
    logger.info("fastlora: added adapters to %d linear layers (init %s, ranks %s)", len(configs), init, ranks)
    return model


def _is_default(value: Any, default: Any) -> bool:
    return value is default or (type(value) is type(default) and value == default)


def _inject_config(model: nn.Module, config: Any) -> nn.Module:
    """inject with the settings of a LoraConfig; records what exports need."""
    kwargs, record = inject_arguments(model, config)
    inject(model, **kwargs)
    if record["inference_mode"]:  # as PEFT: nothing trains, adapters and modules_to_save copies included
        for param in model.parameters():
            param.requires_grad_(False)
    model.__dict__[PEFT_RECORD] = record
    return model


def get_peft_model(model: nn.Module, peft_config: Any, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> nn.Module:
    """PEFT's ``get_peft_model`` spelling of ``fastlora.inject(model, peft_config)``: adapts
    ``model`` in place from a ``LoraConfig`` (``peft.LoraConfig`` or :class:`fastlora.LoraConfig`)
    and returns it; the model then has PEFT's methods (``print_trainable_parameters``,
    ``merge_and_unload``, ``disable_adapter``, ``save_pretrained``, ...; see docs/from_peft.md).

    PEFT's other arguments: one adapter per model (``adapter_name`` must be "default"), no mixed
    adapter types; adapters are float32 (PEFT's ``autocast_adapter_dtype=True``; another dtype:
    ``fastlora.LoraConfig(adapter_dtype=...)``); ``low_cpu_mem_usage`` is refused;
    ``revision`` is recorded for exports."""
    problems = []
    if adapter_name != "default":
        problems.append(f"adapter_name={adapter_name!r}: fastlora keeps one adapter per model, named 'default'; "
                        "train a second adapter on a second copy of the model, or save one and load the other "
                        "(fastlora.save_adapter / load_adapter)")
    if mixed:
        problems.append("mixed=True: mixed adapter types are not supported (LoRA only)")
    if autocast_adapter_dtype is not True:
        problems.append("autocast_adapter_dtype=False: set the adapters' dtype with "
                        "fastlora.LoraConfig(adapter_dtype=...)")
    if low_cpu_mem_usage:
        problems.append("low_cpu_mem_usage=True is not supported: adapters are created with their values")
    if problems:
        raise ValueError("get_peft_model: " + "; ".join(problems))
    if not is_lora_config(peft_config):
        raise TypeError(f"get_peft_model takes a LoraConfig (peft.LoraConfig or fastlora.LoraConfig), got "
                        f"{type(peft_config).__name__}")
    _inject_config(model, peft_config)
    if revision is not None:
        model.__dict__[PEFT_RECORD]["revision"] = revision
    return model


def _modules_to_save(model: nn.Module, targets: Targets, configs: Mapping[str, AdapterConfig]) -> list[str]:
    """Names of the modules ``targets`` selects for trainable copies (outermost matches only),
    checked: none adapted, none inside an adapted layer or another copy, none containing one."""
    names = []
    adapted = list(configs) + list(lora_layers(model)) + list(trainable_copies(model))
    for name, module in model.named_modules():
        if not name or not name_matches(name, targets) or any(name.startswith(f"{n}.") for n in names):
            continue
        if isinstance(module, (LoRALinear, TrainableCopy)) or name in configs:
            raise ValueError(f"modules_to_save={targets!r} selects {name!r}, which has or gets an adapter already")
        if any(name.startswith(f"{n}.") for n in adapted):
            raise ValueError(f"modules_to_save={targets!r} selects {name!r}, inside an adapted module")
        inner = [n for n in adapted if n.startswith(f"{name}.")]
        if inner:
            raise ValueError(f"modules_to_save={targets!r} selects {name!r}, which contains {inner[0]!r}, a LoRA layer or "
                             "a modules_to_save copy: its copy would duplicate that. Leave one of the two out")
        names.append(name)
    if not names:
        raise ValueError(f"no module matched modules_to_save={targets!r}")
    return names


def refuse_merged(layers: Mapping[str, LoRALinear], before: str) -> None:
    """RuntimeError if any of ``layers`` is merged: adding or reading an adapter into it, or writing
    one out, needs the base unmerged."""
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"layers {merged[:4]} are merged: call fastlora.unmerge(model) before {before}")


def refuse_peft_model(model: nn.Module) -> None:
    """ValueError if PEFT has wrapped ``model`` (fastlora would wrap PEFT's own layers)."""
    wrapped = peft_modules(model)
    if wrapped:
        raise ValueError(
            f"this model is wrapped by PEFT ({wrapped[0]}); fastlora adapts plain models. Fold PEFT's adapter into "
            "the base with model.merge_and_unload(), or load the adapter into the unwrapped base model with "
            "fastlora.import_peft(base_model, adapter_dir)"
        )


def _tied_elsewhere(model: nn.Module, names: list[str]) -> dict[str, str]:
    """{layer name: another parameter name} for layers whose weight is shared with another
    module (a tied output head)."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    tied = {}
    for name in names:
        module = model.get_submodule(name)
        weight = module.base_layer.weight if isinstance(module, LoRALinear) else module.weight
        inside = f"{name}." if name else ""  # "" is the model itself (a LoRALinear on its own)
        others = [n for n in owners.get(id(weight), []) if not n.startswith(inside)]
        if others:
            tied[name] = others[0]
    return tied


def _refuse_tied(model: nn.Module, names: list[str], action: str) -> None:
    tied = _tied_elsewhere(model, names)
    if tied:
        name, other = next(iter(tied.items()))
        raise ValueError(
            f"{name}'s weight is tied to {other}: {action} would change {other} too. Leave {name} out "
            f"(exclude_modules), or untie it first: model.get_submodule({name!r}).weight = "
            "nn.Parameter(its weight.detach().clone()) (and config.tie_word_embeddings = False for a Hugging Face model)"
        )


def swap_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Puts ``module`` at the dotted ``name`` of ``model``; returns the module it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def add_layers(
    model: nn.Module,
    configs: Mapping[str, AdapterConfig],
    adapter_dtype: torch.dtype | Mapping[str, torch.dtype],
    generator: torch.Generator | None = None,
    trainable_modules: Targets | None = None,
    then: Callable[[nn.Module], Any] | None = None,
    copies: list[str] | tuple[str, ...] = (),
) -> None:
    """Wraps the ``nn.Linear`` modules named (exactly) in ``configs`` in :class:`LoRALinear`
    (``adapter_dtype`` for all, or per name) and the modules named in ``copies`` in
    :class:`TrainableCopy`, then runs ``then(model)``. The first adapters of a model freeze every
    other parameter; later ones leave the existing flags alone. On any error (in ``then`` too)
    the model is restored as it was."""
    _refuse_tied(model, list(configs), "training a LoRA on it and merging")
    first = not lora_layers(model)
    with transaction(model):
        if first:
            for param in model.parameters():
                param.requires_grad_(False)
        for name, config in configs.items():
            module = model.get_submodule(name)
            init = config.init if config.init in INITS else "lora"
            dtype = adapter_dtype[name] if isinstance(adapter_dtype, Mapping) else adapter_dtype
            swap_module(model, name, LoRALinear(module, config.r, config.lora_alpha, config.lora_dropout,
                                                config.use_rslora, dtype, init, generator, name=name))
        for name in copies:
            swap_module(model, name, TrainableCopy(model.get_submodule(name)))
        if trainable_modules is not None:
            for name, module in model.named_modules():
                if name and name_matches(name, trainable_modules):
                    for param in module.parameters():
                        param.requires_grad_(True)
        if then is not None:
            then(model)
        for added, _ in MODEL_HOOKS.values():
            added(model)


def _gradient_init(init: str, found: list, configs: dict[str, AdapterConfig], gradients: Any, init_config,
                   r: int) -> Callable[[nn.Module], Any]:
    """Checks a LoRA-GA / GoRA init against the planned layers before the model changes, and
    returns the function that applies it once the layers exist."""
    names = list(configs)
    _init_step("check_gradients")(gradients, names)
    options = dict(init_config or {})
    if init == "lora_ga":
        cfg = _init_step("LoraGAConfig")(**options)
        cfg.validate()
        rank_fits = _init_step("rank_fits")
        for name, module in found:
            rank_fits(name, configs[name].r, module.out_features, module.in_features, cfg)
        lora_ga = _init_step("lora_ga")
        return lambda model: lora_ga(model, gradients, cfg, layers=names)
    options.setdefault("r_ref", r)
    cfg = _init_step("GoRAConfig")(**options)
    cfg.validate()
    gora = _init_step("gora")
    return lambda model: gora(model, gradients, cfg, layers=names)


def _layers_or_raise(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call fastlora.inject(model, ...) first")
    return layers


def merge(model: nn.Module, allow_requantize: bool = False) -> nn.Module:
    """Folds every adapter into its base weight (see :meth:`LoRALinear.merge`).

    Layers with a quantized base are refused (before anything changes) unless
    ``allow_requantize``: then they are dequantized, merged in float32 and re-quantized, and the
    rounding error this introduced is logged and warned about (largest over the layers)."""
    layers = _layers_or_raise(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"already merged: {merged[:4]}; call fastlora.unmerge(model) first")
    for name, layer in layers.items():
        layer.check_merge(allow_requantize, name)
    _refuse_tied(model, list(layers), "merging")
    errors = {}
    with transaction(model):
        for name, layer in layers.items():
            report = layer.merge(allow_requantize)
            if report is not None:
                errors[name] = report
    if errors:
        worst = max(errors, key=lambda n: errors[n]["relative_error"])
        message = (f"fastlora: re-quantized {len(errors)} merged layers; largest error at {worst}: relative "
                   f"{errors[worst]['relative_error']:.3g}, max |ΔW| {errors[worst]['max_abs_error']:.3g}")
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtracts every merged adapter from its base weight again."""
    layers = _layers_or_raise(model)
    unmerged = [name for name, layer in layers.items() if not layer.merged]
    if unmerged:
        raise RuntimeError(f"not merged: {unmerged[:4]}; call fastlora.merge(model) first")
    with transaction(model):
        for layer in layers.values():
            layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True, allow_requantize: bool = False) -> nn.Module:
    """Replaces every LoRA layer by its base ``nn.Linear`` and returns the model: with the adapter
    merged into the weight (``merge=True``, computed in float32 and rounded once) or with the
    original weight (``merge=False``); ``modules_to_save`` copies by the trained copy or the
    original. ``save_pretrained`` then writes a standard checkpoint. Quantized bases merge only
    with ``allow_requantize`` (see :func:`merge`). The LoRA layers taken out are
    :attr:`~LoRALinear.detached`: optimizers still holding them refuse to step. A
    :class:`LoRALinear` given on its own returns its base layer."""
    layers = _layers_or_raise(model)
    for layer in layers.values():
        layer.check_unwrap(merge, allow_requantize)
    if merge:
        _refuse_tied(model, list(layers), "merging")
    if isinstance(model, LoRALinear):
        return model.unwrap(merge, allow_requantize)
    with transaction(model):
        for name, layer in layers.items():
            swap_module(model, name, layer.unwrap(merge, allow_requantize))
        for name, wrapper in trainable_copies(model).items():
            swap_module(model, name, getattr(wrapper, COPY) if merge else wrapper.original_module)
        for _, removed in MODEL_HOOKS.values():
            removed(model)
    return model


def merge_and_unload(model: nn.Module, allow_requantize: bool = False) -> nn.Module:
    """``unload(model, merge=True, allow_requantize=...)``, PEFT's name for it."""
    return unload(model, merge=True, allow_requantize=allow_requantize)


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every LoRA layer computes its original base layer and every ``modules_to_save``
    copy its original module (the reference model of DPO-style training); the adapters come back
    afterwards, also after an exception. Refused while merged. Parameters trained in place
    (``trainable_modules``) are not switched off."""
    layers = _layers_or_raise(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"layers {merged[:4]} are merged: unmerge them before disabling the adapter")
    before = {name: layer.adapter_enabled for name, layer in layers.items()}
    copies = trainable_copies(model)
    copies_before = {name: wrapper.enabled for name, wrapper in copies.items()}
    try:
        for layer in layers.values():
            layer.set_adapter_enabled(False)
        for wrapper in copies.values():
            wrapper.set_enabled(False)
        yield model
    finally:
        for name, layer in layers.items():
            if not layer.detached:  # unload(merge=False) inside the block took it out
                layer.set_adapter_enabled(before[name])
        for name, wrapper in trainable_copies(model).items():  # a load inside the block may have made new ones
            wrapper.set_enabled(copies_before.get(name, True))


@torch.no_grad()
def initialize_lora_eva_weights(model: nn.Module, dataloader: Any = None,
                                eva_state_dict: Mapping[str, Tensor] | None = None, eva_config: Any = None,
                                show_progress_bar: bool = True,
                                gather_distributed_inputs: bool = True) -> nn.Module:
    """PEFT's ``initialize_lora_eva_weights``: EVA (:mod:`fastlora.init.eva`) on a model adapted
    with ``LoraConfig(init_lora_weights="eva")`` (its ``eva_config`` is used unless ``eva_config``
    is given) or by :func:`inject`. From ``dataloader`` (forward passes with the adapters off) or
    a given ``eva_state_dict``: each layer's ``lora_A`` becomes its components, ``lora_B = 0``,
    its rank the redistributed one (new Parameters: build the optimizer afterwards); with
    ``adjust_scaling_factors`` alpha becomes ``alpha·new_r/r``; a layer of rank 0 is replaced by
    its base layer. Everything is checked before any layer changes. ``gather_distributed_inputs``:
    see :func:`fastlora.init.get_eva_state_dict`."""
    layers = _layers_or_raise(model)
    record = model.__dict__.get(PEFT_RECORD) or {}
    config = eva_config_from(eva_config if eva_config is not None else record.get("eva_config"))
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("initialize_lora_eva_weights needs a dataloader (calibration batches) or an "
                             "eva_state_dict")
        with disable_adapter(model):
            eva_state_dict = _init_step("get_eva_state_dict")(model, dataloader, config, show_progress_bar,
                                                              gather_distributed_inputs)
    missing = [name for name in layers if name not in eva_state_dict]
    unknown = [name for name in eva_state_dict if name not in layers]
    if missing or unknown:
        raise ValueError(f"eva_state_dict does not match the model's LoRA layers: missing {missing[:4]}, "
                         f"unknown {unknown[:4]}")
    planned, removed = {}, []
    for name, layer in layers.items():
        a = eva_state_dict[name]
        rank = a.shape[0]
        if rank == 0:
            layer.check_unwrap(merge=False)
            removed.append(name)
            continue
        alpha = layer.lora_alpha
        if config.adjust_scaling_factors and rank != layer.r:  # PEFT: alpha *= new_rank / r
            alpha = alpha * rank / layer.r
        adapter = AdapterConfig(rank, alpha, layer.lora_dropout, layer.use_rslora, "lora")
        a = a.to(layer.lora_A.device, layer.lora_A.dtype)
        b = torch.zeros(layer.out_features, rank, device=a.device, dtype=a.dtype)
        layer.check_adapter(a, b, adapter, where=name)
        planned[name] = (a, b, adapter)
    with transaction(model):
        for name, args in planned.items():
            layers[name].load_factors(*args, base_weights="original")
        for name in removed:
            swap_module(model, name, layers[name].unwrap(merge=False))
    logger.info("fastlora: eva initialised %d layers, removed %d with rank 0", len(planned), len(removed))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts as PEFT's ``get_nb_trainable_parameters`` gives them: a
    bitsandbytes 4-bit weight counts two values per byte of its packed storage."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if n == 0 and hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3 partitioned
            n = param.ds_numel
        if type(param).__name__ == "Params4bit":
            n *= 2 * param.element_size()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Prints (as PEFT does) and returns the numbers of trainable and of all parameters
    (:func:`count_parameters`)."""
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    return trainable, total


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


_INJECT_DEFAULTS = {name: p.default for name, p in inspect.signature(inject).parameters.items()
                    if name not in ("model", "target_modules")}
