"""accelerate's FSDP2 preparation of a fastlora model on two CPU processes (gloo), with AdamW and
LoRA-Pro passed to ``Accelerator.prepare`` with the model, as accelerate requires for FSDP2
(docs/distributed.md). accelerate (1.15) only selects FSDP on accelerator devices: on CPU it makes
the state MULTI_CPU (DDP) and ignores the FSDP plugin, so this test sets the state's distributed
type to FSDP itself; the code that then runs is accelerate's own FSDP2 path (``fully_shard`` per
``Block`` and on the root, the optimizer's parameters switched to the sharded ones)."""

from __future__ import annotations

import os

import fastlora
import pytest
import torch
from fastlora._distributed import is_dtensor
from fsdp_helpers import (
    full_params,
    loss_of,
    make_model,
    needs_fsdp2,
    shard_model,
    spawn,
)

accelerate = pytest.importorskip("accelerate")
pytestmark = [needs_fsdp2, pytest.mark.slow]  # multi-process (gloo)

STEPS = 3


def _optimizer(name, model):
    if name == "adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=False)
    return fastlora.optim.LoRAPro(model, lr=1e-2, mode="full", moment_dtype=torch.float32)


def _train(model, opt, rank, backward=None):
    for step in range(STEPS):
        loss = loss_of(model, rank, step)
        backward(loss) if backward else loss.backward()
        opt.step()
        opt.zero_grad()
    return full_params(model)


def _worker(rank, world, out_dir):
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Block"],
        reshard_after_forward=True,
    )
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    out = {"chosen": str(acc.state.distributed_type)}
    for name in ("adamw", "lora-pro"):
        acc.state.distributed_type, acc.state.fsdp_plugin = DistributedType.FSDP, plugin  # (prepare sets it back)
        model = make_model()
        model, opt = acc.prepare(model, _optimizer(name, model))
        sharded = is_dtensor(model.blocks[0].up.lora_A) and is_dtensor(model.head.weight)
        ours = shard_model(make_model())
        out[name] = {"sharded": sharded, "accelerate": _train(model, opt, rank, acc.backward),
                     "fastlora": _train(ours, _optimizer(name, ours), rank)}
    return out


def test_accelerate_fsdp2_prepare_trains_as_fully_shard(tmp_path):
    ranks = spawn(_worker, tmp_path)
    for r in ranks:
        assert r["chosen"] == "DistributedType.MULTI_CPU"  # if this changes, accelerate runs FSDP on CPU itself
        for name in ("adamw", "lora-pro"):
            assert r[name]["sharded"], f"{name}: accelerate did not shard the blocks and the root"
            # The same sharding and arithmetic as fastlora's recipe (docs/distributed.md): the same bits.
            for pname, value in r[name]["fastlora"].items():
                assert torch.equal(r[name]["accelerate"][pname], value), f"{name}: {pname}"
    for pname, value in ranks[0]["lora-pro"]["accelerate"].items():
        assert torch.equal(value, ranks[1]["lora-pro"]["accelerate"][pname]), f"the ranks differ on {pname}"
