"""Saving and loading adapters, and PEFT interoperability.

- :func:`save_adapter` / :func:`load_adapter`: fastlora's own format, one ``adapter_model.safetensors``
  whose metadata holds the per-layer configuration (rank, alpha, scale mode, dropout, init method),
  plus a readable copy of it in ``fastlora_config.json``.
- :func:`export_peft` / :func:`import_peft`: PEFT's ``adapter_config.json`` +
  ``adapter_model.safetensors``, loadable with ``peft.PeftModel.from_pretrained`` on the original
  base model.

Every write builds the whole directory next to the target and swaps it in atomically (Linux
``renameat2(RENAME_EXCHANGE)``), so a crash at any point leaves the previous adapter intact and
loadable; it replaces the adapter files of every format, so no earlier save's file outlives it.
Every load reads all its files from one save (one handle on the directory, files read whole),
and checks everything, heads and values in the dtypes they end in included, before changing the
model, which afterwards computes its fresh base plus the loaded adapter. See docs/adapters.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import json
import logging
import os
import shutil
import stat
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._distributed import is_dtensor
from .copies import COPY, TrainableCopy, trainable_copies
from .functional import SUPPORTED_DTYPES
from .principal import original_weight, principal_factors
from .inject import PEFT_RECORD, add_layers, refuse_peft_model, swap_module
from .layer import (RECORDED_INITS, AdapterConfig, LoRALinear, check_base_layer, check_factors, check_no_peft_layers,
                    finite_in, lora_layers)
from .quantized import is_quantized
from ._numerics import accumulation_dtype
from .targets import name_matches, pattern_value
from .transaction import transaction, write

__all__ = ["save_adapter", "load_adapter", "export_peft", "import_peft", "AdapterFormatError", "infer_task_type"]

logger = logging.getLogger("fastlora")

FORMAT = "fastlora-adapter"
VERSION = 1
WEIGHTS = "adapter_model.safetensors"
CONFIG = "fastlora_config.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
HF_WEIGHTS = "fastlora_adapter.safetensors"  # fastlora's format in a save_pretrained directory
RESUME_WEIGHTS = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME, what Trainer resumes from
# Marks a RESUME_WEIGHTS file as written by a fastlora save (a model.safetensors without it is the user's).
RESUME_MARK = ("written_by", "fastlora.save_pretrained")
# The adapter files of every format (PEFT's legacy .bin included): each save replaces all of them, so
# that no file of an earlier save outlives a later one and shadows it (see write_directory).
ADAPTER_FILES = (WEIGHTS, CONFIG, PEFT_CONFIG, HF_WEIGHTS, "adapter_model.bin")


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


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)  # no data copied: a Trainer folder may hold gigabytes of checkpoints
    except OSError:
        shutil.copy2(src, dst)


def _is_fastlora_resume_file(path: Path) -> bool:
    """Whether ``path`` (a model.safetensors) was written by a fastlora save (its header holds RESUME_MARK)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size <= 100_000_000 else {}
    except (OSError, ValueError):
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and metadata.get(RESUME_MARK[0]) == RESUME_MARK[1]


def _carried_over(entry: Path) -> bool:
    """Whether a save keeps ``entry`` of the folder it replaces: everything but the adapter files of
    every format (and a model.safetensors a fastlora save wrote)."""
    if entry.name in ADAPTER_FILES:
        return False
    return not (entry.name == RESUME_WEIGHTS and entry.is_file() and _is_fastlora_resume_file(entry))


def write_directory(target: Path, write: Callable[[Path], None]) -> None:
    """Writes a directory's files with ``write(tmpdir)`` and puts them in place atomically.

    The save owns the adapter files: those of an earlier save that this one does not write
    (another format's) are gone afterwards, so every reader gets this save or a clear error; the
    user's other files and folders (a README, a Trainer checkpoint's optimizer state) are kept,
    hard-linked into the new directory. A symlink is written through (its target directory is
    replaced); temporary directories left by killed saves of the same target are cleaned up. Two
    processes may create the same new directory at once: the later one swaps its own in."""
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
        written = {f.name for f in tmp.iterdir()}
        while True:
            if target.exists():
                for entry in target.iterdir():
                    if entry.name in written or not _carried_over(entry):
                        continue
                    if entry.is_symlink():
                        os.symlink(os.readlink(entry), tmp / entry.name)
                    elif entry.is_dir():
                        shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
                    else:
                        _link_or_copy(entry, tmp / entry.name)
                _fsync(tmp)
                _exchange(tmp, target)
                # Files another process wrote into the folder meanwhile (in DDP, Trainer's other ranks
                # write their rng_state_<rank>.pth while rank 0 saves the model) move on too.
                for entry in tmp.iterdir():
                    if entry.name not in written and _carried_over(entry) and not os.path.lexists(target / entry.name):
                        os.rename(entry, target / entry.name)
                break
            _fsync(tmp)
            try:
                os.rename(tmp, target)
                break
            except OSError as exc:  # another save created the target meanwhile: swap with it instead
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        _fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the old content after an exchange
        os.close(tmp_fd)


