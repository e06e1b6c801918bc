"""PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``peft.PeftModel.from_pretrained`` on the original base model. Export writes every layer relative
to the original base (LoRA-GA as rank 2r); import parses and checks the configuration (task types,
rank and alpha patterns, PiSSA/OLoRA's recomputable residual base) and every tensor before the
model changes."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._numerics import accumulation_dtype
from ..functional import SUPPORTED_DTYPES
from ..principal import PRINCIPAL_INITS, original_weight, principal_factors
from ..inject import PEFT_RECORD, add_layers, refuse_merged, refuse_peft_model
from ..layer import AdapterConfig, LoRALinear, lora_layers
from ..targets import name_matches, pattern_value
from ..transaction import transaction
from . import files
from .checks import adapter_config, factor_problems, field, target_problems
from .files import (PEFT_CONFIG, WEIGHTS, AdapterFormatError, Generation, parse_safetensors, read_consistently,
                    write_directory)
from .heads import apply_heads, base_module_names, head_problems, inside, layers_to_write, trainable_extras

logger = logging.getLogger("fastlora")

PEFT_PREFIX = "base_model.model."


def _peft_factors(layer: LoRALinear, fold_scaling: bool) -> tuple[Tensor, Tensor, int, float, bool]:
    """(A, B, r, alpha, use_rslora) of a layer as PEFT stores it, relative to the original base:
    a LoRA-GA layer becomes the rank-2r adapter ``[B, −B0] [A; A0]``."""
    a, b, r, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.r, layer.scaling
    if layer.base_offset is not None:
        a0, b0 = layer.base_offset
        a = torch.cat([a, a0.to(a.dtype)], dim=0)
        b = torch.cat([b, -b0.to(b.dtype)], dim=1)
        r = 2 * r
    if fold_scaling:  # float64 adapters stay exact to float64's rounding
        return a, (b.to(accumulation_dtype(b.dtype)) * s).to(b.dtype), r, float(r), False
    alpha = s * (r**0.5 if layer.use_rslora else r)  # keeps PEFT's scale equal to s at rank r
    return a, b, r, alpha, layer.use_rslora


# PEFT's task types by the model class's name (transformers' naming), longest suffix first.
TASK_TYPES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("Model", "FEATURE_EXTRACTION"),
)


def infer_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model class (``LlamaForCausalLM`` -> "CAUSAL_LM",
    ``BertForSequenceClassification`` -> "SEQ_CLS", ``BertModel`` -> "FEATURE_EXTRACTION"),
    None for other modules."""
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        return None
    name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES if name.endswith(suffix)), None)


def _peft_layers(layers: dict[str, LoRALinear], fold_scaling: bool
                 ) -> tuple[dict[str, Tensor], dict[str, int], dict[str, float], bool, float]:
    """The layers' factors as PEFT names them, their ranks and alphas, the one use_rslora and the
    one lora_dropout PEFT's configuration holds for all of them (ValueError if the dropouts differ)."""
    tensors: dict[str, Tensor] = {}
    ranks, alphas, rslora, dropouts = {}, {}, set(), set()
    for name, layer in layers.items():
        a, b, r, alpha, use_rslora = _peft_factors(layer, fold_scaling)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        ranks[name], alphas[name] = r, alpha
        rslora.add(use_rslora)
        dropouts.add(layer.lora_dropout)
    if len(dropouts) > 1:
        raise ValueError(
            f"the LoRA layers have different lora_dropout values {sorted(dropouts)}; PEFT's adapter_config.json "
            "holds one for all layers (it has no per-module dropout). Give every layer the same dropout "
            "(layer.load_factors(layer.lora_A, layer.lora_B, dataclasses.replace(layer.config, lora_dropout=p), "
            "layer.base_offset)), or save fastlora's format with fastlora.save_adapter, which keeps each layer's dropout"
        )
    if len(rslora) > 1:  # mixed (never with fold_scaling): express every scale as alpha / r
        for name, layer in layers.items():
            alphas[name] = layer.scaling * ranks[name]
        rslora = {False}
    return tensors, ranks, alphas, rslora.pop(), dropouts.pop()


