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
import dataclasses
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

from .copies import COPY, trainable_copies
from .functional import SUPPORTED_DTYPES
from .inject import add_layers, refuse_peft_model
from .layer import RECORDED_INITS, AdapterConfig, LoRALinear, check_base_layer, check_factors, lora_layers
from .reference import accumulation_dtype
from .targets import name_matches, pattern_value

__all__ = ["save_adapter", "load_adapter", "export_peft", "import_peft", "AdapterFormatError", "infer_task_type"]

logger = logging.getLogger("fastlora")

FORMAT = "fastlora-adapter"
VERSION = 1
WEIGHTS = "adapter_model.safetensors"
CONFIG = "fastlora_config.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
HF_WEIGHTS = "fastlora_adapter.safetensors"  # fastlora's format in a save_pretrained directory


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


def _locked(fd: int, blocking: bool = True) -> bool:
    """Takes an exclusive flock on ``fd``; False if another process holds it (non-blocking), or
    where flock does not exist (then nothing is ever taken for stale)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return blocking
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _remove_stale(parent: Path, prefix: str) -> None:
    """Removes temporary directories ``prefix*`` whose writer died (a live writer holds a lock on
    its own; the caller holds the parent's lock, under which writers lock theirs)."""
    for entry in parent.glob(f"{prefix}*"):
        if entry.is_symlink() or not entry.is_dir():
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            if _locked(fd, blocking=False):
                shutil.rmtree(entry, ignore_errors=True)
                logger.info("fastlora: removed %s, left by an interrupted save", entry)
        finally:
            os.close(fd)


def write_directory(target: Path, write: Callable[[Path], None]) -> None:
    """Writes a directory's files with ``write(tmpdir)`` and puts them in place atomically; other
    files already in ``target`` are kept. A symlink is written through (its target directory is
    replaced); temporary directories left by killed saves of the same target are cleaned up."""
    target = Path(target)
    if target.is_symlink():
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    parent_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:  # under the parent's lock: a new directory is locked before anyone may look for stale ones
        _locked(parent_fd)
        _remove_stale(target.parent, prefix)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        tmp_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        _locked(tmp_fd)
    finally:
        os.close(parent_fd)  # closing releases the lock
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
        os.close(tmp_fd)


def save_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
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


def _trainable_extras(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters outside the adapters (a classification head, say)."""
    return {n: p for n, p in _plain_parameters(model).items() if p.requires_grad}


def fastlora_state(model: nn.Module) -> tuple[dict[str, Tensor], str]:
    """The tensors and the JSON configuration of fastlora's format for ``model``'s adapters."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
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
            "adapter_dtype": _dtype_name(layer.lora_A.dtype),
            "init": layer.init_method,
            "base_offset": has_offset,
            "merged": layer.merged,
        }
    for name, p in _trainable_extras(model).items():
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
        save_safetensors(tmp / WEIGHTS, tensors, {"fastlora": text})
        (tmp / CONFIG).write_text(text)

    path = Path(path)
    write_directory(path, write)
    logger.info("fastlora: saved %d LoRA layers to %s", len(lora_layers(model)), path)
    return path


def _read_fastlora(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not path.is_dir():
        raise AdapterFormatError(f"{path} is missing or not an adapter directory")
    # A save_pretrained directory keeps fastlora's format beside PEFT's adapter_model.safetensors.
    tensors, metadata = _load_safetensors(path / HF_WEIGHTS if (path / HF_WEIGHTS).is_file() else path / WEIGHTS)
    if "fastlora" not in metadata:
        raise AdapterFormatError(f"{path / WEIGHTS} has no fastlora configuration; for a PEFT adapter use import_peft")
    try:
        config = json.loads(metadata["fastlora"])
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{path / WEIGHTS}: unreadable configuration ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("version") != VERSION:
        raise AdapterFormatError(f"{path}: not a {FORMAT} v{VERSION} directory")
    return config, tensors


def _field(cfg: dict, key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
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


def _adapter_config(r: Any, alpha: Any, dropout: Any, use_rslora: Any, init: str, in_f: int, out_f: int,
                    where: str) -> AdapterConfig:
    """The validated AdapterConfig, or AdapterFormatError saying what is wrong."""
    try:
        config = AdapterConfig(r, alpha, dropout, use_rslora, init)
        config.check(in_f, out_f, where)
    except (TypeError, ValueError) as exc:
        raise AdapterFormatError(str(exc)) from None
    return dataclasses.replace(config, lora_alpha=float(alpha), lora_dropout=float(dropout))


def _saved_layers(config: dict[str, Any], path: Path) -> dict[str, tuple[AdapterConfig, int, int, torch.dtype, bool]]:
    """name -> (config, in_features, out_features, adapter dtype, has a base offset), checked."""
    layers = _field(config, "layers", dict, str(path))
    if not layers:
        raise AdapterFormatError(f"{path}: the adapter has no layers")
    dtypes = {_dtype_name(d): d for d in SUPPORTED_DTYPES}
    out = {}
    for name, cfg in layers.items():
        where = f"{path}: layer {name!r}"
        if not isinstance(cfg, dict):
            raise AdapterFormatError(f"{where}: its configuration is not a mapping")
        in_f, out_f = _field(cfg, "in_features", int, where), _field(cfg, "out_features", int, where)
        dtype = dtypes.get(_field(cfg, "adapter_dtype", str, where))
        if dtype is None:
            raise AdapterFormatError(f"{where}: adapter_dtype {cfg['adapter_dtype']!r} is not one of {list(dtypes)}")
        init = _field(cfg, "init", str, where)
        if init not in RECORDED_INITS:
            raise AdapterFormatError(f"{where}: init {init!r} is not one of {RECORDED_INITS}")
        adapter = _adapter_config(_field(cfg, "r", int, where), _field(cfg, "lora_alpha", (int, float), where),
                                  _field(cfg, "lora_dropout", (int, float), where),
                                  _field(cfg, "use_rslora", bool, where), init, in_f, out_f, where)
        out[name] = (adapter, in_f, out_f, dtype, _field(cfg, "base_offset", bool, where, False))
    for key in ("trainable", "modules_to_save"):
        names = _field(config, key, list, str(path), [])
        if not all(isinstance(n, str) for n in names):
            raise AdapterFormatError(f"{path}: '{key}' must list names")
    return out


BASE_WEIGHTS = {None: "recorded", True: "original", False: "offset"}


def _target_problems(module: nn.Module, r: int, name: str) -> list[str]:
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


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike, apply_base_offset: bool | None = None) -> nn.Module:
    """Loads an adapter saved by :func:`save_adapter` into ``model`` and returns it.

    A model without adapters gets them (on exactly the saved module names, with the saved ranks
    and scales); a model with adapters must have exactly the saved layers, ranks and shapes, and
    must not be merged. Afterwards the model computes the original base plus the loaded adapter,
    whatever adapter it held before. Everything is checked before anything changes: on any
    mismatch the model is left as it was.

    ``apply_base_offset`` (LoRA-GA layers store ``A0``, ``B0``; the base must hold ``W − s·B0 A0``):
    ``None`` lets each layer's record decide (the offset it carries, if any, is replaced; nothing
    moves if it is the same); ``True`` says the base weights are the original ones (the offset is
    applied whatever is recorded); ``False`` says they already hold this adapter's offset (a
    model saved whole after LoRA-GA, say).
    """
    path = Path(path)
    if apply_base_offset not in BASE_WEIGHTS:
        raise TypeError(f"apply_base_offset must be None, True or False, got {apply_base_offset!r}")
    refuse_peft_model(model)
    config, tensors = _read_fastlora(path)
    saved = _saved_layers(config, path)
    existing = lora_layers(model)
    merged = [n for n, layer in existing.items() if layer.merged]
    if merged:
        raise RuntimeError(f"layers {merged[:4]} are merged: call fastlora.unmerge(model) before loading an adapter")
    modules = dict(model.named_modules())
    problems = []
    if existing and set(existing) != set(saved):
        problems.append(f"the model's LoRA layers {sorted(set(existing) ^ set(saved))[:4]} differ from the adapter's")
    for name, (cfg, in_f, out_f, _, has_offset) in saved.items():
        module = existing.get(name, modules.get(name))
        if not isinstance(module, (nn.Linear, LoRALinear)):
            problems.append(f"{name}: no such linear layer in the model")
            continue
        if (module.in_features, module.out_features) != (in_f, out_f):
            problems.append(f"{name}: the model's layer is {module.out_features}x{module.in_features}, "
                            f"the adapter's {out_f}x{in_f}")
            continue
        problems += _target_problems(module, cfg.r, name)
        keys = ("lora_A", "lora_B") + (("lora_A0", "lora_B0") if has_offset else ())
        shapes = {"lora_A": (cfg.r, in_f), "lora_B": (out_f, cfg.r)}
        shapes.update({"lora_A0": shapes["lora_A"], "lora_B0": shapes["lora_B"]})
        try:
            check_factors({k: tensors.get(f"{name}.{k}") for k in keys}, {k: shapes[k] for k in keys}, name)
        except ValueError as exc:
            problems.append(str(exc))
    params = _plain_parameters(model)
    for name in config.get("trainable", []):
        t, p = tensors.get(f"trainable.{name}"), params.get(name)
        if t is None or p is None or t.shape != p.shape:
            problems.append(f"trainable parameter {name}: not in the model or the adapter, or shapes differ")
        elif not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            problems.append(f"trainable parameter {name}: not finite floating-point values")
    if problems:
        raise AdapterFormatError(f"{path} does not fit this model: " + "; ".join(problems[:6]))

    copies = config.get("modules_to_save", [])
    if not existing:
        bad = [n for n in copies if n not in modules or n in saved or any(n.startswith(f"{s}.") for s in saved)]
        if bad:
            raise AdapterFormatError(f"{path} does not fit this model: modules_to_save {bad[:4]} are not modules "
                                     "of the model apart from the adapted layers")

    def apply(model: nn.Module) -> None:
        layers = lora_layers(model)
        for name, (cfg, *_, has_offset) in saved.items():
            offset = (tensors[f"{name}.lora_A0"], tensors[f"{name}.lora_B0"]) if has_offset else None
            layers[name].set_adapter(tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"], cfg, offset,
                                     BASE_WEIGHTS[apply_base_offset])
        now = _plain_parameters(model)  # modules_to_save copies are new Parameters
        for name in config.get("trainable", []):
            now[name].copy_(tensors[f"trainable.{name}"])
            now[name].requires_grad_(True)

    if existing:
        apply(model)
    else:
        add_layers(model, {n: v[0] for n, v in saved.items()}, {n: v[3] for n, v in saved.items()}, then=apply,
                   copies=copies)
    logger.info("fastlora: loaded %d LoRA layers from %s", len(saved), path)
    return model


# ---- PEFT ------------------------------------------------------------------------------------------


def _peft_factors(layer: LoRALinear, fold_scaling: bool) -> tuple[Tensor, Tensor, int, float, bool]:
    """(A, B, r, alpha, use_rslora) of a layer as PEFT stores it, relative to the original base:
    a LoRA-GA layer becomes the rank-2r adapter ``[B, −B0] [A; A0]``."""
    a, b, r, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.r, layer.scaling
    if layer.base_offset is not None:
        a0, b0 = layer.base_offset
        a = torch.cat([a, a0.to(a.dtype)], dim=0)
        b = torch.cat([b, -b0.to(b.dtype)], dim=1)
        r = 2 * r
    if fold_scaling:
        return a, (b.float() * s).to(b.dtype), r, float(r), False
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


def peft_state(
    model: nn.Module,
    fold_scaling: bool = False,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and ``adapter_config.json`` of PEFT's format for ``model``'s adapters (see
    :func:`export_peft`)."""
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
        "task_type": task_type if task_type is not None else infer_task_type(model),
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
    return tensors, config


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
        save_safetensors(tmp / WEIGHTS, tensors, {"format": "pt"})
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
# Config fields of PEFT features that change what the adapter computes; fastlora has none of them.
PEFT_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "lora_bias", "use_qalora", "use_bdlora", "layer_replication",
                    "target_parameters", "trainable_token_indices", "alora_invocation_tokens", "arrow_config",
                    "kasa_config")


def _read_peft_config(path: Path) -> dict[str, Any]:
    """adapter_config.json, checked for everything import_peft relies on (AdapterFormatError)."""
    file = path / PEFT_CONFIG
    if not path.is_dir() or not file.is_file():  # is_file: a FIFO or device would block the read
        raise AdapterFormatError(f"{file} is missing or not a regular file")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
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
    if not any(init is v or (isinstance(init, str) and init == v) for v in PEFT_PLAIN_INITS):
        raise AdapterFormatError(
            f"{path}: init_lora_weights={init!r} changes the base weights (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ, ...), "
            "so this adapter is only right on its adjusted base model. Convert it to a plain LoRA on the original "
            "base with PEFT: save the trained model with save_pretrained(dir, "
            "path_initial_model_for_weight_conversion=<the adapter as initialised>), then import that directory"
        )
    where = str(file)
    _field(config, "r", int, where, 8)
    _field(config, "lora_alpha", (int, float), where, 8)
    _field(config, "lora_dropout", (int, float), where, 0.0)
    _field(config, "use_rslora", bool, where, False)
    for key, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        pattern = _field(config, key, (dict, type(None)), where, None) or {}
        for k, v in pattern.items():
            _field(pattern, k, kind, f"{where}: {key}")
    saved_modules = _field(config, "modules_to_save", (list, type(None)), where, None) or []
    if not all(isinstance(n, str) for n in saved_modules):
        raise AdapterFormatError(f"{where}: modules_to_save must list module names")
    return config


@torch.no_grad()
def import_peft(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Loads a PEFT LoRA adapter directory (from ``save_pretrained`` or :func:`export_peft`) into
    ``model`` (the base model, or one with matching, unmerged fastlora adapters) and returns it.

    Supported: plain LoRA on linear layers, with ``rank_pattern`` / ``alpha_pattern``, rsLoRA and
    ``modules_to_save``. Module names are matched exactly; weights of other modules in the file
    are ignored (as PEFT does). Adapters whose initialisation changed the base weights (PiSSA,
    OLoRA, CorDA, LoftQ, LoRA-GA) are refused with the way to convert them. Afterwards the model
    computes the original base plus the imported adapter (a LoRA-GA offset it carried is
    removed). Everything is checked before the model changes.
    """
    path = Path(path)
    refuse_peft_model(model)
    config = _read_peft_config(path)
    tensors, _ = _load_safetensors(path / WEIGHTS)
    existing = lora_layers(model)
    merged = [n for n, layer in existing.items() if layer.merged]
    if merged:
        raise RuntimeError(f"layers {merged[:4]} are merged: call fastlora.unmerge(model) before importing an adapter")
    factors: dict[str, dict[str, Tensor]] = {}
    extras: dict[str, Tensor] = {}
    ignored = []
    problems = []
    saved_modules = config.get("modules_to_save") or []
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
    modules = dict(model.named_modules())
    params = _plain_parameters(model)
    use_rslora = config.get("use_rslora", False)
    dropout = config.get("lora_dropout", 0.0)
    configs: dict[str, AdapterConfig] = {}
    for name, pair in factors.items():
        module = existing.get(name, modules.get(name))
        if set(pair) != {"lora_A", "lora_B"}:
            problems.append(f"{name}: needs both lora_A and lora_B")
            continue
        if not isinstance(module, (nn.Linear, LoRALinear)):
            problems.append(f"{name}: no such linear layer in the model")
            continue
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            problems.append(f"{name}: adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit a "
                            f"{module.out_features}x{module.in_features} layer")
            continue
        r = pattern_value(name, config.get("rank_pattern"), config.get("r", 8))
        if a.shape[0] != r:
            problems.append(f"{name}: lora_A has {a.shape[0]} rows, the configuration says rank {r}")
            continue
        alpha = pattern_value(name, config.get("alpha_pattern"), config.get("lora_alpha", 8))
        try:
            cfg = _adapter_config(r, alpha, dropout, use_rslora, "peft", module.in_features, module.out_features, name)
            check_factors(pair, {"lora_A": (r, module.in_features), "lora_B": (module.out_features, r)}, name)
        except (AdapterFormatError, ValueError) as exc:
            problems.append(str(exc))
            continue
        problems += _target_problems(module, r, name)
        configs[name] = cfg
    if existing and set(existing) != set(factors):
        problems.append(f"the model's LoRA layers differ from the adapter's: {sorted(set(existing) ^ set(factors))[:4]}")
    for name, t in extras.items():
        if name not in params or params[name].shape != t.shape:
            problems.append(f"{name}: not a parameter of the model with shape {tuple(t.shape)}")
        elif not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            problems.append(f"{name}: not finite floating-point values")
    if not factors:
        problems.append("no LoRA weights found")
    if problems:
        raise AdapterFormatError(f"{path} does not fit this model: " + "; ".join(problems[:6]))
    if ignored:
        logger.warning("fastlora: ignored %d weights of %s that are neither LoRA factors nor modules_to_save: %s",
                       len(ignored), path, ignored[:4])

    def apply(model: nn.Module) -> None:
        layers = lora_layers(model)
        for name, cfg in configs.items():
            layers[name].set_adapter(factors[name]["lora_A"], factors[name]["lora_B"], cfg)
        now = _plain_parameters(model)  # modules_to_save copies are new Parameters
        for name, t in extras.items():
            now[name].copy_(t)
            now[name].requires_grad_(True)

    if existing:
        apply(model)
    else:
        # float32 master adapters, as inject's default; float64 files keep their precision
        dtypes = {n: accumulation_dtype(factors[n]["lora_A"].dtype) for n in configs}
        copies: list[str] = []  # PEFT's modules_to_save become trained copies, outermost matches
        for m in modules:
            if (m and name_matches(m, saved_modules) and not any(m.startswith(f"{c}.") for c in copies)
                    and any(e.startswith(f"{m}.") for e in extras)):
                copies.append(m)
        add_layers(model, configs, dtypes, then=apply, copies=copies)
    logger.info("fastlora: imported %d LoRA layers from the PEFT adapter %s", len(factors), path)
    return model
