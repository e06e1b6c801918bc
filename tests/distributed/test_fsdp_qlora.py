"""FSDP2 over QLoRA bases (bitsandbytes NF4, packed weights stored as bfloat16 or float32 so that
``fully_shard`` can shard them; docs/distributed.md) on gloo CPU processes: LoRA-GA initialised
before sharding with its offset kept exactly; AdamW and LoRA-Pro on 4 ranks equal to one process;
a DCP checkpoint written on 4 ranks resumed on 2; AdamW on 2 ranks bit for bit one process;
LoRA-Pro's gradient transform (adjust_gradients) on the shards bit for bit one process's; adapter
saves from sharded layers refused."""

from __future__ import annotations

import os

import pytest
import torch

import fastlora
from fastlora._distributed import full
from fsdp_helpers import (
    U, assert_same_state, batch, check_gradients, check_step, full_params, loss_of, make_nf4_model, needs_fsdp2,
    optimizer, record_step, reference_grads, same_bits, shard_model, spawn,
)

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
pytestmark = [needs_fsdp2, pytest.mark.slow]  # multi-process (gloo)

STEPS = 2


def _loss(model, b):
    x, y = b
    return (model(x).float() - y).pow(2).mean()


def _with_offsets(offsets: dict) -> torch.nn.Module:
    """A fresh NF4 model holding the given LoRA-GA offsets (A0, B0) as its adapters and offset:
    the state LoRA-GA left; DCP does not carry the offsets (non-persistent buffers)."""
    model = make_nf4_model()
    for name, layer in fastlora.lora_layers(model).items():
        a0, b0 = offsets[name]
        layer.load_factors(a0, b0, layer.config, base_offset=(a0, b0))
    return model


def _lora_ga(rank: int) -> tuple[torch.nn.Module, dict]:
    """The NF4 model with LoRA-GA from gradients collected sharded over the ranks (one batch each);
    checks, per layer and before sharding, that the offset term cancels the new adapter: the layer
    computes its quantized base within the rounding of the rank-2r branch."""
    model = make_nf4_model()
    stats = fastlora.collect_gradients(model, [batch(rank, -1)], targets=["up", "down"], loss_fn=_loss,
                                       shard=True, progress=False)
    fastlora.init.lora_ga(model, stats)
    report = {}
    g = torch.Generator().manual_seed(7)
    for name, layer in fastlora.lora_layers(model).items():
        assert same_bits(layer.lora_A0, layer.lora_A) and same_bits(layer.lora_B0, layer.lora_B), name
        x = torch.randn(5, layer.in_features, generator=g)
        with torch.no_grad():
            y, base = layer(x), layer.base_layer(x)
        a, b, s = layer.lora_A.abs(), layer.lora_B.abs(), layer.scaling
        gamma = lambda n: n * U / (1 - n * U)  # noqa: E731
        # x A^T twice (for A and A0; each within gamma_in |x||A|^T of exact), summed against
        # [B, -B0] over 2r terms, added to the base output (rounded once).
        xa, g_in = x.abs() @ a.T, gamma(layer.in_features)
        bound = s * (2 * g_in * xa + gamma(2 * layer.r) * 2 * xa * (1 + g_in)) @ b.T
        bound = bound * (1 + U) + U * (base.abs() + bound)
        assert bool(((y - base).abs() <= bound).all()), f"{name}: the offset does not cancel the adapter"
        report[name] = (layer.lora_A0.clone(), layer.lora_B0.clone())
    return model, report


def _four(rank, world, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out = {}
    for name in ("adamw", "full"):
        model, out["offsets"] = _lora_ga(rank)
        x = batch(99, 0)[0]
        with torch.no_grad():
            before = model(x)
            shard_model(model)
            out["same_output_sharded"] = same_bits(model(x), before)  # sharding changes nothing
        model.reshard()  # the root stays gathered after a forward without backward; the optimizer needs its shards
        opt = optimizer(name, model)
        out[name] = [record_step(model, opt, [lambda s=step: loss_of(model, rank, s)]) for step in range(STEPS)]
    model_sd, optim_sd = get_state_dict(model, opt)  # LoRA-Pro full mode: moments sharded by rows
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(out_dir, "ckpt"))
    out["next"] = record_step(model, opt, [lambda: loss_of(model, rank, STEPS)])
    out["offsets_after"] = {n: (layer.lora_A0.clone(), layer.lora_B0.clone())
                            for n, layer in fastlora.lora_layers(model).items()}
    return out