def peft_state(
    model: nn.Module,
    fold_scaling: bool = False,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and ``adapter_config.json`` of PEFT's format for ``model``'s adapters (see
    :func:`export_peft`)."""
    layers = layers_to_write(model, "export")
    record = model.__dict__.get(PEFT_RECORD) or {}  # what a LoraConfig said (inject(model, config))
    task_type = task_type if task_type is not None else record.get("task_type")
    base_model_name_or_path = base_model_name_or_path or record.get("base_model_name_or_path")
    refuse_merged(layers, "exporting (merged weights are in the base)")
    tensors, ranks, alphas, use_rslora, dropout = _peft_layers(layers, fold_scaling)
    extras = trainable_extras(model)
    save_modules = sorted({n.rpartition(".")[0] for n in extras})
    for n, p in extras.items():
        tensors[f"{PEFT_PREFIX}{n}"] = p
    r_default = Counter(ranks.values()).most_common(1)[0][0]
    alpha_default = Counter(alphas.values()).most_common(1)[0][0]
    config = _peft_config_defaults()
    config.update({
        "peft_type": "LORA",
        "task_type": task_type if task_type is not None else infer_task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "revision": record.get("revision"),
        "r": r_default,
        "lora_alpha": alpha_default,
        "rank_pattern": {n: r for n, r in ranks.items() if r != r_default},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha_default},
        "use_rslora": use_rslora,
        "target_modules": list(layers),
        "lora_dropout": dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": save_modules or None,
        "inference_mode": True,
        "use_dora": False,
    })
    return tensors, dict(sorted(config.items()))


def _peft_config_defaults() -> dict[str, Any]:
    """Every field ``peft.LoraConfig.save_pretrained`` writes, at its default, when PEFT is
    installed (so exports hold what a LoraConfig would write); empty otherwise."""
    try:
        from peft import LoraConfig
    except ImportError:
        return {}
    fields = LoraConfig().to_dict()
    fields.pop("runtime_config", None)  # PEFT does not save it
    return json.loads(json.dumps(fields, default=str))


def export_peft(
    model: nn.Module,
    path: str | os.PathLike,
    fold_scaling: bool = False,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Writes the adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``),
    for ``peft.PeftModel.from_pretrained`` on the original base model.

    Per-layer ranks and scales (GoRA) go to ``rank_pattern`` / ``alpha_pattern``; LoRA-GA layers
    are written as rank-2r adapters relative to the original weights; other trainable modules
    (a classifier head) as ``modules_to_save``. ``task_type`` (PEFT's, e.g. "CAUSAL_LM") is
    inferred from a transformers model's class when not given, so ``AutoPeftModelFor*`` loads
    the export.

    ``fold_scaling=True`` writes ``s_i·B_i`` with ``lora_alpha = r`` (``alpha_pattern =
    rank_pattern``) and no rsLoRA, so every layer's scale is 1: use it for loaders that ignore
    ``rank_pattern`` / ``alpha_pattern`` and apply one global ``lora_alpha / r`` (vLLM and other
    serving engines); use the default for PEFT itself, which keeps the adapters as trained.
    """
    tensors, config = peft_state(model, fold_scaling, base_model_name_or_path, task_type)

    def write(tmp: Path) -> None:
        files.save_safetensors(tmp / WEIGHTS, tensors, {"format": "pt"})  # looked up here: tests patch it
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))

    path = Path(path)
    write_directory(path, write)
    logger.info("fastlora: exported %d LoRA layers in PEFT's format to %s%s", len(lora_layers(model)), path,
                " (scales folded into B)" if fold_scaling else "")
    return path


def _peft_layer_name(key: str) -> tuple[str, str] | None:
    """('<module>', 'lora_A'|'lora_B') for a PEFT adapter key, else None."""
    body = key.removeprefix(PEFT_PREFIX)
    for part in ("lora_A", "lora_B"):
        for suffix in (f".{part}.weight", f".{part}.default.weight"):
            if body.endswith(suffix):
                return body[: -len(suffix)], part
    return None


# init_lora_weights values whose adapters apply to the unchanged base model.
PEFT_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# init_lora_weights values whose base adjustment import_peft recomputes from the original base
# (not the randomized "pissa_niter_<n>").
PEFT_PRINCIPAL_INITS = PRINCIPAL_INITS
# Config fields of PEFT features that change what the adapter computes; fastlora has none of them.
PEFT_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "lora_bias", "use_qalora", "use_bdlora", "layer_replication",
                    "target_parameters", "trainable_token_indices", "alora_invocation_tokens", "arrow_config",
                    "kasa_config")


