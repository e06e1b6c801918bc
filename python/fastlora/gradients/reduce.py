"""Cross-rank reductions of a collection: accumulators summed on every rank (big tensors alone,
small ones in flat buckets) or reduced by rows into the rank that keeps them, and the counts and
losses summed."""

from __future__ import annotations

import torch
from torch import Tensor

from .._distributed import BUCKET_BYTES, chunk_rows, flat_in_place, in_place
from .results import LayerGradient
from .strategies import ExactUpdate

__all__ = ["all_reduce_sum", "reduce_across_ranks", "reduce_rows_to_owners"]


def reduce_rows_to_owners(update: ExactUpdate) -> tuple[int, int]:
    """The reduce-scatter of one exact accumulator by rows (split as ``torch.chunk`` splits them,
    the layout ``fully_shard`` gives the weight): each block of rows is summed into the rank that
    keeps it, then only this rank's rows are kept and the whole accumulator is freed. Blocks of
    uneven size rule out ``reduce_scatter_tensor``; one ``reduce`` per block moves as many bytes."""
    dist = torch.distributed
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = update.acc.shape[0]
    for owner in range(world):
        start, stop = chunk_rows(rows, world, owner)
        if stop > start:
            in_place(update.acc[start:stop], lambda t, owner=owner: dist.reduce(t, dst=owner))
    start, stop = chunk_rows(rows, world, rank)
    update.acc = update.acc[start:stop].clone()
    return start, stop


def all_reduce_sum(tensors: list[Tensor]) -> None:
    """Sums tensors over all ranks in place: big ones alone, small ones in flat buckets."""
    import torch.distributed as dist

    small: list[Tensor] = []
    for t in tensors:
        if t.numel() * t.element_size() >= BUCKET_BYTES:
            in_place(t, dist.all_reduce)
            continue
        if small and (small[0].device != t.device or small[0].dtype != t.dtype):
            flat_in_place(small, dist.all_reduce)
            small = []
        small.append(t)
        if sum(s.numel() * s.element_size() for s in small) >= BUCKET_BYTES:
            flat_in_place(small, dist.all_reduce)
            small = []
    if small:
        flat_in_place(small, dist.all_reduce)


def reduce_across_ranks(records: dict[str, LayerGradient], updates, losses: list[float],
                         reduce_accumulators: bool) -> tuple[float, float]:
    """Sums the counts and losses over all ranks, and the accumulators unless they were reduced
    into row blocks already; returns (loss sum, loss count)."""
    counts = torch.tensor([[r.count, r.tokens, r.skipped] for r in records.values()], dtype=torch.float64)
    stats = torch.tensor([sum(losses), len(losses)], dtype=torch.float64)
    if reduce_accumulators:
        all_reduce_sum([t for u in updates.values() for t in u.tensors()])
    all_reduce_sum([counts, stats])
    for rec, (c, t, s) in zip(records.values(), counts.tolist()):
        rec.count, rec.tokens, rec.skipped = int(c), int(t), int(s)
    loss_sum, loss_n = stats.tolist()
    return loss_sum, loss_n
