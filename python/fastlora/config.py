"""``LoraConfig``: PEFT's configuration object, read by :func:`fastlora.inject`.

A PEFT script's ``LoraConfig(...)`` (``peft.LoraConfig`` when PEFT is installed, or
:class:`LoraConfig` here, a dataclass with PEFT's field names and defaults plus fastlora's own
settings) becomes :func:`fastlora.inject`'s keyword arguments through :func:`inject_arguments`.
Every field is either honoured or refused by name with what to do instead; a field this module
does not know (a newer PEFT) is refused whenever it differs from PEFT's default, so nothing is
silently ignored. The table is in docs/from_peft.md. :class:`EvaConfig` (PEFT's EVA settings)
lives here too, below :mod:`fastlora.init.eva` which runs EVA, so that reading a config needs no
initialiser.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .principal import is_principal_init

__all__ = ["EvaConfig", "LoraConfig", "PEFT_TASK_TYPES", "eva_config_from", "inject_arguments", "is_lora_config",
           "init_name"]

# PEFT's task types (peft.TaskType's values).
PEFT_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# Heads PEFT's task-specific models add to modules_to_save (PeftModelForSequenceClassification, ...).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


@dataclass
class EvaConfig:
    """PEFT's ``EvaConfig`` (same fields and defaults): ``rho`` (>= 1; a layer gets at most
    ``round(r·rho)``), ``tau`` (cosine threshold of convergence, in [0, 1]), ``use_label_mask``,
    ``label_mask_value``, ``whiten``, ``adjust_scaling_factors``."""

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.rho, (int, float)) or isinstance(self.rho, bool) or not self.rho >= 1.0:
            raise ValueError(f"EvaConfig.rho={self.rho!r}: must be a number >= 1.0 (1.0: no rank redistribution)")
        if not isinstance(self.tau, (int, float)) or isinstance(self.tau, bool) or not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"EvaConfig.tau={self.tau!r}: must be between 0.0 and 1.0 (PEFT's default 0.99)")


def eva_config_from(config: Any) -> EvaConfig:
    """An :class:`EvaConfig` from ours, PEFT's ``EvaConfig``, a dict of its fields, or None (defaults)."""
    if config is None:
        return EvaConfig()
    if isinstance(config, EvaConfig):
        return config
    fields = ("rho", "tau", "use_label_mask", "label_mask_value", "whiten", "adjust_scaling_factors")
    if isinstance(config, Mapping):
        unknown = sorted(set(config) - set(fields))
        if unknown:
            raise ValueError(f"eva_config: unknown fields {unknown}; EvaConfig has {list(fields)}")
        return EvaConfig(**config)
    if type(config).__name__ == "EvaConfig":  # peft.EvaConfig
        return EvaConfig(**{f: getattr(config, f) for f in fields})
    raise TypeError(f"eva_config must be an EvaConfig (fastlora's or PEFT's) or a dict, got {type(config).__name__}")


@dataclass
class LoraConfig:
    """PEFT's ``LoraConfig`` fields (same names, same defaults) that fastlora honours, plus
    fastlora's own settings. ``fastlora.inject(model, LoraConfig(...))`` or
    ``fastlora.get_peft_model(model, LoraConfig(...))``.

    PEFT fields: ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules`` (None: PEFT's
    default targets for the model type, which needs PEFT installed), ``exclude_modules``,
    ``use_rslora``, ``rank_pattern``, ``alpha_pattern``, ``modules_to_save``, ``task_type``
    (SEQ_CLS / TOKEN_CLS / QUESTION_ANS also train the classifier head as a copy, as PEFT's
    task models do), ``inference_mode`` (adapters frozen), ``init_lora_weights`` (True,
    "gaussian", "pissa", "pissa_niter_<n>", "olora", "eva" with ``eva_config``: then call
    ``fastlora.initialize_lora_eva_weights(model, dataloader)``), ``bias`` ("none" only),
    ``fan_in_fan_out`` (False only), ``use_dora`` (False only), ``base_model_name_or_path`` and
    ``revision`` (recorded, written by exports). PEFT's other fields are refused when set; see
    docs/from_peft.md.

    fastlora's fields: ``init`` ("lora_ga" / "gora" from ``gradients``, overriding
    ``init_lora_weights``), ``gradients``, ``init_config``, ``adapter_dtype``,
    ``trainable_modules``, ``generator``.
    """

    r: int = 8
    target_modules: Any = None
    exclude_modules: Any = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Any = None
    init_lora_weights: bool | str = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_dora: bool = False
    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    eva_config: Any = None
    # fastlora's own
    init: str | None = None
    gradients: Any = None
    init_config: Mapping[str, Any] | None = None
    adapter_dtype: torch.dtype = torch.float32
    trainable_modules: Any = None
    generator: torch.Generator | None = None


