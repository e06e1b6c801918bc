"""The LoRA-Pro optimizers (Wang et al., ICLR 2025; docs/lora_pro.md).

LoRA-Pro adjusts the LoRA gradients so that a step on ``(A, B)`` moves the merged weight
``W + s B A`` along the projection of the full gradient ``G`` onto the tangent space of rank-r
matrices (:mod:`fastlora.optim.closed_form`). :class:`LoRAPro` is the AdamW version: in the
default ``mode="full"`` it keeps Adam's moments of the *equivalent gradient* in weight space
(``out x in`` per layer) and pulls Adam's direction back to the adapters, one fused pass over the
moments per layer (``fastlora._ops.lora_pro_moments``); ``mode="efficient"`` runs AdamW on the
adjusted adapter gradients with adapter-sized moments. :class:`LoRAProSGD` is the plain SGD
version. Each layer's ``(A, B, s)`` comes from its :class:`~fastlora.LoRALinear`, so per-layer
ranks and scales (GoRA, rank_pattern) work; every other trainable parameter gets ordinary AdamW
(or SGD).
"""

from __future__ import annotations

import logging
import math
import numbers

import torch
from torch import Tensor

from ... import _ops
from ..._distributed import gather_rows, local, sum_over_mesh
from ..._numerics import adam_directions
from ..closed_form import DEFAULT_RIDGE, GramProjector
from .base import LoRAProBase
from .discovery import Block, ModelOrLayers
from .state import new_moment, start_moments

__all__ = ["DEFAULT_TRUST_REGION", "LoRAPro", "LoRAProSGD", "MODES", "MOMENT_DTYPES"]

logger = logging.getLogger("fastlora")

MODES = ("full", "efficient")
MOMENT_DTYPES = (torch.bfloat16, torch.float32, torch.float64)
DEFAULT_TRUST_REGION = 0.5  # chosen on the main job's ablation (docs/composition.md)


