"""The principal part of a base weight, as PiSSA and OLoRA take it (the factor math only).

Shared by :mod:`fastlora.init.pissa` (which moves it out of the base at initialisation) and
:mod:`fastlora.io` (which recomputes it to read a PEFT PiSSA/OLoRA adapter saved without PEFT's
conversion); :func:`fastlora.inject` asks :func:`is_principal_init` while validating ``init=``.
In float32 from the (dequantized) base weight ``W`` (out x in) of a layer with scale ``s``:

- PiSSA: ``W = V S U^T`` (exact SVD, or ``torch.svd_lowrank(W, r, niter=n)``);
  ``A = diag(sqrt(S_r / s)) U_r^T``, ``B = V_r diag(sqrt(S_r / s))``.
- OLoRA: ``W = Q R``; ``A = R[:r]``, ``B = Q[:, :r]``.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from .layer import LoRALinear
from .quantized import dense_weight

__all__ = ["PRINCIPAL_INITS", "is_principal_init", "original_weight", "principal_factors"]

PRINCIPAL_INITS = ("pissa", "olora")  # plus "pissa_niter_<n>"
_NITER = re.compile(r"pissa_niter_(\d+)")


def is_principal_init(init: object) -> bool:
    """Whether ``init`` names PiSSA ("pissa", "pissa_niter_<n>") or OLoRA ("olora")."""
    return isinstance(init, str) and (init in PRINCIPAL_INITS or _NITER.fullmatch(init) is not None)


@torch.no_grad()
def principal_factors(weight: Tensor, r: int, scaling: float, init: str) -> tuple[Tensor, Tensor]:
    """``(A, B)`` in float32 (r x in, out x r) of PiSSA / OLoRA (``init``) for ``weight``."""
    w = weight.to(torch.float32)
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    match = _NITER.fullmatch(init)
    if match:
        v, s, u = torch.svd_lowrank(w, r, niter=int(match.group(1)))
        uh = u.t()
    elif init == "pissa":
        v, s, uh = torch.linalg.svd(w, full_matrices=False)
        v, s, uh = v[:, :r], s[:r], uh[:r]
    else:
        raise ValueError(f"init must be 'pissa', 'pissa_niter_<n>' or 'olora', got {init!r}")
    root = (s / scaling).sqrt()
    return root[:, None] * uh, v * root[None, :]


def original_weight(layer: LoRALinear) -> Tensor:
    """The layer's original base weight (its recorded offset added back), in float32."""
    base = layer.base_layer
    w = dense_weight(base) if layer.quantized else base.weight.detach().to(torch.float32)
    if layer.base_offset is not None and not layer.quantized:
        w = w + layer.delta_weight(*layer.base_offset).to(w.device)
    return w
