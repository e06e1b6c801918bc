"""The gradient engine: mean gradients of frozen weights over calibration batches.

LoRA-GA and GoRA start from ``Ḡ_i``, the mean over ``N`` batches of the gradient of the loss with
respect to each target layer's frozen weight. :func:`collect_gradients` gets it without giving any
parameter a ``.grad``: each target layer is tapped with a forward hook whose autograd node sees the
layer's input ``x`` and output gradient ``dy`` in backward and streams ``dy^T x`` into a float32
accumulator (exact mode), or only random projections of it (sketch mode). See
``docs/gradient_engine.md``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import resource
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._numerics import accumulation_dtype
from ._batches import call_model
from ._distributed import (
    BUCKET_BYTES, chunk_rows, flat_in_place, gather_row_chunks, in_place, sum_in_rank_order, world_size,
)
from .backends.registry import op_function
from .layer import LoRALinear
from .progress import Progress
from .quantized import check_quantized_layer, cpu_repacking, is_quantized
from .targets import Targets, find_linear_targets

__all__ = ["GradientSketch", "GradientStats", "LayerGradient", "collect_gradients"]

logger = logging.getLogger("fastlora")

MODES = ("exact", "sketch")
OFFLOADS = ("auto", "device", "cpu", "passes")
NONFINITE = ("skip", "error")


def _op(name: str, device: torch.device) -> Callable:
    """The compiled op where the registry says it runs on this device, else the reference (same signature)."""
    return op_function(name, device)


# ---- results ------------------------------------------------------------------------------------


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


# ---- accumulators -------------------------------------------------------------------------------


class _StagingPool:
    """Two device buffers shared by all host accumulators: a layer's rows of ``dy^T x`` are formed
    in one while the other's copy to host memory is in flight (asynchronous on CUDA)."""

    def __init__(self, device: torch.device, elements: int, dtype: torch.dtype) -> None:
        self.device, self.elements, self.dtype = device, max(int(elements), 1), dtype
        self._slots: list[dict] = []
        self._turn = 0

    def slot(self) -> dict:
        if not self._slots:
            pin = self.device.type == "cuda"
            for _ in range(2):
                self._slots.append({
                    "dev": torch.empty(self.elements, dtype=self.dtype, device=self.device),
                    "host": torch.empty(self.elements, dtype=self.dtype, pin_memory=pin),
                    "pending": None,
                })
        slot = self._slots[self._turn]
        self._turn ^= 1
        self.drain(slot)
        return slot

    @staticmethod
    def drain(slot: dict) -> None:
        if slot["pending"] is None:
            return
        target, event, n = slot["pending"]
        if event is not None:
            event.synchronize()
        target.add_(slot["host"][:n].view_as(target))
        slot["pending"] = None

    def flush(self) -> None:
        for slot in self._slots:
            self.drain(slot)

    @property
    def nbytes(self) -> int:
        return 2 * self.elements * self.dtype.itemsize if self._slots else 0


