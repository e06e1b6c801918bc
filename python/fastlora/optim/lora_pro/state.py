"""LoRA-Pro's optimizer state as checkpoints hold it: the Adam moments' layout (a full-mode
layer's ``out x in`` moments live under its ``lora_A``, sharded by rows like ``lora_B`` under
FSDP2), the checks that a saved state fits the layers, and placing loaded moments where this
optimizer keeps them, in the dtype they were saved in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..._distributed import full, is_dtensor, local, rows_like
from .discovery import Layer

__all__ = ["check_saved_moments", "new_moment", "restore_moments", "saved_lora_states", "start_moments"]

MOMENTS = ("exp_avg", "exp_avg_sq")


def start_moments(state: dict[str, Any], zeros: Callable[[], Tensor]) -> None:
    """Adam's first and second moments of a parameter's state, both ``zeros()``."""
    for name in MOMENTS:
        state[name] = zeros()


def new_moment(layer: Layer, dtype: torch.dtype) -> Tensor:
    """A zero ``out x in`` moment of the layer's weight; under FSDP2 a DTensor sharded by rows as
    lora_B (and the weight) is, so each rank stores ``out x in / world`` elements."""
    shape = (layer.B.shape[0], layer.A.shape[1])
    start, stop = layer.rows_B
    rows = torch.zeros((stop - start, shape[1]), dtype=dtype, device=local(layer.B).device)
    return rows_like(rows, layer.B, shape) if layer.sharded else rows


def saved_lora_states(state_dict: dict[str, Any], param_groups: Sequence[dict]) -> dict[int, dict[str, Any]]:
    """The saved state of each LoRA adapter, by ``id`` of this optimizer's parameter; ValueError
    if the state was saved for another set of LoRA layers."""
    states = {}
    for saved, group in zip(state_dict["param_groups"], param_groups):
        if not saved.get("lora_pro"):
            continue
        if not group["lora_pro"] or len(saved["params"]) != len(group["params"]):
            raise ValueError(
                "this optimizer state was saved for a different set of LoRA layers; load it into an optimizer "
                "built on the same model"
            )
        for index, param in zip(saved["params"], group["params"]):
            states[id(param)] = state_dict["state"].get(index, {})
    return states


def check_saved_moments(
    state_dict: dict[str, Any], param_groups: Sequence[dict], layers: Mapping[int, Layer],
    states: dict[int, dict[str, Any]],
) -> None:
    """ValueError unless every LoRA layer's saved moments fit it in the mode they were saved in."""
    for saved, group in zip(state_dict["param_groups"], param_groups):
        if saved.get("lora_pro"):
            for a, b in zip(group["params"][0::2], group["params"][1::2]):
                _check_moments(layers[id(a)], a, b, saved.get("mode", group["mode"]), states)


def _check_moments(layer: Layer, a: Tensor, b: Tensor, mode: str, states: dict[int, dict[str, Any]]) -> None:
    """ValueError unless the saved moments of the layer (A, B) fit it in ``mode``: ``out x in``
    on A in full mode, each adapter's own shape in efficient mode."""
    expected = {id(a): (layer.B.shape[0], layer.A.shape[1])} if mode == "full" else {id(a): a.shape, id(b): b.shape}
    for key, shape in expected.items():
        for name in MOMENTS:
            moment = states.get(key, {}).get(name)
            if moment is not None and (not isinstance(moment, Tensor) or tuple(moment.shape) != tuple(shape)):
                found = tuple(moment.shape) if isinstance(moment, Tensor) else type(moment).__name__
                raise ValueError(
                    f"layer {layer.name!r}: saved {name} has shape {found}, expected {tuple(shape)} for "
                    f"mode={mode!r}; was the state saved with another mode or model?"
                )


def restore_moments(
    state: dict[Tensor, dict[str, Any]], param_groups: Sequence[dict], layers: Mapping[int, Layer],
    states: dict[int, dict[str, Any]],
) -> None:
    """Puts the LoRA layers' saved tensors (but ``step``) back into ``state`` as saved, laid out as
    this optimizer keeps them (``torch.optim.Optimizer.load_state_dict`` cast them)."""
    for group in param_groups:
        if not group["lora_pro"]:
            continue
        for param in group["params"]:
            for key, value in states.get(id(param), {}).items():
                if isinstance(value, Tensor) and key != "step":
                    state[param][key] = _placed(layers.get(id(param)), param, group["mode"], value)


def _placed(layer: Layer | None, param: Tensor, mode: str, value: Tensor) -> Tensor:
    """A loaded LoRA moment laid out as this optimizer keeps it: a full-mode ``out x in``
    moment of a sharded layer as a DTensor sharded by rows like lora_B (taking this rank's rows
    of a whole tensor), every other one whole (gathered if it was saved sharded). ``layer`` is
    None for a lora_B."""
    if mode != "full" or layer is None or not layer.sharded:
        return full(value).to(device=local(param).device)
    like = layer.B
    if is_dtensor(value) and value.device_mesh == like.device_mesh and value.placements == like.placements:
        return value.to(device=local(like).device)
    start, stop = layer.rows_B
    rows = full(value)[start:stop].to(device=local(like).device).clone()
    return rows_like(rows, like, tuple(value.shape))
