"""FSDP2 and DDP training on 4 CPU processes (gloo) and a LoRA-Pro checkpoint written on 4 ranks
and resumed on 2 (docs/distributed.md). With 4 ranks the reduce-scatter adds 4 gradients in an order
of its own, so the averaged gradient equals one process's mean of the 4 per-rank gradients only to
the rounding of a 4-term sum; each step is then compared with one process stepping from the same
state with the ranks' averaged gradient."""

from __future__ import annotations

import os

import fastlora
import torch
from fastlora._distributed import chunk_rows, full, local
from fastlora.optim import LoRAPro
from fsdp_helpers import (
    assert_same_state,
    closed_form_tolerance,
    full_params,
    full_state,
    loss_of,
    make_model,
    needs_fsdp2,
    shard_model,
    spawn,
)

pytestmark = needs_fsdp2

STEPS = 2
U = torch.finfo(torch.float32).eps / 2


def _optimizer(name: str, model):
    if name == "adamw":  # the single-tensor implementation, as in one process
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=False)
    return LoRAPro(model, lr=1e-2, mode=name, moment_dtype=torch.float32)


def _step(model, opt, losses) -> dict:
    """One step on the sum of ``losses`` (callables, one backward each: gradient accumulation);
    returns the state before, the averaged gradients, and the state after (all gathered)."""
    before = (full_params(model), full_state(opt))
    for loss in losses:
        loss().backward()
    grads = {name: full(p.grad).clone() for name, p in model.named_parameters() if p.grad is not None}
    opt.step()
    opt.zero_grad()
    return {"before": before, "grads": grads, "after": (full_params(model), full_state(opt))}


def _train(rank, world, out_dir):
    out = {}
    for name in ("adamw", "full", "efficient", "ddp-adamw", "ddp-full"):
        if name.startswith("ddp-"):  # DistributedDataParallel: gradients all-reduced, everything whole
            model = make_model()
            run = torch.nn.parallel.DistributedDataParallel(model)
        else:
            model = run = shard_model(make_model())
        opt = _optimizer(name.removeprefix("ddp-"), model)
        out[name] = [_step(model, opt, [lambda m=run, s=step: loss_of(m, rank, s)]) for step in range(STEPS)]
        if name == "full":  # bytes of the out x in moments this rank holds
            states = [opt.state[layer.lora_A] for layer in fastlora.lora_layers(model).values()]
            out["moment_bytes"] = sum(local(s[k]).numel() * 4 for s in states for k in ("exp_avg", "exp_avg_sq"))
    return out


def _check_gradients(record: dict, quarters: list[tuple[int, int]], weight: float) -> None:
    """The ranks' averaged gradient against ``weight`` times the sum of the per-quarter-batch
    gradients one process computes (bit for bit what each rank computes for its quarter): both
    add the same 4 terms, in different orders (FSDP2's reduce-scatter, DDP's all-reduce), so each
    is within gamma_3 sum |g_i| of the exact sum; scaling by powers of two is exact."""
    model = make_model()
    model.load_state_dict(record["before"][0], strict=False)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    parts = [torch.autograd.grad(loss_of(model, *q), list(params.values())) for q in quarters]
    gamma3 = 3 * U / (1 - 3 * U)
    for i, name in enumerate(params):
        terms = [part[i] for part in parts]
        mean = sum(terms) * weight
        bound = 2 * gamma3 * sum(t.abs() for t in terms) * weight
        assert bool(((record["grads"][name] - mean).abs() <= bound).all()), f"gradient of {name}"


def _check_step(name: str, record: dict) -> None:
    """One process from the same state with the same gradients: AdamW and LoRA-Pro's moments bit
    for bit (elementwise arithmetic), FSDP2 full mode's A and B within the closed form's rounding
    bound (its pull-back sums rows over the ranks), under DDP bit for bit (the same computation)."""
    params, state = record["before"]
    model = make_model()
    model.load_state_dict(params, strict=False)
    opt = _optimizer(name.removeprefix("ddp-"), model)
    if state["state"]:
        opt.load_state_dict(state)
    for pname, p in model.named_parameters():
        if pname in record["grads"]:
            p.grad = record["grads"][pname].clone()
    opt.step()
    got_params, got_state = record["after"]
    for key, saved in full_state(opt)["state"].items():
        for moment, value in saved.items():
            other = got_state["state"][key][moment]
            assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value, (name, moment)
    for pname, p in model.named_parameters():
        want = p.detach()
        if name == "full" and pname.endswith(("lora_A", "lora_B")):
            layer = pname.rsplit(".", 1)[0]
            moved = want - params[pname]
            tol = closed_form_tolerance(params[layer + ".lora_A"], params[layer + ".lora_B"], moved)
            tol += 2 * U * float(want.norm())  # A - lr dA rounded on each side
            assert float((got_params[pname] - want).double().norm()) <= tol, f"{name}: {pname}"
        else:
            assert torch.equal(got_params[pname], want), f"{name}: {pname}"


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
            _check_gradients(record, [(rank, step) for rank in range(4)], 0.25)
            _check_step(name, record)


def _save_on_four(rank, world, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = shard_model(make_model())
    opt = _optimizer("full", model)
    for step in range(STEPS):
        _step(model, opt, [lambda s=step: loss_of(model, rank, s)])
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(out_dir, "ckpt"))
    return {"next": _step(model, opt, [lambda: loss_of(model, rank, STEPS)])}


def _resume_on_two(rank, world, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = shard_model(make_model())
    opt = _optimizer("full", model)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "ckpt"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    moment_rows = {n: local(opt.state[layer.lora_A]["exp_avg"]).shape[0]
                   for n, layer in fastlora.lora_layers(model).items()}
    # The same global batch as the 4 ranks' next step: this rank takes two of their quarters.
    quarters = [lambda q=q: loss_of(model, q, STEPS) / 2 for q in (2 * rank, 2 * rank + 1)]
    return {"next": _step(model, opt, quarters), "moment_rows": moment_rows}


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
        _check_gradients(run, quarters, 0.25)
        _check_step("full", run)
