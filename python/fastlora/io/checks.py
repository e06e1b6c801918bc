"""Validation both formats share: configuration fields, adapter configurations, the layers an
adapter goes into and the factors it brings. Each check returns (or raises) what is wrong in
words, before anything changes."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ..functional import SUPPORTED_DTYPES
from ..layer import AdapterConfig, LoRALinear, check_base_layer, check_factors
from .files import AdapterFormatError

def check_dtypes(tensors: dict[str, Tensor], where: str) -> list[str]:
    """Problems with tensors that are not of an adapter dtype (float8 and others have no finiteness
    check, integers and complex numbers are no adapters)."""
    return [f"{where}: {key} has dtype {t.dtype}; adapters are real floating-point tensors of "
            f"{', '.join(dtype_name(d) for d in SUPPORTED_DTYPES)}"
            for key, t in tensors.items() if t.dtype not in SUPPORTED_DTYPES]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def field(cfg: dict, key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    """cfg[key] if it has the type ``kind`` (bool is not a number here), else AdapterFormatError."""
    if key not in cfg:
        if default is ...:
            raise AdapterFormatError(f"{where}: '{key}' is missing")
        return default
    value = cfg[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise AdapterFormatError(f"{where}: '{key}' must be {names}, got {value!r}")
    return value


def adapter_config(r: Any, alpha: Any, dropout: Any, use_rslora: Any, init: str, in_f: int, out_f: int,
                   where: str) -> AdapterConfig:
    """The validated AdapterConfig, or AdapterFormatError saying what is wrong."""
    try:
        config = AdapterConfig(r, alpha, dropout, use_rslora, init)
        config.check(in_f, out_f, where)
    except (TypeError, ValueError) as exc:
        raise AdapterFormatError(str(exc)) from None
    return dataclasses.replace(config, lora_alpha=float(alpha), lora_dropout=float(dropout))


def target_problems(module: nn.Module, r: int, name: str) -> list[str]:
    """Why an adapter of rank r cannot go into ``module`` (an existing LoRA layer of another rank,
    or a linear layer fastlora cannot wrap)."""
    if isinstance(module, LoRALinear):
        if module.r != r:
            return [f"{name}: rank {module.r} in the model, {r} in the adapter (load it into the base model)"]
        return []
    try:
        check_base_layer(module, name)
    except TypeError as exc:
        return [str(exc)]
    return []


def factor_problems(tensors: dict[str, Tensor | None], shapes: dict[str, tuple[int, int]], dtype: torch.dtype,
                    name: str) -> list[str]:
    """Why these factors cannot become a layer's adapter in ``dtype``: missing, not of an adapter dtype,
    misshapen, or not finite (in the file or once cast to ``dtype``)."""
    problems = check_dtypes({k: t for k, t in tensors.items() if isinstance(t, Tensor)}, name)
    if problems:
        return problems
    try:
        check_factors(tensors, shapes, name, dtype)
    except ValueError as exc:
        return [str(exc)]
    return []
