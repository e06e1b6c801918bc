"""FSDP2 and DDP training on 4 CPU processes (gloo) and a LoRA-Pro checkpoint written on 4 ranks
and resumed on 2 (docs/distributed.md). With 4 ranks the reduce-scatter adds 4 gradients in an order
of its own, so the averaged gradient equals one process's mean of the 4 per-rank gradients only to
the rounding of a 4-term sum; each step is then compared with one process stepping from the same
state with the ranks' averaged gradient."""

from __future__ import annotations

import os

import fastlora
import pytest
import torch
from fastlora._distributed import chunk_rows, local
from fsdp_helpers import (
    assert_same_state, check_gradients, check_step, loss_of, make_model, needs_fsdp2, optimizer, record_step,
    shard_model, spawn,
)

pytestmark = [needs_fsdp2, pytest.mark.slow]  # multi-process (gloo)

STEPS = 2


def _train(rank, world, out_dir):
    out = {}
    for name in ("adamw", "full", "efficient", "ddp-adamw", "ddp-full"):
        if name.startswith("ddp-"):  # DistributedDataParallel: gradients all-reduced, everything whole
            model = make_model()
            run = torch.nn.parallel.DistributedDataParallel(model)
        else:
            model = run = shard_model(make_model())
        opt = optimizer(name.removeprefix("ddp-"), model)
        out[name] = [record_step(model, opt, [lambda m=run, s=step: loss_of(m, rank, s)]) for step in range(STEPS)]
        if name == "full":  # bytes of the out x in moments this rank holds
            states = [opt.state[layer.lora_A] for layer in fastlora.lora_layers(model).values()]
            out["moment_bytes"] = sum(local(s[k]).numel() * 4 for s in states for k in ("exp_avg", "exp_avg_sq"))
    return out


def test_four_ranks_fsdp2_and_ddp_adamw_and_lora_pro_equal_one_process(tmp_path):
    ranks = spawn(_train, tmp_path, world=4)
    torch.set_num_threads(1)
    # Full mode's moments: each rank holds torch.chunk's rows of each (21 rows: 6, 6, 6, 3; 12: 3 each).
    shapes = [(layer.out_features, layer.in_features) for layer in fastlora.lora_layers(make_model()).values()]
    for rank, r in enumerate(ranks):
        rows = [chunk_rows(out, 4, rank) for out, _ in shapes]
        assert r.pop("moment_bytes") == sum(2 * 4 * (b - a) * in_f for (a, b), (_, in_f) in zip(rows, shapes))
    leaves = torch.utils._pytree.tree_leaves
    for name, records in ranks[0].items():
        for other in ranks[1:]:
            for mine, theirs in zip(leaves(records), leaves(other[name])):
                assert not isinstance(mine, torch.Tensor) or torch.equal(mine, theirs), f"{name}: the ranks differ"
        for step, record in enumerate(records):
            check_gradients(record, [(rank, step) for rank in range(4)], 0.25)
            check_step(name, record)


def _save_on_four(rank, world, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = shard_model(make_model())
    opt = optimizer("full", model)
    for step in range(STEPS):
        record_step(model, opt, [lambda s=step: loss_of(model, rank, s)])
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(out_dir, "ckpt"))
    return {"next": record_step(model, opt, [lambda: loss_of(model, rank, STEPS)])}


def _resume_on_two(rank, world, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = shard_model(make_model())
    opt = optimizer("full", model)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "ckpt"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    moment_rows = {n: local(opt.state[layer.lora_A]["exp_avg"]).shape[0]
                   for n, layer in fastlora.lora_layers(model).items()}
    # The same global batch as the 4 ranks' next step: this rank takes two of their quarters.
    quarters = [lambda q=q: loss_of(model, q, STEPS) / 2 for q in (2 * rank, 2 * rank + 1)]
    return {"next": record_step(model, opt, quarters), "moment_rows": moment_rows}


def test_lora_pro_checkpoint_saved_on_four_ranks_resumes_on_two(tmp_path):
    four = spawn(_save_on_four, tmp_path, world=4)
    two = spawn(_resume_on_two, tmp_path, world=2)
    torch.set_num_threads(1)
    saved, resumed = four[0]["next"], two[0]["next"]
    # The moments are resharded (up's 21 rows: 6, 6, 6, 3 on 4 ranks, 11 and 10 on 2) and the
    # parameters and optimizer state are the saved ones, bit for bit.
    for rank, r in enumerate(two):
        for name, rows in r["moment_rows"].items():
            out = 21 if name.endswith("up") else 12
            assert rows == -(-out // 2) - (rank * (out % 2)), name
    assert_same_state(resumed["before"], saved["before"], "the resumed state differs from the saved one")
    # The next step: both runs' averaged gradients are the mean of the same 4 quarter-batch
    # gradients (to the rounding of a 4-term sum), and each run's step equals one process
    # stepping from the checkpoint with its gradients.
    quarters = [(q, STEPS) for q in range(4)]
    for run in (saved, resumed):
        check_gradients(run, quarters, 0.25)
        check_step("full", run)
