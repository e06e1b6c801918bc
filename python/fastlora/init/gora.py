"""GoRA: gradient-driven rank allocation and initialisation (He et al., arXiv 2502.12171).

Phase 2 (importance and ranks) and phase 3 (initialisation) of ``shared/spec/gora.md``, from the
gradient engine's mean gradients: each layer's importance (default ``mean |W ⊙ Ḡ|``) shares out a
budget of ``r_ref · Σ (in + out)`` adapter parameters; each layer gets ``A`` Kaiming-uniform and
``B = −ξ Ḡ A^T (A A^T + 1e-8 I)^{-1}``, ``ξ = γ sqrt(in) / α``, so that ``s·B A = −γ sqrt(in/r) Ḡ P_A``
(one norm-matched gradient-descent step) with ``s = α / sqrt(r)``. Base weights are not modified.
See docs/gora.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._distributed import chunk_rows, gather_row_chunks, sum_in_rank_order
from ..gradients import GradientStats
from ..layer import LoRALinear
from ..quantized import dense_weight
from ..targets import Targets, find_linear_targets
from ..transaction import transaction
from .common import collecting_ranks, select_layers

__all__ = ["GoRAConfig", "Allocation", "allocate_ranks", "gora", "gora_a_max", "IMPORTANCES"]

logger = logging.getLogger("fastlora")

IMPORTANCES = ("union_mean", "union_frobenius_norm", "grad_frobenius_norm")


@dataclass
class GoRAConfig:
    """Settings of :func:`gora` (defaults: the official scripts').

    r_ref: the reference rank; the budget is ``r_ref · Σ (in + out)``.
    r_min, r_max: rank bounds (default ``r_ref // 2`` and ``4 r_ref``); never above ``min(in, out)``.
    importance: "union_mean" (``mean |W ⊙ Ḡ|``), "union_frobenius_norm" (``‖W ⊙ Ḡ‖_F``) or
        "grad_frobenius_norm" (``‖Ḡ‖_F``).
    strict_budget: repair the floored ranks (largest remainders first, within the bounds) so the
        parameter count is within one layer's ``in + out`` of the budget; off as in the official code.
    gamma: the initial step size γ (``ΔW_0 ≈ −γ Ḡ`` in norm).
    seed: seeds the ``A`` draws (identical on every rank).
    a_max: ``{layer: A_max}`` drawn before calibration (see :func:`gora_a_max`) for the
        memory-lean variant: ``B`` then comes from the engine's streamed ``Ḡ A_max^T``.
    """

    r_ref: int = 8
    r_min: int | None = None
    r_max: int | None = None
    importance: str = "union_mean"
    strict_budget: bool = False
    gamma: float = 0.05
    seed: int = 0
    a_max: dict[str, Tensor] | None = field(default=None, repr=False)

    def bounds(self) -> tuple[int, int]:
        r_min = self.r_min if self.r_min is not None else max(1, self.r_ref // 2)
        r_max = self.r_max if self.r_max is not None else 4 * self.r_ref
        return r_min, r_max

    def validate(self) -> None:
        if not isinstance(self.r_ref, int) or self.r_ref < 1:
            raise ValueError(f"r_ref must be a positive int, got {self.r_ref!r}")
        r_min, r_max = self.bounds()
        if not 1 <= r_min <= r_max:
            raise ValueError(f"need 1 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {IMPORTANCES}, got {self.importance!r}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be positive, got {self.gamma!r}")


@dataclass
class Allocation:
    """Ranks per layer, with the importances, the budget and the parameter count it uses."""

    ranks: dict[str, int]
    importances: dict[str, float]
    shares: dict[str, float]
    budget: int
    used: int


def importance(weight: Tensor, grad: Tensor, kind: str) -> float:
    """A layer's importance from its base weight and mean gradient (float32)."""
    w, g = weight.float(), grad.float().to(weight.device)
    if kind == "union_mean":
        return (w * g).abs().mean().item()
    if kind == "union_frobenius_norm":
        return torch.linalg.matrix_norm(w * g).item()
    return torch.linalg.matrix_norm(g).item()


def _importance_sum(weight_rows: Tensor, grad_rows: Tensor, kind: str) -> Tensor:
    """One block of rows' share of an importance (float64): the sum of ``|W ⊙ Ḡ|``, of
    ``(W ⊙ Ḡ)²`` or of ``Ḡ²``, finished by :func:`_importance_from_sums`."""
    w, g = weight_rows.float(), grad_rows.float().to(weight_rows.device)
    terms = g.square() if kind == "grad_frobenius_norm" else (w * g).abs() if kind == "union_mean" else (w * g).square()
    return terms.sum(dtype=torch.float64)


def _importance_from_sums(total: float, numel: int, kind: str) -> float:
    return total / numel if kind == "union_mean" else math.sqrt(total)


def allocate_ranks(
    importances: dict[str, float],
    features: dict[str, int],
    r_ref: int,
    r_min: int,
    r_max: int,
    caps: dict[str, int] | None = None,
    strict_budget: bool = False,
) -> Allocation:
    """GoRA's allocation: ``r_i = clamp(round(budget · p_i) // (in_i + out_i), r_min, r_max)`` with
    ``p_i = I_i / Σ I_j`` (computed in float32, as the official code does, so ranks match it
    exactly), ``budget = r_ref · Σ (in + out)`` and ``caps[name] = min(in, out)`` as a further bound.
    ``strict_budget`` repairs the floors so the count is within one layer's ``in + out`` of the
    budget."""
    names = list(importances)
    caps = caps or {}
    budget = r_ref * sum(features[n] for n in names)
    imp = torch.tensor([importances[n] for n in names])  # float32, like the official code
    total = imp.sum()
    shares = (imp / total).tolist() if total > 0 else [0.0] * len(names)
    hi = {n: min(r_max, caps.get(n, r_max)) for n in names}
    lo = {n: min(r_min, hi[n]) for n in names}
    ranks, remainders = {}, {}
    for n, p in zip(names, shares):
        params = round(budget * p)
        ranks[n] = min(max(params // features[n], lo[n]), hi[n])
        remainders[n] = budget * p / features[n] - math.floor(budget * p / features[n])
    if strict_budget:
        _repair(ranks, remainders, features, lo, hi, budget)
    used = sum(ranks[n] * features[n] for n in names)
    return Allocation(ranks, dict(importances), dict(zip(names, shares)), budget, used)


def _repair(ranks: dict[str, int], remainders: dict[str, float], features: dict[str, int],
            lo: dict[str, int], hi: dict[str, int], budget: int) -> None:
    """Largest remainders gain a rank while the budget allows; smallest lose one while it is
    exceeded (ties by layer order)."""
    order = sorted(ranks, key=lambda n: -remainders[n])
    used = sum(ranks[n] * features[n] for n in ranks)
    for n in reversed(order):
        while used > budget and ranks[n] > lo[n]:
            ranks[n] -= 1
            used -= features[n]
    changed = True
    while changed:
        changed = False
        for n in order:
            if ranks[n] < hi[n] and used + features[n] <= budget:
                ranks[n] += 1
                used += features[n]
                changed = True


def _draw_a_max(in_features: int, r_max: int, gen: torch.Generator) -> Tensor:
    bound = 1.0 / math.sqrt(in_features)  # Kaiming-uniform with a = sqrt(5), as PEFT's A
    return torch.empty(r_max, in_features).uniform_(-bound, bound, generator=gen)


def gora_a_max(model: nn.Module, targets: Targets = "all-linear", r_max: int = 32, seed: int = 0) -> dict[str, Tensor]:
    """Draws ``A_max`` (``r_max × in``, float32, CPU) for every target layer before calibration, in
    module order with the same generator :func:`gora` uses, for the memory-lean variant: pass
    ``products={name: a.t() for name, a in a_max.items()}`` to :func:`fastlora.collect_gradients`
    and ``a_max`` to GoRA; layer i then uses ``A_max[:r_i]``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in find_linear_targets(model, targets, include_adapted=True):
        in_f = module.in_features
        out[name] = _draw_a_max(in_f, r_max, gen)
    return out


@torch.no_grad()
def gora(
    model: nn.Module,
    gradients: GradientStats,
    config: GoRAConfig | dict | None = None,
    layers: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Allocates ranks and initialises every LoRA layer of ``model`` with GoRA.

    Layers are resized to their allocated rank (new adapter Parameters where it changes) and
    switched to the rank-stabilised scale ``s_i = lora_alpha / sqrt(r_i)``; the init replaces the
    layer's adapter (a LoRA-GA offset is removed from the base weight), base weights are otherwise
    untouched. With a
    sketch-mode collection the importances come from the sketches' low-rank reconstructions (an
    estimate; exact mode gives the official importances) and ``B`` from the streamed ``Ḡ A_max^T``
    when ``config.a_max`` is given.

    ``layers`` limits it to those LoRA layers (default: all); the budget is theirs.

    Gradients collected on several ranks: every rank must call this. Each rank works on its block
    of rows of every ``Ḡ`` (a sharded mean's own rows, or those rows of a sketch's reconstruction):
    importances and norms are sums over the ranks (in rank order) and ``B``'s rows are gathered, so
    no rank forms a whole ``Ḡ`` and all end with the same bits.

    Returns:
        ``{"allocation": Allocation, "layers": {name: diagnostics}}``; diagnostics per layer: rank,
        importance, share, ``‖ΔW_0‖ / (γ ‖Ḡ‖)`` and ``‖ΔW_0 + γ Ḡ‖ / ‖Ḡ‖`` (the official code's).
    """
    cfg = config if isinstance(config, GoRAConfig) else GoRAConfig(**(config or {}))
    cfg.validate()
    layers = select_layers(model, layers, gradients)
    r_min, r_max = cfg.bounds()
    if cfg.a_max is not None:
        bad = [n for n in layers if n not in cfg.a_max or cfg.a_max[n].shape != (r_max, layers[n].in_features)]
        if bad:
            raise ValueError(f"a_max must hold a ({r_max}, in_features) matrix for every layer; wrong or missing: {bad[:4]}")
    if gradients.mode == "sketch":
        warnings.warn("GoRA: importances from sketches are estimates; exact mode gives the official ones",
                      RuntimeWarning, stacklevel=2)

    world = collecting_ranks(gradients)
    rank = torch.distributed.get_rank() if world > 1 else 0
    rows = {n: gradients[n].rows if gradients[n].sharded else chunk_rows(layer.out_features, world, rank)
            for n, layer in layers.items()}
    imps = _importances(layers, gradients, rows, cfg.importance, world)
    zero = [n for n, v in imps.items() if v == 0.0]
    if zero:
        warnings.warn(f"GoRA: layers with a zero importance get r_min={r_min}: {zero[:6]}", RuntimeWarning, stacklevel=2)
    alloc = allocate_ranks(
        imps,
        {n: layer.in_features + layer.out_features for n, layer in layers.items()},
        cfg.r_ref, r_min, r_max,
        caps={n: min(layer.in_features, layer.out_features) for n, layer in layers.items()},
        strict_budget=cfg.strict_budget,
    )
    # Every layer's factors first: a failure leaves the model as it was.
    planned, norms = _planned_factors(layers, gradients, alloc.ranks, rows, cfg, r_max, world)
    report = {}
    for name, (g_norm, d_norm, distance) in zip(layers, norms):
        report[name] = {
            "rank": alloc.ranks[name],
            "importance": imps[name],
            "share": alloc.shares[name],
            "delta_over_gamma_grad": d_norm / (cfg.gamma * g_norm) if g_norm else float("nan"),
            "distance_to_minus_gamma_grad": distance / g_norm if g_norm else float("nan"),
        }
    with transaction(model):  # a failure on layer k puts layers 0..k-1 back
        for name, layer in layers.items():
            layer.load_factors(*planned[name])
    ranks = sorted(alloc.ranks.values())
    logger.info("GoRA: budget %d adapter parameters, allocated %d (%.1f%%), ranks min %d / median %d / max %d",
                alloc.budget, alloc.used, 100.0 * alloc.used / alloc.budget, ranks[0], ranks[len(ranks) // 2], ranks[-1])
    logger.info("GoRA: ranks %s", {name: info["rank"] for name, info in report.items()})
    return {"allocation": alloc, "layers": report}


def _importances(layers: dict[str, LoRALinear], gradients: GradientStats, rows: dict[str, tuple[int, int]],
                 kind: str, world: int) -> dict[str, float]:
    """Each layer's importance, from one layer's block of dense gradient rows at a time (a sketch's
    reconstruction is out x in); on several ranks from each rank's rows, summed in rank order."""
    if world == 1:
        return {n: importance(dense_weight(layer.base_layer), gradients[n].gradient_rows(0, layer.out_features), kind)
                for n, layer in layers.items()}
    sums = torch.stack([
        _importance_sum(dense_weight(layer.base_layer)[slice(*rows[n])], gradients[n].gradient_rows(*rows[n]),
                        kind).cpu() for n, layer in layers.items()])
    sums = sum_in_rank_order(sums).tolist()
    return {n: _importance_from_sums(total, layer.out_features * layer.in_features, kind)
            for (n, layer), total in zip(layers.items(), sums)}


def _planned_factors(layers: dict[str, LoRALinear], gradients: GradientStats, ranks: dict[str, int],
                     rows: dict[str, tuple[int, int]], cfg: GoRAConfig, r_max: int,
                     world: int) -> tuple[dict[str, tuple[Tensor, Tensor, Any]], list[list[float]]]:
    """Every layer's checked ``(A, B, config)`` at its allocated rank (``B`` gathered whole from the
    ranks' rows), and per layer ``‖Ḡ‖``, ``‖ΔW_0‖`` and ``‖ΔW_0 + γ Ḡ‖`` (squares summed over the ranks)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    planned, squares = {}, []
    for name, layer in layers.items():
        r, (start, stop), g = ranks[name], rows[name], gradients[name]
        grad = g.gradient_rows(start, stop)
        a_max = cfg.a_max[name] if cfg.a_max is not None else _draw_a_max(layer.in_features, r_max, gen)
        a = a_max[:r].to(device=grad.device, dtype=torch.float32)
        streamed = g.products.get(name) if cfg.a_max is not None else None
        ga = g.local_rows(streamed, start, stop)[:, :r].float() if streamed is not None else grad.float() @ a.t()
        gram = a @ a.t() + 1e-8 * torch.eye(r, device=a.device)
        xi = cfg.gamma * math.sqrt(layer.in_features) / layer.lora_alpha
        b = -xi * torch.linalg.solve(gram, ga.t()).t()
        if world > 1:
            b = gather_row_chunks(b, layer.out_features)
        config = dataclasses.replace(layer.config, r=r, use_rslora=True, init="gora")
        layer.check_adapter(a, b, config, where=name)
        planned[name] = (a, b, config)
        # This rank's rows of s·B A as the layer will hold it (factors rounded to the adapters' dtype).
        delta = layer.delta_weight(a.to(layer.lora_A.dtype), b[start:stop].to(layer.lora_B.dtype), config.scaling)
        grad = grad.to(delta.device)
        layer_norms = torch.stack([grad.norm(), delta.norm(), (delta + cfg.gamma * grad).norm()])
        squares.append(layer_norms.double().square().cpu())
    squares = torch.stack(squares)
    return planned, (sum_in_rank_order(squares) if world > 1 else squares).sqrt().tolist()