# PEFT fields inject_arguments reads (the others must keep PEFT's default).
HONOURED = ("r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "use_rslora", "modules_to_save",
            "init_lora_weights", "rank_pattern", "alpha_pattern", "task_type", "inference_mode", "fan_in_fan_out",
            "bias", "use_dora", "eva_config")
# Metadata: recorded by PEFT, nothing to do when adapting a model.
METADATA = ("peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "megatron_core",
            "qalora_group_size", "runtime_config")
# fastlora's own fields (of fastlora.LoraConfig).
OWN = ("init", "gradients", "init_config", "adapter_dtype", "trainable_modules", "generator")
# What to do instead of a PEFT feature fastlora does not have, by field.
REFUSED = {
    "use_dora": "DoRA is not supported; train plain LoRA (use_dora=False), or a different method fastlora has "
                "(init='lora_ga', LoRA-Pro: fastlora.optim.LoRAPro)",
    "fan_in_fan_out": "fastlora adapts nn.Linear layers (weights stored out x in); GPT-2's Conv1D layers are not "
                      "supported. Leave them out of target_modules",
    "bias": "fastlora trains no biases through the config; make the modules whose biases you train trainable "
            "(fastlora.LoraConfig(trainable_modules=...)) and keep bias='none'",
    "layers_to_transform": "select the layers with a regex in target_modules instead, e.g. "
                           r"r'.*\.layers\.(0|1)\..*\.(q_proj|v_proj)'",
    "layers_pattern": "select the layers with a regex in target_modules instead",
    "megatron_config": "Megatron parallel layers are not supported; adapt the plain model",
    "trainable_token_indices": "trainable tokens are not supported; train the embedding as a copy "
                               "(modules_to_save=['embed_tokens'])",
    "loftq_config": "LoftQ is not supported; quantize the base and use init_lora_weights=True, 'pissa' or 'olora'",
    "corda_config": "CorDA is not supported; use init_lora_weights='pissa' or fastlora's init='lora_ga'",
    "lora_ga_config": "use fastlora's LoRA-GA: fastlora.LoraConfig(init='lora_ga', "
                      "gradients=fastlora.collect_gradients(model, batches))",
    "velora_config": "VeLoRA is not supported; fastlora's layer already saves only x and the r-wide product",
    "monteclora_config": "MonteCLoRA is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "use_qalora": "QA-LoRA is not supported; QLoRA on bitsandbytes 4-bit / 8-bit bases is",
    "layer_replication": "layer replication is not supported; build the replicated model first",
    "lora_bias": "a bias on lora_B is not supported",
    "target_parameters": "only nn.Linear modules are adapted (target_modules), not bare parameters",
    "use_bdlora": "BD-LoRA is not supported",
    "arrow_config": "Arrow routing (several adapters) is not supported: one adapter per model",
    "kasa_config": "KaSA is not supported",
    "ensure_weight_tying": "tied weights are never adapted (fastlora refuses a tied target); untie the weight or "
                           "leave the tied module out",
}
# init_lora_weights values and fastlora's init for each; the others are refused with what to do.
# "eva": standard adapters until fastlora.initialize_lora_eva_weights(model, dataloader), as PEFT.
PEFT_INITS = {True: "lora", "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "eva": "lora"}
REFUSED_INITS = {
    False: "init_lora_weights=False (random B, the adapter is not a no-op: PEFT's testing option) is not supported; "
           "use True",
    "loftq": "LoftQ is not supported; use 'pissa' or 'olora' (both also on 4-bit bases)",
    "corda": "CorDA is not supported; use 'pissa' or fastlora's init='lora_ga'",
    "lora_ga": "use fastlora's LoRA-GA: fastlora.LoraConfig(init='lora_ga', gradients=fastlora.collect_gradients(...))",
    "orthogonal": "the orthogonal init is not supported; use True or 'olora'",
}


def is_lora_config(value: Any) -> bool:
    """Whether ``value`` is a LoRA configuration object: :class:`LoraConfig` or ``peft.LoraConfig``
    (recognised by class name and module, so PEFT need not be imported)."""
    if isinstance(value, LoraConfig):
        return True
    cls = type(value)
    return cls.__name__ == "LoraConfig" and cls.__module__.split(".")[0] == "peft"


def init_name(init_lora_weights: Any) -> str:
    """fastlora's init for a PEFT ``init_lora_weights`` value ("pissa_niter_4" stays as it is);
    ValueError naming the value and what to use otherwise."""
    for value, name in PEFT_INITS.items():
        if init_lora_weights is value or (isinstance(value, str) and init_lora_weights == value):
            return name
    if is_principal_init(init_lora_weights):  # "pissa_niter_<n>"
        return init_lora_weights
    for value, advice in REFUSED_INITS.items():
        if init_lora_weights is value or (isinstance(value, str) and init_lora_weights == value):
            raise ValueError(f"LoraConfig.init_lora_weights={init_lora_weights!r}: {advice}")
    raise ValueError(f"LoraConfig.init_lora_weights={init_lora_weights!r} is not known; use True, 'gaussian', "
                     "'pissa', 'pissa_niter_<n>' or 'olora'")


def _fields(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _default_targets(model: nn.Module) -> Any:
    """PEFT's default target_modules for the model's type (its own table; needs PEFT)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
    except ImportError:
        table = {}
    targets = table.get(model_type) if model_type else None
    if targets is None:
        raise ValueError(f"LoraConfig.target_modules=None: no default targets for model type {model_type!r}"
                         f"{'' if table else ' (PEFT, which holds the table, is not installed)'}; give "
                         "target_modules, e.g. 'all-linear' or ['q_proj', 'v_proj']")
    return targets if isinstance(targets, str) else sorted(targets)


def _task_heads(model: nn.Module, task_type: str | None, modules_to_save: Any) -> Any:
    """modules_to_save plus the heads PEFT's task model would train (those the model has)."""
    heads = TASK_HEADS.get(task_type or "", ())
    names = {name.rpartition(".")[2] for name, _ in model.named_modules()}
    extra = [h for h in heads if h in names]
    if not extra:
        return modules_to_save
    if modules_to_save is None:
        return extra
    if isinstance(modules_to_save, str):
        raise ValueError(f"LoraConfig.modules_to_save={modules_to_save!r}: give a list of names with "
                         f"task_type={task_type!r} (its head {extra} is added to it, as PEFT does)")
    return list(modules_to_save) + [h for h in extra if h not in modules_to_save]


def inject_arguments(model: nn.Module, config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(inject's keyword arguments, what the model records)`` for ``config`` (a
    :class:`LoraConfig` or ``peft.LoraConfig``): every field honoured or refused here, with a
    ValueError naming the field and what to do instead. The record holds ``task_type``,
    ``inference_mode``, ``base_model_name_or_path`` and ``revision``."""
    if not is_lora_config(config):
        raise TypeError(f"expected a LoraConfig (fastlora.LoraConfig or peft.LoraConfig), got {type(config).__name__}")
    values = _fields(config)
    peft_type = values.get("peft_type")
    if peft_type is not None and str(getattr(peft_type, "value", peft_type)) != "LORA":
        raise ValueError(f"LoraConfig.peft_type={peft_type!r}: fastlora adapts with LoRA only")
    defaults = _fields(type(config)())
    refused = []
    for name, value in values.items():
        if name in METADATA or name in OWN or (name in HONOURED and name not in REFUSED):
            continue
        default = defaults.get(name)
        if value == default or (not value and not default):  # None, {} and False alike
            continue
        advice = REFUSED.get(name, f"not supported by fastlora; leave it at {default!r}")
        refused.append(f"LoraConfig.{name}={value!r}: {advice}")
    if refused:
        raise ValueError("; ".join(refused))
    task_type = values.get("task_type")
    task_type = getattr(task_type, "value", task_type)
    if task_type is not None and task_type not in PEFT_TASK_TYPES:
        raise ValueError(f"LoraConfig.task_type={task_type!r} is not one of PEFT's task types {PEFT_TASK_TYPES}")
    own = {name: values[name] for name in OWN if name in values}
    init = own.get("init")
    if init is None:
        init = init_name(values["init_lora_weights"])
    elif values["init_lora_weights"] is not True:
        raise ValueError(f"LoraConfig: init={init!r} and init_lora_weights={values['init_lora_weights']!r} "
                         "contradict each other; set one of them")
    targets = values["target_modules"]
    if targets is None:
        targets = _default_targets(model)
    elif isinstance(targets, (set, frozenset)):
        targets = sorted(targets)
    exclude = values["exclude_modules"]
    if isinstance(exclude, (set, frozenset)):
        exclude = sorted(exclude)
    kwargs = dict(
        target_modules=targets,
        r=values["r"],
        lora_alpha=values["lora_alpha"],
        lora_dropout=values["lora_dropout"],
        rank_pattern=values["rank_pattern"] or None,
        alpha_pattern=values["alpha_pattern"] or None,
        use_rslora=values["use_rslora"],
        init=init,
        exclude_modules=exclude,
        modules_to_save=_task_heads(model, task_type, values["modules_to_save"]),
    )
    for name in ("gradients", "init_config", "adapter_dtype", "trainable_modules", "generator"):
        if own.get(name) is not None:
            kwargs[name] = own[name]
    record = {"task_type": task_type, "inference_mode": bool(values["inference_mode"]),
              "base_model_name_or_path": values.get("base_model_name_or_path"), "revision": values.get("revision")}
    if values["init_lora_weights"] == "eva":  # read by fastlora.initialize_lora_eva_weights; checked now
        record["eva_config"] = eva_config_from(values.get("eva_config"))
    elif values.get("eva_config") is not None:  # as PEFT: ignored with a warning
        warnings.warn("LoraConfig.eva_config is ignored: init_lora_weights is not 'eva'", stacklevel=3)
    return kwargs, record
