"""What the gradient engine returns: each layer's mean gradient (or its sketch) and the collection."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._distributed import gather_row_chunks, sum_in_rank_order

__all__ = ["GradientSketch", "GradientStats", "LayerGradient"]


@dataclass
class GradientSketch:
    """Random projections of a layer's mean gradient ``Ḡ`` (out x in).

    ``range = Ḡ Ω`` (out x k) and ``corange = Ψ Ḡ`` (l x in) for Gaussian ``Ω`` (in x k) and
    ``Ψ`` (l x out); after a second pass also an orthonormal ``basis`` Q of the range and
    ``projection = Q^T Ḡ`` (k x in).
    """

    omega: Tensor
    psi: Tensor
    range: Tensor
    corange: Tensor
    basis: Tensor | None = None
    projection: Tensor | None = None

    @property
    def rank(self) -> int:
        return self.omega.shape[1]

    def low_rank(self, rank: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(U, S, Vh)`` of a rank-``rank`` approximation of ``Ḡ``: from ``Q`` and ``Q^T Ḡ`` after a
        second pass, else the single-pass reconstruction of Tropp, Yurtsever, Udell and Cevher
        (2017): ``Ḡ ≈ Q (Ψ Q)^+ Z`` with ``Q = orth(Y)``."""
        if not 1 <= rank <= self.rank:
            raise ValueError(f"rank must be between 1 and the sketch rank {self.rank}, got {rank}")
        if self.projection is not None:
            u, s, vh = torch.linalg.svd(self.projection, full_matrices=False)
            u = self.basis @ u
        else:
            q = torch.linalg.qr(self.range).Q
            core = torch.linalg.lstsq(self.psi @ q, self.corange).solution
            u, s, vh = torch.linalg.svd(core, full_matrices=False)
            u = q @ u
        return u[:, :rank], s[:rank], vh[:rank]