def save_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


# ---- consistent reads ----------------------------------------------------------------------------


class _Generation:
    """One directory as it was when opened: files are read relative to a handle on it, so a save
    that swaps a new directory in meanwhile is not seen half (the old files stay readable once
    open). ``stale()`` says whether a file was missing because the directory was replaced (and
    the old one emptied) meanwhile: then the read must start over."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise AdapterFormatError(f"{path} is missing or not an adapter directory ({exc.strerror})") from None
        self.missing = False

    def read(self, name: str) -> bytes | None:
        """The whole file ``name``, or None if it does not exist; AdapterFormatError unless it is a
        regular file (a FIFO would block)."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=self.fd)
        except FileNotFoundError:
            self.missing = True
            return None
        except OSError as exc:
            raise AdapterFormatError(f"{self.path / name} is unreadable ({exc.strerror})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise AdapterFormatError(f"{self.path / name} is not a regular file")
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read()
        finally:
            os.close(fd)

    def stale(self) -> bool:
        if not self.missing:
            return False
        try:
            now, mine = os.stat(self.path), os.fstat(self.fd)
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino)

    def close(self) -> None:
        os.close(self.fd)


READ_ATTEMPTS = 20


def _read_consistently(path: Path, read: Callable[[_Generation], Any]) -> Any:
    """``read(generation)`` on one generation of the directory ``path``, started over while a save
    replaced it in the middle of the read."""
    for _ in range(READ_ATTEMPTS):
        generation = _Generation(path)
        try:
            try:
                result = read(generation)
            except AdapterFormatError:
                if generation.stale():
                    continue
                raise
            if not generation.stale():
                return result
        finally:
            generation.close()
    raise AdapterFormatError(f"{path} was replaced {READ_ATTEMPTS} times while it was being read; try again")


