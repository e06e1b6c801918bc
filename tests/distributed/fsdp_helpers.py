"""Shared pieces of the FSDP2 tests: a small decoder-style model with fastlora adapters, a
2-process gloo launcher, and the single-process reference (each rank's half-batch gradient
averaged, which is what FSDP2's reduce-scatter gives for two ranks: halving is exact)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastlora
from fastlora._distributed import full
from fastlora.optim import LoRAPro
from gloo import spawn  # noqa: F401  (the FSDP tests' launcher)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))  # the FSDP2 example's model
try:
    from fsdp import MixedPrecisionPolicy, TinyDecoder, fully_shard, quantize_blocks, shard_model
except ImportError:  # no FSDP2 in this torch (it came with 2.4)
    fully_shard = None

needs_fsdp2 = pytest.mark.skipif(
    fully_shard is None or not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo and FSDP2 (fully_shard, torch >= 2.4)",
)

WORLD = 2
U = torch.finfo(torch.float32).eps / 2


def make_model() -> TinyDecoder:
    """Adapters of rank 3 on every up/down projection (21 and 12 rows: uneven shards on two
    ranks), and a trainable head (an ordinary parameter next to the adapters)."""
    torch.manual_seed(0)
    return _adapt(TinyDecoder(d=12, h=21, depth=2, out=5))


def make_nf4_model(storage: torch.dtype = torch.bfloat16) -> TinyDecoder:
    """make_model's decoder (up 12 -> 22, so that the packed weights split unevenly: 66 bfloat16 or
    33 float32 rows) with bitsandbytes NF4 bases stored as ``storage`` (accelerate's QLoRA recipe
    for FSDP: a float storage dtype lets ``fully_shard`` shard the packed weights)."""
    torch.manual_seed(0)
    model = quantize_blocks(TinyDecoder(d=12, h=22, depth=2, out=5), storage)
    return _adapt(model)


def _adapt(model: TinyDecoder) -> TinyDecoder:
    fastlora.inject(model, target_modules=["up", "down"], r=3, lora_alpha=6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # start away from B = 0 so that every term of every method is exercised
        for layer in fastlora.lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(layer.out_features))
    model.head.requires_grad_(True)
    return model


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(6, 12, generator=g), torch.randn(6, 5, generator=g)


def loss_of(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    x, y = batch(rank, step)
    return (model(x).float() - y).pow(2).mean()


def repeat_first_batch(model: nn.Module, opt, rank: int, steps: int) -> list[float]:
    """``steps`` optimizer steps on this rank's first batch; returns the losses."""
    losses = []
    for _ in range(steps):
        loss = loss_of(model, rank, 0)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return losses


def reference_grads(model: nn.Module, step: int) -> None:
    """Sets each trainable parameter's grad to the mean of the two ranks' half-batch gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    halves = [torch.autograd.grad(loss_of(model, rank, step), params) for rank in range(WORLD)]
    for p, g0, g1 in zip(params, *halves):
        p.grad = (g0 + g1) / 2


def optimizer(name: str, model):
    if name == "adamw":  # the single-tensor implementation, as in one process
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=False)
    return LoRAPro(model, lr=1e-2, mode=name, moment_dtype=torch.float32)


def record_step(model, opt, losses) -> dict:
    """One step on the sum of ``losses`` (callables, one backward each: gradient accumulation);
    returns the state before, the averaged gradients, and the state after (all gathered)."""
    before = (full_params(model), full_state(opt))
    for loss in losses:
        loss().backward()
    grads = {name: full(p.grad).clone() for name, p in model.named_parameters() if p.grad is not None}
    opt.step()
    opt.zero_grad()
    return {"before": before, "grads": grads, "after": (full_params(model), full_state(opt))}


def check_gradients(record: dict, quarters: list[tuple[int, int]], weight: float, build=make_model) -> None:
    """The ranks' averaged gradient against ``weight`` times the sum of the per-quarter-batch
    gradients one process computes (bit for bit what each rank computes for its quarter): both
    add the same 4 terms, in different orders (FSDP2's reduce-scatter, DDP's all-reduce), so each
    is within gamma_3 sum |g_i| of the exact sum; scaling by powers of two is exact."""
    model = build()
    _load_trainable(model, record["before"][0])
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    parts = [torch.autograd.grad(loss_of(model, *q), list(params.values())) for q in quarters]
    gamma3 = 3 * U / (1 - 3 * U)
    for i, name in enumerate(params):
        terms = [part[i] for part in parts]
        mean = sum(terms) * weight
        bound = 2 * gamma3 * sum(t.abs() for t in terms) * weight
        assert bool(((record["grads"][name] - mean).abs() <= bound).all()), f"gradient of {name}"


def check_step(name: str, record: dict, build=make_model) -> None:
    """One process from the same state with the same gradients: AdamW and LoRA-Pro's moments bit
    for bit (elementwise arithmetic), FSDP2 full mode's A and B within the closed form's rounding
    bound (its pull-back sums rows over the ranks), under DDP bit for bit (the same computation)."""
    params, state = record["before"]
    model = build()
    _load_trainable(model, params)
    opt = optimizer(name.removeprefix("ddp-"), model)
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
        if not p.requires_grad:  # frozen: as built on both sides
            continue
        want = p.detach()
        if name == "full" and pname.endswith(("lora_A", "lora_B")):
            layer = pname.rsplit(".", 1)[0]
            moved = want - params[pname]
            tol = closed_form_tolerance(params[layer + ".lora_A"], params[layer + ".lora_B"], moved)
            tol += 2 * U * float(want.norm())  # A - lr dA rounded on each side
            assert float((got_params[pname] - want).double().norm()) <= tol, f"{name}: {pname}"
        else:
            assert torch.equal(got_params[pname], want), f"{name}: {pname}"


def _load_trainable(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Copies the trainable parameters' values (frozen ones, packed quantized weights among them,
    are as ``model`` was built)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(params[name])


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered whole (a collective under FSDP), by name."""
    return {name: full(p).detach().clone() for name, p in model.named_parameters()}


