"""What a LoRA layer does with its base layer, one strategy per kind of base: a dense
``nn.Linear`` (LoRA-GA's offset and merges live in its weight) or a bitsandbytes 4-bit / 8-bit
layer (the packed weight is never changed in place: the offset is a frozen low-rank term, a merge
re-quantizes into a new weight and unmerge swaps the old one back). The strategies are stateless;
the state they change (weights, the factors a merge added, a quantized weight kept across a
merge) belongs to the layer, so its transitions and transactions see all of it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from ._distributed import is_dtensor, local
from .functional import lora_linear, lora_update
from .quantized import dense_weight, is_quantized, quantization_kind, requantize, swap_weight
from .transaction import preserve

__all__ = ["AdapterLayer", "Dense", "Quantized", "for_base"]


class AdapterLayer(Protocol):
    """What a strategy reads and changes of its layer (:class:`fastlora.LoRALinear`, the module
    above this one): the base, the factors, the base offset ``(A0, B0)`` and the flags."""

    base_layer: nn.Module
    lora_A: Tensor
    lora_B: Tensor
    lora_A0: Tensor | None
    lora_B0: Tensor | None
    scaling: float
    lora_dropout: float
    merged: bool
    adapter_enabled: bool
    training: bool
    where: str

    def delta_weight(self, lora_A: Tensor | None = None, lora_B: Tensor | None = None,
                     scaling: float | None = None) -> Tensor:
        ...


class Dense:
    """A plain ``nn.Linear``: the base and the adapter in one fused call; LoRA-GA's offset is
    held in the weight (``W0 - s·B0 A0``)."""

    @staticmethod
    def describe(base: nn.Module) -> str:
        return ""

    @staticmethod
    def forward(layer: AdapterLayer, x: Tensor) -> Tensor:
        base = layer.base_layer
        if layer.merged or (not layer.adapter_enabled and layer.lora_A0 is None):
            return base(x)
        if not torch.compiler.is_compiling() and is_dtensor(base.weight):
            # base_layer.forward never runs here, so FSDP hooks on base_layer alone never unshard it.
            raise TypeError(
                "LoRALinear: the base layer's weight is still a DTensor at forward time: fully_shard was applied to "
                "base_layer alone (or the weight is tensor-parallel). fastlora computes the base layer inside its own "
                "kernel, so apply fully_shard to the LoRALinear or to a module that contains it (a decoder layer, "
                "the root); see docs/distributed.md"
            )
        if not layer.adapter_enabled:  # the original base: W x = (W - s·B0 A0) x + s·(x A0^T) B0^T
            return lora_linear(x, base.weight, base.bias, layer.lora_A0, layer.lora_B0, layer.scaling, 0.0)
        p = layer.lora_dropout if layer.training else 0.0
        return lora_linear(x, base.weight, base.bias, layer.lora_A, layer.lora_B, layer.scaling, p)

    @staticmethod
    @torch.no_grad()
    def shift(layer: AdapterLayer, a: Tensor, b: Tensor, sign: float, scaling: float) -> None:
        """W += sign·scaling·B A, computed in float32 (float64 for a float64 base), cast back once;
        refused (W unchanged) if the result would not be finite in W's dtype (a float16 overflow)."""
        w = layer.base_layer.weight
        delta = layer.delta_weight(a, b, sign * scaling)
        new = (w.to(delta.dtype) + delta).to(w.dtype)
        if not bool(torch.isfinite(new).all()):
            raise ValueError(
                f"{layer.where}: the base weight plus the adapter is not finite in {w.dtype} (it overflows); "
                "nothing was changed. Keep the adapter separate, or cast the base to a wider dtype first"
            )
        preserve(w)
        w.copy_(new)

    @staticmethod
    def check_merge(layer: AdapterLayer, allow_requantize: bool, where: str) -> None:
        pass

    @staticmethod
    def merge(layer: AdapterLayer, allow_requantize: bool) -> tuple[dict[str, float] | None, object]:
        """Folds s·B A into the weight; returns (no report, what unmerge must subtract: the factors
        as merged, even if an optimizer steps the adapters meanwhile)."""
        Dense.shift(layer, layer.lora_A, layer.lora_B, +1.0, layer.scaling)
        return None, (layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.scaling)

    @staticmethod
    def unmerge(layer: AdapterLayer, merged: object) -> None:
        a, b, scaling = merged
        Dense.shift(layer, a, b, -1.0, scaling)

    @staticmethod
    def decayed(layer: AdapterLayer) -> list[tuple[Tensor, float]]:
        """What a decay of the original weight by ``f`` scales, each by ``f ** power``: this rank's
        weight (power 1) and a LoRA-GA offset's factors (power 1/2 each)."""
        offset = [(t, 0.5) for t in (layer.lora_A0, layer.lora_B0) if t is not None]
        return [(local(layer.base_layer.weight), 1.0), *offset]