def _parse_safetensors(data: bytes, where: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file's bytes."""
    from safetensors.torch import load

    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        metadata = header.get("__metadata__") or {}
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for corrupted headers
        raise AdapterFormatError(f"{where} is not a readable safetensors file ({exc})") from exc
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFormatError(f"{where}: its metadata is not a mapping of strings")
    return tensors, metadata


def _check_dtypes(tensors: dict[str, Tensor], where: str) -> list[str]:
    """Problems with tensors that are not of an adapter dtype (float8 and others have no finiteness
    check, integers and complex numbers are no adapters)."""
    return [f"{where}: {key} has dtype {t.dtype}; adapters are real floating-point tensors of "
            f"{', '.join(_dtype_name(d) for d in SUPPORTED_DTYPES)}"
            for key, t in tensors.items() if t.dtype not in SUPPORTED_DTYPES]


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


def _check_whole(model: nn.Module, layers: dict[str, LoRALinear]) -> None:
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
    tensors.update(_trainable_extras(model))
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


def fastlora_state(model: nn.Module) -> tuple[dict[str, Tensor], str]:
    """The tensors and the JSON configuration of fastlora's format for ``model``'s adapters."""
    check_no_peft_layers(model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    _check_whole(model, layers)
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
    """The configuration and tensors of a fastlora directory, both from one save."""

    def read(generation: _Generation) -> tuple[dict[str, Any], dict[str, Tensor]]:
        # A save_pretrained directory keeps fastlora's format beside PEFT's adapter_model.safetensors.
        name = HF_WEIGHTS
        data = generation.read(HF_WEIGHTS)
        if data is None:
            name, data = WEIGHTS, generation.read(WEIGHTS)
        if data is None:
            raise AdapterFormatError(f"{path / WEIGHTS} is missing")
        tensors, metadata = _parse_safetensors(data, path / name)
        if "fastlora" not in metadata:
            raise AdapterFormatError(f"{path / name} has no fastlora configuration; for a PEFT adapter use import_peft")
        try:
            config = json.loads(metadata["fastlora"])
        except json.JSONDecodeError as exc:
            raise AdapterFormatError(f"{path / name}: unreadable configuration ({exc})") from exc
        if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("version") != VERSION:
            raise AdapterFormatError(f"{path}: not a {FORMAT} v{VERSION} directory")
        return config, tensors

    return _read_consistently(path, read)


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


def _factor_problems(tensors: dict[str, Tensor | None], shapes: dict[str, tuple[int, int]], dtype: torch.dtype,
                     name: str) -> list[str]:
    """Why these factors cannot become a layer's adapter in ``dtype``: missing, not of an adapter dtype,
    misshapen, or not finite (in the file or once cast to ``dtype``)."""
    problems = _check_dtypes({k: t for k, t in tensors.items() if isinstance(t, Tensor)}, name)
    if problems:
        return problems
    try:
        check_factors(tensors, shapes, name, dtype)
    except ValueError as exc:
        return [str(exc)]
    return []


def _offset_problems(module: nn.Module, offset: tuple[Tensor, Tensor], scaling: float, dtype: torch.dtype,
                     base_weights: str, name: str) -> list[str]:
    """Why a LoRA-GA offset cannot go into ``module``'s base weight: ``W − s·B0 A0`` (as the layer
    computes it: the offset in the adapter dtype, the product in float32, float64 for a float64
    base, rounded to the weight's dtype) is not finite. A quantized base never holds the offset."""
    layer = module if isinstance(module, LoRALinear) else None
    base = layer.base_layer if layer is not None else module
    if base_weights == "offset" or is_quantized(base):
        return []
    w = base.weight.detach()
    acc = accumulation_dtype(w.dtype)
    a0, b0 = (t.to(w.device, dtype) for t in offset)
    if layer is not None and base_weights == "recorded" and layer.base_offset is not None:
        old_a0, old_b0 = layer.base_offset
        if scaling == layer.scaling and torch.equal(old_a0, a0.to(old_a0)) and torch.equal(old_b0, b0.to(old_b0)):
            return []  # the same offset: the weight does not move
        w = (w.to(acc) + layer.delta_weight(old_a0, old_b0, layer.scaling)).to(w.dtype)
    shifted = (w.to(acc) - (b0.to(acc) @ a0.to(acc)) * scaling).to(w.dtype)
    if not bool(torch.isfinite(shifted).all()):
        return [f"{name}: the base weight minus the LoRA-GA offset s·B0 A0 is not finite in {_dtype_name(w.dtype)}"]
    return []


# ---- what a load does outside the LoRA layers: modules_to_save copies, parameters trained in place -------


def _inside(name: str, modules: Any) -> bool:
    return any(name.startswith(f"{m}.") for m in modules)


def _base_module_names(model: nn.Module) -> set[str]:
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
        elif _inside(name, layers):
            continue
        names.add(name)
    return names


def _head_problems(model: nn.Module, copies: list[str], values: dict[str, Tensor], adapted: list[str],
                   replaces: bool) -> list[str]:
    """Why the model cannot end as its fresh base plus these heads: ``copies`` (modules_to_save,
    made afresh from the original modules) and ``values`` (named as in the model without adapters:
    the copies' parameters, and parameters trained in place). ``replaces``: the model holds an
    adapter now, whose parameters trained in place must all be among ``values`` outside the
    copies (their base values are lost, so nothing else could give the fresh base)."""
    problems = []
    names = _base_module_names(model)
    for c in copies:
        if not c or c not in names:
            problems.append(f"modules_to_save {c!r}: not a module of the model")
        elif c in adapted or _inside(c, adapted) or any(a.startswith(f"{c}.") for a in adapted):
            problems.append(f"modules_to_save {c!r}: is, contains or is inside a LoRA layer")
        elif _inside(c, copies):
            problems.append(f"modules_to_save {c!r}: inside another of the modules to save")
    params = _plain_parameters(model)
    problems += _check_dtypes(values, "trainable parameters")
    for name, t in values.items():
        p = params.get(name)
        if p is None or p.shape != t.shape:
            problems.append(f"trainable parameter {name}: not a parameter of the model with shape {tuple(t.shape)}")
        elif t.dtype in SUPPORTED_DTYPES and not finite_in(t, p.dtype):
            problems.append(f"trainable parameter: {name} has NaN or infinite values in {_dtype_name(p.dtype)}")
    if replaces:
        current = trainable_copies(model)
        lost = [n for n, p in params.items()
                if p.requires_grad and not _inside(n, current) and (n not in values or _inside(n, copies))]
        if lost:
            problems.append(
                f"the model's {lost[:4]} were trained in place (trainable_modules) and this adapter does not carry them "
                "in place: their base values are lost, so the model cannot become its base plus this adapter. Load it "
                "into a freshly loaded base model (train heads with modules_to_save to keep their originals)")
    return problems


@torch.no_grad()
def _apply_heads(model: nn.Module, copies: list[str], values: dict[str, Tensor]) -> None:
    """Makes the model's modules_to_save exactly ``copies``, each a fresh copy of its original
    module (a copy not among them gives its original back, frozen), then writes ``values`` and makes
    them trainable. Checked by :func:`_head_problems` first."""
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
    params = _plain_parameters(model)  # a new copy's parameters are new Parameters
    for name, t in values.items():
        write(params[name], t)
        params[name].requires_grad_(True)


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike, apply_base_offset: bool | None = None) -> nn.Module:
    """Loads an adapter saved by :func:`save_adapter` into ``model`` and returns it.

    A model without adapters gets them (on exactly the saved module names, with the saved ranks
    and scales); a model with adapters must have exactly the saved layers, ranks and shapes, and
    must not be merged. Afterwards the model computes the original base plus the loaded adapter,
    whatever adapter it held before, heads included: the adapter's ``modules_to_save`` are fresh
    copies of the original modules holding the saved values, copies it lacks are removed (the
    original back, frozen). Parameters the model trained in place (``trainable_modules``) must be
    in the adapter (their base values are lost). Everything is checked before anything changes
    (values also in the dtype they are cast to, and a LoRA-GA offset's effect on the base weight):
    on any mismatch the model is left as it was.

    ``apply_base_offset`` (LoRA-GA layers store ``A0``, ``B0``; the base must hold ``W − s·B0 A0``):
    ``None`` lets each layer's record decide (the offset it carries, if any, is replaced; nothing
    moves if it is the same); ``True`` says the base weights are the original ones (the offset is
    applied whatever is recorded); ``False`` says they already hold this adapter's offset (a
    model saved whole after LoRA-GA, say).
    """
    path = Path(path)
    if apply_base_offset is not None and not isinstance(apply_base_offset, bool):  # 0 == False, 1 == True
        raise TypeError(f"apply_base_offset must be None, True or False, got {apply_base_offset!r}")
    base_weights = BASE_WEIGHTS[apply_base_offset]
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
    for name, (cfg, in_f, out_f, saved_dtype, has_offset) in saved.items():
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
        dtype = module.lora_A.dtype if isinstance(module, LoRALinear) else saved_dtype  # what load_factors casts to
        factors = {k: tensors.get(f"{name}.{k}") for k in keys}
        found = _factor_problems(factors, {k: shapes[k] for k in keys}, dtype, name)
        if not found and has_offset:
            found = _offset_problems(module, (factors["lora_A0"], factors["lora_B0"]), cfg.scaling, dtype,
                                     base_weights, name)
        problems += found
    copies = config.get("modules_to_save", [])
    values = {}
    for name in config.get("trainable", []):
        if f"trainable.{name}" not in tensors:
            problems.append(f"trainable parameter {name}: listed, but not in the file")
        else:
            values[name] = tensors[f"trainable.{name}"]
    problems += _head_problems(model, copies, values, list(saved), replaces=bool(existing))
    if problems:
        raise AdapterFormatError(f"{path} does not fit this model: " + "; ".join(problems[:6]))

    def apply(model: nn.Module) -> None:
        layers = lora_layers(model)
        for name, (cfg, *_, has_offset) in saved.items():
            offset = (tensors[f"{name}.lora_A0"], tensors[f"{name}.lora_B0"]) if has_offset else None
            layers[name].load_factors(tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"], cfg, offset, base_weights)
        _apply_heads(model, copies, values)

    if existing:
        with transaction(model):  # a failure on layer k puts everything back
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


def peft_state(
    model: nn.Module,
    fold_scaling: bool = False,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and ``adapter_config.json`` of PEFT's format for ``model``'s adapters (see
    :func:`export_peft`)."""
    check_no_peft_layers(model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to export")
    _check_whole(model, layers)
    record = model.__dict__.get(PEFT_RECORD) or {}  # what a LoraConfig said (inject(model, config))
    task_type = task_type if task_type is not None else record.get("task_type")
    base_model_name_or_path = base_model_name_or_path or record.get("base_model_name_or_path")
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
    if len(dropouts) > 1:
        raise ValueError(
            f"the LoRA layers have different lora_dropout values {sorted(dropouts)}; PEFT's adapter_config.json "
            "holds one for all layers (it has no per-module dropout). Give every layer the same dropout "
            "(layer.load_factors(layer.lora_A, layer.lora_B, dataclasses.replace(layer.config, lora_dropout=p), "
            "layer.base_offset)), or save fastlora's format with fastlora.save_adapter, which keeps each layer's"
        )
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
        "use_rslora": rslora.pop(),
        "target_modules": list(layers),
        "lora_dropout": dropouts.pop(),
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
# init_lora_weights values whose base adjustment import_peft recomputes from the original base.
PEFT_PRINCIPAL_INITS = ("pissa", "olora")
# Config fields of PEFT features that change what the adapter computes; fastlora has none of them.
PEFT_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "lora_bias", "use_qalora", "use_bdlora", "layer_replication",
                    "target_parameters", "trainable_token_indices", "alora_invocation_tokens", "arrow_config",
                    "kasa_config")


def _read_peft(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """adapter_config.json, checked for everything import_peft relies on, and the tensors, both
    from one save (AdapterFormatError)."""

    def read(generation: _Generation) -> tuple[dict[str, Any], dict[str, Tensor]]:
        text = generation.read(PEFT_CONFIG)
        if text is None:
            raise AdapterFormatError(f"{path / PEFT_CONFIG} is missing")
        config = _parse_peft_config(text, path)
        data = generation.read(WEIGHTS)
        if data is None:
            raise AdapterFormatError(f"{path / WEIGHTS} is missing")
        return config, _parse_safetensors(data, path / WEIGHTS)[0]

    return _read_consistently(path, read)


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
    use_rslora = config.get("use_rslora", False)
    dropout = config.get("lora_dropout", 0.0)
    principal = config.get("init_lora_weights") if config.get("init_lora_weights") in PEFT_PRINCIPAL_INITS else None
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
            cfg = _adapter_config(r, alpha, dropout, use_rslora, principal or "peft", module.in_features,
                                  module.out_features, name)
        except AdapterFormatError as exc:
            problems.append(str(exc))
            continue
        # load_factors casts into an existing layer's dtype; new layers are float32 (float64 for float64 files)
        dtype = (module.lora_A.dtype if isinstance(module, LoRALinear)
                 else accumulation_dtype(a.dtype) if a.dtype in SUPPORTED_DTYPES else None)
        found = _factor_problems(pair, {"lora_A": (r, module.in_features), "lora_B": (module.out_features, r)},
                                 dtype, name)
        problems += found + _target_problems(module, r, name)
        configs[name] = cfg
    if existing and set(existing) != set(factors):
        problems.append(f"the model's LoRA layers differ from the adapter's: {sorted(set(existing) ^ set(factors))[:4]}")
    if not factors:
        problems.append("no LoRA weights found")
    # PEFT's modules_to_save become trained copies: the outermost matching modules holding saved weights
    copies: list[str] = []
    for m in sorted(_base_module_names(model), key=lambda n: (n.count("."), n)):
        if (m and name_matches(m, saved_modules) and not _inside(m, copies)
                and any(e.startswith(f"{m}.") for e in extras)):
            copies.append(m)
    problems += _head_problems(model, copies, extras, list(factors), replaces=bool(existing))
    if problems:
        raise AdapterFormatError(f"{path} does not fit this model: " + "; ".join(problems[:6]))
    if ignored:
        logger.warning("fastlora: ignored %d weights of %s that are neither LoRA factors nor modules_to_save: %s",
                       len(ignored), path, ignored[:4])

    def apply(model: nn.Module) -> None:
        layers = lora_layers(model)
        for name, cfg in configs.items():
            layer = layers[name]
            offset = None
            if principal is not None:  # PEFT's residual base: the principal part of the original weight
                a0, b0 = principal_factors(original_weight(layer), cfg.r, cfg.scaling, principal)
                offset = (a0.to(layer.lora_A.dtype), b0.to(layer.lora_B.dtype))
            layer.load_factors(factors[name]["lora_A"], factors[name]["lora_B"], cfg, base_offset=offset)
        _apply_heads(model, copies, extras)

    if existing:
        with transaction(model):
            apply(model)
    else:
        # float32 master adapters, as inject's default; float64 files keep their precision
        dtypes = {n: accumulation_dtype(factors[n]["lora_A"].dtype) for n in configs}
        add_layers(model, configs, dtypes, then=apply, copies=copies)
    logger.info("fastlora: imported %d LoRA layers from the PEFT adapter %s", len(factors), path)
    return model
