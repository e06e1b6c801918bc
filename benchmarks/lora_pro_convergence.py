"""Convergence check of LoRA-Pro on a regression problem whose answer is known.

A frozen linear layer W0 must learn a target W* = W0 + Delta, Delta of rank k <= r, by
regression through a LoRA adapter (full batch, mean squared error). Every method starts from the
same adapter (A Kaiming-uniform, B = 0) and runs the same number of steps; its learning rate is
the best of a grid on a tuning seed, and it is then evaluated on other seeds. Reported per seed:
the final loss, and ||g~ - G|| / ||G|| averaged over the steps, where G is the full gradient in
the merged weight at the current point and g~ the equivalent gradient of the method's adapter
gradients (for AdamW-LoRA the plain ones, s^2 (B B^T G + G A^T A); for LoRA-Pro the adjusted
ones, the projection of G onto the tangent space) -- the quantity of the paper's Figure 4.

    python benchmarks/lora_pro_convergence.py            # writes benchmarks/results/lora_pro_convergence.json
    python benchmarks/lora_pro_convergence.py --quick
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, format_table, write_json  # noqa: E402

import fastlora  # noqa: E402
from fastlora.optim import equivalent_gradient, lora_pro_gradients  # noqa: E402

METHODS = ("adamw_lora", "lora_pro_full", "lora_pro_efficient", "adamw_full_ft")
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


@dataclass(frozen=True)
class Problem:
    out_features: int = 128
    in_features: int = 96
    r: int = 8
    target_rank: int = 8
    samples: int = 512
    steps: int = 100


def make_problem(p: Problem, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W0, X, Y) with Y = X (W0 + Delta)^T and Delta of rank ``target_rank``."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(p.out_features, p.in_features, generator=g) / math.sqrt(p.in_features)
    u = torch.randn(p.out_features, p.target_rank, generator=g)
    v = torch.randn(p.in_features, p.target_rank, generator=g)
    delta = 0.5 * (u @ v.t()) / math.sqrt(p.in_features)
    x = torch.randn(p.samples, p.in_features, generator=g)
    return w0, x, x @ (w0 + delta).t()


def train(method: str, lr: float, p: Problem, seed: int) -> dict:
    """Runs one method; returns the loss curve and the mean relative gradient distance."""
    w0, x, y = make_problem(p, seed)
    base = nn.Linear(p.in_features, p.out_features, bias=False)
    with torch.no_grad():
        base.weight.copy_(w0)
    layer = fastlora.LoRALinear(base, r=p.r, lora_alpha=2 * p.r, generator=torch.Generator().manual_seed(seed))
    if method == "adamw_full_ft":
        base.weight.requires_grad_(True)
        opt = torch.optim.AdamW([base.weight], lr=lr, weight_decay=0.0)
    elif method == "adamw_lora":
        opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=lr, weight_decay=0.0)
    else:
        mode = method.removeprefix("lora_pro_")
        opt = fastlora.optim.LoRAPro(layer, lr=lr, mode=mode, weight_decay=0.0)
    losses, distances = [], []
    for _ in range(p.steps):
        loss = (layer(x) - y).pow(2).mean()
        loss.backward()
        if method != "adamw_full_ft":
            distances.append(_gradient_distance(layer, x, y, adjusted=method.startswith("lora_pro")))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        final = (layer(x) - y).pow(2).mean().item()
    return {"final_loss": final, "losses": losses, "distance": statistics.fmean(distances) if distances else None}


def _gradient_distance(layer: fastlora.LoRALinear, x: torch.Tensor, y: torch.Tensor, adjusted: bool) -> float:
    """||g~ - G|| / ||G|| at the current point (G from autograd on the merged weight)."""
    a, b, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    w = (layer.base_layer.weight.detach() + layer.delta_weight()).requires_grad_(True)
    with torch.enable_grad():
        (x @ w.t() - y).pow(2).mean().backward()
    g_full = w.grad
    g_a, g_b = layer.lora_A.grad, layer.lora_B.grad
    if adjusted:
        g_a, g_b = lora_pro_gradients(a, b, g_a, g_b, s)
    g_eq = equivalent_gradient(a, b, g_a, g_b, s)
    return ((g_eq - g_full).norm() / g_full.norm()).item()


def run(p: Problem, tune_seed: int = 0, seeds: tuple[int, ...] = (1, 2, 3, 4, 5), methods=METHODS) -> dict:
    """Tunes each method's learning rate on ``tune_seed``, then runs it on ``seeds``."""
    best_lr = {m: min(LR_GRID, key=lambda lr: train(m, lr, p, tune_seed)["final_loss"]) for m in methods}
    results = {m: {seed: train(m, best_lr[m], p, seed) for seed in seeds} for m in methods}
    return {"best_lr": best_lr, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, 60 steps")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    p = Problem(steps=60) if args.quick else Problem()
    seeds = (1, 2, 3) if args.quick else (1, 2, 3, 4, 5)
    out = run(p, seeds=seeds)
    rows = []
    for m in METHODS:
        res = out["results"][m]
        row = {"method": m, "lr": out["best_lr"][m]}
        for seed in seeds:
            row[f"loss s{seed}"] = f"{res[seed]['final_loss']:.2e}"
        if res[seeds[0]]["distance"] is not None:
            row["||g~-G||/||G||"] = statistics.fmean(res[s]["distance"] for s in seeds)
        rows.append(row)
    columns = ["method", "lr"] + [f"loss s{s}" for s in seeds] + ["||g~-G||/||G||"]
    print(f"problem: {p}, initial loss {run_initial_loss(p, seeds[0]):.3f}")
    print(format_table(rows, columns))
    payload = {"problem": p.__dict__, "environment": environment(), "best_lr": out["best_lr"], "rows": rows}
    path = write_json(Path(args.out) / "lora_pro_convergence.json", payload)
    print(f"wrote {path}")


def run_initial_loss(p: Problem, seed: int) -> float:
    w0, x, y = make_problem(p, seed)
    return (x @ w0.t() - y).pow(2).mean().item()


if __name__ == "__main__":
    main()
