"""``LoRALinear``: a frozen ``nn.Linear`` plus a low-rank adapter, computed by fused kernels."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .functional import SUPPORTED_DTYPES, lora_linear

__all__ = ["LoRALinear", "validate_lora_config", "lora_scaling", "INITS"]

INITS = ("lora", "gaussian")


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def validate_lora_config(
    r: int, lora_alpha: float, lora_dropout: float, in_features: int, out_features: int, where: str = "LoRALinear"
) -> None:
    """Raises ValueError/TypeError, naming ``where``, if the adapter settings cannot work."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"{where}: r must be an int, got {type(r).__name__}")
    if r < 1 or r > min(in_features, out_features):
        raise ValueError(
            f"{where}: rank r={r} must be between 1 and min(in_features, out_features)="
            f"{min(in_features, out_features)} for a {in_features}->{out_features} layer; choose a smaller r"
        )
    if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or not lora_alpha > 0:
        raise ValueError(f"{where}: lora_alpha must be a positive number, got {lora_alpha!r}")
    if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"{where}: lora_dropout must be in [0, 1), got {lora_dropout!r}")


class LoRALinear(nn.Module):
    """A frozen linear layer with a LoRA adapter: ``y = x W^T + b + s (drop(x) A^T) B^T``.

    The wrapped layer is kept as ``base_layer`` (not copied; its weight and bias are frozen).
    ``lora_A`` (r x in) and ``lora_B`` (out x r) are the trainable adapters, stored in
    ``adapter_dtype`` (float32 by default) while the branch runs in the input's dtype with
    float32 accumulation. Dropout masks are regenerated from a seed in backward, never stored.

    Args:
        base_layer: the ``nn.Linear`` to adapt.
        r: adapter rank, 1 <= r <= min(in_features, out_features).
        lora_alpha: scale numerator; s = lora_alpha / r (or / sqrt(r) with ``use_rslora``).
        lora_dropout: dropout probability on the adapter branch's input in training mode.
        use_rslora: use the rank-stabilised scale alpha / sqrt(r).
        adapter_dtype: dtype of ``lora_A`` and ``lora_B`` (and of their gradients).
        init: "lora" (A Kaiming-uniform, B = 0, as PEFT; the layer starts equal to the base
            layer) or "gaussian" (A ~ N(0, 1/r), B = 0).
        generator: RNG for the initial A.

    Example:
        >>> layer = LoRALinear(nn.Linear(64, 32), r=4, lora_alpha=8)
        >>> y = layer(torch.randn(2, 10, 64))
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
        init: str = "lora",
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        validate_lora_config(r, lora_alpha, lora_dropout, base_layer.in_features, base_layer.out_features)
        if adapter_dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"adapter_dtype must be one of {SUPPORTED_DTYPES}, got {adapter_dtype}")
        super().__init__()
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=adapter_dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=adapter_dtype, device=device))
        self.merged = False
        self.init_method = init  # recorded with saved adapters; LoRA-GA and GoRA overwrite it
        self.reset_lora_parameters(init, generator)

    @classmethod
    def new(
        cls,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **lora_kwargs,
    ) -> LoRALinear:
        """Builds the base ``nn.Linear(in_features, out_features, bias)`` and wraps it."""
        return cls(nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype), **lora_kwargs)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def scaling(self) -> float:
        """The scale s applied to the adapter branch."""
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def set_rank(self, r: int) -> None:
        """Replaces the adapters by zero ones of rank ``r`` (same dtype and device); the caller
        initialises them. Used by rank-allocating initialisers such as GoRA."""
        validate_lora_config(r, self.lora_alpha, self.lora_dropout, self.in_features, self.out_features)
        if self.merged:
            raise RuntimeError("unmerge() this layer before changing its rank")
        kw = dict(dtype=self.lora_A.dtype, device=self.lora_A.device)
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        self.r = r

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "lora", generator: torch.Generator | None = None) -> None:
        """Re-draws A and zeroes B (see the class docstring for ``init``)."""
        if init == "lora":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r, generator=generator)
        else:
            raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
        self.lora_B.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        p = self.lora_dropout if self.training else 0.0
        return lora_linear(x, base.weight, base.bias, self.lora_A, self.lora_B, self.scaling, p)

    @torch.no_grad()
    def delta_weight(self, lora_A: Tensor | None = None, lora_B: Tensor | None = None) -> Tensor:
        """s * B A in float32 (float64 for a float64 base): what merging adds to the weight. Other
        factors of the layer's shapes may be given (LoRA-GA's base offset uses its A0, B0)."""
        a = self.lora_A if lora_A is None else lora_A
        b = self.lora_B if lora_B is None else lora_B
        w = self.base_layer.weight
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        return (b.to(w.device, dtype) @ a.to(w.device, dtype)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Folds s * B A into the base weight (computed in float32, cast back); forward then
        runs the base layer alone. Raises RuntimeError if already merged."""
        if self.merged:
            raise RuntimeError("this LoRALinear is already merged; call unmerge() first")
        w = self.base_layer.weight
        delta = self.delta_weight()
        w.copy_(w.to(delta.dtype) + delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts s * B A from the base weight again. Raises RuntimeError if not merged."""
        if not self.merged:
            raise RuntimeError("this LoRALinear is not merged; nothing to unmerge")
        w = self.base_layer.weight
        delta = self.delta_weight()
        w.copy_(w.to(delta.dtype) - delta)
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, "
            f"lora_dropout={self.lora_dropout:g}, use_rslora={self.use_rslora}, "
            f"adapter_dtype={self.lora_A.dtype}, merged={self.merged}"
        )
