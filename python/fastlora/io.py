"""Saving and loading adapters, and PEFT interoperability.

- :func:`save_adapter` / :func:`load_adapter`: fastlora's own format, one ``adapter_model.safetensors``
  whose metadata holds the per-layer configuration (rank, alpha, scale mode, dropout, init method),
  plus a readable copy of it in ``fastlora_config.json``.
- :func:`export_peft` / :func:`import_peft`: PEFT's ``adapter_config.json`` +
  ``adapter_model.safetensors``, loadable with ``peft.PeftModel.from_pretrained`` on the original
  base model.

Every write builds the whole directory next to the target and swaps it in atomically (Linux
``renameat2(RENAME_EXCHANGE)``), so a crash at any point leaves the previous adapter intact and
loadable. Every load reads and checks everything before changing the model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .inject import inject, lora_layers
from .layer import LoRALinear
from .targets import pattern_value

__all__ = ["save_adapter", "load_adapter", "export_peft", "import_peft", "AdapterFormatError"]

logger = logging.getLogger("fastlora")

FORMAT = "fastlora-adapter"
VERSION = 1
WEIGHTS = "adapter_model.safetensors"
CONFIG = "fastlora_config.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


class AdapterFormatError(ValueError):
    """An adapter directory is missing, corrupted, or does not fit the model."""


# ---- atomic directory writes --------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> None:
    """Atomically swaps two directories (Linux renameat2 RENAME_EXCHANGE); elsewhere two renames
    with a short window in which ``b`` is missing (its old content stays in a sibling)."""
    libc_name = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    if renameat2 is not None:
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
    aside = Path(tempfile.mkdtemp(prefix=f".{b.name}.old-", dir=b.parent))
    aside.rmdir()
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def _write_directory(target: Path, write: Callable[[Path], None]) -> None:
    """Writes a directory's files with ``write(tmpdir)`` and puts them in place atomically; other
    files already in ``target`` are kept."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        if target.exists():
            for entry in target.iterdir():  # the user's own files (a README, say) stay
                if not (tmp / entry.name).exists():
                    if entry.is_dir():
                        shutil.copytree(entry, tmp / entry.name, symlinks=True)
                    else:
                        try:
                            os.link(entry, tmp / entry.name)
                        except OSError:
                            shutil.copy2(entry, tmp / entry.name)
            _fsync(tmp)
            _exchange(tmp, target)
        else:
            _fsync(tmp)
            os.rename(tmp, target)
        _fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the old content after an exchange


def _save_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _load_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise AdapterFormatError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupted headers
        raise AdapterFormatError(f"{path} is not a readable safetensors file ({exc})") from exc
    return tensors, metadata


# ---- fastlora's own format ----------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _plain_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters outside the adapters by their names in the model without adapters (a LoRA
    layer's ``<name>.base_layer.weight`` is ``<name>.weight``), so names survive (un)injection."""
    layers = lora_layers(model)
    adapters = {id(p) for layer in layers.values() for p in (layer.lora_A, layer.lora_B)}
    out = {}
    for name, p in model.named_parameters():
        if id(p) in adapters:
            continue
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer") or owner == "base_layer":
            layer_name = owner.removesuffix("base_layer").removesuffix(".")
            if layer_name in layers:
                name = f"{layer_name}.{leaf}" if layer_name else leaf
        out[name] = p
    return out


