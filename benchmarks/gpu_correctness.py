"""Correctness of every fastlora op and layer path on a GPU, at the headline size and at odd sizes,
against the float32 reference computed on the same GPU from the same (rounded) values.

Step 2 of benchmarks/gpu_check.sh; needs a CUDA GPU and an extension built with CUDA (--device cpu
runs the same checks on the CPU kernels, to check this script). An error passes when it is within
2x the activation dtype's tolerance (tests/conftest.py's RTOL) of the result's largest magnitude,
or of 1% of the largest term it sums (the reference on absolute values) where the result cancels.
Prints one line per (case, op) and exits 1 if any fails.

    python benchmarks/gpu_correctness.py            # headline (T=8192, 4096^2, r=16) + odd sizes, bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import fastlora  # before conftest, which turns measured dispatch off for the test suite  # noqa: E402
from fastlora.testing import reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import RTOL  # noqa: E402

# (T, in, out, r, p)
HEADLINE = [(8192, 4096, 4096, 16, 0.0), (8192, 4096, 4096, 16, 0.05)]
ODD = [(1, 5, 3, 1, 0.3), (333, 200, 120, 7, 0.1), (1000, 257, 129, 33, 0.0), (2049, 96, 4100, 130, 0.05)]


def _abs(v):
    return v.abs() if isinstance(v, torch.Tensor) and v.is_floating_point() else (abs(v) if isinstance(v, float) else v)


def check(name: str, got: torch.Tensor, fn, args: tuple, dtype: torch.dtype) -> tuple[str, bool]:
    """got against fn(*args) in float32; the tolerance scales with fn on absolute values."""
    want = fn(*args)
    if not want.numel():
        return f"{name:<22} empty", got.numel() == 0
    terms = fn(*(_abs(a) for a in args)).abs().max().item()
    err = (got.float() - want.float()).abs().max().item()
    tol = 2 * RTOL[dtype] * max(want.abs().max().item(), 0.01 * terms, 1e-30)
    ok = err <= tol and bool(torch.isfinite(got).all())
    return f"{name:<22} err {err:9.3g}  tol {tol:9.3g}  {'ok' if ok else 'FAIL'}", ok


def _layer_reference(x, w, bias, a, b, s, dy, p, seed, which):
    """y (which = 0) or the gradient dx, dA, dB (which = 1, 2, 3) of the reference layer."""
    x, a, b = (t.detach().requires_grad_(True) for t in (x, a, b))
    y = reference.lora_linear(x, w, bias, a, b, s, p, seed)
    return y if which == 0 else torch.autograd.grad(y, (x, a, b), dy)[which - 1]


def run_case(T: int, n_in: int, n_out: int, r: int, p: float, dtype: torch.dtype,
             device: str) -> list[tuple[str, bool]]:
    g = torch.Generator(device=device).manual_seed(T + n_in + r)
    opt = dict(device=device, generator=g)
    x, dy = torch.randn(T, n_in, **opt).to(dtype), torch.randn(T, n_out, **opt).to(dtype)
    w, bias = (torch.randn(n_out, n_in, **opt) / n_in**0.5).to(dtype), torch.randn(n_out, **opt).to(dtype)
    a, b = torch.randn(r, n_in, **opt) / n_in**0.5, torch.randn(n_out, r, **opt)
    dxa = torch.randn(T, r, **opt)
    seed, s = torch.tensor([7], device=device), 2.0
    X, DY, W, BIAS = x.float(), dy.float(), w.float(), bias.float()
    ops = torch.ops.fastlora
    out = []

    y, xa = ops.lora_forward(x, w, bias, a, b, s, p, seed)
    out.append(check("lora_forward xa", xa, reference.lora_down, (X, a, p, seed), dtype))
    # The rank-r terms use the kernel's rounded xa, as the reference does when given it.
    out.append(check("lora_forward y", y, lambda *v: reference.lora_up(F.linear(*v[:3]), *v[3:]),
                     (X, W, BIAS, xa.float(), b, s), dtype))
    out.append(check("lora_down", ops.lora_down(x, a, p, seed), reference.lora_down, (X, a, p, seed), dtype))
    out.append(check("lora_up", ops.lora_up(dy, xa, b, s), reference.lora_up, (DY, xa.float(), b, s), dtype))
    d_xa, d_b = ops.lora_dy_products(dy, xa, b, s)
    out.append(check("lora_dy_products dxa", d_xa, lambda *v: reference.lora_dy_products(*v)[0],
                     (DY, xa.float(), b, s), dtype))
    out.append(check("lora_dy_products dB", d_b, lambda *v: reference.lora_dy_products(*v)[1],
                     (DY, xa.float(), b, s), dtype))
    out.append(check("lora_grad_A", ops.lora_grad_A(x, dxa, p, seed, a.dtype), reference.lora_grad_A,
                     (X, dxa, p, seed, torch.float32), dtype))
    out.append(check("lora_grad_x", ops.lora_grad_x(dy, w, dxa, a, p, seed), reference.lora_grad_x,
                     (DY, W, dxa, a, p, seed), dtype))
    mask_ok = torch.equal(ops.dropout_mask(seed, T, n_in, p), reference.dropout_mask(seed, T, n_in, p))
    out.append((f"{'dropout_mask':<22} {'equal' if mask_ok else 'FAIL'}", mask_ok))
    acc = torch.zeros(n_out, n_in, device=device)
    ops.accumulate_outer(acc, dy, x, 0.5)
    out.append(check("accumulate_outer", acc, lambda *v: reference.accumulate_outer(*v) or v[0],
                     (torch.zeros(n_out, n_in, device=device), DY, X, 0.5), dtype))

    # The layer on the kernels, the composed path and (with Triton) the fused path: y and every gradient.
    paths = [("kernels", "kernels"), ("composed", "composed"), ("auto", "auto")]
    paths += [("fused", "fused")] if fastlora.fused.available() else []
    for path, backend in paths:
        with fastlora.use_backend(backend):
            args = [x.clone().requires_grad_(True), w, bias, a.clone().requires_grad_(True),
                    b.clone().requires_grad_(True)]
            y = fastlora.lora_linear(*args, s, p, seed)
            grads = torch.autograd.grad(y, (args[0], args[3], args[4]), dy)

        for i, (name, got) in enumerate(zip(("y", "dx", "dA", "dB"), (y, *grads))):
            ref_args = (X, W, BIAS, a, b, s, DY, p, seed, i)
            out.append(check(f"layer[{path}] {name}", got, _layer_reference, ref_args, dtype))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--odd-only", action="store_true", help="skip the headline size")
    parser.add_argument("--tiny", action="store_true", help="only the three smallest odd sizes (for compute-sanitizer)")
    parser.add_argument("--device", default="cuda", help="cpu checks this script itself on the CPU kernels")
    args = parser.parse_args(argv)
    if not fastlora._extension.compiled_kernel("lora_forward", args.device):
        print(f"gpu_correctness.py: fastlora has no {args.device} kernels here", file=sys.stderr)
        return 1
    fastlora.set_cuda_layer_kernels(True)  # what this checks
    dtype = getattr(torch, args.dtype)
    failed = 0
    cases = (ODD if args.odd_only else HEADLINE + ODD)[: 3 if args.tiny else None]
    for case in cases:
        T, n_in, n_out, r, p = case
        for line, ok in run_case(T, n_in, n_out, r, p, dtype, args.device):
            print(f"T={T} {n_in}->{n_out} r={r} p={p} {args.dtype}: {line}", flush=True)
            failed += not ok
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(f"gpu_correctness: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
