"""LoRA-Pro under DistributedDataParallel: two CPU processes on gloo, different data per rank.
Every rank must end with the same parameters and optimizer state, equal to one process
training on both ranks' data."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastlora
from fastlora.optim import LoRAPro
from gloo import spawn

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"),
    pytest.mark.slow,  # multi-process (gloo)
]

CONFIGS = {"full, paper's step": dict(mode="full", trust_region=None), "efficient": dict(mode="efficient"),
           "full, trust region (default)": dict(mode="full")}
STEPS = 4


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 6))
    fastlora.inject(model, r=4, lora_alpha=8, rank_pattern={"2": 2}, generator=torch.Generator().manual_seed(0))
    return model


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 12, generator=g), torch.randn(8, 6, generator=g)


def _snapshot(model, opt):
    tensors = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        tensors += [v.clone() for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return tensors


def _worker(rank, world, out_dir):
    results = {}
    for mode, kwargs in CONFIGS.items():
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = LoRAPro(ddp, lr=1e-2, **kwargs)
        for step in range(STEPS):
            x, y = _batch(rank, step)
            (ddp(x) - y).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        results[mode] = _snapshot(model, opt)
    return results


def test_ddp_ranks_stay_identical(tmp_path):
    ranks = spawn(_worker, tmp_path)
    torch.set_num_threads(1)
    for mode, kwargs in CONFIGS.items():
        for a, b in zip(ranks[0][mode], ranks[1][mode]):
            assert torch.equal(a, b), f"{mode}: the ranks diverged"
        # DDP averages the two ranks' gradients: one process that computes each half-batch's
        # gradient as the ranks do and averages them ends bit for bit where rank 0 does.
        model = _model()
        opt = LoRAPro(model, lr=1e-2, **kwargs)
        params = [p for p in model.parameters() if p.requires_grad]
        for step in range(STEPS):
            halves = []
            for rank in range(2):
                x, y = _batch(rank, step)
                halves.append(torch.autograd.grad((model(x) - y).pow(2).mean(), params))
            for p, g0, g1 in zip(params, *halves):
                p.grad = (g0 + g1) / 2
            opt.step()
            opt.zero_grad()
        for a, b in zip(ranks[0][mode], _snapshot(model, opt)):
            assert torch.equal(a, b), f"{mode}: rank 0 differs from averaging the two half-batch gradients"
    faithful, damped = ranks[0]["full, paper's step"], ranks[0]["full, trust region (default)"]
    assert not all(torch.equal(a, b) for a, b in zip(faithful, damped)), "the trust region never acted here"