def _trainable_extras(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters outside the adapters (a classification head, say)."""
    return {n: p for n, p in _plain_parameters(model).items() if p.requires_grad}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Saves every LoRA layer's adapters and configuration, and the model's other trainable
    parameters, to the directory ``path`` (created or replaced atomically).

    LoRA-GA layers also store ``A0``, ``B0``: loading onto the original base model re-applies the
    base offset, and :func:`export_peft` can express the adapter relative to the original base.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    tensors: dict[str, Tensor] = {}
    config: dict[str, Any] = {"format": FORMAT, "version": VERSION, "layers": {}, "trainable": []}
    for name, layer in layers.items():
        tensors[f"{name}.lora_A"] = layer.lora_A
        tensors[f"{name}.lora_B"] = layer.lora_B
        has_offset = hasattr(layer, "lora_A0")
        if has_offset:
            tensors[f"{name}.lora_A0"] = layer.lora_A0
            tensors[f"{name}.lora_B0"] = layer.lora_B0
        config["layers"][name] = {
            "r": layer.r,
            "lora_alpha": layer.lora_alpha,
            "use_rslora": layer.use_rslora,
            "scaling": layer.scaling,
            "lora_dropout": layer.lora_dropout,
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "adapter_dtype": _dtype_name(layer.lora_A.dtype),
            "init": layer.init_method,
            "base_offset": has_offset,
            "merged": layer.merged,
        }
    for name, p in _trainable_extras(model).items():
        tensors[f"trainable.{name}"] = p
        config["trainable"].append(name)
    text = json.dumps(config, indent=2, sort_keys=True)

    def write(tmp: Path) -> None:
        _save_safetensors(tmp / WEIGHTS, tensors, {"fastlora": text})
        (tmp / CONFIG).write_text(text)

    path = Path(path)
    _write_directory(path, write)
    logger.info("fastlora: saved %d LoRA layers to %s", len(layers), path)
    return path


def _read_fastlora(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    tensors, metadata = _load_safetensors(path / WEIGHTS)
    if "fastlora" not in metadata:
        raise AdapterFormatError(f"{path / WEIGHTS} has no fastlora configuration; for a PEFT adapter use import_peft")
    try:
        config = json.loads(metadata["fastlora"])
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{path / WEIGHTS}: unreadable configuration ({exc})") from exc
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise AdapterFormatError(f"{path}: not a {FORMAT} v{VERSION} directory")
    return config, tensors


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike, apply_base_offset: bool | None = None) -> nn.Module:
    """Loads an adapter saved by :func:`save_adapter` into ``model`` and returns it.

    A model without adapters gets them (``inject`` with the saved per-layer ranks and scales);
    a model with adapters must have exactly the saved layers and shapes. Everything is checked
    before anything changes: on any mismatch the model is left as it was.

    ``apply_base_offset``: for LoRA-GA layers, subtract ``s·B0 A0`` from the base weight (needed
    on the original base). ``None`` decides per layer: applied unless the layer already carries the
    same ``A0`` (the base it belongs to already has it).
    """
    path = Path(path)
    config, tensors = _read_fastlora(path)
    saved = config["layers"]
    existing = lora_layers(model)
    modules = dict(model.named_modules())
    problems = []
    if existing and set(existing) != set(saved):
        problems.append(f"the model's LoRA layers {sorted(set(existing) ^ set(saved))[:4]} differ from the adapter's")
    for name, cfg in saved.items():
        module = existing.get(name, modules.get(name))
        if not isinstance(module, (nn.Linear, LoRALinear)):
            problems.append(f"{name}: no such linear layer in the model")
            continue
        if (module.in_features, module.out_features) != (cfg["in_features"], cfg["out_features"]):
            problems.append(f"{name}: the model's layer is {module.out_features}x{module.in_features}, "
                            f"the adapter's {cfg['out_features']}x{cfg['in_features']}")
        if isinstance(module, LoRALinear) and module.r != cfg["r"]:
            problems.append(f"{name}: rank {module.r} in the model, {cfg['r']} in the adapter")
        expect = {"lora_A": (cfg["r"], cfg["in_features"]), "lora_B": (cfg["out_features"], cfg["r"])}
        if cfg.get("base_offset"):
            expect.update({"lora_A0": expect["lora_A"], "lora_B0": expect["lora_B"]})
        for key, shape in expect.items():
            t = tensors.get(f"{name}.{key}")
            if t is None or tuple(t.shape) != shape:
                problems.append(f"{name}.{key}: expected shape {shape}, found "
                                f"{None if t is None else tuple(t.shape)}")
    params = _plain_parameters(model)  # the same Parameter objects after any injection below
    for name in config.get("trainable", []):
        t, p = tensors.get(f"trainable.{name}"), params.get(name)
        if t is None or p is None or t.shape != p.shape:
            problems.append(f"trainable parameter {name}: not in the model or the adapter, or shapes differ")
    if problems:
        raise AdapterFormatError(f"{path} does not fit this model: " + "; ".join(problems[:6]))

    if not existing:
        names = list(saved)
        first = saved[names[0]]
        inject(model, names, r=first["r"], lora_alpha=first["lora_alpha"], lora_dropout=first["lora_dropout"],
               rank_pattern={n: c["r"] for n, c in saved.items()},
               alpha_pattern={n: c["lora_alpha"] for n, c in saved.items()},
               use_rslora=first["use_rslora"], adapter_dtype=getattr(torch, first["adapter_dtype"]),
               trainable_modules=None)
    layers = lora_layers(model)
    for name, cfg in saved.items():
        layer = layers[name]
        layer.lora_alpha, layer.use_rslora, layer.lora_dropout = cfg["lora_alpha"], cfg["use_rslora"], cfg["lora_dropout"]
        layer.lora_A.copy_(tensors[f"{name}.lora_A"])
        layer.lora_B.copy_(tensors[f"{name}.lora_B"])
        layer.init_method = cfg["init"]
        if cfg.get("base_offset"):
            a0, b0 = tensors[f"{name}.lora_A0"], tensors[f"{name}.lora_B0"]
            present = hasattr(layer, "lora_A0") and torch.equal(layer.lora_A0.cpu(), a0)
            if apply_base_offset or (apply_base_offset is None and not present):
                offset = layer.delta_weight(a0, b0)
                w = layer.base_layer.weight
                w.copy_((w.to(offset.dtype) - offset).to(w.dtype))
            layer.register_buffer("lora_A0", a0.to(layer.lora_A.device, layer.lora_A.dtype), persistent=False)
            layer.register_buffer("lora_B0", b0.to(layer.lora_B.device, layer.lora_B.dtype), persistent=False)
    for name in config.get("trainable", []):
        params[name].copy_(tensors[f"trainable.{name}"])
        params[name].requires_grad_(True)
    logger.info("fastlora: loaded %d LoRA layers from %s", len(saved), path)
    return model


# ---- PEFT ------------------------------------------------------------------------------------------


def _peft_factors(layer: LoRALinear, fold_scaling: bool) -> tuple[Tensor, Tensor, int, float, bool]:
    """(A, B, r, alpha, use_rslora) of a layer as PEFT stores it, relative to the original base:
    a LoRA-GA layer becomes the rank-2r adapter ``[B, −B0] [A; A0]``."""
    a, b, r, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.r, layer.scaling
    if hasattr(layer, "lora_A0"):
        a = torch.cat([a, layer.lora_A0.to(a.dtype)], dim=0)
        b = torch.cat([b, -layer.lora_B0.to(b.dtype)], dim=1)
        r = 2 * r
    if fold_scaling:
        return a, (b.float() * s).to(b.dtype), r, float(r), False
    alpha = s * (r**0.5 if layer.use_rslora else r)  # keeps PEFT's scale equal to s at rank r
    return a, b, r, alpha, layer.use_rslora


def export_peft(
    model: nn.Module,
    path: str | os.PathLike,
    fold_scaling: bool = False,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Writes the adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``),
    for ``peft.PeftModel.from_pretrained`` on the original base model.

    Per-layer ranks and scales (GoRA) go to ``rank_pattern`` / ``alpha_pattern``; LoRA-GA layers
    are written as rank-2r adapters relative to the original weights; other trainable modules
    (a classifier head) as ``modules_to_save``.

    ``fold_scaling=True`` writes ``s_i·B_i`` with ``lora_alpha = r`` (``alpha_pattern =
    rank_pattern``) and no rsLoRA, so every layer's scale is 1: use it for loaders that ignore
    ``rank_pattern`` / ``alpha_pattern`` and apply one global ``lora_alpha / r`` (vLLM and other
    serving engines); use the default for PEFT itself, which keeps the adapters as trained.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to export")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"unmerge layers {merged[:4]} before exporting (merged weights are in the base)")
    tensors: dict[str, Tensor] = {}
    ranks, alphas, rslora, dropouts = {}, {}, set(), set()
    for name, layer in layers.items():
        a, b, r, alpha, use_rslora = _peft_factors(layer, fold_scaling)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        ranks[name], alphas[name] = r, alpha
        rslora.add(use_rslora)
        dropouts.add(layer.lora_dropout)
    if len(rslora) > 1:  # mixed (never with fold_scaling): express every scale as alpha / r
        for name, layer in layers.items():
            alphas[name] = layer.scaling * ranks[name]
        rslora = {False}
    extras = _trainable_extras(model)
    save_modules = sorted({n.rpartition(".")[0] for n in extras})
    for n, p in extras.items():
        tensors[f"{PEFT_PREFIX}{n}"] = p
    r_default = Counter(ranks.values()).most_common(1)[0][0]
    alpha_default = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r_default,
        "lora_alpha": alpha_default,
        "rank_pattern": {n: r for n, r in ranks.items() if r != r_default},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha_default},
        "use_rslora": rslora.pop(),
        "target_modules": list(layers),
        "lora_dropout": max(dropouts),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": save_modules or None,
        "inference_mode": True,
        "use_dora": False,
    }

    def write(tmp: Path) -> None:
        _save_safetensors(tmp / WEIGHTS, tensors, {"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))

    path = Path(path)
    _write_directory(path, write)
    logger.info("fastlora: exported %d LoRA layers in PEFT's format to %s%s", len(layers), path,
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


@torch.no_grad()
def import_peft(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Loads a PEFT LoRA adapter directory (from ``save_pretrained`` or :func:`export_peft`) into
    ``model`` (the base model, or one with matching fastlora adapters) and returns it.

    Supported: plain LoRA on linear layers, with ``rank_pattern`` / ``alpha_pattern``, rsLoRA and
    ``modules_to_save``. Everything is checked before the model changes.
    """
    path = Path(path)
    try:
        config = json.loads((path / PEFT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{path / PEFT_CONFIG} is missing or unreadable ({exc})") from exc
    if config.get("peft_type") != "LORA":
        raise AdapterFormatError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "lora_bias") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise AdapterFormatError(f"{path}: PEFT features fastlora does not import: {unsupported}")
    tensors, _ = _load_safetensors(path / WEIGHTS)
    factors: dict[str, dict[str, Tensor]] = {}
    extras: dict[str, Tensor] = {}
    for key, t in tensors.items():
        parsed = _peft_layer_name(key)
        if parsed is None:
            extras[key.removeprefix(PEFT_PREFIX)] = t
        else:
            factors.setdefault(parsed[0], {})[parsed[1]] = t
    modules = dict(model.named_modules())
    params = _plain_parameters(model)
    existing = lora_layers(model)
    problems, ranks, alphas = [], {}, {}
    for name, pair in factors.items():
        module = existing.get(name, modules.get(name))
        if set(pair) != {"lora_A", "lora_B"}:
            problems.append(f"{name}: needs both lora_A and lora_B")
            continue
        a, b = pair["lora_A"], pair["lora_B"]
        r = a.shape[0]
        if not isinstance(module, (nn.Linear, LoRALinear)):
            problems.append(f"{name}: no such linear layer in the model")
        elif a.shape != (r, module.in_features) or b.shape != (module.out_features, r):
            problems.append(f"{name}: adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit a "
                            f"{module.out_features}x{module.in_features} layer")
        elif isinstance(module, LoRALinear) and module.r != r:
            problems.append(f"{name}: rank {module.r} in the model, {r} in the adapter")
        ranks[name] = r
        alphas[name] = pattern_value(name, config.get("alpha_pattern"), config.get("lora_alpha", 8))
    if existing and set(existing) != set(factors):
        problems.append(f"the model's LoRA layers differ from the adapter's: {sorted(set(existing) ^ set(factors))[:4]}")
    for name, t in extras.items():
        if name not in params or params[name].shape != t.shape:
            problems.append(f"{name}: not a parameter of the model with shape {tuple(t.shape)}")
    if not factors:
        problems.append("no LoRA weights found")
    if problems:
        raise AdapterFormatError(f"{path} does not fit this model: " + "; ".join(problems[:6]))

    use_rslora = bool(config.get("use_rslora", False))
    if not existing:
        names = list(factors)
        inject(model, names, r=ranks[names[0]], lora_alpha=alphas[names[0]],
               lora_dropout=float(config.get("lora_dropout", 0.0)), rank_pattern=ranks, alpha_pattern=alphas,
               use_rslora=use_rslora)
    layers = lora_layers(model)
    for name, pair in factors.items():
        layer = layers[name]
        layer.lora_alpha, layer.use_rslora = float(alphas[name]), use_rslora
        layer.lora_A.copy_(pair["lora_A"])
        layer.lora_B.copy_(pair["lora_B"])
    for name, t in extras.items():
        params[name].copy_(t)
        params[name].requires_grad_(True)
    logger.info("fastlora: imported %d LoRA layers from the PEFT adapter %s", len(factors), path)
    return model