def _two(rank, world, out_dir, offsets):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = shard_model(_with_offsets(offsets))
    opt = optimizer("full", model)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "ckpt"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    quarters = [lambda q=q: loss_of(model, q, STEPS) / 2 for q in (2 * rank, 2 * rank + 1)]
    out = {"next": record_step(model, opt, quarters)}
    # AdamW over float32-stored NF4 weights (33 packed rows: 17 and 16 per rank).
    model = shard_model(make_nf4_model(torch.float32))
    opt = optimizer("adamw", model)
    for step in range(STEPS):
        loss_of(model, rank, step).backward()
        opt.step()
        opt.zero_grad()
    out["adamw_fp32"] = full_params(model)
    # LoRA-Pro's gradient transform on the shards: each rank's rows of the adjusted average.
    model = shard_model(make_nf4_model())
    loss_of(model, rank, 0).backward()
    assert fastlora.optim.adjust_gradients(model) == 4
    out["adjusted"] = {n: full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}
    # Adapter files from sharded layers would hold this rank's rows: refused, nothing written.
    for save in (fastlora.save_adapter, fastlora.export_peft):
        with pytest.raises(ValueError, match="FSDP2 DTensor"):
            save(model, os.path.join(out_dir, f"refused{rank}"))
        assert not os.path.exists(os.path.join(out_dir, f"refused{rank}"))
    return out


def test_fsdp2_qlora_lora_ga_adamw_lora_pro_on_four_ranks_and_resume_on_two(tmp_path):
    four = spawn(_four, tmp_path, world=4)
    leaves = torch.utils._pytree.tree_leaves
    for other in four[1:]:  # every rank holds the same whole tensors
        for mine, theirs in zip(leaves(four[0]), leaves(other)):
            assert not isinstance(mine, torch.Tensor) or same_bits(mine, theirs), "the ranks differ"
    offsets = four[0]["offsets"]
    two = spawn(_two, tmp_path, offsets, world=2)
    torch.set_num_threads(1)
    assert four[0]["same_output_sharded"]
    for name, (a0, b0) in four[0]["offsets_after"].items():  # training never touches the offset
        assert same_bits(a0, offsets[name][0]) and same_bits(b0, offsets[name][1]), name

    def build():
        return _with_offsets(offsets)

    for name in ("adamw", "full"):
        for step, record in enumerate(four[0][name]):
            check_gradients(record, [(rank, step) for rank in range(4)], 0.25, build)
            check_step(name, record, build)
    # The 4-rank checkpoint on 2 ranks: the saved state bit for bit, and the next step on the same
    # global batch (two quarters per rank) equal to one process stepping from the checkpoint.
    saved, resumed = four[0]["next"], two[0]["next"]
    assert_same_state(resumed["before"], saved["before"], "the resumed state differs from the saved one")
    for run in (saved, resumed):
        check_gradients(run, [(q, STEPS) for q in range(4)], 0.25, build)
        check_step("full", run, build)
    # AdamW, float32 storage, 2 ranks: averaging two gradients is exact, so bit for bit one process.
    model = make_nf4_model(torch.float32)
    opt = optimizer("adamw", model)
    for step in range(STEPS):
        reference_grads(model, step)
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        for r in two:
            assert same_bits(r["adamw_fp32"][name], p.detach()), f"NF4 float32 storage, AdamW: {name}"
    # adjust_gradients under FSDP2: the same gathered bits and the same batched closed form as one
    # process adjusting the averaged gradient, so bit for bit.
    model = make_nf4_model()
    reference_grads(model, 0)
    fastlora.optim.adjust_gradients(model)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == two[0]["adjusted"].keys()
    for name, g in grads.items():
        for r in two:
            assert same_bits(r["adjusted"][name], g), f"adjust_gradients under FSDP2: {name}"
