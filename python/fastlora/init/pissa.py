"""PiSSA (Meng, Wang, Zhang, arXiv 2404.02948) and OLoRA (Büyükakyüz, arXiv 2406.01775): the
adapter starts as the principal part of the base weight, which is moved out of the base.

Faithful to PEFT 0.21.2's ``init_lora_weights="pissa"`` / ``"pissa_niter_<n>"`` / ``"olora"``, all
in float32 from the (dequantized) base weight ``W`` (out x in) of a layer with scale ``s``:

- PiSSA: ``W = V S U^T`` (exact SVD, or ``torch.svd_lowrank(W, r, niter=n)``);
  ``A = diag(sqrt(S_r / s)) U_r^T``, ``B = V_r diag(sqrt(S_r / s))``.
- OLoRA: ``W = Q R``; ``A = R[:r]``, ``B = Q[:, :r]``.

In both ``s·B A`` is then taken out of the base: LoRA-GA's recorded base offset ``(A0, B0) = (A,
B)`` (:meth:`fastlora.LoRALinear.load_factors`), so the output is unchanged at init and merge,
unmerge, unload, saves and :func:`fastlora.export_peft` (relative to the original base, as PEFT's
``path_initial_model_for_weight_conversion``) handle it. A quantized base keeps the offset as an
exact term instead of PEFT's re-quantized residual (PEFT refuses PiSSA on a quantized base).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import torch
from torch import nn

from ..layer import lora_layers
from ..principal import PRINCIPAL_INITS, is_principal_init, original_weight, principal_factors
from ..progress import Progress
from ..transaction import transaction

__all__ = ["PRINCIPAL_INITS", "is_principal_init", "original_weight", "principal_factors", "principal_init"]

logger = logging.getLogger("fastlora")


def recorded_name(init: str) -> str:
    """What the adapter records: "pissa" for every PiSSA variant, "olora"."""
    return "olora" if init == "olora" else "pissa"


@torch.no_grad()
def principal_init(model: nn.Module, init: str, layers: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
    """Initialises the LoRA layers of ``model`` (all, or those named) with PiSSA or OLoRA
    (``init``: "pissa", "pissa_niter_<n>", "olora"); each keeps its rank and scale. Every
    factorisation is computed before any layer changes; a failure leaves the model as it was.
    Returns per layer the norm of the offset ``s·B A`` moved out of the base."""
    if not is_principal_init(init):
        raise ValueError(f"init must be 'pissa', 'pissa_niter_<n>' or 'olora', got {init!r}")
    all_layers = lora_layers(model)
    if not all_layers:
        raise ValueError("the model has no LoRA layers; call fastlora.inject(model, ...) first")
    names = list(all_layers) if layers is None else list(layers)
    unknown = [n for n in names if n not in all_layers]
    if unknown:
        raise ValueError(f"not LoRA layers of this model: {unknown[:4]}")
    merged = [n for n in names if all_layers[n].merged]
    if merged:
        raise RuntimeError(f"unmerge layers {merged[:4]} before initialising them")
    planned = {}
    progress = Progress(init, len(names), unit="layers")
    for name in names:
        layer = all_layers[name]
        a, b = principal_factors(original_weight(layer), layer.r, layer.scaling, init)
        a = a.to(layer.lora_A.device, layer.lora_A.dtype)
        b = b.to(layer.lora_B.device, layer.lora_B.dtype)
        config = dataclasses.replace(layer.config, init=recorded_name(init))
        layer.check_adapter(a, b, config, (a, b), where=name)
        planned[name] = (a, b, config)
        progress.update()
    progress.close()
    report = {}
    with transaction(model):
        for name, (a, b, config) in planned.items():
            layer = all_layers[name]
            layer.load_factors(a, b, config, base_offset=(a, b))
            report[name] = {"rank": layer.r, "offset_norm": layer.delta_weight().norm().item()}
    logger.info("fastlora: %s initialised %d layers", init, len(planned))
    return report
