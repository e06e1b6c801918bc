"""Optimizer-step benchmark: LoRA-Pro (full and efficient modes) against torch.optim.AdamW on the
LoRA parameters and against AdamW on the full weights (the full fine-tuning optimizer step), on
the CPU and, when there is one, on a GPU; plus the fused moment pass's achieved bandwidth as a
fraction of the device's measured copy bandwidth.

Only the optimizer step is timed (the gradients are set once, the step runs repeatedly). "state
MiB" is the optimizer state (moments); "peak extra MiB" (GPU only) is what a step allocates
beyond the state at its peak. Memory traffic of the fused pass: each moment is read and written
once (4 x out x in x element size bytes); the copy bandwidth is that of dst.copy_(src) on a
buffer far larger than the caches (read + write counted), timed in alternating rounds with it.

    python benchmarks/optim.py                      # CPU: one Llama-7B block; GPU: all 32 blocks
    python benchmarks/optim.py --preset small       # a quick run
    python benchmarks/optim.py --device cuda --blocks 8
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, format_table, measure, measure_interleaved, write_json  # noqa: E402

import fastlora  # noqa: E402

# (out, in) of the adapted linear layers of one Llama-2-7B decoder block.
LLAMA7B_BLOCK = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
PRESETS = {"small": [(1024, 1024)] * 4 + [(2816, 1024)] * 2 + [(1024, 2816)], "llama7b": LLAMA7B_BLOCK}
VARIANTS = ("adamw_lora", "lora_pro_efficient", "lora_pro_full", "adamw_full")
BANDWIDTH_SHAPES = [(4096, 4096), (4096, 14336)]


class Adapters(nn.Module):
    """LoRA layers of the given shapes with random adapters and gradients (no forward needed)."""

    def __init__(self, shapes, r, dtype, device, generator):
        super().__init__()
        self.layers = nn.ModuleList(
            fastlora.LoRALinear(nn.Linear(n, m, bias=False, dtype=dtype, device=device), r=r, lora_alpha=2 * r)
            for m, n in shapes
        )
        with torch.no_grad():
            for layer in self.layers:
                for p in (layer.lora_A, layer.lora_B):
                    p.copy_(torch.randn(p.shape, generator=generator, device=device) * 0.02)
                    p.grad = torch.randn(p.shape, generator=generator, device=device) * 1e-3


def _adamw(params, device):
    # fused=True is torch's fastest AdamW where it exists (CUDA; the CPU since torch 2.4).
    try:
        return torch.optim.AdamW(params, lr=1e-5, fused=True), "fused"
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=1e-5), "foreach" if device.type == "cuda" else "default"


def build(variant, shapes, r, dtype, device, generator):
    """(step function, optimizer, note); the gradients are already in place."""
    if variant == "adamw_full":
        params = [nn.Parameter(torch.randn(m, n, generator=generator, device=device, dtype=dtype)) for m, n in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, device=device, dtype=dtype) * 1e-3
        opt, note = _adamw(params, device)
        return opt.step, opt, f"AdamW({note}) on the {str(dtype).removeprefix('torch.')} weights"
    model = Adapters(shapes, r, dtype, device, generator)
    if variant == "adamw_lora":
        opt, note = _adamw([p for layer in model.layers for p in (layer.lora_A, layer.lora_B)], device)
        return opt.step, opt, f"AdamW({note}) on the float32 adapters"
    mode = variant.removeprefix("lora_pro_")
    opt = fastlora.optim.LoRAPro(model, lr=1e-5, mode=mode, check_finite=False)
    return opt.step, opt, f"LoRAPro(mode={mode!r}), bfloat16 moments"


def state_mib(opt) -> float:
    tensors = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(v.numel() * v.element_size() for v in tensors) / 2**20


def step_rows(shapes, r, dtype, device, repeat) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    if device.type == "cpu":
        # All variants live at once and are timed in alternating rounds (the machine is shared).
        built = {v: build(v, shapes, r, dtype, device, g) for v in VARIANTS}
        for fn, _, _ in built.values():
            fn()  # create the state
        times = measure_interleaved({v: b[0] for v, b in built.items()}, device, warmup=1, repeat=repeat)
        for v, (fn, opt, note) in built.items():
            rows.append({"variant": v, "step ms": 1e3 * times[v], "state MiB": state_mib(opt), "what": note})
    else:
        # One at a time (a Llama-7B set does not fit twice); GPU timings are stable.
        for v in VARIANTS:
            fn, opt, note = build(v, shapes, r, dtype, device, g)
            fn()
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            t = measure(fn, device, warmup=2, repeat=repeat)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            rows.append({"variant": v, "step ms": 1e3 * t, "state MiB": state_mib(opt), "peak extra MiB": peak,
                         "what": note})
            del fn, opt
            gc.collect()
            torch.cuda.empty_cache()
    full = next(row["step ms"] for row in rows if row["variant"] == "adamw_full")
    lora = next(row["step ms"] for row in rows if row["variant"] == "adamw_lora")
    for row in rows:
        row["x AdamW full"] = row["step ms"] / full
        row["x AdamW LoRA"] = row["step ms"] / lora
    return rows


def bandwidth_rows(r, device, repeat) -> list[dict]:
    """The fused pass on single layers against dst.copy_(src), timed in alternating rounds: the
    copy moves 1 GiB (256 MiB on the CPU), far more than the caches hold."""
    n = (1 << 30 if device.type == "cuda" else 1 << 28) // 8
    src, dst = torch.ones(n, device=device), torch.empty(n, device=device)
    rows = []
    g = torch.Generator(device=device).manual_seed(1)
    for out, n_in in BANDWIDTH_SHAPES:
        for moment_dtype in (torch.bfloat16, torch.float32):
            def t(*shape):
                return torch.randn(*shape, generator=g, device=device)

            exp_avg = torch.zeros(out, n_in, dtype=moment_dtype, device=device)
            exp_avg_sq = torch.zeros_like(exp_avg)
            args = (exp_avg, exp_avg_sq, t(r, n_in), t(out, r), t(r, n_in), t(out, r), 2.0, 0.9, 0.999, 1e-8, 3)
            kernel = fastlora._ops.lora_pro_kernel_applies(exp_avg, r)
            times = measure_interleaved(
                {"fused": lambda: fastlora._ops.lora_pro_moments(*args), "copy": lambda: dst.copy_(src)},
                device, warmup=2, repeat=repeat,
            )
            moved = 4 * out * n_in * exp_avg.element_size()  # each moment read and written once
            copy_bw = 2 * 4 * n / times["copy"]
            rows.append({
                "shape": f"{out}x{n_in}", "r": r, "moments": str(moment_dtype).replace("torch.", ""),
                "path": "kernel" if kernel else "reference", "ms": 1e3 * times["fused"],
                "GB/s": moved / times["fused"] / 1e9, "copy GB/s": copy_bw / 1e9,
                "x copy bw": moved / times["fused"] / copy_bw,
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama7b")
    parser.add_argument("--blocks", type=int, help="decoder blocks (default: 32 on a GPU, 1 on the CPU)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="base / full-weight dtype (adapters are float32)")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    blocks = args.blocks or (32 if device.type == "cuda" and args.preset == "llama7b" else 1)
    repeat = args.repeat or (20 if device.type == "cuda" else 7)
    shapes = PRESETS[args.preset] * blocks
    dtype = getattr(torch, args.dtype)

    env = environment(device)
    print(f"# optim: torch {env['torch']}, {env['device']}, {env['threads']} threads, "
          f"fastlora kernels: {env.get('fastlora_cpu_isa', 'none')}", flush=True)
    print(f"# {len(shapes)} layers ({args.preset} x {blocks} blocks, "
          f"{sum(m * n for m, n in shapes) / 1e9:.2f}B weights), r={args.rank}, {args.dtype} weights", flush=True)
    bw = bandwidth_rows(args.rank, device, repeat)
    print("\nfused moment pass of one layer (bytes: each moment read and written once) vs a 2-buffer copy:")
    print(format_table(bw, ["shape", "r", "moments", "path", "ms", "GB/s", "copy GB/s", "x copy bw"]), flush=True)
    rows = step_rows(shapes, args.rank, dtype, device, repeat)
    print("\noptimizer step:")
    columns = ["variant", "step ms", "x AdamW full", "x AdamW LoRA", "state MiB", "peak extra MiB", "what"]
    print(format_table(rows, [c for c in columns if c in rows[0]]))
    path = write_json(Path(args.out) / f"optim_{device.type}.json", {
        "environment": env, "preset": args.preset, "blocks": blocks, "rank": args.rank, "dtype": args.dtype,
        "bandwidth": bw, "steps": rows,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
