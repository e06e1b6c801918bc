"""LoRA-Pro as a gradient transform (fastlora.optim.adjust_gradients, lora_pro_gradient_hooks):
AdamW on the adjusted gradients is LoRAPro(mode="efficient"); the hooks, applied per backward,
give the adjusted gradients (also summed over micro-batches: the closed form is linear in them);
bad input is refused before anything changes. One process, float64 (so that any real difference
stands out against the rounding bound)."""

from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora.optim import LoRAPro, adjust_gradients, lora_pro_gradient_hooks
from fsdp_helpers import batch, gram_condition, make_model

STEPS = 3
U64 = torch.finfo(torch.float64).eps / 2


def _model():
    return make_model().double()


def _loss(model, step):
    x, y = (t.double() for t in batch(0, step))
    return (model(x) - y).pow(2).mean()



def test_adamw_on_adjusted_gradients_is_lora_pro_efficient():
    ref, mine = _model(), _model()
    kappa = gram_condition(ref)
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    opt_ref = LoRAPro(ref, lr=1e-2, mode="efficient", moment_dtype=torch.float64)
    opt = torch.optim.AdamW([p for p in mine.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0,
                            foreach=False)
    for step in range(STEPS):
        for model, o in ((ref, opt_ref), (mine, opt)):
            _loss(model, step).backward()
            if o is opt:
                assert adjust_gradients(model) == 4
            o.step()
            o.zero_grad()
    params = dict(mine.named_parameters())
    for name, p in ref.named_parameters():
        moved = float((p.detach() - start[name]).norm())
        # Adam's few roundings per element and step, fed back through the closed form (kappa).
        tol = STEPS * 16 * kappa * U64 * moved + 4 * U64 * float(p.detach().norm())
        assert moved > 0 or not p.requires_grad
        assert float((params[name].detach() - p.detach()).norm()) <= tol, name


def _adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}


def test_hooks_adjust_each_backward_and_restore_the_parameters():
    model = _model()
    kappa = gram_condition(model)
    adapters = {n: p for n, p in model.named_parameters()}
    for step in range(2):  # two micro-batches: the adjusted gradients add up
        _loss(model, step).backward()
    adjust_gradients(model)
    want = _adapter_grads(model)
    model.zero_grad()
    with lora_pro_gradient_hooks(model) as hooked:
        assert hooked == 4
        for step in range(2):
            _loss(model, step).backward()
        with pytest.raises(RuntimeError):  # a failing forward leaves the parameters in place
            model(torch.zeros(2, 5, dtype=torch.float64))
    got = _adapter_grads(model)
    for name, h in want.items():
        tol = 64 * kappa * U64 * float(h.norm())
        assert float((got[name] - h).norm()) <= tol, name
    assert dict(model.named_parameters()) == adapters  # the same Parameter objects, hooks gone
    for layer in fastlora.lora_layers(model).values():
        assert isinstance(layer.lora_A, torch.nn.Parameter) and not layer._forward_pre_hooks
    # Outside the block the plain gradients again.
    model.zero_grad()
    _loss(model, 0).backward()
    assert not torch.equal(_adapter_grads(model)["blocks.0.up.lora_A"], got["blocks.0.up.lora_A"])


def test_bad_input_changes_nothing():
    model = _model()
    _loss(model, 0).backward()
    before = _adapter_grads(model)
    with pytest.raises(ValueError, match="x_mode"):
        adjust_gradients(model, x_mode="nope")
    with pytest.raises(ValueError, match="x_mode"):
        with lora_pro_gradient_hooks(model, x_mode="nope"):
            pass
    model.blocks[0].up.lora_B.grad = None
    with pytest.raises(ValueError, match="only one of"):
        adjust_gradients(model)
    for name, p in model.named_parameters():
        if name in before and p.grad is not None:
            assert torch.equal(p.grad, before[name]), name
    model.blocks[0].up.lora_B.grad = before["blocks.0.up.lora_B"].clone()
    model.blocks[0].up.lora_A.grad = before["blocks.0.up.lora_A"].to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        adjust_gradients(model)
    for name, p in model.named_parameters():
        if name in before and p.grad is not None and not p.grad.is_sparse:
            assert torch.equal(p.grad, before[name]), name
    with pytest.raises(TypeError, match="LoRALinear"):
        adjust_gradients([torch.nn.Parameter(torch.zeros(2))])
