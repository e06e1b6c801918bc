"""All-or-nothing changes to a model: what a multi-layer operation changed is put back exactly
when it fails part way (an error on layer k, an out-of-memory, a ``KeyboardInterrupt``).

``with transaction(model):`` records, cheaply, every module's attributes (its submodules,
parameters and buffers by reference, flags such as a LoRA layer's settings), and every
parameter's ``requires_grad``. Tensors written in place are recorded lazily, by
:func:`preserve`, just before the first write: the only copies made are of the tensors the
operation actually changes (a merge holds a host copy of each weight it has merged until it
completes). A transaction opened inside another, on the same model or one of its modules, joins
it.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["transaction", "preserve", "write"]

_CONTAINERS = (dict, set, list)


class _Record:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = [(m, _attributes(m)) for m in model.modules()]
        self.ids = {id(m) for m, _ in self.modules}
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.tensors: dict[int, tuple[Tensor, Tensor]] = {}

    def preserve(self, t: Tensor) -> None:
        if id(t) in self.tensors or t.device.type == "meta":
            return
        keep = t.detach().to("cpu", copy=True) if t.device.type != "cpu" else t.detach().clone()
        self.tensors[id(t)] = (t, keep)

    @torch.no_grad()
    def restore(self) -> None:
        for t, keep in self.tensors.values():
            t.copy_(keep)
        for module, attributes in self.modules:
            _restore(module, attributes)
        for p, flag in self.flags:
            p.requires_grad_(flag)


_local = threading.local()  # each thread's open transactions


def _open() -> list[_Record]:
    if not hasattr(_local, "records"):
        _local.records = []
    return _local.records


def _attributes(module: nn.Module) -> dict:
    """The module's attributes, containers (its parameter, buffer and submodule dicts) copied
    one level deep so that later additions and removals can be undone."""
    return {k: (v, copy.copy(v) if isinstance(v, _CONTAINERS) else None) for k, v in vars(module).items()}


def _restore(module: nn.Module, attributes: dict) -> None:
    state = vars(module)
    for key in [k for k in state if k not in attributes]:
        del state[key]
    for key, (value, contents) in attributes.items():
        state[key] = value
        if contents is not None:
            if isinstance(value, list):
                value[:] = contents
            else:
                value.clear()
                value.update(contents)


@contextlib.contextmanager
def transaction(model: nn.Module) -> Iterator[None]:
    """Runs the block as one change of ``model``: on any exception (``KeyboardInterrupt``
    included) every module, parameter, buffer, flag and in-place written tensor (see
    :func:`preserve`) is put back as it was, and the exception propagates."""
    records = _open()
    if any(id(model) in record.ids for record in records):
        yield
        return
    record = _Record(model)
    records.append(record)
    try:
        yield
    except BaseException:
        record.restore()
        raise
    finally:
        records.remove(record)


def preserve(t: Tensor) -> None:
    """Call before writing ``t`` in place: open transactions keep its current values to restore
    them if they fail. Without an open transaction this does nothing."""
    for record in _open():
        record.preserve(t)


@torch.no_grad()
def write(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)``, undone if the open transaction fails."""
    preserve(dst)
    dst.copy_(src)
