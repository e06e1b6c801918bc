"""Which layers LoRA-Pro optimises: the trainable :class:`~fastlora.LoRALinear` layers of a model
(or of a given set of layers), checked to be stepped as pairs ``(A, B)`` and, under FSDP2,
sharded by rows together; and the stacks (:class:`Block`) in which layers of one shape go
through the closed form together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..._distributed import check_row_sharded, full, is_dtensor, local, row_range
from ..._numerics import accumulation_dtype
from ...layer import LoRALinear, check_no_peft_layers, lora_layers

__all__ = ["Block", "Layer", "ModelOrLayers", "by_rank", "check_steppable", "discover", "has_gradients", "stack_blocks"]

ModelOrLayers = nn.Module | Mapping[str, LoRALinear] | Iterable[LoRALinear]


@dataclass
class Layer:
    """A LoRA layer. Under FSDP2 its adapters are DTensors sharded by rows; this rank holds rows
    ``rows_A`` of A and ``rows_B`` of B (and of the layer's out x in moments)."""

    name: str
    module: LoRALinear
    A: nn.Parameter
    B: nn.Parameter
    rows_A: tuple[int, int] = field(init=False)
    rows_B: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.rows_A, self.rows_B = row_range(self.A), row_range(self.B)

    @property
    def sharded(self) -> bool:
        return is_dtensor(self.B)


@dataclass
class Block:
    """Layers of one shape (r, out, in) on one device, their tensors stacked in the compute dtype
    (whole tensors: sharded adapters and their reduced gradients are gathered, so the closed form
    runs identically on every rank). ``groups`` holds each layer's optimizer param group (empty
    for the gradient transform, which has none)."""

    layers: list[Layer]
    groups: list[dict]
    scales: list[float]
    A: Tensor = field(init=False)
    B: Tensor = field(init=False)
    grad_A: Tensor = field(init=False)
    grad_B: Tensor = field(init=False)
    s: Tensor = field(init=False)

    def stack(self, dtype: torch.dtype) -> None:
        self.A = torch.stack([full(layer.A.detach()) for layer in self.layers]).to(dtype)
        self.B = torch.stack([full(layer.B.detach()) for layer in self.layers]).to(dtype)
        self.grad_A = torch.stack([full(layer.A.grad) for layer in self.layers]).to(dtype)
        self.grad_B = torch.stack([full(layer.B.grad) for layer in self.layers]).to(dtype)
        self.s = torch.tensor(self.scales, dtype=dtype, device=self.A.device)

    def write_rows(self, a: Tensor, b: Tensor, grads: bool = False) -> None:
        """Copies each layer's whole ``a[k]``, ``b[k]`` into its adapters (with ``grads``: into
        their gradients). Every rank computed the same whole tensors; each writes the rows it holds."""
        for which, new in (("A", a), ("B", b)):
            params = [getattr(layer, which) for layer in self.layers]
            rows = [slice(*getattr(layer, f"rows_{which}")) for layer in self.layers]
            torch._foreach_copy_([local(p.grad if grads else p) for p in params],
                                 [t[r] for t, r in zip(new.unbind(0), rows)])

    def per_layer(self, key: str) -> Tensor:
        """A hyperparameter of each layer's group as a (K, 1, 1) tensor."""
        values = [float(g[key]) for g in self.groups]
        return torch.tensor(values, dtype=self.A.dtype, device=self.A.device).view(-1, 1, 1)

    def trust_radii(self) -> Tensor | None:
        """Per layer the largest allowed ``‖d_A‖_F`` of the X-free part of A's direction:
        ``trust_region * ‖A‖_F / lr`` (so the step ``lr d_A`` stays within that fraction of
        ``‖A‖``); None when the group has no trust region."""
        trust = self.groups[0]["trust_region"]
        if trust is None or self.groups[0]["mode"] == "efficient":  # Adam on the adapters bounds its step
            return None
        lr = self.per_layer("lr").reshape(-1)
        return torch.where(lr > 0, trust * self.A.flatten(1).norm(dim=1) / lr, torch.full_like(lr, math.inf))


def stack_blocks(entries: Iterable[tuple[tuple, Layer, dict | None]]) -> list[Block]:
    """Blocks of the ``(settings, layer, param group or None)`` entries: layers of one shape,
    device and compute dtype (and equal settings) in one, stacked. Under FSDP2 stacking gathers the
    adapters and their gradients (collectives)."""
    blocks: dict[tuple, Block] = {}
    for settings, layer, group in entries:
        a = layer.A
        key = (*settings, a.shape, layer.B.shape, local(a).device, accumulation_dtype(a.dtype))
        block = blocks.setdefault(key, Block([], [], []))
        block.layers.append(layer)
        if group is not None:
            block.groups.append(group)
        block.scales.append(float(layer.module.scaling))
    for key, block in blocks.items():
        block.stack(key[-1])
    return list(blocks.values())


def by_rank(blocks: Iterable[Block], settings: Callable[[Block], tuple] = lambda block: ()) -> list[list[Block]]:
    """The blocks grouped for one closed form each: of one rank, device and dtype (and settings)."""
    groups: dict[tuple, list[Block]] = {}
    for block in blocks:
        groups.setdefault((*settings(block), block.A.shape[1], block.A.device, block.A.dtype), []).append(block)
    return list(groups.values())


def discover(model: ModelOrLayers) -> tuple[list[Layer], list[nn.Parameter]]:
    """The trainable LoRA layers and the other trainable parameters of ``model``."""
    named, others_from = _named_layers(model)
    layers, adapter_ids = [], set()
    for name, module in named.items():
        a, b = module.lora_A, module.lora_B
        adapter_ids.update((id(a), id(b)))
        _check_sharding(name, a, b)
        if _trainable(name, a, b):
            layers.append(Layer(name, module, a, b))
    if not layers:
        raise ValueError(
            "no trainable fastlora LoRA layers found; add adapters with fastlora.inject(model, ...) first "
            "(LoRA-Pro optimises LoRALinear layers; use torch.optim.AdamW for anything else)"
        )
    others = []
    if others_from is not None:
        others = [p for p in others_from.parameters() if p.requires_grad and id(p) not in adapter_ids]
    return layers, others


def _named_layers(model: ModelOrLayers) -> tuple[dict[str, LoRALinear], nn.Module | None]:
    """The LoRA layers by name, and the module whose other trainable parameters are stepped too
    (None when layers were given)."""
    if isinstance(model, LoRALinear):
        named, others_from = {"": model}, None
    elif isinstance(model, nn.Module):
        check_no_peft_layers(model)
        named, others_from = lora_layers(model), model
    elif isinstance(model, Mapping):
        named, others_from = dict(model), None
    elif isinstance(model, Iterable) and not isinstance(model, Tensor):
        named, others_from = {str(i): m for i, m in enumerate(model)}, None
    else:
        named, others_from = None, None
    if named is None or not all(isinstance(m, LoRALinear) for m in named.values()):
        raise TypeError(
            "LoRA-Pro needs the model (or its fastlora LoRALinear layers), not a list of parameters: it reads each "
            "layer's (lora_A, lora_B, scaling) from the layer. Pass the model, e.g. LoRAPro(model, lr=...)."
        )
    return named, others_from


def _check_sharding(name: str, a: Tensor, b: Tensor) -> None:
    """ValueError unless both adapters are whole, or both sharded by rows over one mesh."""
    if is_dtensor(a) != is_dtensor(b):
        raise ValueError(
            f"layer {name!r}: only one of lora_A and lora_B is sharded (a DTensor); shard the whole LoRALinear "
            "(fully_shard on it or on a module that contains it) or neither"
        )
    if is_dtensor(a):
        check_row_sharded(a, f"layer {name!r}: lora_A")
        check_row_sharded(b, f"layer {name!r}: lora_B")
        if a.device_mesh != b.device_mesh:
            raise ValueError(f"layer {name!r}: lora_A and lora_B are sharded over different device meshes")


def _trainable(name: str, a: Tensor, b: Tensor) -> bool:
    """Whether the layer is trained: both adapters require gradients (ValueError if only one does)."""
    if a.requires_grad and b.requires_grad:
        return True
    if a.requires_grad or b.requires_grad:
        frozen = "lora_B" if a.requires_grad else "lora_A"
        raise ValueError(
            f"layer {name!r} has a frozen {frozen}: LoRA-Pro adjusts lora_A and lora_B together, so both must "
            "require gradients (or neither, to leave the layer out)"
        )
    return False


def check_steppable(layer: Layer) -> None:
    """RuntimeError unless the layer's adapter can be stepped: not unloaded, not merged (a step
    would not reach the merged weight), its base layer not wrapped by PEFT since."""
    module = layer.module
    if module.detached:
        raise RuntimeError(f"layer {layer.name!r} was unloaded (fastlora.unload) after this optimizer was built; "
                           "build a new optimizer for the model's current LoRA layers")
    if module.merged:
        raise RuntimeError(f"layer {layer.name!r} is merged: a step would change adapters the merged weight does not "
                           "follow; fastlora.unmerge(model) before training")
    module.check_base_unchanged()


def has_gradients(layer: Layer) -> bool:
    """Whether the layer is stepped (or adjusted): both adapters have dense gradients (False if
    neither has one; ValueError if only one has, or one is sparse)."""
    a, b = layer.A, layer.B
    if a.grad is None and b.grad is None:
        return False
    for pname, p in (("lora_A", a), ("lora_B", b)):
        if p.grad is None:
            raise ValueError(
                f"layer {layer.name!r}: {pname}.grad is None but the other adapter has a gradient (only one of "
                "lora_A.grad and lora_B.grad is set); LoRA-Pro needs both (set it to zeros if that is what you mean)"
            )
        if p.grad.is_sparse:
            raise ValueError(f"layer {layer.name!r}: {pname}.grad is sparse; LoRA-Pro needs it dense")
    return True
