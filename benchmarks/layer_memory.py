"""Memory of one LoRA layer's forward+backward: the composed path against the reference path,
fastlora's kernels (where they apply), PEFT and the frozen nn.Linear (a script, not a test).

For each variant, on copies of the same frozen nn.Linear with the same x (requiring grad) and dy:
  held MiB   what a training-mode forward leaves allocated besides x and the parameters (its
             output plus what autograd saves; saved-tensor hooks count the saved part exactly)
  peak MiB   the peak of a forward+backward above the memory in use before it: device memory on
             a GPU; on the CPU, the bytes of the tensors torch's operators allocate, followed
             until freed (LiveBytes; BLAS scratch and allocator slack are not counted)
Peaks are the smallest of --repeat runs, so one-off allocations (cuBLAS workspace) drop out.

    python benchmarks/layer_memory.py                      # CPU, float32, p = 0 and 0.05
    python benchmarks/layer_memory.py --device cuda --dtype bfloat16 --tokens 8192 --features 4096 4096
"""

from __future__ import annotations

import argparse
import sys
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, format_table, write_json  # noqa: E402
from layer_cpu import backend_of, build, saved_mib  # noqa: E402

import fastlora  # noqa: E402

VARIANTS = ("frozen", "reference", "composed", "fastlora", "peft")


class LiveBytes(TorchDispatchMode):
    """Follows every storage an operator allocates while active until its last tensor dies
    (storages of tensors made before, reached through views or in-place ops, are not counted)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._follow(t, inputs)
        return out

    def _follow(self, t: torch.Tensor, inputs: set[int]) -> None:
        key = t.untyped_storage().data_ptr()
        if key not in self._refs:
            if key in inputs:
                return  # a view of, or in place on, a tensor made before
            self._refs[key] = 0
            self.live += t.untyped_storage().nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        weakref.finalize(t, self._release, key, t.untyped_storage().nbytes())

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= nbytes


def peak_step_mib(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> float:
    x.grad = None
    module.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        module(x).backward(dy)
        return (torch.cuda.max_memory_allocated(x.device) - before) / 2**20
    with LiveBytes() as meter:
        module(x).backward(dy)
    return meter.peak / 2**20


def run_config(tokens: int, n_in: int, n_out: int, r: int, p: float, dtype: torch.dtype, device: str,
               repeat: int) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, dtype=dtype, device=device).requires_grad_(False)
    x = torch.randn(tokens, n_in, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(tokens, n_out, dtype=dtype, device=device)
    row = {"T": tokens, "shape": f"{n_in}->{n_out}", "r": r, "p": p, "dtype": str(dtype).replace("torch.", "")}
    for variant in VARIANTS:
        try:
            module = build(variant, base, r, p).train()
        except ImportError:  # peft not installed
            continue
        with fastlora.use_backend(backend_of(variant)):
            output_mib = tokens * n_out * x.element_size() / 2**20
            row[f"{variant} held MiB"] = saved_mib(module, x) + output_mib
            row[f"{variant} peak MiB"] = min(peak_step_mib(module, x, dy) for _ in range(repeat))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--features", type=int, nargs=2, default=[1024, 1024], metavar=("IN", "OUT"))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if args.device == "cuda":
        fastlora.set_cuda_layer_kernels(True)  # so the "fastlora" variant runs the kernels
    n_in, n_out = args.features
    rows = [run_config(args.tokens, n_in, n_out, args.rank, p, getattr(torch, args.dtype), args.device, args.repeat)
            for p in args.dropout]
    columns = ["p"] + [f"{v} {m}" for m in ("held MiB", "peak MiB") for v in VARIANTS if f"{v} {m}" in rows[0]]
    print(format_table(rows, columns))
    verdicts = [row["composed peak MiB"] <= row["reference peak MiB"] for row in rows]
    print("composed peak <= reference peak:", "yes" if all(verdicts) else "NO")
    path = write_json(Path(args.out) / f"layer_memory_{args.device}.json",
                      {"environment": environment(args.device), "rows": rows})
    print(f"wrote {path}")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
