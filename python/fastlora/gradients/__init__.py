"""The gradient engine: mean gradients of frozen weights over calibration batches.

LoRA-GA and GoRA start from ``Ḡ_i``, the mean over ``N`` batches of the gradient of the loss with
respect to each target layer's frozen weight. :func:`collect_gradients` gets it without giving any
parameter a ``.grad``: each target layer is tapped with a forward hook whose autograd node sees the
layer's input ``x`` and output gradient ``dy`` in backward and streams ``dy^T x`` into a float32
accumulator (exact mode), or only random projections of it (sketch mode). See
``docs/gradient_engine.md``.

Modules, each importing only those listed before it: ``results`` (what a collection returns),
``staging`` (the host staging pool), ``plan`` (option checks, budget, layer groups, memory plan),
``strategies`` (exact and sketch updates), ``taps`` (the hooks that see ``x`` and ``dy``),
``reduce`` (cross-rank reductions), ``engine`` (:func:`collect_gradients` and its batch loop).
"""

from .engine import collect_gradients
from .results import GradientSketch, GradientStats, LayerGradient

__all__ = ["GradientSketch", "GradientStats", "LayerGradient", "collect_gradients"]