def _read_peft(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """adapter_config.json, checked for everything import_peft relies on, and the tensors, both
    from one save (AdapterFormatError)."""

    def read(generation: Generation) -> tuple[dict[str, Any], dict[str, Tensor]]:
        text = generation.read(PEFT_CONFIG)
        if text is None:
            raise AdapterFormatError(f"{path / PEFT_CONFIG} is missing")
        config = _parse_peft_config(text, path)
        data = generation.read(WEIGHTS)
        if data is None:
            raise AdapterFormatError(f"{path / WEIGHTS} is missing")
        return config, parse_safetensors(data, path / WEIGHTS)[0]

    return read_consistently(path, read)


def _parse_peft_config(text: bytes, path: Path) -> dict[str, Any]:
    file = path / PEFT_CONFIG
    try:
        config = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{file} is unreadable ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{file}: not a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterFormatError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = [k for k in PEFT_UNSUPPORTED if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise AdapterFormatError(f"{path}: PEFT features fastlora does not import: {unsupported}")
    init = config.get("init_lora_weights", True)
    if not any(init is v or (isinstance(init, str) and init == v) for v in PEFT_PLAIN_INITS + PEFT_PRINCIPAL_INITS):
        raise AdapterFormatError(
            f"{path}: init_lora_weights={init!r} changes the base weights in a way fastlora cannot recompute "
            "(PiSSA's randomized pissa_niter_<n>, CorDA, LoRA-GA, LoftQ, ...), so this adapter is only right on its "
            "adjusted base model. Convert it to a plain LoRA on the original base with PEFT: save the trained model "
            "with save_pretrained(dir, path_initial_model_for_weight_conversion=<the adapter as initialised>), then "
            "import that directory"
        )
    where = str(file)
    field(config, "r", int, where, 8)
    field(config, "lora_alpha", (int, float), where, 8)
    field(config, "lora_dropout", (int, float), where, 0.0)
    field(config, "use_rslora", bool, where, False)
    for key, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        pattern = field(config, key, (dict, type(None)), where, None) or {}
        for k, v in pattern.items():
            field(pattern, k, kind, f"{where}: {key}")
    saved_modules = field(config, "modules_to_save", (list, type(None)), where, None) or []
    if not all(isinstance(n, str) for n in saved_modules):
        raise AdapterFormatError(f"{where}: modules_to_save must list module names")
    return config


def _sort_tensors(tensors: dict[str, Tensor], saved_modules: list[str]
                  ) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor], list[str], list[str]]:
    """The file's tensors sorted: LoRA factors by layer name and kind, parameters of the
    ``modules_to_save`` (named as in the model), keys that are neither (ignored, as PEFT does), and
    the LoRA weights of kinds fastlora does not import."""
    factors: dict[str, dict[str, Tensor]] = {}
    extras: dict[str, Tensor] = {}
    ignored, problems = [], []
    for key, t in tensors.items():
        parsed = _peft_layer_name(key)
        if parsed is not None:
            factors.setdefault(parsed[0], {})[parsed[1]] = t
        elif "lora_" in key:
            problems.append(f"{key}: a kind of LoRA weight fastlora does not import (only lora_A/lora_B of linear layers)")
        else:
            name = key.removeprefix(PEFT_PREFIX)
            parts = name.split(".")  # a parameter of a module_to_save, or of a module inside one
            if any(name_matches(".".join(parts[:i]), saved_modules) for i in range(1, len(parts))):
                extras[name] = t
            else:
                ignored.append(key)
    return factors, extras, ignored, problems


def _principal(config: dict[str, Any]) -> str | None:
    """"pissa" or "olora" when the adapter was trained against PEFT's residual base, else None."""
    init = config.get("init_lora_weights")
    return init if init in PEFT_PRINCIPAL_INITS else None


def _layer_config(name: str, pair: dict[str, Tensor], module: nn.Module | None, config: dict[str, Any]
                  ) -> tuple[AdapterConfig | None, list[str]]:
    """The configuration of the imported layer ``name`` (None if it cannot have one) and why
    ``pair`` cannot become its adapter in ``module``."""
    if set(pair) != {"lora_A", "lora_B"}:
        return None, [f"{name}: needs both lora_A and lora_B"]
    if not isinstance(module, (nn.Linear, LoRALinear)):
        return None, [f"{name}: no such linear layer in the model"]
    a, b = pair["lora_A"], pair["lora_B"]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != module.in_features or b.shape[0] != module.out_features:
        return None, [f"{name}: adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit a "
                      f"{module.out_features}x{module.in_features} layer"]
    r = pattern_value(name, config.get("rank_pattern"), config.get("r", 8))
    if a.shape[0] != r:
        return None, [f"{name}: lora_A has {a.shape[0]} rows, the configuration says rank {r}"]
    alpha = pattern_value(name, config.get("alpha_pattern"), config.get("lora_alpha", 8))
    try:
        cfg = adapter_config(r, alpha, config.get("lora_dropout", 0.0), config.get("use_rslora", False),
                             _principal(config) or "peft", module.in_features, module.out_features, name)
    except AdapterFormatError as exc:
        return None, [str(exc)]
    # load_factors casts into an existing layer's dtype; new layers are float32 (float64 for float64 files)
    dtype = (module.lora_A.dtype if isinstance(module, LoRALinear)
             else accumulation_dtype(a.dtype) if a.dtype in SUPPORTED_DTYPES else None)
    found = factor_problems(pair, {"lora_A": (r, module.in_features), "lora_B": (module.out_features, r)},
                            dtype, name)
    return cfg, found + target_problems(module, r, name)