@dataclass
class LayerGradient:
    """What the engine learned about one target layer's mean gradient ``Ḡ`` (out x in).

    ``mean`` is ``Ḡ`` itself in float32 (exact mode), ``sketch`` its projections (sketch mode),
    ``products[name]`` the streamed ``Ḡ M`` for each requested ``M``. ``count`` is the number of
    batches that contributed (the divisor of the mean), ``skipped`` those rejected for a
    non-finite gradient. After a sharded collection (``collect_gradients(..., shard=True)`` on
    several ranks) ``rows = (start, stop)`` says which rows of ``Ḡ`` (and of an exact-mode
    product) this rank's ``mean`` holds; ``None``: all of them.
    """

    name: str
    out_features: int
    in_features: int
    count: int = 0
    tokens: int = 0
    skipped: int = 0
    mean: Tensor | None = None
    sketch: GradientSketch | None = None
    products: dict[str, Tensor] = field(default_factory=dict)
    rows: tuple[int, int] | None = None

    @property
    def sharded(self) -> bool:
        """Whether ``mean`` holds only this rank's rows of ``Ḡ`` (the rest are on other ranks)."""
        return self.rows is not None

    def local_rows(self, t: Tensor, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of an ``out``-row result stored as this record stores it: the
        exact mean and products hold ``rows`` on a sharded record, everything else all rows."""
        first = self.rows[0] if self.sharded else 0
        if start < first or stop - first > t.shape[0]:
            raise ValueError(f"{self.name}: rows {start}:{stop} are not on this rank (it holds {self.rows})")
        return t[start - first : stop - first]

    def gradient_rows(self, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of ``Ḡ`` (float32): from the mean (which must hold them), or the
        sketch's full-rank reconstruction, formed for those rows only."""
        if self.mean is not None:
            return self.local_rows(self.mean, start, stop)
        if self.sketch is None:
            raise ValueError(f"no gradient for {self.name}")
        u, s, vh = self.sketch.low_rank(self.sketch.rank)
        return (u[start:stop] * s) @ vh

    def svd(
        self, rank: int, method: str = "auto", niter: int = 4, seed: int = 0, q: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(U, S, Vh)``: the top ``rank`` singular triplets of ``Ḡ``.

        ``method``: "exact" (full SVD of the mean), "randomized" (``torch.svd_lowrank`` with ``q``
        columns, default ``min(2 rank, out, in)``, and ``niter`` power iterations, seeded; CPU and
        CUDA generators alike), "sketch" (from the sketch), or "auto" (randomized with a mean,
        else sketch).
        """
        if method == "auto":
            method = "randomized" if self.mean is not None else "sketch"
        if method == "sketch":
            if self.sketch is None:
                raise ValueError(f"{self.name}: no sketch was collected; use mode='sketch'")
            return self.sketch.low_rank(rank)
        if self.mean is None:
            raise ValueError(f"{self.name}: method={method!r} needs the exact mean; collect with mode='exact'")
        if not 1 <= rank <= min(self.out_features, self.in_features):
            raise ValueError(f"{self.name}: rank must be in [1, {min(self.out_features, self.in_features)}], got {rank}")
        if method == "exact":
            # A sharded mean is gathered whole for this one layer (a collective).
            mean = gather_row_chunks(self.mean, self.out_features) if self.sharded else self.mean
            u, s, vh = torch.linalg.svd(mean, full_matrices=False)
            return u[:, :rank], s[:rank], vh[:rank]
        if method == "randomized":
            q = min(q or 2 * rank, self.out_features, self.in_features)
            if q < rank:
                raise ValueError(f"{self.name}: q={q} is smaller than rank={rank}")
            devices = [self.mean.device] if self.mean.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                if self.sharded:
                    u, s, v = self._sharded_svd_lowrank(q, niter)
                else:
                    u, s, v = torch.svd_lowrank(self.mean, q=q, niter=niter)
            return u[:, :rank], s[:rank], v[:, :rank].mT
        raise ValueError(f"unknown method {method!r}; choose auto, exact, randomized or sketch")

    def _sharded_svd_lowrank(self, q: int, niter: int) -> tuple[Tensor, Tensor, Tensor]:
        """``torch.svd_lowrank``'s algorithm (Halko, Martinsson, Tropp 2009, 5.1 with 4.4) on the
        rows of ``Ḡ`` spread over the ranks: every product with ``Ḡ`` is formed from the local rows
        (``Ḡ M`` row by row, then gathered; ``Ḡ^T M`` as a sum over ranks in rank order), so only
        ``out x q`` and ``in x q`` matrices travel and every rank computes the same bits."""
        block, (start, stop) = self.mean, self.rows

        def times(m: Tensor) -> Tensor:  # Ḡ m
            return gather_row_chunks(block @ m, self.out_features)

        def times_t(m: Tensor) -> Tensor:  # Ḡ^T m
            return sum_in_rank_order(block.mT @ m[start:stop])

        # As torch.svd_lowrank: work on the tall one of Ḡ and Ḡ^T.
        tall = self.out_features >= self.in_features
        a_mul, ah_mul = (times, times_t) if tall else (times_t, times)
        r = torch.randn(self.in_features if tall else self.out_features, q, dtype=block.dtype, device=block.device)
        basis = torch.linalg.qr(a_mul(r)).Q
        for _ in range(niter):
            basis = torch.linalg.qr(ah_mul(basis)).Q
            basis = torch.linalg.qr(a_mul(basis)).Q
        u, s, vh = torch.linalg.svd(ah_mul(basis).mT, full_matrices=False)
        u, v = basis @ u, vh.mT
        return (u, s, v) if tall else (v, s, u)


class GradientStats(Mapping[str, LayerGradient]):
    """The result of :func:`collect_gradients`: a mapping from target module name to its
    :class:`LayerGradient`, plus ``mode`` and a ``summary`` dict (layers, batches, tokens, time,
    peak memory, accumulator bytes and where they lived, mean loss)."""

    def __init__(self, layers: dict[str, LayerGradient], mode: str, summary: dict[str, Any]) -> None:
        self._layers = layers
        self.mode = mode
        self.summary = summary

    def __getitem__(self, name: str) -> LayerGradient:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"GradientStats(mode={self.mode!r}, layers={len(self)}, batches={s.get('batches')}, "
            f"tokens={s.get('tokens')}, accumulator_bytes={s.get('accumulator_bytes')})"
        )
