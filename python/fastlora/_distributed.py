"""What fastlora needs to know about sharded tensors (``DTensor``, as FSDP2's ``fully_shard``
makes them), without importing ``torch.distributed`` for programs that do not use it.

A tensor can only be a DTensor once ``torch.distributed.tensor`` (``torch.distributed._tensor``
before torch 2.5) has been imported, so :func:`is_dtensor` looks the class up in ``sys.modules``
instead of importing it (importing it costs most of a second).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import reduce
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "is_dtensor", "full", "local", "row_range", "check_row_sharded", "rows_like", "gather_rows", "sum_over_mesh",
    "world_size", "chunk_rows", "sum_in_rank_order", "gather_row_chunks", "broadcast_from_rank0",
    "in_place", "flat_in_place", "BUCKET_BYTES",
]

_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (a sharded or replicated distributed tensor)."""
    for name in _DTENSOR_MODULES:
        module = sys.modules.get(name)
        if module is not None and isinstance(t, getattr(module, "DTensor", ())):
            return True
    return False


def full(t: Tensor) -> Tensor:
    """The whole tensor: ``t`` itself, or a DTensor gathered (a collective: every rank must call it)."""
    return t.full_tensor() if is_dtensor(t) else t


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t`` (``t`` itself unless it is a DTensor); in-place changes to it
    change ``t``."""
    return t.to_local() if is_dtensor(t) else t


def check_row_sharded(t: Tensor, where: str) -> None:
    """ValueError unless the DTensor ``t`` is sharded by rows over a 1-D mesh (``fully_shard``'s
    default layout), the only layout fastlora's sharded code paths handle."""
    placements = tuple(t.placements)
    if t.device_mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard(dim=0):
        raise ValueError(
            f"{where} is a DTensor with placements {placements} on a {t.device_mesh.ndim}-D mesh; fastlora handles "
            "row-sharded tensors on a 1-D mesh (fully_shard's default, no shard_placement_fn, no HSDP)"
        )
    start, stop = row_range(t)
    if t.to_local().shape[0] != stop - start:
        raise ValueError(f"{where}: the local shard has {t.to_local().shape[0]} rows, expected {stop - start}")


def row_range(t: Tensor) -> tuple[int, int]:
    """The rows ``[start, stop)`` of ``t`` this rank holds: all of them for an ordinary tensor;
    ``torch.chunk``'s split (what ``fully_shard`` uses) for a DTensor sharded by rows."""
    rows = t.shape[0]
    if not is_dtensor(t):
        return 0, rows
    return chunk_rows(rows, t.device_mesh.size(), t.device_mesh.get_local_rank())


def chunk_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` that ``torch.chunk`` gives part ``rank`` of ``world`` (the last
    parts may be short or empty)."""
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def world_size(group=None) -> int:
    """The number of ranks of ``group`` (default: the default group); 1 without torch.distributed."""
    dist = torch.distributed
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rows_like(rows: Tensor, like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A DTensor of global ``shape`` sharded by rows as ``like`` is, from this rank's ``rows``."""
    return type(like).from_local(
        rows, like.device_mesh, like.placements, run_check=False, shape=torch.Size(shape),
        stride=torch.empty(shape, device="meta").stride(),
    )


def gather_rows(rows: Tensor, like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The whole tensor of global ``shape`` whose rows are spread over the ranks as those of the
    DTensor ``like`` are; this rank holds ``rows`` (a collective)."""
    return rows_like(rows.contiguous(), like, shape).full_tensor()


def sum_over_mesh(partial: Tensor, like: Tensor) -> Tensor:
    """The sum of every rank's ``partial`` over the mesh of the DTensor ``like``, added in rank
    order, so that every rank gets the same bits (an all-reduce need not promise that)."""
    return sum_in_rank_order(partial, like.device_mesh.get_group())


def _staged(t: Tensor, group) -> Tensor:
    """``t`` where the group's backend can send it: NCCL only moves CUDA tensors."""
    if torch.distributed.get_backend(group) == "nccl" and not t.is_cuda:
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def sum_in_rank_order(partial: Tensor, group=None) -> Tensor:
    """The sum over the ranks of ``group`` of every rank's ``partial`` (same shape everywhere),
    added in rank order, so that every rank gets the same bits (a collective)."""
    sent = _staged(partial.contiguous(), group)
    parts = [torch.empty_like(sent) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, sent, group=group)
    return reduce(torch.add, parts).to(partial.device)


def gather_row_chunks(rows: Tensor, total: int, group=None) -> Tensor:
    """The whole tensor of ``total`` rows that are split over the ranks of ``group`` as
    :func:`chunk_rows` splits them; this rank holds ``rows`` (a collective; each row comes from
    one rank, so every rank gets the same bits)."""
    world = torch.distributed.get_world_size(group)
    padded = rows.new_zeros((-(-total // world), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    padded = _staged(padded, group)
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded, group=group)
    return torch.cat(parts)[:total].to(rows.device)


BUCKET_BYTES = 32 * 2**20


def in_place(t: Tensor, collective: Callable[[Tensor], Any], group=None) -> None:
    """Runs an in-place collective on ``t``; NCCL only moves device tensors, so a host tensor goes
    through the current device in pieces of at most 32 MiB."""
    if torch.distributed.get_backend(group) == "nccl" and not t.is_cuda:
        for chunk in t.view(-1).split(BUCKET_BYTES // t.element_size()):
            staged = chunk.cuda()
            collective(staged)
            chunk.copy_(staged)
    else:
        collective(t)


def flat_in_place(tensors: list[Tensor], collective: Callable[[Tensor], Any], group=None) -> None:
    """Runs an in-place collective on ``tensors`` (one dtype and device) as one flat message."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    in_place(flat, collective, group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_from_rank0(tensors: list[Tensor], group=None) -> None:
    """Overwrites ``tensors`` on every rank with rank 0's (in place; one flat message per dtype)."""
    dist = torch.distributed
    src = dist.get_global_rank(group, 0) if group else 0
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat_in_place(same, lambda t: dist.broadcast(t, src=src, group=group), group)