class _ExactUpdate:
    """acc += dy^T x, with acc on the layer's device or in (pinned) host memory; float32 (float64
    for a float64 layer). ``acc`` is allocated when the pass over the layer's group starts, so
    that layer groups in separate passes never hold all accumulators at once."""

    def __init__(self, weight: _Target, pool: _StagingPool | None) -> None:
        out_f, in_f = weight.shape
        self.pool = pool
        device = weight.device
        pin = pool is not None and device.type == "cuda"
        acc_device = "cpu" if pool is not None else device
        dtype = accumulation_dtype(weight.dtype)
        self._zeros = functools.partial(torch.zeros, out_f, in_f, dtype=dtype, device=acc_device, pin_memory=pin)
        self.nbytes = out_f * in_f * dtype.itemsize  # of the whole accumulator
        self.acc: Tensor | None = None
        self._accumulate = _op("accumulate_outer", device)

    def allocate(self) -> None:
        if self.acc is None:
            self.acc = self._zeros()

    def __call__(self, dy: Tensor, x: Tensor) -> None:
        if self.pool is None:
            self._accumulate(self.acc, dy, x, 1.0)
            return
        out_f, in_f = self.acc.shape
        rows = max(1, min(out_f, self.pool.elements // in_f))
        for r0 in range(0, out_f, rows):
            n = min(rows, out_f - r0)
            slot = self.pool.slot()
            stage = slot["dev"][: n * in_f].view(n, in_f).zero_()
            self._accumulate(stage, dy[:, r0 : r0 + n], x, 1.0)
            slot["host"][: n * in_f].copy_(stage.view(-1), non_blocking=True)
            event = None
            if stage.is_cuda:
                event = torch.cuda.Event()
                event.record()
            slot["pending"] = (self.acc[r0 : r0 + n], event, n * in_f)

    def tensors(self) -> list[Tensor]:
        return [self.acc] if self.acc is not None else []


class _SketchUpdate:
    """Y += dy^T (x Ω), Z += (Ψ dy^T) x and P_i += dy^T (x M_i), from one pass over dy and two
    over x; the products of ``x`` with Ω and every M_i share one pass."""

    def __init__(self, weight: _Target, k: int, gen: torch.Generator, products: dict[str, Tensor]) -> None:
        # Ω^T and the M_i^T stacked: one lora_down forms all of x [Ω | M_1 | ...]. Ω and Ψ are
        # kept once, in the layout the kernels read; the sketch exposes transposed views.
        out_f, in_f = weight.shape
        self.device = device = weight.device
        self.dtype = dtype = accumulation_dtype(weight.dtype)
        omega = torch.randn(in_f, k, generator=gen, dtype=torch.float32).to(device, dtype)
        psi = torch.randn(2 * k, out_f, generator=gen, dtype=torch.float32).to(device, dtype)
        self.k = k
        self.names = list(products)
        self.widths = [m.shape[1] for m in products.values()]
        lhs = [omega] + [m.to(device=device, dtype=dtype) for m in products.values()]
        self.lhs_t = torch.cat(lhs, dim=1).t().contiguous()
        self.psi_t = psi.t().contiguous()
        self.omega, self.psi = self.lhs_t[:k].t(), self.psi_t.t()
        self.right = torch.zeros(out_f, self.lhs_t.shape[0], dtype=dtype, device=device)
        self.corange = torch.zeros(2 * k, in_f, dtype=dtype, device=device)
        self.basis: Tensor | None = None  # set for the second pass
        self.projection: Tensor | None = None
        self._down = _op("lora_down", device)
        self._dy_products = _op("lora_dy_products", device)
        self._grad_a = _op("lora_grad_A", device)

    def __call__(self, dy: Tensor, x: Tensor) -> None:
        if self.basis is not None:  # second pass: Q^T Ḡ = mean (dy Q)^T x
            dyq = self._down(dy, self.basis_t, 0.0, None).to(self.dtype)
            self.projection += self._grad_a(x, dyq, 0.0, None, self.dtype)
            return
        xl = self._down(x, self.lhs_t, 0.0, None)
        dy_psi, right = self._dy_products(dy, xl, self.psi_t, 1.0)
        self.right += right
        self.corange += self._grad_a(x, dy_psi, 0.0, None, self.dtype)

    def allocate(self) -> None:
        """(Allocated when built: sketches are small.)"""

    def start_second_pass(self) -> None:
        self.basis = torch.linalg.qr(self.right[:, : self.k]).Q.contiguous()
        self.basis_t = self.basis.t().contiguous()
        self.projection = torch.zeros(self.k, self.corange.shape[1], dtype=self.dtype, device=self.device)

    def tensors(self) -> list[Tensor]:
        return [self.projection] if self.basis is not None else [self.right, self.corange]


# ---- taps ---------------------------------------------------------------------------------------


class _Attach(torch.autograd.Function):
    """A copy of a layer output that needs no gradient (its input came from frozen layers), made
    part of the graph through the engine's anchor so that its gradient is still computed. The
    backward passes nothing on: no wasted dx, no .grad on the anchor."""

    @staticmethod
    def forward(ctx, y: Tensor, anchor: Tensor) -> Tensor:  # noqa: ARG004
        return y.clone()

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[None, None]:  # noqa: ARG004
        return None, None


class _Probe:
    """Hooks one target layer: a tensor hook on its output receives ``dy`` in backward, with the
    layer's input ``x`` kept from forward. Outputs are not copied (in-place use stays legal),
    except where only the anchor gives them a gradient."""

    def __init__(self, record: LayerGradient, update, engine: _Engine) -> None:
        self.record, self.update, self.engine = record, update, engine
        self.batch = -1  # last batch this layer contributed to
        self.rejected = -1  # last batch it was rejected in

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
        if not isinstance(output, Tensor) or not torch.is_grad_enabled():
            return None
        x = args[0] if args else kwargs["input"]
        replaced = None
        if not output.requires_grad:
            output = replaced = _Attach.apply(output, self.engine.anchor)
        output.register_hook(lambda dy: self.backward(dy, x))
        return replaced

    def backward(self, dy: Tensor, x: Tensor) -> None:
        rec, batch = self.record, self.engine.batch
        dy = dy.reshape(-1, rec.out_features)
        x = x.reshape(-1, rec.in_features)
        # One read of dy: its float32 sum is non-finite iff an element is (barring sums past
        # 3e38, which only already-diverged gradients reach).
        if not math.isfinite(float(dy.sum(dtype=torch.float32))):
            if self.engine.nonfinite == "error":
                raise FloatingPointError(f"non-finite gradient at layer {rec.name} in batch {batch}")
            if self.rejected != batch:
                warnings.warn(f"fastlora: non-finite gradient at layer {rec.name} in batch {batch}; "
                              "that batch is left out of this layer's mean", RuntimeWarning, stacklevel=2)
                self.rejected = batch
                rec.skipped += 1
            return
        self.update(dy, x)
        if self.batch != batch:
            self.batch = batch
            rec.count += 1
        rec.tokens += x.shape[0]


class _Engine:
    """State shared by the probes of one collection."""

    def __init__(self, nonfinite: str) -> None:
        self.anchor = torch.zeros((), requires_grad=True)
        self.batch = 0
        self.nonfinite = nonfinite


# ---- the collection -----------------------------------------------------------------------------


def _default_loss(model: nn.Module, batch: Any) -> Tensor:
    out = call_model(model, batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Tensor) and out.dim() == 0:
        loss = out
    if loss is None:
        raise ValueError("the model's output has no .loss: pass loss_fn=lambda model, batch: <scalar loss>")
    return loss


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch with its tensors (also inside Mappings, tuples and lists) on ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        if hasattr(batch, "to"):  # transformers' BatchEncoding
            return batch.to(device)
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


@contextlib.contextmanager
def _frozen_and_restored(model: nn.Module, train_mode: bool) -> Iterator[None]:
    """No parameter requires grad and the model is in eval (or train) mode inside, with
    bitsandbytes' CPU repacking of 4-bit weights off (see :func:`fastlora.quantized.cpu_repacking`);
    the flags and modes come back afterwards, also after an exception."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    repacking = [(m, cpu_repacking(m, False)) for m in model.modules() if is_quantized(m)]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.train(train_mode)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
        for m, enabled in repacking:
            cpu_repacking(m, enabled)


@dataclass(frozen=True)
class _Target:
    """The weight a target layer's gradient is taken for (a LoRA layer's base weight; a quantized
    layer's dequantized weight, whose gradient is float32): its shape, device and dtype."""

    shape: tuple[int, int]
    device: torch.device
    dtype: torch.dtype


def frozen_weight(module: nn.Module) -> _Target:
    base = module.base_layer if isinstance(module, LoRALinear) else module
    dtype = torch.float32 if is_quantized(base) else base.weight.dtype
    return _Target((base.out_features, base.in_features), base.weight.device, dtype)


def _parse_budget(budget: int | float | str | None, device: torch.device) -> float:
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return 0.5 * free
        return math.inf
    if isinstance(budget, str):
        units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
        text = budget.strip().lower().removesuffix("ib").removesuffix("b")
        factor = units.get(text[-1:], 1)
        try:
            budget = float(text[:-1] if text[-1:] in units else text) * factor
        except ValueError:
            raise ValueError(f"memory_budget={budget!r} is not a size like 8e9, '12GB' or '512MiB'") from None
    if not budget >= 0:
        raise ValueError(f"memory_budget must be a non-negative number of bytes, got {budget!r}")
    return float(budget)


def _plan_groups(sizes: list[int], budget: float) -> list[list[int]]:
    """Consecutive layers grouped so each group's accumulators fit the budget (one layer at least)."""
    groups, current, used = [], [], 0
    for i, size in enumerate(sizes):
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    if current:
        groups.append(current)
    return groups


def _reduce_rows_to_owners(update: _ExactUpdate) -> tuple[int, int]:
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


def _all_reduce_sum(tensors: list[Tensor]) -> None:
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


def _peak_memory(device: torch.device) -> dict[str, int | None]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    dev = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_device_memory_bytes": dev, "peak_host_rss_bytes": rss}


def collect_gradients(
    model: nn.Module,
    batches: Iterable,
    targets: Targets = "all-linear",
    *,
    num_batches: int | None = None,
    mode: str = "exact",
    sketch_rank: int = 64,
    passes: int = 1,
    products: Mapping[str, Tensor] | None = None,
    memory_budget: int | float | str | None = None,
    offload: str = "auto",
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    exclude_modules: Targets | None = None,
    nonfinite: str = "skip",
    train_mode: bool = False,
    progress: bool = True,
    seed: int = 0,
    shard: bool = False,
) -> GradientStats:
    """Mean gradients of the target layers' frozen weights over calibration batches.

    For each batch the loss (``loss_fn(model, batch)``, default ``model(**batch).loss``) is
    back-propagated once; the target layers' weight gradients ``dy^T x`` are accumulated in
    float32 as they are produced, never as a ``.grad``. No parameter gets a gradient; the
    ``requires_grad`` flags and train/eval modes are restored afterwards, also after an error.

    Args:
        model: the model (its target layers may be ``nn.Linear`` or already ``LoRALinear``).
        batches: an iterable of batches (Mappings, tuples or tensors; tensors are moved to the
            model's device). ``offload="passes"`` and ``passes=2`` need a re-iterable one.
        targets: which layers, as in :func:`fastlora.inject` (default "all-linear").
        num_batches: use at most this many batches (default: all).
        mode: "exact" (the float32 mean gradient per layer) or "sketch" (random projections
            ``Ḡ Ω`` and ``Ψ Ḡ`` with ``sketch_rank`` columns / ``2 sketch_rank`` rows).
        passes: sketch mode only: 2 re-runs the batches once to get ``Q^T Ḡ`` exactly for the
            range basis ``Q`` (the two-pass randomized SVD: a more accurate reconstruction).
        products: ``{layer name: M}`` with M of shape (in_features, k): also return ``Ḡ M``,
            streamed in sketch mode and exact in exact mode (GoRA's ``Ḡ A^T``).
        memory_budget: bytes (or "12GB") the exact-mode accumulators may take on the device
            (default: half the free GPU memory; unlimited on a CPU).
        offload: where exact-mode accumulators live: "device", "cpu" (pinned host memory filled
            through a small staging buffer with asynchronous copies), "passes" (layer groups that
            fit the budget, each in its own pass over the batches), or "auto" (device if they
            fit, else cpu on a GPU and passes on a CPU).
        loss_fn: ``loss_fn(model, batch) -> scalar``; per-batch losses are averaged over batches.
        exclude_modules: layers never to target.
        nonfinite: "skip" leaves a batch out of a layer's mean when that layer's gradient is not
            finite (warning naming the layer; a batch with a non-finite loss is skipped whole),
            "error" raises FloatingPointError.
        train_mode: run the model in train mode (dropout on); default eval.
        progress: show a tqdm bar (on rank 0, where a terminal or notebook shows one). Start,
            progress and a summary are logged (logger "fastlora", INFO) either way; see
            :func:`fastlora.enable_logging`.
        seed: seeds the sketch matrices (identical on all ranks).
        shard: under ``torch.distributed`` with several ranks, exact mode keeps on each rank only
            its block of rows of every ``Ḡ`` (``torch.chunk``'s split, as ``fully_shard`` splits
            the weight; ``LayerGradient.rows`` says which), ``out·in / world`` per layer: as soon
            as a layer group's pass is done, its whole accumulators are reduced into their owners'
            rows one layer at a time and freed (with ``offload="passes"`` only one group's whole
            accumulators exist at a time: ``summary["accumulator_bytes_peak"]``).
            :func:`fastlora.init.lora_ga` and :func:`fastlora.init.gora` take such a result
            (every rank must call them). Sketches are small and stay whole on every rank. No
            effect on one process. Off by default: ``mean`` then holds all of ``Ḡ`` everywhere.

    Returns:
        :class:`GradientStats`. Under ``torch.distributed`` every rank accumulates its own batches
        and the results are averaged over all ranks (identical everywhere; with ``shard``, each
        rank holds its rows). ``summary["accumulator_bytes"]`` is what this rank keeps,
        ``summary["accumulator_bytes_whole"]`` what one whole copy takes,
        ``summary["accumulator_bytes_peak"]`` the most this rank held at once.
    """
    _check_options(model, mode, offload, nonfinite, num_batches, sketch_rank, passes)
    if not isinstance(shard, bool):
        raise TypeError(f"shard must be True or False, got {shard!r}")
    plan = _plan(model, batches, targets, exclude_modules, mode, sketch_rank, passes, products, memory_budget, offload)
    updates = _make_updates(plan, mode, sketch_rank, seed)
    world = world_size()
    distributed = world > 1
    shard = shard and distributed and mode == "exact"
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)
    start = time.perf_counter()

    def reduce_group(names: list[str]) -> None:  # as soon as a group's pass is done: one layer at a time
        for name in names:
            plan.records[name].rows = _reduce_rows_to_owners(updates[name])

    losses = _run_batches(model, batches, plan, updates, loss_fn or _default_loss, num_batches, nonfinite,
                          train_mode, progress if not distributed or torch.distributed.get_rank() == 0 else None, mode,
                          reduce_group if shard else None)
    loss_sum, loss_n = (_reduce_across_ranks(plan.records, updates, losses, reduce_accumulators=not shard)
                        if distributed else (sum(losses), len(losses)))
    _finish(plan.records, updates, mode, plan.products)

    acc_bytes = _bytes(updates)
    whole_bytes, peak_bytes = _accumulator_sizes(plan, updates, mode)
    summary = {
        "mode": mode,
        "layers": len(plan.records),
        "batches": int(loss_n),
        "skipped_batches": max((r.skipped for r in plan.records.values()), default=0),
        "tokens": max((r.tokens for r in plan.records.values()), default=0),
        "mean_loss": loss_sum / loss_n if loss_n else float("nan"),
        "time_s": time.perf_counter() - start,
        "accumulator_bytes": acc_bytes,
        "accumulator_bytes_whole": whole_bytes,
        "accumulator_bytes_peak": peak_bytes,
        "world_size": world,
        "sharded": shard,
        "staging_bytes": plan.pool.nbytes if plan.pool is not None else 0,
        "accumulators_on": plan.placement if mode == "exact" else "device",
        "passes": len(plan.runs),
        **_peak_memory(plan.device),
    }
    logger.info("fastlora: gradients of %d layers over %d batches (%d tokens) in %.2f s, %s mode, "
                "accumulators %.1f MiB on %s", summary["layers"], summary["batches"], summary["tokens"],
                summary["time_s"], mode, acc_bytes / 2**20, summary["accumulators_on"])
    return GradientStats(plan.records, mode, summary)


def _bytes(updates: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for u in updates.values() for t in u.tensors())


def _accumulator_sizes(plan: _Plan, updates: dict[str, Any], mode: str) -> tuple[int, int]:
    """(one whole copy of the accumulators, the most this rank held at once): in exact mode each
    group's whole accumulators live during its pass, next to what earlier groups kept (their row
    blocks when sharded, else everything)."""
    if mode != "exact":
        whole = _bytes(updates)
        return whole, whole
    whole, peak, kept = 0, 0, 0
    for group, pass_no in plan.runs:
        if pass_no != 1:
            continue
        names = [plan.found[i][0] for i in group]
        group_whole = sum(updates[n].nbytes for n in names)
        whole += group_whole
        peak = max(peak, kept + group_whole)
        kept += _bytes({n: updates[n] for n in names})
    return whole, peak


def _check_options(model, mode, offload, nonfinite, num_batches, sketch_rank, passes) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
    if mode == "sketch" and (not isinstance(sketch_rank, int) or sketch_rank < 1):
        raise ValueError(f"sketch_rank must be a positive int, got {sketch_rank!r}")
    if passes not in (1, 2) or (passes == 2 and mode != "sketch"):
        raise ValueError("passes must be 1, or 2 in sketch mode")


@dataclass
class _Plan:
    """What one collection runs: the target layers, their records, where the accumulators live,
    and the passes over the batches (a layer group and the pass number each)."""

    found: list[tuple[str, nn.Module]]
    records: dict[str, LayerGradient]
    products: dict[str, Tensor]
    device: torch.device
    placement: str
    pool: _StagingPool | None
    runs: list[tuple[list[int], int]]


def _plan(model, batches, targets, exclude_modules, mode, sketch_rank, passes, products, memory_budget,
          offload) -> _Plan:
    """Targets, checks of ``products`` and the sketch rank, and the memory plan (placement of the
    exact accumulators, staging buffers, layer groups)."""
    found = find_linear_targets(model, targets, exclude_modules, include_adapted=True)
    for name, module in found:
        base = module.base_layer if isinstance(module, LoRALinear) else module
        if is_quantized(base):
            check_quantized_layer(base, name)
    products = dict(products or {})
    names = {name for name, _ in found}
    for name, m in products.items():
        if name not in names:
            raise ValueError(f"products has a matrix for {name!r}, which is not a target layer")
        in_f = frozen_weight(dict(found)[name]).shape[1]
        if not isinstance(m, Tensor) or m.dim() != 2 or m.shape[0] != in_f:
            raise ValueError(f"products[{name!r}] must be a tensor of shape ({in_f}, k), got "
                             f"{tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__}")
    if mode == "sketch":
        for name, module in found:
            if sketch_rank > min(frozen_weight(module).shape):
                raise ValueError(f"sketch_rank={sketch_rank} exceeds min(out, in) of layer {name}")
    reiterable = iter(batches) is not batches
    device = frozen_weight(found[0][1]).device
    budget = _parse_budget(memory_budget, device)

    records = {name: LayerGradient(name, *frozen_weight(m).shape) for name, m in found}
    sizes = [4 * r.out_features * r.in_features for r in records.values()]
    pool = None
    groups = [list(range(len(found)))]
    placement = "device"
    if mode == "exact":
        if offload == "auto":
            offload = "device" if sum(sizes) <= budget else ("cpu" if device.type == "cuda" else "passes")
        placement = offload
        if offload == "cpu":
            # Two staging slots of at most a quarter of the largest layer each (and 16 MiB): the
            # engine's device memory stays below half a layer's float32 gradient.
            largest = max(sizes) // 4
            widest = max(r.in_features for r in records.values())
            all_f64 = all(frozen_weight(m).dtype == torch.float64 for _, m in found)
            pool = _StagingPool(device, max(widest, min(largest // 4, 4 * 2**20)),
                                torch.float64 if all_f64 else torch.float32)
        elif offload == "passes":
            groups = _plan_groups(sizes, budget)
    if (len(groups) > 1 or passes == 2) and not reiterable:
        raise ValueError("this collection runs over the batches more than once: pass a re-iterable "
                         "collection (a list or a DataLoader), not an iterator")
    runs = [(g, 1) for g in groups] + ([(groups[0], 2)] if passes == 2 else [])
    return _Plan(found, records, products, device, placement, pool, runs)


def _make_updates(plan: _Plan, mode: str, sketch_rank: int, seed: int) -> dict[str, Any]:
    """Each target layer's accumulator (exact) or sketch (the sketch matrices seeded, in order)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    updates: dict[str, Any] = {}
    for name, module in plan.found:
        w = frozen_weight(module)
        if mode == "exact":
            updates[name] = _ExactUpdate(w, plan.pool)
        else:
            layer_products = {name: plan.products[name]} if name in plan.products else {}
            updates[name] = _SketchUpdate(w, sketch_rank, gen, layer_products)
    return updates


def _run_batches(model, batches, plan: _Plan, updates, loss_fn, num_batches, nonfinite, train_mode, progress,
                 mode, after_group: Callable[[list[str]], None] | None = None) -> list[float]:
    """Every pass over the batches with the probes attached (one backward per batch); returns the
    first pass's finite losses. ``after_group`` gets the names of each first-pass layer group once
    its pass is done. ``progress``: log and show a bar (True), log only (False), neither (None: not
    rank 0)."""
    engine = _Engine(nonfinite)
    records = plan.records
    losses: list[float] = []
    with _frozen_and_restored(model, train_mode), torch.enable_grad():
        for run_index, (group, pass_no) in enumerate(plan.runs):
            if pass_no == 2:
                if world_size() > 1:  # the basis Q must come from every rank's batches, identical everywhere
                    _all_reduce_sum([t for upd in updates.values() for t in upd.tensors()])
                for upd in updates.values():
                    upd.start_second_pass()
            handles = []
            try:
                for i in group:
                    name, module = plan.found[i]
                    updates[name].allocate()
                    probe = _Probe(records[name], updates[name], engine)
                    # A second pass must not count again.
                    if pass_no == 2:
                        records[name].count = records[name].tokens = 0
                    handles.append(module.register_forward_hook(probe.hook, with_kwargs=True))
                total = num_batches
                if total is None and hasattr(batches, "__len__"):
                    total = len(batches)
                bar = None
                if progress is not None:
                    desc = f"gradients ({mode}" + (f", pass {run_index + 1}/{len(plan.runs)}" if len(plan.runs) > 1 else "") + ")"
                    bar = Progress(desc, total, bar=progress)
                seen = 0
                for batch in batches:
                    if num_batches is not None and seen >= num_batches:
                        break
                    engine.batch = seen
                    seen += 1
                    loss = loss_fn(model, to_device(batch, plan.device))
                    if not isinstance(loss, Tensor) or loss.dim() != 0:
                        raise ValueError("loss_fn must return a scalar tensor")
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        if nonfinite == "error":
                            raise FloatingPointError(f"non-finite loss {value} in batch {engine.batch}")
                        warnings.warn(f"fastlora: non-finite loss in batch {engine.batch}; batch skipped",
                                      RuntimeWarning, stacklevel=3)
                        for rec in records.values():
                            rec.skipped += 1
                        continue
                    if not loss.requires_grad:
                        raise ValueError("the loss does not depend on any target layer: check targets "
                                         "and that the loss is computed from the model's output")
                    loss.backward()
                    if plan.pool is not None:
                        plan.pool.flush()
                    if run_index == 0:
                        losses.append(value)
                    if bar is not None:
                        bar.update(1)
                if bar is not None:
                    bar.close(f"{len(group)} layers")
                if num_batches is not None and seen < num_batches:
                    warnings.warn(f"fastlora: only {seen} batches were available (num_batches={num_batches})",
                                  RuntimeWarning, stacklevel=3)
                if seen == 0:
                    raise ValueError("no batches: `batches` is empty")
            finally:
                for h in handles:
                    h.remove()
            if after_group is not None and pass_no == 1:
                after_group([plan.found[i][0] for i in group])
    return losses


def _reduce_across_ranks(records: dict[str, LayerGradient], updates, losses: list[float],
                         reduce_accumulators: bool) -> tuple[float, float]:
    """Sums the counts and losses over all ranks, and the accumulators unless they were reduced
    into row blocks already; returns (loss sum, loss count)."""
    counts = torch.tensor([[r.count, r.tokens, r.skipped] for r in records.values()], dtype=torch.float64)
    stats = torch.tensor([sum(losses), len(losses)], dtype=torch.float64)
    if reduce_accumulators:
        _all_reduce_sum([t for u in updates.values() for t in u.tensors()])
    _all_reduce_sum([counts, stats])
    for rec, (c, t, s) in zip(records.values(), counts.tolist()):
        rec.count, rec.tokens, rec.skipped = int(c), int(t), int(s)
    loss_sum, loss_n = stats.tolist()
    return loss_sum, loss_n


def _finish(records: dict[str, LayerGradient], updates, mode: str, products: dict[str, Tensor]) -> None:
    """Turns the sums into means (and the sketches into GradientSketch); warns about layers with
    no or an all-zero gradient."""
    empty = []
    for name, rec in records.items():
        upd = updates[name]
        scale = 1.0 / rec.count if rec.count else 0.0
        if rec.count == 0:
            empty.append(name)
        if mode == "exact":
            rec.mean = upd.acc.mul_(scale)
            if name in products:
                rec.products[name] = rec.mean @ products[name].to(device=rec.mean.device, dtype=rec.mean.dtype)
        else:
            k = upd.k
            right = upd.right.mul_(scale)
            rec.sketch = GradientSketch(upd.omega, upd.psi, right[:, :k], upd.corange.mul_(scale),
                                        upd.basis, upd.projection.mul_(scale) if upd.projection is not None else None)
            offset = k
            for pname, width in zip(upd.names, upd.widths):
                rec.products[pname] = right[:, offset : offset + width]
                offset += width
        # (A shard's zeros say nothing about the other rows.)
        if mode == "exact" and rec.count and not rec.sharded and not bool(rec.mean.any()):
            empty.append(name)
    if empty:
        warnings.warn(f"fastlora: no (or an all-zero) gradient for {len(empty)} target layers: {empty[:6]}",
                      RuntimeWarning, stacklevel=3)
