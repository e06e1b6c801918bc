"""``LoRALinear``: a frozen ``nn.Linear`` plus a low-rank adapter, computed by fused kernels.

The layer is the one owner of its adapter's state (:class:`AdapterConfig`, whether it is merged,
and the LoRA-GA offset its base weight carries). Every change goes through one of its transitions
(:meth:`LoRALinear.load_factors`, :meth:`~LoRALinear.reset_lora_parameters`,
:meth:`~LoRALinear.set_rank`, :meth:`~LoRALinear.merge`, :meth:`~LoRALinear.unmerge`,
:meth:`~LoRALinear.set_adapter_enabled`, :meth:`~LoRALinear.decay_base`,
:meth:`~LoRALinear.unwrap`), each of which checks everything first and then either completes or
raises with the layer unchanged (a :func:`fastlora.transaction.transaction`). The rules are in
docs/adapters.md.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .bases import Quantized, for_base
from .functional import SUPPORTED_DTYPES
from ._numerics import accumulation_dtype
from .quantized import check_quantized_layer, cpu_repacking, is_quantized
from .transaction import preserve, transaction

__all__ = [
    "AdapterConfig",
    "LoRALinear",
    "INITS",
    "RECORDED_INITS",
    "check_base_layer",
    "check_factors",
    "finite_in",
    "check_generator",
    "check_no_peft_layers",
    "decay_bases",
    "lora_layers",
    "lora_scaling",
    "validate_lora_config",
]

INITS = ("lora", "gaussian")
# What an adapter's ``init`` may record: the layer's own draws, the gradient inits, the weight
# inits (PiSSA, OLoRA), a PEFT import.
RECORDED_INITS = INITS + ("lora_ga", "gora", "pissa", "olora", "peft")


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _is_real_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_lora_config(
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    in_features: int,
    out_features: int,
    where: str = "LoRALinear",
    use_rslora: bool = False,
) -> None:
    """Raises ValueError/TypeError, naming ``where``, if the adapter settings cannot work."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"{where}: r must be an int, got {type(r).__name__}")
    if r < 1 or r > min(in_features, out_features):
        raise ValueError(
            f"{where}: rank r={r} must be between 1 and min(in_features, out_features)="
            f"{min(in_features, out_features)} for a {in_features}->{out_features} layer; choose a smaller r"
        )
    if not _is_real_number(lora_alpha) or not lora_alpha > 0:
        raise ValueError(f"{where}: lora_alpha must be a positive finite number, got {lora_alpha!r}")
    if not _is_real_number(lora_dropout) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"{where}: lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"{where}: use_rslora must be True or False, got {use_rslora!r}")


@dataclass(frozen=True)
class AdapterConfig:
    """An adapter's settings. ``init`` records how its factors were made (saved with them)."""

    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init: str = "lora"

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def check(self, in_features: int, out_features: int, where: str = "LoRALinear") -> None:
        """Raises ValueError/TypeError, naming ``where``, unless the settings fit the layer."""
        validate_lora_config(self.r, self.lora_alpha, self.lora_dropout, in_features, out_features, where,
                             self.use_rslora)
        if self.init not in RECORDED_INITS:
            raise ValueError(f"{where}: init {self.init!r} is not one of {RECORDED_INITS}")


def check_base_layer(module: nn.Module, where: str = "LoRALinear") -> None:
    """Raises TypeError unless ``module`` is a linear layer fastlora can wrap: a plain
    ``nn.Linear`` (its own forward, a real float weight) or a supported bitsandbytes layer
    (``Linear4bit`` NF4/FP4, ``Linear8bitLt``; see :func:`fastlora.quantized.check_quantized_layer`)."""
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{where}: LoRALinear wraps an nn.Linear, got {type(module).__name__}")
    if is_quantized(module):
        check_quantized_layer(module, where)
        return
    if type(module).forward is not nn.Linear.forward:
        raise TypeError(
            f"{where}: {type(module).__module__}.{type(module).__name__} is a linear layer with its own forward; "
            "fastlora adapts plain nn.Linear layers and bitsandbytes Linear4bit / Linear8bitLt only. Leave it out "
            "of target_modules (exclude_modules=...)"
        )
    if module.weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{where}: the base weight's dtype {module.weight.dtype} is not one of {SUPPORTED_DTYPES}")


