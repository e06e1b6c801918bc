"""GPU benchmark of one LoRA layer (issue 3): fastlora's CUDA kernels against the frozen layer
and the usual ways to train LoRA.

Variants, all wrapping copies of the same frozen nn.Linear, timed in one process on the same
input and output gradient (median of --repeat CUDA-event timings after warm-up, the variants
alternating within each round), in training mode with gradients for x as inside a network:
  frozen      nn.Linear, weight frozen: forward x W^T, backward dx = dy W (the floor)
  full        nn.Linear fully trainable
  peft        PEFT's LoRA, default settings (float32 adapters, x cast to float32 for the branch)
  peft_bf16   PEFT with autocast_adapter_dtype=False (adapters in the activation dtype)
  plain       F.linear(x, W, b) + s F.linear(F.linear(dropout(x), A), B), adapters in x's dtype
  fused       one autograd.Function over cuBLAS calls saving x, A, B and recomputing x A^T in
              backward (the op sequence of Unsloth's LoRA_W; no dropout, so p > 0 is skipped)
  fastlora    fastlora.LoRALinear (float32 adapters) as a user gets it: measured dispatch's choice
  kernels     fastlora.LoRALinear pinned to its CUDA kernels (experimental)
  composed    fastlora.LoRALinear on its composed path (cuBLAS calls in one autograd.Function)
  reference   fastlora.LoRALinear on its PyTorch reference path (plain autograd)
  triton      fastlora.LoRALinear pinned to its fused Triton path (the rank-r terms inside the two
              big GEMMs), if Triton is present
"held MiB" is the device memory a forward leaves allocated (output plus what autograd keeps).
First, the headline table: for each configuration, measured dispatch's check and timing of every
candidate (fastlora.backends.layer.tune_shape), which one it chose and which it rejected and why.
A later table times each fastlora op against the cuBLAS calls it replaces and against the time
to move its bytes at the copy bandwidth measured in the same process.

    python benchmarks/layer.py            # issue 3's grid: T 2048/8192/32768, 3 shapes, r 8-128, p 0/0.05
    python benchmarks/layer.py --quick    # T = 8192 subset with the headline configuration
    python benchmarks/layer.py --headline # the headline configuration, p = 0 and 0.05 (gpu_check.sh)
    python benchmarks/layer.py --warm     # compile and autotune the Triton kernels at the headline
                                          # shapes, print the dispatch table and register spills
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, format_table, measure, measure_interleaved, plot_ratios, write_json  # noqa: E402
from layer_cpu import PlainLoRA, backend_of, build, timed_row  # noqa: E402

import fastlora  # noqa: E402

from fastlora.backends.layer import tune_shape  # noqa: E402

VARIANTS = ("frozen", "full", "peft", "peft_bf16", "plain", "fused", "fastlora", "kernels", "composed",
            "reference") + (("triton",) if fastlora.fused.available() else ())
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
HEADLINE = dict(T=8192, shape="4096->4096", r=16)  # the configuration issue 3's targets name


class _FusedLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        y = F.linear(x, weight, bias)
        y.addmm_(x @ lora_a.t(), lora_b.t(), alpha=scale)
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scale
        xa = x @ lora_a.t()  # recomputed: nothing but x, A, B was saved
        d_b = (dy.t() @ xa).mul_(s)
        dxa = (dy @ lora_b).mul_(s)
        d_a = dxa.t() @ x
        dx = (dy @ weight).addmm_(dxa, lora_a)
        return dx, None, None, d_a, d_b, None


class FusedAutogradLoRA(PlainLoRA):
    """PlainLoRA's parameters computed by one autograd.Function (no dropout)."""

    def forward(self, x):
        return _FusedLoRAFunction.apply(x, self.base.weight, self.base.bias, self.a, self.b, self.scale)


def make(variant: str, base: nn.Linear, r: int, p: float) -> nn.Module:
    if variant == "fused":
        return FusedAutogradLoRA(build("frozen", base, r, p), r, 2 * r, p)
    return build("fastlora" if variant == "kernels" else variant, base, r, p)


def dispatch_rows(configs: list[tuple], dtype: torch.dtype, device: str = "cuda") -> list[dict]:
    """Measured dispatch on each configuration (a layer with bias, as the variants below): every
    candidate's fwd+bwd ms (after its check against the composed path), the choice, and the
    rejected candidates with the reason."""
    rows = []
    for tokens, n_in, n_out, r, p in configs:
        record = tune_shape(tokens, n_in, n_out, r, dtype=dtype, device=device, dropout_p=p, bias=True)
        row = {"T": tokens, "shape": f"{n_in}->{n_out}", "r": r, "p": p, "choice": record["choice"]}
        row.update({f"{name} ms": ms for name, ms in record["ms"].items()})
        row["rejected"] = "; ".join(f"{name}: {why}" for name, why in record["rejected"].items()) or "-"
        rows.append(row)
    return rows