def full_state(opt) -> dict:
    """The optimizer's state_dict with every sharded tensor gathered (a collective)."""
    sd = opt.state_dict()
    sd["state"] = {
        k: {key: full(v).clone() if isinstance(v, torch.Tensor) else v for key, v in s.items()}
        for k, s in sd["state"].items()
    }
    return sd


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit the same tensors (NaN patterns included: packed 4-bit weights stored as
    floats hold them)."""
    bits = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def assert_same_state(got: tuple, want: tuple, what: str) -> None:
    """(full_params, _full_state) pairs hold the same names, values, dtypes and steps."""
    for name, value in want[0].items():
        assert same_bits(got[0][name], value), f"{what}: {name}"
    assert got[1]["state"].keys() == want[1]["state"].keys(), what
    for key, state in want[1]["state"].items():
        assert got[1]["state"][key].keys() == state.keys(), what
        for moment, value in state.items():
            other = got[1]["state"][key][moment]
            if isinstance(value, torch.Tensor):
                assert other.dtype == value.dtype and torch.equal(other, value), f"{what}: {moment} of {key}"
            else:
                assert other == value, f"{what}: {moment} of {key}"


def token_magnitudes(model: nn.Module, batches, names, loss_fn) -> dict[str, torch.Tensor]:
    """sum over every token t of |dy_t|^T |x_t| for each named layer: what bounds the rounding of
    any order of adding up the layer's weight gradient dy^T x over those tokens."""
    mags, handles = {}, []
    for name in names:
        module = model.get_submodule(name)
        mags[name] = torch.zeros_like(module.weight)

        def tap(mod, inputs, output, name=name):
            x = inputs[0].detach()

            def add(dy):
                mags[name].add_(dy.abs().T @ x.abs())

            output.register_hook(add)

        handles.append(module.register_forward_hook(tap))
    for b in batches:
        loss_fn(model, b).backward()
    for h in handles:
        h.remove()
    return mags


def gram_condition(model: nn.Module) -> float:
    """The largest product of cond(B^T B) and cond(A A^T) over the model's LoRA layers: how much
    LoRA-Pro's closed form can amplify a relative rounding of its inputs."""
    worst = 1.0
    for layer in fastlora.lora_layers(model).values():
        a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        la, lb = torch.linalg.eigvalsh(a @ a.T), torch.linalg.eigvalsh(b.T @ b)
        worst = max(worst, float(la[-1] / la[0] * lb[-1] / lb[0]))
    return worst


def closed_form_tolerance(a_before: torch.Tensor, b_before: torch.Tensor, moved: torch.Tensor) -> float:
    """How far two float32 LoRA-Pro steps from the same state may land apart (Frobenius norm)
    when they differ only in the order of float32 sums: each run's pull-back ``s B^T D`` (a sum
    over the out rows, split over the ranks) and each evaluation of the closed form (inner
    products no longer than max(out, in)) is within gamma_n = n u / (1 - n u) of exact, relative;
    the closed form amplifies a relative change of its input by at most the condition numbers of
    the Gram matrices B^T B and A A^T it inverts. ``moved`` is one run's change of the adapter
    (lr times its direction); the final rounding of A - lr dA adds at most u |A|."""
    u = torch.finfo(torch.float32).eps / 2
    n = max(b_before.shape[0], a_before.shape[1])
    gamma = n * u / (1 - n * u)

    def cond(gram):
        lam = torch.linalg.eigvalsh(gram.double())
        return float(lam[-1] / lam[0])

    kappa = cond(b_before.T @ b_before) * cond(a_before @ a_before.T)
    return 4 * gamma * kappa * float(moved.double().norm())
