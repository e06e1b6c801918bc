"""LoRA-GA initialisation (Wang, Yu, Li, NeurIPS 2024, arXiv 2407.05000).

From the SVD ``Ḡ = U S V^T`` of a layer's mean gradient, ``A0 = c V[:, :r]^T`` and
``B0 = c U[:, r:2r]`` (direction "ArB2r") make LoRA's first SGD step equal ``−η s² c² rank_2r(Ḡ)``,
full fine-tuning's step projected to rank 2r. The base weight absorbs ``−s B0 A0`` (a quantized base keeps it
exactly, as the frozen term ``−s B0 A0 x`` of the layer's forward) so the model's
output is unchanged at step 0. See docs/lora_ga.md for the deviations from the official fork.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._batches import call_model, to_device
from .._distributed import broadcast_from_rank0
from ..gradients import GradientStats
from .._numerics import accumulation_dtype
from ..layer import lora_layers
from ..layer import LoRALinear
from ..progress import Progress
from ..transaction import transaction
from .common import collecting_ranks, select_layers

__all__ = ["LoraGAConfig", "lora_ga", "DIRECTIONS", "SCALES", "SVD_METHODS"]

logger = logging.getLogger("fastlora")

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "gd", "unit")
SVD_METHODS = ("randomized", "exact", "sketch")
FALLBACKS = ("error", "lora")


@dataclass
class LoraGAConfig:
    """Settings of :func:`lora_ga` (defaults: the official ``LoraGAConfig``'s).

    direction: which singular vectors go to A and B ("ArB2r": A = V[:r]^T, B = U[:, r:2r];
        "A2rBr"; "ArBr": interleaved; "random": a seeded random split of the top 2r).
    scale: "stable" (both A and B times ``out^(1/4) / sqrt(stable_gamma)``), "gd" (both divided by
        the layer's scale s), "unit" (orthonormal factors as they are).
    svd: "randomized" (``torch.svd_lowrank``, ``q = min(4r, out, in)``, ``niter``, seeded), "exact",
        or "sketch" (from a sketch-mode collection).
    fallback: what to do for a layer with ``2r > min(in, out)``: "error", or "lora" (plain LoRA
        init for that layer, with a warning).
    """

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: float = 16.0
    svd: str = "randomized"
    niter: int = 4
    seed: int = 0
    fallback: str = "error"

    def validate(self) -> None:
        for value, allowed, what in ((self.direction, DIRECTIONS, "direction"), (self.scale, SCALES, "scale"),
                                     (self.svd, SVD_METHODS, "svd"), (self.fallback, FALLBACKS, "fallback")):
            if value not in allowed:
                raise ValueError(f"LoRA-GA {what} must be one of {allowed}, got {value!r}")
        if not self.stable_gamma > 0:
            raise ValueError(f"stable_gamma must be positive, got {self.stable_gamma!r}")


def factors(u: Tensor, vh: Tensor, r: int, direction: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(A, B)`` (r x in, out x r) from the top-2r singular vectors by ``direction``."""
    if direction == "ArB2r":
        return vh[:r], u[:, r : 2 * r]
    if direction == "A2rBr":
        return vh[r : 2 * r], u[:, :r]
    if direction == "ArBr":
        return vh[1 : 2 * r : 2], u[:, 0 : 2 * r : 2]
    perm = torch.randperm(2 * r, generator=torch.Generator().manual_seed(seed)).to(u.device)
    return vh[perm[:r]], u[:, perm[r:]]


def scale_factor(scale: str, out_features: int, layer_scale: float, stable_gamma: float) -> float:
    """The factor c applied to both A and B."""
    if scale == "stable":
        return out_features**0.25 / stable_gamma**0.5
    if scale == "gd":
        return 1.0 / layer_scale
    return 1.0


def _model_output(model: nn.Module, batch: Any) -> Tensor:
    device = next(iter(lora_layers(model).values())).base_layer.weight.device
    out = call_model(model, to_device(batch, device))
    out = getattr(out, "logits", out)
    return out[0] if isinstance(out, (tuple, list)) else out


def rank_fits(name: str, r: int, out_features: int, in_features: int, cfg: LoraGAConfig) -> bool:
    """Whether LoRA-GA's rank-2r split fits the layer; with ``fallback="error"`` a misfit raises."""
    if 2 * r <= min(in_features, out_features):
        return True
    if cfg.fallback == "error":
        raise ValueError(f"LoRA-GA needs 2r <= min(in, out): layer {name} has r={r} and shape "
                         f"{out_features}x{in_features}; lower its rank (rank_pattern) or pass "
                         "init_config={'fallback': 'lora'} (inject) / fallback='lora' (LoraGAConfig)")
    return False


@torch.no_grad()
def lora_ga(
    model: nn.Module,
    gradients: GradientStats,
    config: LoraGAConfig | dict | None = None,
    check_batch: Any = None,
    layers: Iterable[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Initialises every LoRA layer of ``model`` with LoRA-GA from the engine's gradients.

    For each layer: the top-2r singular vectors of ``Ḡ`` (by ``config.svd``) give ``A0``, ``B0``
    (``config.direction``, times ``c`` by ``config.scale``); they are stored in the adapters' dtype,
    and ``W ← W − s·B0 A0`` is computed in float32 from the stored values and cast back, so the
    model's output at step 0 equals the original base model's up to ``W``'s rounding. The init
    replaces the layer's adapter: a previous LoRA-GA offset is removed from ``W`` first, trained
    factors are discarded. ``A0``, ``B0`` are kept on the layer (buffers
    ``lora_A0``, ``lora_B0``) so the adapter can be exported relative to the original base (see
    :func:`fastlora.export_peft`).

    Args:
        model: a model with LoRA layers (``fastlora.inject``); layers keep their rank and scale.
        gradients: :func:`fastlora.collect_gradients` result covering every LoRA layer. If it was
            collected on several ranks, every rank must call this (sharded means are decomposed
            with collectives; rank 0's factors are broadcast so all ranks hold the same bits).
        config: :class:`LoraGAConfig` or a dict of its fields.
        check_batch: optional batch; the largest absolute change of the model's output on it
            (before vs after the initialisation) is logged and returned under "__model__".
        layers: names of the LoRA layers to initialise (default: all).

    Returns:
        Per layer: rank, scale, c, the norm of the offset ``s·B0 A0``, and the largest rounding
        error of ``W + s·B0 A0`` against the original weight.
    """
    cfg = config if isinstance(config, LoraGAConfig) else LoraGAConfig(**(config or {}))
    cfg.validate()
    layers = select_layers(model, layers, gradients)
    fits = {name: rank_fits(name, layer.r, layer.out_features, layer.in_features, cfg) for name, layer in layers.items()}
    before = _model_output(model, check_batch) if check_batch is not None else None

    factors_by_layer = {}  # every SVD first: a failure leaves the model as it was
    progress = Progress("LoRA-GA", len(layers), unit="layers")
    for name, layer in layers.items():
        progress.update()
        if not fits[name]:
            continue
        r = layer.r
        g = gradients[name]
        q = min(4 * r, g.out_features, g.in_features)
        u, _, vh = g.svd(2 * r, method=cfg.svd, niter=cfg.niter, seed=cfg.seed, q=q)
        a, b = factors(u, vh, r, cfg.direction, cfg.seed)
        c = scale_factor(cfg.scale, layer.out_features, layer.scaling, cfg.stable_gamma)
        a, b = (a * c).to(layer.lora_A.device, layer.lora_A.dtype), (b * c).to(layer.lora_B.device, layer.lora_B.dtype)
        config = dataclasses.replace(layer.config, init="lora_ga")
        layer.check_adapter(a, b, config, (a, b), where=name)
        factors_by_layer[name] = (a, b, config, c)
    progress.close()
    if collecting_ranks(gradients) > 1:
        # Rank 0's factors everywhere: the same bits whatever each rank's LAPACK threading did.
        broadcast_from_rank0([t for a, b, _, _ in factors_by_layer.values() for t in (a, b)])

    report: dict[str, dict[str, Any]] = {}
    with transaction(model):  # a failure on layer k puts layers 0..k-1 back
        for name, layer in layers.items():
            if name not in factors_by_layer:
                warnings.warn(f"LoRA-GA: layer {name} keeps the plain LoRA init (2r > min(in, out))", stacklevel=2)
                report[name] = {"rank": layer.r, "init": "lora"}
                continue
            a, b, config, c = factors_by_layer[name]
            report[name] = {"rank": layer.r, "scale": config.scaling, "c": c, **_apply(layer, a, b, config)}
    if before is not None:
        after = _model_output(model, check_batch)
        report["__model__"] = {"max_output_change": (after.float() - before.float()).abs().max().item()}
        logger.info("LoRA-GA: largest change of the model's output at init: %.3g",
                    report["__model__"]["max_output_change"])
    logger.info("LoRA-GA: initialised %d layers (%s)", len(layers), asdict(cfg))
    return report


def _apply(layer: LoRALinear, a: Tensor, b: Tensor, config) -> dict[str, float]:
    """Sets the adapter (A, B) = (A0, B0) with the base offset ``s·B0 A0`` (replacing any offset
    the layer had); returns the offset's norm and the largest rounding error of the new effective
    weight against the original one (zero on a quantized base, which keeps the offset as a term)."""
    if layer.quantized:
        layer.load_factors(a, b, config, base_offset=(a, b))
        return {"offset_norm": layer.delta_weight().norm().item(), "max_weight_rounding": 0.0}
    w = layer.base_layer.weight
    offset = layer.base_offset
    original = w.detach().to(accumulation_dtype(w.dtype), copy=True)
    if offset is not None:
        original = original + layer.delta_weight(*offset)
    layer.load_factors(a, b, config, base_offset=(a, b))
    after = layer.delta_weight()
    rounding = (w.to(after.dtype) + after - original).abs().max().item()
    return {"offset_norm": after.norm().item(), "max_weight_rounding": rounding}