def print_dispatch(rows: list[dict], dtype: str) -> None:
    names = sorted({k for r in rows for k in r if k.endswith(" ms")})
    print(f"\nmeasured dispatch (fastlora.backends), {dtype}: fwd+bwd ms per candidate on synthetic tensors, choice")
    print(format_table(rows, ["T", "shape", "r", "p", "choice", *names, "rejected"]), flush=True)


def triton_spills() -> list[dict]:
    """Registers and spills of each compiled Triton kernel variant (best effort: Triton's
    internals differ between versions)."""
    rows = []
    for name in ("forward", "grad_x"):
        try:
            jit = fastlora.fused._kernel(name, False)
            jit = getattr(jit, "fn", jit)  # the autotuner wraps the jit function
            for caches in getattr(jit, "device_caches", {}).values():
                for compiled in (caches[0] if isinstance(caches, tuple) else caches).values():
                    rows.append({"kernel": name, "name": getattr(compiled, "name", "?"),
                                 "n_regs": getattr(compiled, "n_regs", None), "n_spills": getattr(compiled, "n_spills", None)})
        except Exception as exc:  # noqa: BLE001  (a report, not a check)
            rows.append({"kernel": name, "name": f"not available ({type(exc).__name__}: {exc})"})
    return rows


def held_mib(module: nn.Module, x: torch.Tensor) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = module(x)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    del y
    return held / 2**20


def run_config(tokens: int, n_in: int, n_out: int, r: int, p: float, dtype: torch.dtype, repeat: int) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, device="cuda", dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, n_in, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, n_out, device="cuda", dtype=dtype)
    row = {"T": tokens, "shape": f"{n_in}->{n_out}", "r": r, "p": p, "dtype": str(dtype).replace("torch.", "")}
    modules = {v: make(v, base, r, p).train() for v in VARIANTS if not (v == "fused" and p > 0)}
    for variant, module in modules.items():
        with fastlora.use_backend(backend_of(variant)):
            row[f"{variant} held MiB"] = held_mib(module, x)
    row.update(timed_row(modules, x, dy, "cuda", warmup=3, repeat=repeat))
    return row


def copy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / measure(lambda: dst.copy_(src), "cuda", warmup=3, repeat=30)


def op_timings(tokens: int, n_in: int, n_out: int, r: int, dtype: torch.dtype, repeat: int) -> tuple[list[dict], float]:
    """Each fastlora op against the cuBLAS calls it replaces and its bytes at copy bandwidth."""
    torch.manual_seed(0)
    ops = torch.ops.fastlora
    opt = dict(device="cuda", dtype=dtype)
    x, dy, w = torch.randn(tokens, n_in, **opt), torch.randn(tokens, n_out, **opt), torch.randn(n_out, n_in, **opt)
    a, b = torch.randn(r, n_in, device="cuda"), torch.randn(n_out, r, device="cuda")
    a16, b16 = a.to(dtype), b.to(dtype)
    xa = ops.lora_down(x, a, 0.0, None)
    dxa = torch.randn(tokens, r, device="cuda")
    seed = torch.tensor([1], device="cuda")
    size = x.element_size()
    bandwidth = copy_bandwidth()
    # (name, fastlora call, the cuBLAS calls it replaces, bytes it must move at least)
    cases = [
        ("xa = x A^T", lambda: ops.lora_down(x, a, 0.0, None), lambda: x @ a16.t(), tokens * n_in * size),
        ("xa = drop(x) A^T, p=0.05", lambda: ops.lora_down(x, a, 0.05, seed), None, tokens * n_in * size),
        ("y = x W^T + s xa B^T", lambda: ops.lora_forward(x, w, None, a, b, 2.0, 0.0, None),
         lambda: (x @ w.t()).addmm_(x @ a16.t(), b16.t(), alpha=2.0), (tokens * n_in + tokens * n_out) * size),
        ("frozen y = x W^T", None, lambda: x @ w.t(), (tokens * n_in + tokens * n_out) * size),
        ("dxa, dB from dy", lambda: ops.lora_dy_products(dy, xa, b, 2.0),
         lambda: (dy @ b16, dy.t() @ xa), tokens * n_out * size),
        ("dA = dxa^T drop(x)", lambda: ops.lora_grad_A(x, dxa, 0.0, None, torch.float32),
         lambda: dxa.to(dtype).t() @ x, tokens * n_in * size),
        ("dx = dy W + dxa A", lambda: ops.lora_grad_x(dy, w, dxa, a, 0.0, None),
         lambda: (dy @ w).addmm_(dxa.to(dtype), a16), (tokens * n_in + tokens * n_out) * size),
        ("frozen dx = dy W", None, lambda: dy @ w, (tokens * n_in + tokens * n_out) * size),
    ]
    rows = []
    for name, ours, theirs, nbytes in cases:
        fns = {k: f for k, f in (("fastlora", ours), ("cublas", theirs)) if f is not None}
        times = measure_interleaved(fns, "cuda", warmup=3, repeat=repeat)
        rows.append({"op": name, "fastlora us": 1e6 * times.get("fastlora", float("nan")),
                     "cuBLAS us": 1e6 * times.get("cublas", float("nan")), "bytes floor us": 1e6 * nbytes / bandwidth})
    return rows, bandwidth


