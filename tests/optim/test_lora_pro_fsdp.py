"""LoRA-Pro under FSDP2 on two CPU processes with gloo (docs/distributed.md): adapters sharded with
their blocks, full-mode moments sharded by rows like the weight, the closed form computed
identically on every rank. Each step is compared with one process stepping from the same state
with the two ranks' averaged gradients; checkpoints go through torch.distributed.checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

import fastlora
from fastlora._distributed import is_dtensor, local
from fastlora.optim import LoRAPro, LoRAProSGD
from fsdp_helpers import (
    MixedPrecisionPolicy, assert_same_state, closed_form_tolerance, full_params, full_state, loss_of, make_model,
    needs_fsdp2, reference_grads, repeat_first_batch, shard_model, spawn,
)

pytestmark = [needs_fsdp2, pytest.mark.slow]  # multi-process (gloo)

STEPS = 3
LR = 1e-2
CONFIGS = {
    "full": (LoRAPro, dict(mode="full", moment_dtype=torch.float32)),
    "full-bf16": (LoRAPro, dict(mode="full")),
    "efficient": (LoRAPro, dict(mode="efficient", moment_dtype=torch.float32)),
    "sgd": (LoRAProSGD, dict()),
}


def _optimizer(name, model):
    cls, kwargs = CONFIGS[name]
    return cls(model, lr=LR, **kwargs)


def _train(rank, world, out_dir):
    results = {}
    for name in CONFIGS:
        model = shard_model(make_model())
        opt = _optimizer(name, model)
        records = []
        for step in range(STEPS):
            before = (full_params(model), full_state(opt))
            loss_of(model, rank, step).backward()
            opt.step()
            opt.zero_grad()
            records.append((before, full_params(model), full_state(opt)))
        mine = whole = most = 0  # bytes of the out x in moments: this rank's, all, one chunk of rows
        for layer in fastlora.lora_layers(model).values():
            state = opt.state[layer.lora_A]
            if name.startswith("full"):
                assert is_dtensor(state["exp_avg"])
                assert state["exp_avg"].shape == (layer.out_features, layer.in_features)
                for key in ("exp_avg", "exp_avg_sq"):
                    size = state[key].element_size()
                    mine += local(state[key]).numel() * size
                    whole += state[key].numel() * size
                    most += -(-layer.out_features // world) * layer.in_features * size
        results[name] = {"records": records, "moment_bytes": (mine, whole, most)}
    return results


def test_lora_pro_fsdp2_ranks_agree_and_equal_one_process(tmp_path):
    ranks = spawn(_train, tmp_path)
    torch.set_num_threads(1)
    for name in CONFIGS:
        for rec0, rec1 in zip(ranks[0][name]["records"], ranks[1][name]["records"]):
            for t0, t1 in zip(torch.utils._pytree.tree_leaves(rec0), torch.utils._pytree.tree_leaves(rec1)):
                if isinstance(t0, torch.Tensor):
                    assert torch.equal(t0, t1), f"{name}: the ranks differ"
        if name.startswith("full"):
            # Each rank stores only its rows of the moments (torch.chunk's split: 11 + 10 of 21 rows).
            (mine0, whole, most), (mine1, _, _) = ranks[0][name]["moment_bytes"], ranks[1][name]["moment_bytes"]
            assert mine0 + mine1 == whole and max(mine0, mine1) <= most < whole
        worst = 0.0
        for step, ((params, state), after, state_after) in enumerate(ranks[0][name]["records"]):
            model = make_model()
            model.load_state_dict(params, strict=False)
            opt = _optimizer(name, model)
            opt.load_state_dict(state)  # the gathered sharded state: resumable on one process
            reference_grads(model, step)
            opt.step()
            expected, expected_state = dict(model.named_parameters()), full_state(opt)
            # Moments are updated elementwise from the same closed form: the same bits.
            for key, saved in expected_state["state"].items():
                for moment, value in saved.items():
                    got = state_after["state"][key][moment]
                    assert (got == value) if not isinstance(value, torch.Tensor) else torch.equal(got, value), (
                        f"{name} step {step}: {moment} of parameter {key} differs from one process"
                    )
            for pname, value in after.items():
                want = expected[pname].detach()
                if not name.startswith("full") or not pname.endswith(("lora_A", "lora_B")):
                    assert torch.equal(value, want), f"{name} step {step}: {pname} differs from one process"
                    continue
                # Full mode: the pull-back s B^T D sums rows over two ranks; the only difference.
                layer = pname.rsplit(".", 1)[0]
                a0, b0 = params[layer + ".lora_A"], params[layer + ".lora_B"]
                moved = want - params[pname]
                tol = closed_form_tolerance(a0, b0, moved) + torch.finfo(torch.float32).eps * float(want.norm())
                diff = float((value - want).double().norm())
                assert diff <= tol, f"{name} step {step}: {pname} is {diff:.3g} from one process (bound {tol:.3g})"
                worst = max(worst, diff / tol)
        print(f"{name}: largest difference / derived bound = {worst:.3g}")


def _checkpoint(rank, world, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def run(model, opt, steps):
        for step in steps:
            loss_of(model, rank, step).backward()
            opt.step()
            opt.zero_grad()

    out = {}
    for name in ("full-bf16", "efficient"):
        path = os.path.join(out_dir, name)
        model = shard_model(make_model())
        opt = _optimizer(name, model)
        run(model, opt, range(2))
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        saved = (full_params(model), full_state(opt))
        run(model, opt, [2])
        continued = (full_params(model), full_state(opt))

        resumed = shard_model(make_model())
        resumed_opt = _optimizer(name, resumed)
        model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(resumed, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        run(resumed, resumed_opt, [2])
        resumed_state = (full_params(resumed), full_state(resumed_opt))
        out[name] = {"saved": saved, "continued": continued, "resumed": resumed_state}

    # bfloat16 compute with float32 gradient reduction: LoRA-Pro trains, ranks in step.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mixed = shard_model(make_model(), mp_policy=policy)
    losses = repeat_first_batch(mixed, _optimizer("full-bf16", mixed), rank, 3)
    out.update(mixed=full_params(mixed), losses=losses)
    return out


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # loading on one process is the point
def test_lora_pro_fsdp2_checkpoint_resumes_on_two_ranks_and_on_one(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ranks = spawn(_checkpoint, tmp_path)
    for r in ranks:
        for name in ("full-bf16", "efficient"):
            assert_same_state(r[name]["resumed"], r[name]["continued"],
                              f"{name}: resuming from DCP changed the next step")
        assert r["losses"][-1] < r["losses"][0]
    for pname, value in ranks[0]["mixed"].items():
        assert torch.equal(value, ranks[1]["mixed"][pname]), f"mixed precision: the ranks differ on {pname}"

    # A two-rank checkpoint loads into one process without FSDP: the same whole tensors.
    for name in ("full-bf16", "efficient"):
        model = make_model()
        opt = _optimizer(name, model)
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(tmp_path, name))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        assert_same_state((full_params(model), full_state(opt)), ranks[0][name]["saved"],
                          f"{name}: loading on one process")


def _errors(rank, world, out_dir):
    import inspect

    from fsdp_helpers import fully_shard

    # A NaN in one rank's shard of a gradient: every rank raises, nothing changes anywhere.
    model = shard_model(make_model())
    opt = _optimizer("full", model)
    loss_of(model, rank, 0).backward()
    before = full_params(model)
    if rank == 0:
        local(model.blocks[1].down.lora_A.grad).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step()
    unchanged = all(torch.equal(value, before[name]) for name, value in full_params(model).items())
    assert unchanged and not opt.state

    # Adapters sharded by columns (not fully_shard's default): refused when the optimizer is built.
    refused = None
    if "shard_placement_fn" in inspect.signature(fully_shard).parameters:
        from torch.distributed.tensor import Shard

        def by_columns(p):  # FSDP2 shards dim 1 only evenly: the 3 x 12 lora_A of each block's up
            return Shard(1) if p.ndim == 2 and p.shape[1] % world == 0 else None

        model = make_model()
        for block in model.blocks:
            fully_shard(block, shard_placement_fn=by_columns)
        with pytest.raises(ValueError, match="row-sharded") as info:
            _optimizer("full", model)
        refused = str(info.value)
    return {"refused": refused}


def test_lora_pro_fsdp2_errors_leave_everything_unchanged(tmp_path):
    ranks = spawn(_errors, tmp_path)
    assert ranks[0]["refused"] is None or "placements" in ranks[0]["refused"]
