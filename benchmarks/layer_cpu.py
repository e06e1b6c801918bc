"""CPU benchmark of one LoRA layer: fastlora vs its composed and reference paths vs PEFT vs plain
PyTorch LoRA.

All variants wrap copies of the same frozen nn.Linear, get the same input and output gradient,
and are timed in one process (median of --repeat runs after warm-up), in training mode with
gradients for x (as inside a network). Ratios are against the frozen nn.Linear alone. "saved
MiB" is what autograd keeps for backward besides x and the parameters (measured with
saved-tensor hooks), the memory a layer holds after forward beyond its output.

    python benchmarks/layer_cpu.py            # default grid, writes benchmarks/results/
    python benchmarks/layer_cpu.py --quick    # one small configuration
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, format_table, measure_interleaved, plot_ratios, write_json  # noqa: E402

import fastlora  # noqa: E402
import fastlora.testing  # noqa: E402,F401  (registers the oracle: the "reference" variant pins it)

VARIANTS = ("frozen", "fastlora", "composed", "reference", "peft", "plain")


class PlainLoRA(nn.Module):
    """The textbook layer: F.linear(x, W, b) + s * F.linear(F.linear(dropout(x), A), B)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, p: float):
        super().__init__()
        self.base = base
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.a = nn.Parameter(torch.randn(r, base.in_features, **like) / base.in_features**0.5)
        self.b = nn.Parameter(torch.randn(base.out_features, r, **like) * 0.01)
        self.scale, self.p = alpha / r, p

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(F.dropout(x, self.p, self.training), self.a), self.b)


def build(variant: str, base: nn.Linear, r: int, p: float) -> nn.Module:
    """A fresh copy of the frozen ``base`` as the named variant ("peft_bf16": PEFT keeping the
    adapters in the base's dtype, autocast_adapter_dtype=False; "full": all of base trainable)."""
    base = copy.deepcopy(base)
    alpha = 2 * r
    if variant == "frozen":
        return base
    if variant == "full":
        return base.requires_grad_(True)
    if variant in ("fastlora", "composed", "reference", "triton"):
        layer = fastlora.LoRALinear(base, r=r, lora_alpha=alpha, lora_dropout=p)
        nn.init.normal_(layer.lora_B, std=0.01)
        return layer
    if variant in ("peft", "peft_bf16"):
        import peft

        model = nn.Sequential()
        model.add_module("proj", base)
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"])
        model = peft.get_peft_model(model, cfg, autocast_adapter_dtype=variant == "peft")
        nn.init.normal_(model.base_model.model.proj.lora_B["default"].weight, std=0.01)
        return model
    if variant == "plain":
        return PlainLoRA(base, r, alpha, p)
    raise ValueError(variant)


def saved_mib(module: nn.Module, x: torch.Tensor) -> float:
    params = {p.data_ptr() for p in module.parameters()} | {x.data_ptr()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values()) / 2**20


def backend_of(variant: str) -> str:
    """The fastlora backend a variant runs under ("triton": the fused Triton path, "kernels": the
    compiled kernels pinned; "fastlora": "auto", what a user gets)."""
    return {"composed": "composed", "reference": "reference", "triton": "fused", "kernels": "kernels"}.get(variant, "auto")


def timed_row(modules: dict[str, nn.Module], x: torch.Tensor, dy: torch.Tensor, device: str = "cpu",
              warmup: int = 2, repeat: int = 10) -> dict:
    """Median forward and forward+backward times of each module on x (output gradient dy), the
    variants alternating within each round, and each one's ratios to the "frozen" variant."""
    fwd, step = {}, {}
    for variant, module in modules.items():

        def forward(module=module, backend=backend_of(variant)):
            with fastlora.use_backend(backend):
                return module(x)

        def forward_backward(forward=forward, module=module):
            x.grad = None
            module.zero_grad(set_to_none=True)
            forward().backward(dy)

        fwd[variant], step[variant] = forward, forward_backward
    row = {}
    for name, t in measure_interleaved(fwd, device, warmup=warmup, repeat=repeat).items():
        row[f"{name} fwd ms"] = 1e3 * t
    for name, t in measure_interleaved(step, device, warmup=warmup, repeat=repeat).items():
        row[f"{name} f+b ms"] = 1e3 * t
    for variant in modules:
        if variant != "frozen":
            row[f"{variant} fwd x"] = row[f"{variant} fwd ms"] / row["frozen fwd ms"]
            row[f"{variant} f+b x"] = row[f"{variant} f+b ms"] / row["frozen f+b ms"]
    return row


def run_config(tokens: int, n_in: int, n_out: int, r: int, p: float, dtype: torch.dtype, repeat: int) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, n_in, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, n_out, dtype=dtype)
    row = {"T": tokens, "shape": f"{n_in}->{n_out}", "r": r, "p": p, "dtype": str(dtype).replace("torch.", "")}
    modules = {}
    for variant in VARIANTS:
        if variant == "peft":
            try:
                import peft  # noqa: F401
            except ImportError:
                continue
        modules[variant] = build(variant, base, r, p).train()
        with fastlora.use_backend(backend_of(variant)):
            row[f"{variant} saved MiB"] = saved_mib(modules[variant], x)
    row.update(timed_row(modules, x, dy, repeat=repeat))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small configuration")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)

    shapes = [(1024, 1024), (1024, 4096), (4096, 1024)]
    configs = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        # bfloat16 on one shape only: it shows the dtype's effect without doubling the run.
        grid_shapes = shapes if dtype == torch.float32 else shapes[:1]
        for tokens, (n_in, n_out), r, p in itertools.product(args.tokens, grid_shapes, args.ranks, args.dropout):
            configs.append((tokens, n_in, n_out, r, p, dtype))
    if args.quick:
        configs = [(256, 512, 512, 16, 0.05, torch.float32)]
        args.repeat = 5

    env = environment()
    print(f"# layer_cpu: torch {env['torch']}, {env['device']}, {env['threads']} threads, "
          f"fastlora kernels: {env.get('fastlora_cpu_isa', 'none')}", flush=True)
    rows = []
    for i, cfg in enumerate(configs, 1):
        rows.append(run_config(*cfg, repeat=args.repeat))
        print(f"[{i}/{len(configs)}] T={cfg[0]} {cfg[1]}->{cfg[2]} r={cfg[3]} p={cfg[4]} {cfg[5]}: "
              f"fastlora f+b {rows[-1]['fastlora f+b x']:.3f}x frozen", flush=True)

    out = Path(args.out)
    write_json(out / "layer_cpu.json", {"environment": env, "rows": rows})
    for r in rows:
        r["config"] = f"{r['shape']} r{r['r']} p{r['p']} {r['dtype']}"
    plot_ratios(out / "layer_cpu.png", rows, "config",
                [f"{v} f+b x" for v in VARIANTS[1:] if f"{v} f+b x" in rows[0]],
                f"LoRA layer fwd+bwd on CPU, T={rows[0]['T']} (torch {env['torch']})")
    columns = ["shape", "r", "p", "dtype", "frozen f+b ms"] + [
        c for v in VARIANTS[1:] for c in (f"{v} fwd x", f"{v} f+b x") if c in rows[0]
    ] + ["fastlora saved MiB", "peft saved MiB"]
    print()
    print(format_table(rows, [c for c in columns if c in rows[0]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