class Quantized:
    """A bitsandbytes ``Linear4bit`` (NF4/FP4) or ``Linear8bitLt``: its own forward computes
    ``Q(W) x + b`` and fastlora's ops add the exact offset term and the adapter branch."""

    @staticmethod
    def describe(base: nn.Module) -> str:
        return f", quantized={quantization_kind(base)}"

    @staticmethod
    def forward(layer: AdapterLayer, x: Tensor) -> Tensor:
        y = layer.base_layer(x)
        if layer.merged or not layer.adapter_enabled:
            return y
        p = layer.lora_dropout if layer.training else 0.0
        a, b = layer.lora_A, layer.lora_B
        if layer.lora_A0 is not None:
            if p == 0.0:  # both terms in one rank-2r branch: one pass over x, one dx update
                a = torch.cat([a, layer.lora_A0.to(a.dtype)])
                b = torch.cat([b, -layer.lora_B0.to(b.dtype)], dim=1)
            else:  # dropout applies to the adapter's input only, not to the offset term's
                y = lora_update(x, y, layer.lora_A0, layer.lora_B0, -layer.scaling)
        return lora_update(x, y, a, b, layer.scaling, p)

    @staticmethod
    def shift(layer: AdapterLayer, a: Tensor, b: Tensor, sign: float, scaling: float) -> None:
        pass  # the packed weight never holds the offset: forward computes its term

    @staticmethod
    def check_merge(layer: AdapterLayer, allow_requantize: bool, where: str) -> None:
        if not allow_requantize:
            raise ValueError(
                f"{where} has a quantized base ({quantization_kind(layer.base_layer)}): merging rounds W + s·B A back "
                "onto the quantization grid, so the merged layer no longer computes the trained adapter exactly. "
                "Keep the adapter separate (save_adapter / export_peft), or dequantize, merge in float32 and "
                "re-quantize (the error is reported) with fastlora.unload(model, merge=True, allow_requantize=True) "
                "(or model.merge_and_unload(allow_requantize=True)) for plain layers, or with "
                "fastlora.merge(model, allow_requantize=True) to keep the LoRA layers, merged"
            )

    @staticmethod
    @torch.no_grad()
    def merge(layer: AdapterLayer, allow_requantize: bool) -> tuple[dict[str, float], object]:
        """Dequantizes, adds ``s·B A - s·B0 A0`` in float32 and re-quantizes into a new weight;
        returns the rounding error and the weight it replaced (unmerge swaps it back exactly)."""
        target = dense_weight(layer.base_layer) + layer.delta_weight().to(layer.lora_A.device)
        if layer.lora_A0 is not None:
            target -= layer.delta_weight(layer.lora_A0, layer.lora_B0)
        if not bool(torch.isfinite(target).all()):
            raise ValueError(f"{layer.where}: the base weight plus the adapter is not finite; nothing was changed")
        previous = swap_weight(layer.base_layer, requantize(layer.base_layer, target))
        error = dense_weight(layer.base_layer) - target
        report = {"max_abs_error": error.abs().max().item(),
                  "relative_error": (error.norm() / target.norm().clamp_min(1e-30)).item()}
        return report, previous

    @staticmethod
    def unmerge(layer: AdapterLayer, merged: object) -> None:
        swap_weight(layer.base_layer, merged)

    @staticmethod
    def decayed(layer: AdapterLayer) -> list[tuple[Tensor, float]]:
        raise ValueError(f"{layer.where} has a quantized base ({quantization_kind(layer.base_layer)}): its weight "
                         "cannot decay in place; use decay_base_weight=False")


def for_base(base: nn.Module) -> type[Dense] | type[Quantized]:
    """The strategy for a base layer that passed :func:`fastlora.layer.check_base_layer`."""
    return Quantized if is_quantized(base) else Dense