def _check_hyperparameters(
    lr: float, weight_decay: float, betas: tuple[float, float] | None = None, eps: float | None = None
) -> None:
    if not isinstance(lr, numbers.Real) or not lr >= 0.0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if not isinstance(weight_decay, numbers.Real) or not weight_decay >= 0.0 or not math.isfinite(weight_decay):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if betas is not None:
        if len(betas) != 2 or not all(isinstance(b, numbers.Real) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if eps is not None and (not isinstance(eps, numbers.Real) or not eps >= 0.0 or not math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


class LoRAPro(LoRAProBase):
    """LoRA-Pro with AdamW (the paper's final algorithm), a ``torch.optim.Optimizer``.

    Example:
        >>> fastlora.inject(model, target_modules="all-linear", r=16, lora_alpha=32)
        >>> opt = fastlora.optim.LoRAPro(model, lr=2e-5)
        >>> loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()

    Args:
        model: the model (its :class:`~fastlora.LoRALinear` layers are found with
            :func:`fastlora.lora_layers`; its other trainable parameters get ordinary AdamW),
            or LoRA layers (a dict from ``lora_layers`` or a list; then only those are optimised).
        lr: learning rate.
        betas, eps: Adam's coefficients; bias correction starts at step 1.
        weight_decay: decoupled weight decay of the merged weight: ``A, B *= sqrt(1 - lr wd)`` so
            that ``s B A`` shrinks by ``1 - lr wd``; plain AdamW decay for the other parameters.
        mode: "full" (default): Adam moments of the equivalent gradient, ``out x in`` per layer
            (the memory of full fine-tuning's Adam state), one fused pass per layer; the merged
            weight moves along the tangent-space projection of Adam's direction. "efficient":
            AdamW on the adjusted adapter gradients with adapter-sized moments.
        x_mode: how the free r x r matrix X is chosen: "sylvester" (closest to the LoRA gradients,
            the paper's choice), "symmetry" or "zero".
        moment_dtype: storage of the LoRA layers' moments (math is float32, or float64 for
            float64 moments): torch.bfloat16 (default), torch.float32 or torch.float64.
        ridge: the ridge added to the Gram matrices' eigenvalues before inverting them.
        decay_base_weight: also multiply each adapted layer's frozen base weight by
            ``1 - lr wd`` (the older official code's behaviour; off by default: it modifies the
            base model).
        check_finite: raise ValueError, before changing anything, if a gradient holds NaN/Inf
            (costs one device synchronisation per step).
        trust_region: τ > 0 (default 0.5) or None (the paper's closed form): each step of a
            layer's ``lora_A`` stays within ``τ ‖A‖_F`` for the closed form's X-free part
            (``2 τ ‖A‖_F`` with X), by damping ``BᵀB`` by the smallest ``δ`` that achieves it; the
            faithful step wherever it already fits. Where ``B`` is small next to its step (right
            after a GoRA init, or after ``B`` leaves 0) the faithful step moves ``A`` by many
            times its norm and the realised merged-weight step is mostly the second-order term
            ``s ΔB ΔA``; the region keeps it first order (docs/composition.md). Not used in
            efficient mode, whose Adam normalises each adapter's step.

    State (``optimizer.state``): for a LoRA layer, under its ``lora_A``: ``step`` and, in full
    mode, ``exp_avg`` / ``exp_avg_sq`` of shape ``out x in``; in efficient mode each adapter holds
    its own moments. ``state_dict()`` / ``load_state_dict()`` include them.
    """

    def __init__(
        self,
        model: ModelOrLayers,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mode: str = "full",
        x_mode: str = "sylvester",
        moment_dtype: torch.dtype = torch.bfloat16,
        ridge: float = DEFAULT_RIDGE,
        decay_base_weight: bool = False,
        check_finite: bool = True,
        trust_region: float | None = DEFAULT_TRUST_REGION,
    ) -> None:
        _check_hyperparameters(lr, weight_decay, betas, eps)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if moment_dtype not in MOMENT_DTYPES:
            raise TypeError(
                f"moment_dtype must be one of {MOMENT_DTYPES}, got {moment_dtype!r} (float16 cannot hold the second "
                "moment's range)"
            )
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, mode=mode, x_mode=x_mode,
            moment_dtype=moment_dtype, ridge=ridge, decay_base_weight=bool(decay_base_weight),
            trust_region=trust_region,
        )
        super().__init__(model, defaults, check_finite)
        if mode == "full":
            elements = sum(layer.A.shape[1] * layer.B.shape[0] for layer in self._layers.values())
            logger.info(
                "fastlora: LoRAPro full mode keeps %.2f GiB of %s moments (2 x out x in per layer)",
                2 * elements * torch.tensor([], dtype=moment_dtype).element_size() / 2**30, moment_dtype,
            )

    def _directions(
        self, projector: GramProjector, blocks: list[Block], mode: str, x_mode: str
    ) -> list[tuple[Tensor, Tensor]]:
        """Each block's directions: the closed form on Adam's pulled-back direction (full mode),
        or Adam on the adjusted gradients (efficient mode)."""
        if mode == "efficient":
            adjusted = projector.adjust([b.grad_A for b in blocks], [b.grad_B for b in blocks], x_mode)
            return [self._adam_on_adapters(block, h_a, h_b) for block, (h_a, h_b) in zip(blocks, adjusted)]
        pulled_A, pulled_B = [], []
        for i, block in enumerate(blocks):
            h_a0, h_b0 = projector.base(i, block.grad_A, block.grad_B)
            pulled = [self._pull_back(block, k, h_a0[k], h_b0[k]) for k in range(len(block.layers))]
            pulled_A.append(torch.stack([g_a for g_a, _ in pulled]).to(block.A.dtype))
            pulled_B.append(torch.stack([g_b for _, g_b in pulled]).to(block.A.dtype))
        return projector.adjust(pulled_A, pulled_B, x_mode, _trust_radii(blocks))

    def _pull_back(self, block: Block, k: int, h_a0: Tensor, h_b0: Tensor) -> tuple[Tensor, Tensor]:
        """Full mode, layer ``k`` of the block: one fused pass updates its ``out x in`` moments with
        the equivalent gradient rebuilt from ``(h_a0, h_b0)`` and returns Adam's direction ``D``
        pulled back to the adapters, ``(s B^T D, s D A^T)``."""
        layer, group = block.layers[k], block.groups[k]
        state = self.state[layer.A]
        if not state:
            state["step"] = 0
            start_moments(state, lambda: new_moment(layer, group["moment_dtype"]))
        state["step"] += 1
        beta1, beta2 = group["betas"]
        rows = slice(*layer.rows_B)  # the moments' rows this rank holds (all without FSDP)
        g_a, g_b = _ops.lora_pro_moments(
            local(state["exp_avg"]), local(state["exp_avg_sq"]), block.A[k], block.B[k][rows], h_a0,
            h_b0[rows], block.scales[k], beta1, beta2, group["eps"], state["step"],
        )
        if layer.sharded:  # s B^T D sums over all rows; s D A^T has one row per row of B
            g_a = sum_over_mesh(g_a, layer.B)
            g_b = gather_rows(g_b, layer.B, tuple(layer.B.shape))
        return g_a, g_b

    def _adam_on_adapters(self, block: Block, h_a: Tensor, h_b: Tensor) -> tuple[Tensor, Tensor]:
        """Efficient mode: AdamW's direction for each adapter from its adjusted gradient."""
        moments, grads, steps = [], [], []
        for k, (layer, group) in enumerate(zip(block.layers, block.groups)):
            state_a, state_b = self.state[layer.A], self.state[layer.B]
            if not state_a:
                state_a["step"] = 0
                for state, p in ((state_a, layer.A), (state_b, layer.B)):
                    start_moments(state, lambda p=p: torch.zeros(p.shape, dtype=group["moment_dtype"], device=p.device))
            state_a["step"] += 1
            moments += [state_a, state_b]
            grads += [h_a[k], h_b[k]]
            steps += [state_a["step"]] * 2
        directions = _grouped_adam(moments, grads, steps, [g for g in block.groups for _ in range(2)])
        return torch.stack(directions[0::2]), torch.stack(directions[1::2])

    def _plain_step(self, group: dict, params: list[Tensor]) -> None:
        """Ordinary AdamW (moments in each parameter's dtype, math in float32)."""
        states = []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                start_moments(state, lambda p=p: torch.zeros_like(p, memory_format=torch.preserve_format))
            state["step"] += 1
            states.append(state)
        directions = _grouped_adam(states, [p.grad for p in params], [s["step"] for s in states], [group] * len(params))
        if group["weight_decay"] > 0:
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(params, [d.to(p.dtype) for d, p in zip(directions, params)], alpha=-group["lr"])


def _trust_radii(blocks: list[Block]) -> list[Tensor] | None:
    """The blocks' trust radii for :meth:`GramProjector.adjust` (blocks of one call share the setting)."""
    radii = [b.trust_radii() for b in blocks]
    return None if radii[0] is None else radii


def _grouped_adam(states: list[dict], grads: list[Tensor], steps: list[int], groups: list[dict]) -> list[Tensor]:
    """:func:`fastlora._numerics.adam_directions` over tensors whose groups may differ in betas/eps."""
    out: list[Tensor | None] = [None] * len(grads)
    by_hyper: dict[tuple, list[int]] = {}
    for i, g in enumerate(groups):
        by_hyper.setdefault((tuple(g["betas"]), g["eps"]), []).append(i)
    for ((beta1, beta2), eps), idx in by_hyper.items():
        directions = adam_directions(
            [states[i]["exp_avg"] for i in idx], [states[i]["exp_avg_sq"] for i in idx], [grads[i] for i in idx],
            beta1, beta2, eps, [steps[i] for i in idx],
        )
        for i, d in zip(idx, directions):
            out[i] = d
    return out  # type: ignore[return-value]


class LoRAProSGD(LoRAProBase):
    """LoRA-Pro with plain SGD (no momentum), as in the official code: each step moves ``A, B``
    along the closed form's adjusted gradients, so the merged weight moves along the
    tangent-space projection of ``G``. Other trainable parameters get plain SGD.

    Args:
        model, x_mode, ridge, decay_base_weight, check_finite, trust_region: as :class:`LoRAPro`.
        lr: learning rate.
        weight_decay: ``A, B *= sqrt(1 - lr wd)`` (for plain SGD decoupled and L2 decay coincide);
            ``p *= 1 - lr wd`` for the other parameters.
    """

    def __init__(
        self,
        model: ModelOrLayers,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        x_mode: str = "sylvester",
        ridge: float = DEFAULT_RIDGE,
        decay_base_weight: bool = False,
        check_finite: bool = True,
        trust_region: float | None = DEFAULT_TRUST_REGION,
    ) -> None:
        _check_hyperparameters(lr, weight_decay)
        defaults = dict(
            lr=lr, weight_decay=weight_decay, mode="sgd", x_mode=x_mode, ridge=ridge,
            decay_base_weight=bool(decay_base_weight), trust_region=trust_region,
        )
        super().__init__(model, defaults, check_finite)

    def _directions(
        self, projector: GramProjector, blocks: list[Block], mode: str, x_mode: str
    ) -> list[tuple[Tensor, Tensor]]:
        return projector.adjust([b.grad_A for b in blocks], [b.grad_B for b in blocks], x_mode, _trust_radii(blocks))

    def _plain_step(self, group: dict, params: list[Tensor]) -> None:
        if group["weight_decay"] > 0:
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(params, [p.grad for p in params], alpha=-group["lr"])