def finite_in(t: Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether ``t``'s values are finite once cast to ``dtype`` (its own by default): float64 1e300
    is infinite in float32. Meta tensors have no values and pass."""
    return t.device.type == "meta" or bool(torch.isfinite(t.to(dtype or t.dtype)).all())


def check_factors(tensors: dict[str, Tensor], shapes: dict[str, tuple[int, int]], where: str,
                  dtype: torch.dtype | None = None) -> None:
    """Raises ValueError unless every named tensor exists, is a real floating-point tensor of its
    shape and is finite in ``dtype`` (what it will be cast to; its own dtype by default)."""
    for key, shape in shapes.items():
        t = tensors.get(key)
        if not isinstance(t, Tensor):
            raise ValueError(f"{where}: {key} is missing")
        if not t.is_floating_point():
            raise ValueError(f"{where}: {key} has dtype {t.dtype}; adapters are real floating-point tensors")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{where}: {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not finite_in(t, dtype):
            cast = "" if dtype in (None, t.dtype) else f" in {str(dtype).removeprefix('torch.')}"
            raise ValueError(f"{where}: {key} has NaN or infinite values{cast}")


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if device.type != "meta" and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, the adapters on {device}; use a {device.type} generator")


class LoRALinear(nn.Module):
    """A frozen linear layer with a LoRA adapter: ``y = x W^T + b + s (drop(x) A^T) B^T``.

    The wrapped layer is kept as ``base_layer`` (not copied; its weight and bias are frozen). It
    may be a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (QLoRA, docs/qlora.md): its own forward
    computes the base product and fastlora's ops add the branch.
    ``lora_A`` (r x in) and ``lora_B`` (out x r) are the trainable adapters, stored in
    ``adapter_dtype`` (float32 by default) while the branch runs in the input's dtype with
    float32 accumulation. Dropout masks are regenerated from a seed in backward, never stored.

    The adapter's settings (``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``,
    ``init_method``, ``merged``, ``base_offset``) are read-only; they change only through the
    layer's transitions (see the module docstring and docs/adapters.md).

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
        name: the layer's name in its model (:func:`fastlora.inject` gives it), for error messages.

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
        name: str | None = None,
    ) -> None:
        check_base_layer(base_layer)
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
        config = AdapterConfig(r, lora_alpha, lora_dropout, use_rslora, init)
        config.check(base_layer.in_features, base_layer.out_features)
        if adapter_dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"adapter_dtype must be one of {SUPPORTED_DTYPES}, got {adapter_dtype}")
        device = base_layer.weight.device
        check_generator(generator, device)
        super().__init__()
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)
        self._config = dataclasses.replace(config, lora_alpha=float(lora_alpha), lora_dropout=float(lora_dropout))
        self._where = f"LoRA layer {name!r}" if name else "LoRALinear"
        self._base_type = type(base_layer)  # PEFT wrapping base_layer later is caught in forward
        self._base_ops = for_base(base_layer)  # what merges, offsets and forward do with this kind of base
        self._merged = False
        self._merged_state: object = None  # what unmerge needs: the factors merged, or the weight replaced
        self._enabled = True
        self._detached = False  # unwrap() gave the base layer back to the model
        if self.quantized:
            cpu_repacking(base_layer, False)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=adapter_dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=adapter_dtype, device=device))
        # LoRA-GA's (A0, B0): the base weight holds W - s·B0 A0 while they are set (a quantized
        # base: forward subtracts s·B0 A0 x). Persistent, so a state dict (DCP) that holds the
        # shifted weight also holds the offset it needs (absent while None).
        self.register_buffer("lora_A0", None)
        self.register_buffer("lora_B0", None)
        self._draw(init, generator)

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

    # ---- read-only state -----------------------------------------------------------------------

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def config(self) -> AdapterConfig:
        """The adapter's settings."""
        return self._config

    @property
    def r(self) -> int:
        return self._config.r

    @property
    def lora_alpha(self) -> float:
        return self._config.lora_alpha

    @property
    def lora_dropout(self) -> float:
        return self._config.lora_dropout

    @property
    def use_rslora(self) -> bool:
        return self._config.use_rslora

    @property
    def init_method(self) -> str:
        return self._config.init

    @property
    def merged(self) -> bool:
        """Whether ``s·B A`` is folded into the base weight."""
        return self._merged

    @property
    def scaling(self) -> float:
        """The scale s applied to the adapter branch."""
        return self._config.scaling

    @property
    def adapter_enabled(self) -> bool:
        """False inside :func:`fastlora.disable_adapter`: the layer computes its original base."""
        return self._enabled

    @property
    def where(self) -> str:
        """How error messages name this layer."""
        return self._where

    @property
    def detached(self) -> bool:
        """True once :func:`fastlora.unload` has put the base layer back in the model: the layer
        then refuses every transition (its base layer is the model's now)."""
        return self._detached

    @property
    def quantized(self) -> bool:
        """Whether the base is a quantized (bitsandbytes) layer: its weight is never changed in
        place, a LoRA-GA offset is kept as a frozen low-rank term instead."""
        return self._base_ops is Quantized

    @property
    def base_offset(self) -> tuple[Tensor, Tensor] | None:
        """``(A0, B0)`` when the layer computes ``W - s·B0 A0`` (LoRA-GA), else None: held in a
        plain base weight, or as the term ``- s·B0 A0 x`` on a quantized base."""
        return None if self.lora_A0 is None else (self.lora_A0, self.lora_B0)

    # ---- transitions ---------------------------------------------------------------------------

    def _require_attached(self) -> None:
        if self._detached:
            raise RuntimeError(
                f"{self._where} was unloaded (fastlora.unload): its base layer is part of the model again and the "
                "adapter is gone; work on the model's current layers (fastlora.lora_layers(model)) and build a new "
                "optimizer for them"
            )

    def _require_unmerged(self, action: str) -> None:
        self._require_attached()
        if self._merged:
            raise RuntimeError(f"{self._where} is merged; unmerge it (fastlora.unmerge(model)) before you {action}")

    def _remove_base_offset(self) -> None:
        if self.lora_A0 is not None:
            self._base_ops.shift(self, self.lora_A0, self.lora_B0, +1.0, self.scaling)
            self.lora_A0 = self.lora_B0 = None

    def _draw(self, init: str, generator: torch.Generator | None) -> None:
        preserve(self.lora_A)
        preserve(self.lora_B)
        with torch.no_grad():
            if init == "lora":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
            else:
                nn.init.normal_(self.lora_A, std=1.0 / self.r, generator=generator)
            self.lora_B.zero_()

    def _resize(self, r: int) -> None:
        """New zero adapter Parameters of rank r (same dtype, device and requires_grad)."""
        kw = dict(dtype=self.lora_A.dtype, device=self.lora_A.device)
        trainable = self.lora_A.requires_grad
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, **kw), requires_grad=trainable)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw), requires_grad=trainable)

    def check_adapter(
        self, lora_A: Tensor, lora_B: Tensor, config: AdapterConfig, base_offset: tuple[Tensor, Tensor] | None = None,
        where: str | None = None,
    ) -> None:
        """Raises (ValueError/TypeError/RuntimeError) unless :meth:`load_factors` would accept
        these arguments; changes nothing."""
        where = where or self._where
        self._require_unmerged("load an adapter into it")
        if not isinstance(config, AdapterConfig):
            raise TypeError(f"{where}: config must be an AdapterConfig, got {type(config).__name__}")
        config.check(self.in_features, self.out_features, where)
        tensors = {"lora_A": lora_A, "lora_B": lora_B}
        shapes = {"lora_A": (config.r, self.in_features), "lora_B": (self.out_features, config.r)}
        if base_offset is not None:
            tensors.update(lora_A0=base_offset[0], lora_B0=base_offset[1])
            shapes.update(lora_A0=shapes["lora_A"], lora_B0=shapes["lora_B"])
        for key, t in tensors.items():
            if t.device.type == "meta" and self.lora_A.device.type != "meta":
                raise ValueError(f"{where}: {key} is on the meta device (no values); materialise it first")
        check_factors(tensors, shapes, where, self.lora_A.dtype)

    @torch.no_grad()
    def load_factors(
        self,
        lora_A: Tensor,
        lora_B: Tensor,
        config: AdapterConfig,
        base_offset: tuple[Tensor, Tensor] | None = None,
        base_weights: str = "recorded",
    ) -> None:
        """Replaces the adapter: factors, settings and base offset. Afterwards the layer computes
        ``(W0 - s·B0 A0) x + s·B A x`` with ``W0`` the original base weight (no offset term
        without ``base_offset``), whatever adapter it held before.

        ``base_weights`` says what the base weight holds now: "recorded" (the original weight
        minus the offset this layer records, if any: that offset is replaced, and nothing moves
        if it is the same), "original" (the original weight, whatever is recorded), or "offset"
        (already ``W0 - s·B0 A0`` for the new ``base_offset``: the weight is left alone).

        The rank follows ``lora_A``; if it changes, the adapters become new Parameters (rebuild
        any optimizer). Raises before any change if an argument does not fit (see
        :meth:`check_adapter`) or the layer is merged; a failure while applying (an out-of-memory,
        an overflow of the base weight) leaves the layer as it was.

        On a quantized base the offset is never written into the weight (``base_weights`` does
        not apply): forward computes ``Q(W) x - s·B0 A0 x + s·B A x``.
        """
        if base_weights not in ("recorded", "original", "offset"):
            raise ValueError(f"base_weights must be 'recorded', 'original' or 'offset', got {base_weights!r}")
        self.check_adapter(lora_A, lora_B, config, base_offset)
        with transaction(self):
            self._load_factors(lora_A, lora_B, config, base_offset, base_weights)

    def set_adapter(self, *args, **kwargs) -> None:
        """Deprecated name of :meth:`load_factors` (PEFT's ``set_adapter(name)`` selects an adapter,
        a different thing); it will be removed in the next release."""
        warnings.warn("LoRALinear.set_adapter is deprecated; call load_factors (same arguments)", DeprecationWarning,
                      stacklevel=2)
        self.load_factors(*args, **kwargs)

    def _load_factors(self, lora_A: Tensor, lora_B: Tensor, config: AdapterConfig,
                      base_offset: tuple[Tensor, Tensor] | None, base_weights: str) -> None:
        new_offset = None
        if base_offset is not None:  # the offset is kept exactly as the adapters store it
            new_offset = tuple(t.detach().to(self.lora_A.device, self.lora_A.dtype).clone() for t in base_offset)
        same = (
            base_weights == "recorded"
            and new_offset is not None
            and self.lora_A0 is not None
            and config.scaling == self.scaling
            and torch.equal(self.lora_A0, new_offset[0])
            and torch.equal(self.lora_B0, new_offset[1])
        )
        if base_weights == "recorded" and not same:
            self._remove_base_offset()
        self.lora_A0 = self.lora_B0 = None
        if config.r != self.r:
            self._resize(config.r)
        self._config = config
        preserve(self.lora_A)
        preserve(self.lora_B)
        self.lora_A.copy_(lora_A)
        self.lora_B.copy_(lora_B)
        if new_offset is not None:
            if base_weights != "offset" and not same:
                self._base_ops.shift(self, *new_offset, -1.0, config.scaling)
            self.lora_A0, self.lora_B0 = new_offset

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "lora", generator: torch.Generator | None = None) -> None:
        """Starts the adapter afresh: A re-drawn, B = 0 (see the class docstring for ``init``)
        and any LoRA-GA offset removed from the base weight, so the layer equals its base layer."""
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
        check_generator(generator, self.lora_A.device)
        self._require_unmerged("reset its adapter")
        with transaction(self):
            self._remove_base_offset()
            self._config = dataclasses.replace(self._config, init=init)
            self._draw(init, generator)

    def set_rank(self, r: int) -> None:
        """Replaces the adapters by zero ones of rank ``r`` (same dtype and device; new
        Parameters) and removes any LoRA-GA offset (the recorded init becomes "lora"); the caller
        initialises them."""
        config = dataclasses.replace(self._config, r=r, init="lora")
        config.check(self.in_features, self.out_features, self._where)
        self._require_unmerged("change its rank")
        with transaction(self):
            self._remove_base_offset()
            self._resize(r)
            self._config = config

    def set_adapter_enabled(self, enabled: bool) -> None:
        """Switches the adapter off (the layer computes the original base layer, a LoRA-GA offset
        added back on the fly) or on again. Refused while merged."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True or False, got {enabled!r}")
        self._require_unmerged("switch its adapter off or on")
        self._enabled = enabled

    def check_unwrap(self, merge: bool = True, allow_requantize: bool = False) -> None:
        """Raises unless :meth:`unwrap` with these arguments would run; changes nothing."""
        self._require_attached()
        if not isinstance(merge, bool):
            raise TypeError(f"merge must be True or False, got {merge!r}")
        if merge and not self._merged:
            self.check_merge(allow_requantize)

    @torch.no_grad()
    def unwrap(self, merge: bool = True, allow_requantize: bool = False) -> nn.Linear:
        """The base layer, to put in this layer's place: with ``s·B A`` merged into its weight, or
        (``merge=False``) with its original weight (unmerged, a LoRA-GA offset removed). A
        quantized base merges only with ``allow_requantize`` (see :meth:`merge`). Afterwards this
        layer is :attr:`detached` and refuses every transition."""
        self.check_unwrap(merge, allow_requantize)
        with transaction(self):
            if merge and not self._merged:
                self.merge(allow_requantize)
            if not merge:
                if self._merged:
                    self.unmerge()
                self._remove_base_offset()
            self._detached = True
        return self.base_layer

    @torch.no_grad()
    def decay_base(self, factor: float) -> None:
        """Multiplies the original base weight ``W0`` by ``factor`` (LoRA-Pro's
        ``decay_base_weight``: decoupled weight decay of the frozen part of the merged weight). A
        LoRA-GA offset's factors scale by ``sqrt(factor)`` with it, so the layer's base becomes
        ``factor·(W0 - s·B0 A0)`` and ``unload(merge=False)`` gives ``factor·W0``. Refused on
        quantized bases (the packed weight cannot be scaled in place) and on merged layers."""
        decay_bases([self], [factor])

    def forward(self, x: Tensor) -> Tensor:
        if type(self.base_layer) is not self._base_type:
            self.check_base_unchanged()
        return self._base_ops.forward(self, x)

    def check_base_unchanged(self) -> None:
        """Raises TypeError if ``base_layer`` was replaced since the adapter was added: PEFT
        (``get_peft_model``, TRL's ``peft_config``, transformers' ``add_adapter``) wrapping fastlora's
        base layers would train adapters fastlora never computes nor saves."""
        base = self.base_layer
        if isinstance(base, self._base_type):  # the same class, or a subclass fully_shard made of it
            return
        peft = is_peft_module(base)
        raise TypeError(
            f"{self._where}: its base layer was replaced by {type(base).__module__}.{type(base).__name__}"
            + (": PEFT was applied on top of a fastlora model (get_peft_model, TRL's peft_config, or transformers' "
               "add_adapter). The model already has fastlora's adapters: train it as a plain model (no peft_config), "
               "or remove them first (fastlora.unload(model)) if PEFT should manage the adapters"
               if peft else "; LoRA layers own their base layer: put the new module in the model before "
               "fastlora.inject, or fastlora.unload(model) first")
        )

    @torch.no_grad()
    def delta_weight(self, lora_A: Tensor | None = None, lora_B: Tensor | None = None,
                     scaling: float | None = None) -> Tensor:
        """s * B A in float32 (float64 for a float64 base): what merging adds to the weight. Other
        factors of the layer's shapes (LoRA-GA's base offset uses its A0, B0) or another scale
        may be given."""
        a = self.lora_A if lora_A is None else lora_A
        b = self.lora_B if lora_B is None else lora_B
        w = self.base_layer.weight
        dtype = accumulation_dtype(w.dtype)
        return (b.to(w.device, dtype) @ a.to(w.device, dtype)) * (self.scaling if scaling is None else scaling)

    def check_merge(self, allow_requantize: bool = False, where: str | None = None) -> None:
        """Raises (RuntimeError/ValueError) unless :meth:`merge` with these arguments would run."""
        where = where or self._where
        self._require_attached()
        if self._merged:
            raise RuntimeError(f"{where} is already merged; call unmerge() first")
        if not self._enabled:
            raise RuntimeError(
                f"{where}'s adapter is switched off (inside fastlora.disable_adapter, or set_adapter_enabled(False)): "
                "a merge would fold in an adapter the layer does not compute. Merge after the disable_adapter block "
                "(or set_adapter_enabled(True))"
            )
        if not isinstance(allow_requantize, bool):
            raise TypeError(f"allow_requantize must be True or False, got {allow_requantize!r}")
        self._base_ops.check_merge(self, allow_requantize, where)

    @torch.no_grad()
    def merge(self, allow_requantize: bool = False) -> dict[str, float] | None:
        """Folds s * B A into the base weight (computed in float32, cast back once); forward then
        runs the base layer alone. Raises RuntimeError if already merged.

        A quantized base is refused unless ``allow_requantize``: then its weight is dequantized,
        ``- s·B0 A0`` (a LoRA-GA offset) and ``s·B A`` are added in float32 and the sum is
        re-quantized with the base's settings. The quantized weight it replaces is kept, so
        :meth:`unmerge` restores it exactly. Returns, for a quantized base, the error the rounding
        introduced: ``max_abs_error`` and ``relative_error`` (Frobenius norm, relative to the
        merged float32 weight's); None otherwise."""
        self.check_merge(allow_requantize)
        report, self._merged_state = self._base_ops.merge(self, allow_requantize)
        self._merged = True
        return report

    @torch.no_grad()
    def unmerge(self) -> None:
        """Takes out of the base weight what :meth:`merge` added (the factors as they were merged;
        a quantized base gets its weight from before the merge back, exactly). Raises
        RuntimeError if not merged."""
        self._require_attached()
        if not self._merged:
            raise RuntimeError(f"{self._where} is not merged; nothing to unmerge")
        self._base_ops.unmerge(self, self._merged_state)
        self._merged_state = None
        self._merged = False

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, "
            f"lora_dropout={self.lora_dropout:g}, use_rslora={self.use_rslora}, "
            f"adapter_dtype={self.lora_A.dtype}, merged={self.merged}"
            + self._base_ops.describe(self.base_layer)
            + (", base_offset=True" if self.lora_A0 is not None else "")
        )


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All :class:`LoRALinear` modules of ``model`` by name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_peft_module(module: nn.Module) -> bool:
    """Whether ``module`` is one of PEFT's (a tuner layer, a PeftModel wrapper, ...)."""
    return type(module).__module__.split(".")[0] == "peft"


