"""fastlora under DeepSpeed on two CPU processes (gloo; docs/distributed.md): ZeRO stage 0 (data
parallel, gradients averaged by DeepSpeed) trains LoRA-Pro exactly as one process averaging the
two ranks' gradients; ZeRO stages 1-3 hand the optimizer flat partitions instead of the adapters,
which LoRA-Pro refuses at its first step (instead of silently skipping the adapters)."""

from __future__ import annotations

import os

import pytest
import torch
from fastlora.optim import LoRAPro
from fsdp_helpers import loss_of, make_model, needs_fsdp2, reference_grads, spawn

deepspeed = pytest.importorskip("deepspeed")
pytestmark = needs_fsdp2

STEPS = 3


def _worker(rank, world, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for stage in (0, 2):
        model = make_model()
        # (DeepSpeed clips gradients to norm 1 unless told otherwise; one process does not.)
        config = {"train_micro_batch_size_per_gpu": 6, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=LoRAPro(model, lr=1e-2), config=config)
        if stage:
            engine.backward(loss_of(engine, rank, 0))
            with pytest.raises(RuntimeError, match="DeepSpeed ZeRO"):
                engine.step()
            continue
        for step in range(STEPS):
            engine.backward(loss_of(engine, rank, step))
            engine.step()
        out[stage] = {name: p.detach().clone() for name, p in model.named_parameters()}
    return out


def test_deepspeed_zero0_trains_lora_pro_and_zero2_is_refused(tmp_path):
    ranks = spawn(_worker, tmp_path)
    torch.set_num_threads(1)
    model = make_model()
    opt = LoRAPro(model, lr=1e-2)
    for step in range(STEPS):
        reference_grads(model, step)  # the two ranks' gradients averaged (halving is exact)
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        for r in ranks:
            assert torch.equal(r[0][name], p.detach()), f"ZeRO-0: {name} differs from one process"
