"""Choosing a model's target layers by name, with PEFT's matching rules (shared by ``inject`` and
the gradient engine)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from torch import nn

from .copies import trainable_copies
from .layer import LoRALinear, lora_layers

__all__ = ["Targets", "check_targets", "find_linear_targets", "name_matches", "pattern_value"]

# Leaf names of output heads that "all-linear" leaves alone (besides get_output_embeddings()).
_HEAD_NAMES = ("lm_head", "score", "classifier")

Targets = str | Iterable[str]


def name_matches(name: str, targets: Targets) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list matches a name
    equal to an entry or ending in "." + entry."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def pattern_value(name: str, patterns: Mapping[str, float] | None, default):
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


def check_targets(targets, what: str) -> None:
    """TypeError/ValueError unless ``targets`` is a valid regex string or a list of names."""
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise ValueError(f"{what}={targets!r} is not a valid regular expression: {exc}") from None
    elif not isinstance(targets, Iterable) or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"{what} must be a regex string, 'all-linear' or a list of module names, got {targets!r}")


def find_linear_targets(
    model: nn.Module,
    target_modules: Targets,
    exclude_modules: Targets | None = None,
    include_adapted: bool = False,
) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` that ``target_modules`` selects, in module order.

    ``"all-linear"`` selects every ``nn.Linear`` except the output head (``get_output_embeddings()``
    and modules named lm_head/score/classifier); a regex must match a full module name; a list
    matches names or name suffixes. Layers that already have an adapter (``LoRALinear``) are
    skipped, or selected whole when ``include_adapted`` (never their inner ``base_layer``); so is
    everything inside a ``modules_to_save`` copy (its original and its trained copy).

    Raises:
        ValueError: nothing matched, or a matched module is not a linear layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    all_linear = target_modules == "all-linear"
    if not all_linear:
        check_targets(target_modules, "target_modules")
    if exclude_modules is not None:
        check_targets(exclude_modules, "exclude_modules")
    excluded = _output_heads(model) if all_linear else set()
    adapted = set(lora_layers(model))
    copies = list(trainable_copies(model))
    found = []
    for name, module in model.named_modules():
        if not name or name in excluded or name.rpartition(".")[0] in adapted:
            continue
        if any(name.startswith(f"{c}.") for c in copies):
            continue
        if isinstance(module, LoRALinear) and not include_adapted:
            continue
        if exclude_modules is not None and name_matches(name, exclude_modules):
            continue
        if all_linear:
            if not isinstance(module, (nn.Linear, LoRALinear)):
                continue
        elif not name_matches(name, target_modules):
            continue
        if not isinstance(module, (nn.Linear, LoRALinear)):
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) matches target_modules={target_modules!r}, "
                "but fastlora adapts nn.Linear layers only; name the linear layers themselves"
            )
        found.append((name, module))
    if not found:
        again = [n for n in adapted if not (exclude_modules is not None and name_matches(n, exclude_modules))
                 and (all_linear or name_matches(n, target_modules))]
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[0] not in adapted
                  and not any(n.startswith(f"{c}.") for c in copies)]
        hints = []
        if again:
            hints.append(f"{sorted(again)[:4]} are already adapted: fastlora keeps one adapter per layer; change a "
                         "rank with layer.set_rank, or fastlora.unload(model) first to start over")
        if copies and not linear:
            hints.append("the other linear layers are in modules_to_save copies")
        if not hints:
            hints.append(f"linear layers: {linear[:8]}")
        raise ValueError(f"no module matched target_modules={target_modules!r} ({'; '.join(hints)})")
    return found