def peft_modules(model: nn.Module) -> list[str]:
    """Names of PEFT's modules in ``model`` (the model itself as its class name)."""
    return [name or type(model).__name__ for name, m in model.named_modules() if is_peft_module(m)]


@torch.no_grad()
def decay_bases(layers: list[LoRALinear], factors: list[float]) -> None:
    """:meth:`LoRALinear.decay_base` of each layer by its factor, every layer checked first, then
    one batched multiply (LoRA-Pro's ``decay_base_weight`` at every step)."""
    tensors, scales = [], []
    for layer, factor in zip(layers, factors, strict=True):
        layer._require_unmerged("decay its base weight")
        if not (_is_real_number(factor) and 0.0 <= factor <= 1.0):
            raise ValueError(f"{layer.where}: the decay factor must be in [0, 1], got {factor!r}")
        for t, power in layer._base_ops.decayed(layer):
            tensors.append(t)
            scales.append(factor**power)
    for t in tensors:
        preserve(t)
    if tensors:
        torch._foreach_mul_(tensors, scales)


def check_no_peft_layers(model: nn.Module) -> None:
    """Raises TypeError if PEFT's layers were added to a fastlora model (``get_peft_model``, TRL's
    ``peft_config``, transformers' ``add_adapter``): fastlora would neither train nor save them
    correctly. Saves and optimizers call this; forward checks its own layer only."""
    for layer in lora_layers(model).values():
        layer.check_base_unchanged()
    wrapped = peft_modules(model)
    if wrapped:
        raise TypeError(
            f"{wrapped[0]} is a PEFT module inside a fastlora model: PEFT was applied on top of "
            "fastlora's adapters (get_peft_model, TRL's peft_config, or transformers' add_adapter). Use one of the "
            "two: train the fastlora model as it is (no peft_config), or fastlora.unload(model) first"
        )
