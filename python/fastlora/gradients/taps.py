"""How the engine sees ``x`` and ``dy`` of each target layer: a forward hook keeps the input and
hooks the output's gradient, attaching outputs of frozen-only inputs to the graph through an
anchor; the probe checks ``dy`` for non-finite values and hands both to the layer's update."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from .results import LayerGradient

__all__ = ["Probe", "ProbeState"]


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


class Probe:
    """Hooks one target layer: a tensor hook on its output receives ``dy`` in backward, with the
    layer's input ``x`` kept from forward. Outputs are not copied (in-place use stays legal),
    except where only the anchor gives them a gradient."""

    def __init__(self, record: LayerGradient, update, engine: ProbeState) -> None:
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


class ProbeState:
    """State shared by the probes of one collection."""

    def __init__(self, nonfinite: str) -> None:
        self.anchor = torch.zeros((), requires_grad=True)
        self.batch = 0
        self.nonfinite = nonfinite
