"""The collection: :func:`collect_gradients`, the passes over the batches with the probes attached,
and the finish (means, sketches, summary)."""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._batches import call_model, to_device
from .._distributed import world_size
from ..progress import Progress
from ..quantized import cpu_repacking, is_quantized
from ..targets import Targets
from .plan import Plan, check_options, make_plan
from .reduce import all_reduce_sum, reduce_across_ranks, reduce_rows_to_owners
from .results import GradientSketch, GradientStats, LayerGradient
from .strategies import make_updates
from .taps import Probe, ProbeState

__all__ = ["collect_gradients"]

logger = logging.getLogger("fastlora")


def _default_loss(model: nn.Module, batch: Any) -> Tensor:
    out = call_model(model, batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Tensor) and out.dim() == 0:
        loss = out
    if loss is None:
        raise ValueError("the model's output has no .loss: pass loss_fn=lambda model, batch: <scalar loss>")
    return loss


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
    check_options(model, mode, offload, nonfinite, num_batches, sketch_rank, passes)
    if not isinstance(shard, bool):
        raise TypeError(f"shard must be True or False, got {shard!r}")
    plan = make_plan(model, batches, targets, exclude_modules, mode, sketch_rank, passes, products, memory_budget, offload)
    updates = make_updates(plan, mode, sketch_rank, seed)
    world = world_size()
    distributed = world > 1
    shard = shard and distributed and mode == "exact"
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)
    start = time.perf_counter()

    def reduce_group(names: list[str]) -> None:  # as soon as a group's pass is done: one layer at a time
        for name in names:
            plan.records[name].rows = reduce_rows_to_owners(updates[name])

    losses = _run_batches(model, batches, plan, updates, loss_fn or _default_loss, num_batches, nonfinite,
                          train_mode, progress if not distributed or torch.distributed.get_rank() == 0 else None, mode,
                          reduce_group if shard else None)
    loss_sum, loss_n = (reduce_across_ranks(plan.records, updates, losses, reduce_accumulators=not shard)
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


def _accumulator_sizes(plan: Plan, updates: dict[str, Any], mode: str) -> tuple[int, int]:
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


def _run_batches(model, batches, plan: Plan, updates, loss_fn, num_batches, nonfinite, train_mode, progress,
                 mode, after_group: Callable[[list[str]], None] | None = None) -> list[float]:
    """Every pass over the batches with the probes attached (one backward per batch); returns the
    first pass's finite losses. ``after_group`` gets the names of each first-pass layer group once
    its pass is done. ``progress``: log and show a bar (True), log only (False), neither (None: not
    rank 0)."""
    engine = ProbeState(nonfinite)
    losses: list[float] = []
    with _frozen_and_restored(model, train_mode), torch.enable_grad():
        for run_index, (group, pass_no) in enumerate(plan.runs):
            if pass_no == 2:
                _start_second_pass(updates)
            handles: list = []
            try:
                _attach_probes(plan, updates, engine, group, pass_no, handles)
                bar = _progress_bar(progress, mode, run_index, len(plan.runs), batches, num_batches)
                seen = _one_pass(model, batches, plan, loss_fn, num_batches, engine, bar,
                                 losses if run_index == 0 else None)
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


def _start_second_pass(updates: dict[str, Any]) -> None:
    """Each sketch takes the basis ``Q`` of its range for the pass that computes ``Q^T Ḡ``."""
    if world_size() > 1:  # the basis Q must come from every rank's batches, identical everywhere
        all_reduce_sum([t for upd in updates.values() for t in upd.tensors()])
    for upd in updates.values():
        upd.start_second_pass()


def _attach_probes(plan: Plan, updates: dict[str, Any], engine: ProbeState, group: list[int], pass_no: int,
                   handles: list) -> None:
    """Allocates the accumulators of a layer group and hooks a probe into each of its layers;
    ``handles`` gets each hook as it is attached, so that a failure midway removes those too."""
    records = plan.records
    for i in group:
        name, module = plan.found[i]
        updates[name].allocate()
        probe = Probe(records[name], updates[name], engine)
        # A second pass must not count again.
        if pass_no == 2:
            records[name].count = records[name].tokens = 0
        handles.append(module.register_forward_hook(probe.hook, with_kwargs=True))


def _progress_bar(progress: bool | None, mode: str, run_index: int, runs: int, batches: Iterable,
                  num_batches: int | None) -> Progress | None:
    """The progress report of one pass (None on a rank that reports nothing)."""
    total = num_batches
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    if progress is None:
        return None
    desc = f"gradients ({mode}" + (f", pass {run_index + 1}/{runs}" if runs > 1 else "") + ")"
    return Progress(desc, total, bar=progress)


def _one_pass(model, batches, plan: Plan, loss_fn, num_batches, engine: ProbeState, bar: Progress | None,
              losses: list[float] | None) -> int:
    """One pass over (at most ``num_batches`` of) the batches, a backward for each finite loss;
    appends those losses to ``losses`` (unless None) and returns how many batches it took."""
    seen = 0
    for batch in batches:
        if num_batches is not None and seen >= num_batches:
            break
        engine.batch = seen
        seen += 1
        value = _backward_batch(model, batch, plan, loss_fn, engine)
        if value is None:
            continue
        if losses is not None:
            losses.append(value)
        if bar is not None:
            bar.update(1)
    return seen


def _backward_batch(model, batch, plan: Plan, loss_fn, engine: ProbeState) -> float | None:
    """The batch's loss, back-propagated through the probes (the host accumulators then brought up
    to date); None where the loss is not finite and the batch is skipped."""
    loss = loss_fn(model, to_device(batch, plan.device))
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError("loss_fn must return a scalar tensor")
    value = float(loss.detach())
    if not math.isfinite(value):
        if engine.nonfinite == "error":
            raise FloatingPointError(f"non-finite loss {value} in batch {engine.batch}")
        # stacklevel: the caller of collect_gradients (through _one_pass and _run_batches)
        warnings.warn(f"fastlora: non-finite loss in batch {engine.batch}; batch skipped",
                      RuntimeWarning, stacklevel=5)
        for rec in plan.records.values():
            rec.skipped += 1
        return None
    if not loss.requires_grad:
        raise ValueError("the loss does not depend on any target layer: check targets "
                         "and that the loss is computed from the model's output")
    loss.backward()
    if plan.pool is not None:
        plan.pool.flush()
    return value


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
