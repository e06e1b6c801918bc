"""The two ways a probe turns a layer's ``dy`` and ``x`` into what the engine keeps: the exact
``acc += dy^T x`` (on the device or through the staging pool into host memory) and the sketch
updates (``Y += dy^T (x Ω)``, ``Z += (dy Ψ^T)^T x``, streamed products, the second pass's
``Q^T Ḡ``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._numerics import accumulation_dtype
from ..backends.registry import op_function
from .plan import Plan, Target, frozen_weight
from .staging import StagingPool

__all__ = ["ExactUpdate", "SketchUpdate", "make_updates"]


def _op(name: str, device: torch.device) -> Callable:
    """The compiled op where the registry says it runs on this device, else its library-op version (same signature)."""
    return op_function(name, device)


class ExactUpdate:
    """acc += dy^T x, with acc on the layer's device or in (pinned) host memory; float32 (float64
    for a float64 layer). ``acc`` is allocated when the pass over the layer's group starts, so
    that layer groups in separate passes never hold all accumulators at once."""

    def __init__(self, weight: Target, pool: StagingPool | None) -> None:
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


class SketchUpdate:
    """Y += dy^T (x Ω), Z += (Ψ dy^T) x and P_i += dy^T (x M_i), from one pass over dy and two
    over x; the products of ``x`` with Ω and every M_i share one pass."""

    def __init__(self, weight: Target, k: int, gen: torch.Generator, products: dict[str, Tensor]) -> None:
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


def make_updates(plan: Plan, mode: str, sketch_rank: int, seed: int) -> dict[str, Any]:
    """Each target layer's accumulator (exact) or sketch (the sketch matrices seeded, in order)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    updates: dict[str, Any] = {}
    for name, module in plan.found:
        w = frozen_weight(module)
        if mode == "exact":
            updates[name] = ExactUpdate(w, plan.pool)
        else:
            layer_products = {name: plan.products[name]} if name in plan.products else {}
            updates[name] = SketchUpdate(w, sketch_rank, gen, layer_products)
    return updates