def _layer_configs(model: nn.Module, existing: dict[str, LoRALinear], factors: dict[str, dict[str, Tensor]],
                   config: dict[str, Any]) -> tuple[dict[str, AdapterConfig], list[str]]:
    """The imported layers' configurations, and why the factors do not fit the model's layers."""
    modules = dict(model.named_modules())
    configs: dict[str, AdapterConfig] = {}
    problems = []
    for name, pair in factors.items():
        cfg, found = _layer_config(name, pair, existing.get(name, modules.get(name)), config)
        problems += found
        if cfg is not None:
            configs[name] = cfg
    if existing and set(existing) != set(factors):
        problems.append(f"the model's LoRA layers differ from the adapter's: {sorted(set(existing) ^ set(factors))[:4]}")
    if not factors:
        problems.append("no LoRA weights found")
    return configs, problems


def _copies(model: nn.Module, saved_modules: list[str], extras: dict[str, Tensor]) -> list[str]:
    """PEFT's modules_to_save as fastlora's trained copies: the outermost matching modules holding
    saved weights."""
    copies: list[str] = []
    for m in sorted(base_module_names(model), key=lambda n: (n.count("."), n)):
        if (m and name_matches(m, saved_modules) and not inside(m, copies)
                and any(e.startswith(f"{m}.") for e in extras)):
            copies.append(m)
    return copies


def _apply(model: nn.Module, configs: dict[str, AdapterConfig], factors: dict[str, dict[str, Tensor]],
           principal: str | None, copies: list[str], extras: dict[str, Tensor]) -> None:
    """Writes the checked adapter into the model's LoRA layers (their base offsets recomputed for
    PiSSA/OLoRA) and heads."""
    layers = lora_layers(model)
    for name, cfg in configs.items():
        layer = layers[name]
        offset = None
        if principal is not None:  # PEFT's residual base: the principal part of the original weight
            a0, b0 = principal_factors(original_weight(layer), cfg.r, cfg.scaling, principal)
            offset = (a0.to(layer.lora_A.dtype), b0.to(layer.lora_B.dtype))
        layer.load_factors(factors[name]["lora_A"], factors[name]["lora_B"], cfg, base_offset=offset)
    apply_heads(model, copies, extras)


@torch.no_grad()
def import_peft(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Loads a PEFT LoRA adapter directory (from ``save_pretrained`` or :func:`export_peft`) into
    ``model`` (the base model, or one with matching, unmerged fastlora adapters) and returns it.

    Supported: plain LoRA on linear layers, with ``rank_pattern`` / ``alpha_pattern``, rsLoRA and
    ``modules_to_save``. Module names are matched exactly; weights of other modules in the file
    are ignored (as PEFT does). Afterwards the model computes the original base plus the imported
    adapter (a LoRA-GA offset it carried is removed).

    ``model`` holds the original base weights. PiSSA and OLoRA adapters (``init_lora_weights``
    "pissa" / "olora", saved without PEFT's conversion) are trained against the residual base
    PEFT made: the same principal part is computed again from the original weights and kept as
    the layer's base offset, so the model computes PEFT's residual plus the adapter (converted
    adapters are plain LoRA). Adapters whose base change cannot be recomputed (randomized
    ``pissa_niter_<n>``, CorDA, LoftQ, LoRA-GA) are refused with the way to convert them.
    Everything is checked before the model changes.
    """
    path = Path(path)
    refuse_peft_model(model)
    config, tensors = _read_peft(path)
    existing = lora_layers(model)
    refuse_merged(existing, "importing an adapter")
    factors, extras, ignored, problems = _sort_tensors(tensors, config.get("modules_to_save") or [])
    configs, found = _layer_configs(model, existing, factors, config)
    copies = _copies(model, config.get("modules_to_save") or [], extras)
    problems += found + head_problems(model, copies, extras, list(factors), replaces=bool(existing))
    if problems:
        raise AdapterFormatError(f"{path} does not fit this model: " + "; ".join(problems[:6]))
    if ignored:
        logger.warning("fastlora: ignored %d weights of %s that are neither LoRA factors nor modules_to_save: %s",
                       len(ignored), path, ignored[:4])

    def apply(model: nn.Module) -> None:
        _apply(model, configs, factors, _principal(config), copies, extras)

    if existing:
        with transaction(model):
            apply(model)
    else:
        # float32 master adapters, as inject's default; float64 files keep their precision
        dtypes = {n: accumulation_dtype(factors[n]["lora_A"].dtype) for n in configs}
        add_layers(model, configs, dtypes, then=apply, copies=copies)
    logger.info("fastlora: imported %d LoRA layers from the PEFT adapter %s", len(factors), path)
    return model
