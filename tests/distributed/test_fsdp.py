"""FSDP2 (fully_shard) recipes on two CPU processes with gloo (docs/distributed.md): training with
AdamW, with gradient checkpointing and with a mixed-precision policy; sharded (DCP) and full
state dicts; the refusal to shard a wrapped base layer alone; collect_gradients on a sharded model."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import fastlora
from fsdp_helpers import (
    MixedPrecisionPolicy, TinyDecoder, batch, full_params, fully_shard, loss_of, make_model, needs_fsdp2,
    reference_grads, repeat_first_batch, shard_model, spawn, token_magnitudes,
)

pytestmark = [needs_fsdp2, pytest.mark.slow]  # multi-process (gloo)

STEPS = 3


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    # The single-tensor implementation on both sides, so the arithmetic per element is the same.
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=False)


def _train(rank, world, out_dir):
    results = {}
    for variant in ("plain", "checkpointing"):
        model = make_model()
        model.checkpointing = variant == "checkpointing"
        shard_model(model)
        opt = _adamw(model)
        for step in range(STEPS):
            loss_of(model, rank, step).backward()
            opt.step()
            opt.zero_grad()
        results[variant] = full_params(model)
    return results


def test_fsdp2_adamw_and_checkpointing_equal_one_process(tmp_path):
    ranks = spawn(_train, tmp_path)
    torch.set_num_threads(1)
    model = make_model()
    opt = _adamw(model)
    for step in range(STEPS):
        reference_grads(model, step)
        opt.step()
        opt.zero_grad()
    expected = dict(model.named_parameters())
    for variant in ("plain", "checkpointing"):
        assert ranks[0][variant].keys() == expected.keys()  # FSDP2 keeps the parameter names
        for name, value in ranks[0][variant].items():
            assert torch.equal(value, ranks[1][variant][name]), f"{variant}: ranks differ on {name}"
            # Same per-element arithmetic; two ranks' gradients averaged exactly as the reference does.
            assert torch.equal(value, expected[name].detach()), f"{variant}: {name} differs from one process"


def _state_dicts(rank, world, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
    )

    def run(model, opt, steps):
        for step in steps:
            loss_of(model, rank, step).backward()
            opt.step()
            opt.zero_grad()

    model = shard_model(make_model())
    opt = _adamw(model)
    run(model, opt, range(2))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(out_dir, "dcp"))
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    after_two = full_params(model)
    run(model, opt, [2])
    continued = full_params(model)

    # Sharded: a fresh model and optimizer resume from the DCP checkpoint, bit for bit.
    resumed = shard_model(make_model())
    resumed_opt = _adamw(resumed)
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "dcp"))
    set_state_dict(resumed, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    run(resumed, resumed_opt, [2])
    resumed_params = full_params(resumed)

    # Full: rank 0's whole state dict broadcast into a fresh sharded model.
    loaded = shard_model(make_model())
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(loaded, dict(whole) if rank == 0 else {}, options=options)  # it replaces entries
    return {
        "whole": whole, "after_two": after_two, "continued": continued, "resumed": resumed_params,
        "loaded": full_params(loaded),
    }


def test_fsdp2_sharded_and_full_state_dicts(tmp_path):
    ranks = spawn(_state_dicts, tmp_path)
    for r in ranks:
        for name, value in r["continued"].items():
            assert torch.equal(r["resumed"][name], value), f"DCP resume differs on {name}"
            assert torch.equal(r["loaded"][name], r["after_two"][name]), f"full state dict load differs on {name}"
    torch.set_num_threads(1)
    model = make_model()
    opt = _adamw(model)
    for step in range(2):
        reference_grads(model, step)
        opt.step()
        opt.zero_grad()
    whole = ranks[0]["whole"]
    assert whole.keys() == model.state_dict().keys()  # the same names as an unsharded model's
    for name, value in model.state_dict().items():
        assert not fastlora._distributed.is_dtensor(whole[name]) and torch.equal(whole[name], value), name
    assert ranks[1]["whole"] == {}  # cpu_offload: only rank 0 holds the full state dict


def _mixed_precision_and_units(rank, world, out_dir):
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard_model(make_model(), mp_policy=policy)
    losses = repeat_first_batch(model, _adamw(model), rank, 4)
    params = full_params(model)

    # A LoRALinear as its own FSDP unit works; its wrapped base layer alone is refused.
    unit = make_model()
    fully_shard(unit.blocks[0].up)
    fully_shard(unit)
    unit(batch(rank, 0)[0]).sum().backward()
    alone = make_model()
    fully_shard(alone.blocks[0].up.base_layer)
    with pytest.raises(TypeError, match="base_layer alone"):
        alone(batch(rank, 0)[0])
    return {"losses": losses, "params": params, "dtype": next(model.parameters()).dtype}


def test_fsdp2_mixed_precision_and_which_modules_to_shard(tmp_path):
    ranks = spawn(_mixed_precision_and_units, tmp_path)
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), f"ranks differ on {name}"
    assert ranks[0]["dtype"] == torch.float32  # bfloat16 compute, float32 sharded parameters
    for r in ranks:
        assert r["losses"][-1] < r["losses"][0]


def _loss(model, b):
    x, y = b
    return (model(x) - y).pow(2).mean()


def _plain_model():
    torch.manual_seed(0)
    return TinyDecoder(d=12, h=21, depth=2, out=5)


def _collect(rank, world, out_dir):
    model = shard_model(_plain_model())
    stats = fastlora.collect_gradients(
        model, [batch(rank, s) for s in range(2)], targets=["up", "down"], loss_fn=_loss, progress=False
    )
    return {name: (g.mean, g.count) for name, g in stats.items()}


def test_collect_gradients_on_an_fsdp2_model(tmp_path):
    """Exact mode on a sharded model (the accumulators stay whole on every rank): the ranks agree
    and equal one process over both ranks' batches, to the rounding of adding the same token
    terms in another order."""
    ranks = spawn(_collect, tmp_path)
    torch.set_num_threads(1)
    model = _plain_model()
    batches = [batch(rank, s) for rank in range(2) for s in range(2)]
    whole = fastlora.collect_gradients(model, batches, targets=["up", "down"], loss_fn=_loss, progress=False)
    mags = token_magnitudes(model, batches, list(whole), _loss)
    u = torch.finfo(torch.float32).eps / 2
    n = len(batches)
    terms = n * batches[0][0].shape[0] + 2  # every token's dy_t x_t^T, plus the two ranks' sums
    for name, g in whole.items():
        mean, count = ranks[0][name]
        assert torch.equal(mean, ranks[1][name][0]) and count == g.count == n
        # Both sums are within gamma_terms * sum |dy_t| |x_t| of the exact one; dividing by n
        # rounds once more on each side.
        bound = 2 * terms * u / (1 - terms * u) * mags[name] / n + 2 * u * g.mean.abs()
        assert bool(((mean - g.mean).abs() <= bound).all()), name