def fused_gemm_tflops(tokens: int, n_in: int, n_out: int, r: int, dtype: torch.dtype, repeat: int) -> dict:
    """The fused forward GEMM's TFLOP/s (its 2 T (in + r) out flops) next to torch.matmul's on
    the frozen product x W^T (2 T in out flops), same process, same inputs."""
    torch.manual_seed(0)
    opt = dict(device="cuda", dtype=dtype)
    x, w, xa = torch.randn(tokens, n_in, **opt), torch.randn(n_out, n_in, **opt), torch.randn(tokens, r, **opt)
    b = torch.randn(n_out, r, device="cuda")
    times = measure_interleaved({"fused": lambda: fastlora.fused.forward(x, w, None, xa, b, 2.0),
                                 "matmul": lambda: torch.matmul(x, w.t())}, "cuda", warmup=5, repeat=repeat)
    fused = 2 * tokens * (n_in + r) * n_out / times["fused"] / 1e12
    matmul = 2 * tokens * n_in * n_out / times["matmul"] / 1e12
    return {"shape": f"T{tokens} {n_in}->{n_out} r{r}", "fused TFLOP/s": fused, "matmul TFLOP/s": matmul,
            "ratio": fused / matmul}


def summary(rows: list[dict], element_size: int) -> list[dict]:
    """Issue 3's acceptance measures, from the rows that exist."""
    def find(**kw):
        return next((r for r in rows if all(r[k] == v for k, v in kw.items())), None)

    out = []
    head = find(**HEADLINE, p=0.0)
    if head is not None:
        out.append({"measure": "fwd+bwd / frozen (headline)", "value": head["fastlora f+b x"], "target": "<= 1.15"})
        out.append({"measure": "fwd / frozen (headline)", "value": head["fastlora fwd x"], "target": "<= 1.10"})
        others = [r["fastlora f+b x"] for r in rows if r["p"] == 0.0 and r is not head and r["T"] == head["T"]]
        if others:
            spread = max(abs(v - head["fastlora f+b x"]) for v in others)
            out.append({"measure": "max |f+b ratio - headline| (other shapes, ranks)", "value": spread,
                        "target": "<= 0.05"})
        drop = find(**HEADLINE, p=0.05)
        if drop is not None:
            extra_time = drop["fastlora f+b ms"] / head["fastlora f+b ms"] - 1
            extra_mib = drop["fastlora held MiB"] - head["fastlora held MiB"]
            out.append({"measure": "p=0.05 extra f+b time", "value": extra_time, "target": "<= 0.03"})
            out.append({"measure": "p=0.05 extra held MiB", "value": extra_mib, "target": "~0 (an 8-byte seed)"})
        if "triton f+b x" in head:
            out.append({"measure": "triton (fused) fwd+bwd / frozen (headline)", "value": head["triton f+b x"],
                        "target": "<= 1.15"})
        t_r = head["T"] * head["r"] * element_size / 2**20
        held = head["fastlora held MiB"] - head["frozen held MiB"]
        out.append({"measure": "held MiB - frozen held MiB", "value": held, "target": f"<= {t_r:.3f} (T*r elements)"})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the T = 8192 subset (every rank, every shape at r = 16)")
    parser.add_argument("--headline", action="store_true", help="T = 8192, 4096->4096, r = 16, p = 0 and 0.05 only")
    parser.add_argument("--warm", action="store_true",
                        help="compile and autotune the Triton kernels at the headline shapes (gpu_check.sh's build)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64, 128])
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeat", type=int, default=30, help="timed rounds per variant (median; at least 30)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/layer.py needs a CUDA GPU (benchmarks/layer_cpu.py is the CPU version)", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    if args.warm:
        configs = [(HEADLINE["T"], n_in, n_out, HEADLINE["r"], p) for n_in, n_out in SHAPES for p in (0.0, 0.05)]
        print_dispatch(dispatch_rows(configs, dtype), args.dtype)
        if fastlora.fused.available():
            print("\ncompiled Triton kernels")
            print(format_table(triton_spills(), ["kernel", "name", "n_regs", "n_spills"]))
        return 0
    if args.headline:
        configs = [(HEADLINE["T"], 4096, 4096, HEADLINE["r"], p) for p in (0.0, 0.05)]
    elif args.quick:  # the headline shape at every rank, the other shapes at r = 16, dropout on the headline
        configs = [(8192, 4096, 4096, r, 0.0) for r in args.ranks]
        configs += [(8192, n_in, n_out, 16, 0.0) for n_in, n_out in SHAPES[1:]]
        configs += [(8192, 4096, 4096, 16, 0.05)]
    else:
        configs = [(t, n_in, n_out, r, p)
                   for t, (n_in, n_out), r, p in itertools.product(args.tokens, SHAPES, args.ranks, args.dropout)]

    env = environment("cuda")
    print(f"# layer: torch {env['torch']}, {env['device']}, peft {env.get('peft', 'missing')}, {args.dtype}, "
          f"median of {args.repeat}", flush=True)
    dispatch = dispatch_rows(configs, dtype)  # the headline: also settles every key before timing
    print_dispatch(dispatch, args.dtype)
    rows = []
    for i, (tokens, n_in, n_out, r, p) in enumerate(configs, 1):
        rows.append(run_config(tokens, n_in, n_out, r, p, dtype, args.repeat))
        print(f"[{i}/{len(configs)}] T={tokens} {n_in}->{n_out} r={r} p={p}: fastlora f+b "
              f"{rows[-1]['fastlora f+b x']:.3f}x frozen, fwd {rows[-1]['fastlora fwd x']:.3f}x", flush=True)
        torch.cuda.empty_cache()
    op_rows, bandwidth = op_timings(8192, 4096, 4096, 16, dtype, args.repeat)
    accept = summary(rows, torch.empty((), dtype=dtype).element_size())
    gemm = fused_gemm_tflops(8192, 4096, 4096, 16, dtype, args.repeat) if fastlora.fused.available() else None
    if gemm is not None:
        accept.append({"measure": "fused GEMM TFLOP/s / matmul's", "value": gemm["ratio"], "target": ">= 0.90"})

    out = Path(args.out)
    write_json(out / "layer.json", {"environment": env, "command": " ".join(sys.argv), "copy_bandwidth": bandwidth,
                                    "dispatch": dispatch, "rows": rows, "ops": op_rows, "fused_gemm": gemm, "summary": accept})
    for r in rows:
        r["config"] = f"T{r['T']} {r['shape']} r{r['r']} p{r['p']}"
    plot_ratios(out / "layer.png", rows, "config", [f"{v} f+b x" for v in VARIANTS[1:]],
                f"LoRA layer fwd+bwd / frozen, {args.dtype}, {env['device']} (torch {env['torch']})")
    print(f"\nops at T=8192, 4096->4096, r=16 (copy bandwidth {bandwidth / 1e12:.2f} TB/s)")
    print(format_table(op_rows, ["op", "fastlora us", "cuBLAS us", "bytes floor us"]))
    if gemm is not None:
        print("\nfused forward GEMM vs torch.matmul (x W^T)")
        print(format_table([gemm], ["shape", "fused TFLOP/s", "matmul TFLOP/s", "ratio"]))
    print("\nfwd+bwd time / frozen fwd+bwd (x), fwd / frozen fwd, device memory held after forward")
    columns = ["T", "shape", "r", "p", "frozen f+b ms"] + [f"{v} f+b x" for v in VARIANTS[1:]]
    columns += [f"{v} fwd x" for v in ("fastlora", "composed", "triton", "peft")]
    columns += [f"{v} held MiB" for v in ("frozen", "peft", "composed", "fastlora", "triton")]
    print(format_table(rows, [c for c in columns if any(c in r for r in rows)]))
    print_dispatch(dispatch, args.dtype)  # again at the end, next to the acceptance table
    print("\nissue 3 acceptance (fastlora, measured above)")
    print(format_table(accept, ["measure", "value", "target"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
