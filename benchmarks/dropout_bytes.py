"""Bytes the LoRA layer moves per forward+backward beyond the frozen layer, counted on the CPU.

A ``TorchDispatchMode`` records every operation of one forward+backward with the dispatch a CUDA
tensor gets (the skinny Triton kernels, run here by Triton's interpreter) and counts bytes at
operation boundaries: each operation reads its tensor inputs and writes its outputs (and the
inputs it mutates) once; views and allocations move nothing. The frozen ``nn.Linear``'s
forward+backward is counted the same way and subtracted. Two checks:

- no dropout temporary: no int64 tensor, and no bool tensor, with at least T x in / 2 elements
  is created (the PyTorch hash, which CPU users and the no-Triton fallback get, builds several);
- the count equals :func:`model_bytes`, the closed form below, which docs can quote.

Not a timing: it counts what the code asks for, not what a GPU's caches save.

    python benchmarks/dropout_bytes.py                  # headline shape scaled down, bf16-sized
    python benchmarks/dropout_bytes.py --tokens 64 --n-in 96 --n-out 80 --rank 16 --p 0.05
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora
from fastlora import skinny

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, format_table, write_json  # noqa: E402

# Operations that move no data: they make views or allocate.
_FREE = {"t", "view", "_unsafe_view", "reshape", "transpose", "expand", "as_strided", "detach", "alias", "permute",
         "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "unsqueeze", "squeeze", "slice",
         "select", "lift_fresh"}


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class ByteCounter(TorchDispatchMode):
    """Records (operation, bytes read, bytes written, created tensors) of every dispatched call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _FREE:
            return out
        schema = func._schema
        inputs = list(args) + list(kwargs.values())
        read = sum(_nbytes(a) for a in _tensors(inputs))
        mutated = [a for arg, a in zip(schema.arguments, args) if isinstance(a, Tensor)
                   and arg.alias_info is not None and arg.alias_info.is_write]
        outputs = [t for t in _tensors([out]) if not any(t is m for m in mutated)]
        written = sum(_nbytes(t) for t in outputs + mutated)
        self.calls.append({"op": str(func), "read": read, "written": written,
                           "created": [(t.dtype, tuple(t.shape)) for t in outputs]})
        return out

    def total(self) -> int:
        return sum(c["read"] + c["written"] for c in self.calls)


def _tensors(values) -> Iterator[Tensor]:
    for v in values:
        if isinstance(v, Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def mask_temporaries(counter: ByteCounter, tokens: int, n_in: int) -> list[dict]:
    """The calls that created an int64 or bool tensor of at least tokens x n_in / 2 elements."""
    big = tokens * n_in // 2
    return [c for c in counter.calls
            if any(d in (torch.int64, torch.bool) and torch.Size(s).numel() >= big for d, s in c["created"])]


@contextlib.contextmanager
def cuda_like_dispatch() -> Iterator[None]:
    """The dispatch a CUDA tensor gets from the composed path (the skinny kernels), on CPU tensors."""
    with fastlora.use_backend("composed"), skinny.forced():
        yield


def count_step(tokens: int, n_in: int, n_out: int, rank: int, p: float, dtype: torch.dtype,
               lora: bool = True, seed: int = 0) -> ByteCounter:
    """One forward+backward of a frozen linear layer (with a LoRA adapter when ``lora``) under
    a :class:`ByteCounter`; x requires grad, the base weight and bias are frozen."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(n_in, n_out).to(dtype).requires_grad_(False)
    layer = fastlora.LoRALinear(base, r=rank, lora_alpha=2 * rank, lora_dropout=p) if lora else base
    if lora:
        nn.init.normal_(layer.lora_B, generator=g)
    x = torch.randn(tokens, n_in, generator=g).to(dtype).requires_grad_(True)
    dy = torch.randn(tokens, n_out, generator=g).to(dtype)
    layer.train()
    with torch.random.fork_rng():  # the dropout seed is drawn before counting starts
        torch.manual_seed(seed)
        fastlora_seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    counter = ByteCounter()
    with counter:
        if lora:
            y = fastlora.lora_linear(x, base.weight, base.bias, layer.lora_A, layer.lora_B, layer.scaling, p,
                                     fastlora_seed)
        else:
            y = layer(x)
        y.backward(dy)
    return counter


def model_bytes(tokens: int, n_in: int, n_out: int, rank: int, p: float, act_bytes: int = 2,
                adapter_bytes: int = 4, fused: bool = False) -> dict[str, int]:
    """Bytes the layer with the skinny kernels moves per forward+backward beyond the frozen
    layer, at operation boundaries (what :class:`ByteCounter` counts), by step; ``act_bytes`` per
    activation element (bf16: 2), ``adapter_bytes`` per adapter element (fp32 masters: 4);
    ``fused``: the fused path, whose two GEMMs take the rank-r terms in (up and dx then cost
    only their extra operands: xa and B, dxa, A and the seed; re-reads across output tiles, which
    caches serve, are not counted).

        down          x, A read; xa written                      T·in·e + r·in·w + T·r·e
        up            y += s·xa·Bᵀ (beta = 1 GEMM): y read and written, B cast to e if w ≠ e
        dy_products   dy, B, xa read; dxa, dB (fp32) written     T·out·e + out·r·w + 2·T·r·e + out·r·4
        grad_a        dxa, x read; dA (fp32) written             T·r·e + T·in·e + r·in·4
        dx (p > 0)    dx read and written with dxa, A            2·T·in·e + T·r·e + r·in·w
        dx (p = 0)    the same by a beta = 1 GEMM, A cast to e if w ≠ e
        grads cast    dA, dB to the adapter dtype if it is not fp32
        seed          8 bytes per kernel that regenerates the mask

    The fp32 partial sums inside dy_products and grad_a (and, for large ranks, dy_products' second
    read of dy) are :func:`partial_bytes`."""
    t, i, o, r, e, w = tokens, n_in, n_out, rank, act_bytes, adapter_bytes
    drop = p > 0.0
    cast = w != e
    steps = {
        "down": t * i * e + r * i * w + t * r * e + 8 * drop,
        "up": 2 * t * o * e + t * r * e + o * r * e + (o * r * (w + e) if cast else 0),
        "dy_products": t * o * e + o * r * w + 2 * t * r * e + o * r * 4,
        "grad_a": t * r * e + t * i * e + r * i * 4 + 8 * drop,
        "dx": 2 * t * i * e + t * r * e + (r * i * w + 8 if drop else r * i * e + (r * i * (w + e) if cast else 0)),
        "grads_cast": 0 if w == 4 else (r * i + o * r) * (4 + w),
    }
    if fused:
        steps["up"] = t * r * e + o * r * w
        steps["dx"] = t * r * e + r * i * w + 8 * drop
    steps["total"] = sum(steps.values())
    return steps


def partial_bytes(tokens: int, n_in: int, n_out: int, rank: int, act_bytes: int = 2,
                  device_type: str = "cuda") -> dict[str, int]:
    """Bytes moved inside the kernels' operations beyond their boundary reads and writes: the
    fp32 partials of the sums over tokens (written and read back; dB's an out x r block per token
    block, dA's an r x in block per split), or, for ranks where that costs more, dB from a second
    read of dy with per-split partials (:func:`fastlora.skinny.db_in_one_pass`)."""
    def splits(width: int) -> int:
        return -(-tokens // skinny._grad_a_splits(tokens, width, skinny.tiles("grad_a", device_type, rank)))

    if skinny.db_in_one_pass(tokens, n_out, rank, act_bytes, device_type):
        blocks = -(-tokens // skinny.tiles("dy_products", device_type, rank)["BLOCK_T"])
        d_b = 2 * blocks * n_out * rank * 4
    else:
        d_b = tokens * n_out * act_bytes + 2 * splits(n_out) * rank * n_out * 4
    return {"dB": d_b, "dA": 2 * splits(n_in) * rank * n_in * 4}


def measure(tokens: int, n_in: int, n_out: int, rank: int, p: float, dtype: torch.dtype) -> dict:
    """Counted and modelled bytes of one shape (see the module docstring)."""
    frozen = count_step(tokens, n_in, n_out, rank, p, dtype, lora=False)
    with cuda_like_dispatch():
        layer = count_step(tokens, n_in, n_out, rank, p, dtype)
    with fastlora.use_backend("fused"), skinny.forced():
        fused = count_step(tokens, n_in, n_out, rank, p, dtype)
    with fastlora.use_backend("composed"), skinny.forced(False):
        fallback = count_step(tokens, n_in, n_out, rank, p, dtype)
    e = torch.tensor([], dtype=dtype).element_size()
    model = model_bytes(tokens, n_in, n_out, rank, p, act_bytes=e)
    return {
        "tokens": tokens, "n_in": n_in, "n_out": n_out, "rank": rank, "p": p, "dtype": str(dtype),
        "frozen_bytes": frozen.total(),
        "extra_bytes": layer.total() - frozen.total(),
        "model_extra_bytes": model["total"],
        "model_steps": model,
        "partials_bytes": partial_bytes(tokens, n_in, n_out, rank, e),
        "mask_temporaries": len(mask_temporaries(layer, tokens, n_in)),
        "fused_extra_bytes": fused.total() - frozen.total(),
        "fused_model_extra_bytes": model_bytes(tokens, n_in, n_out, rank, p, act_bytes=e, fused=True)["total"],
        "fused_mask_temporaries": len(mask_temporaries(fused, tokens, n_in)),
        "fallback_extra_bytes": fallback.total() - frozen.total(),
        "fallback_mask_temporaries": len(mask_temporaries(fallback, tokens, n_in)),
        "ops": [c["op"] for c in layer.calls],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--n-in", type=int, default=128)
    parser.add_argument("--n-out", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--p", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                        help="float16 stands in for bfloat16 (same size; the interpreter gets bf16 wrong)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "dropout_bytes.json"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = [measure(args.tokens, args.n_in, args.n_out, args.rank, p, dtype) for p in args.p]
    print(format_table(rows, ["tokens", "n_in", "n_out", "rank", "p", "frozen_bytes", "extra_bytes",
                              "model_extra_bytes", "mask_temporaries", "fused_extra_bytes", "fused_model_extra_bytes",
                              "fused_mask_temporaries", "fallback_extra_bytes",
                              "fallback_mask_temporaries"]))
    for row in rows:
        print(f"p={row['p']}: model by step {row['model_steps']}; fp32 partials inside the kernels "
              f"{row['partials_bytes']} (CUDA tiles)")
    headline = {"tokens": 8192, "n_in": 4096, "n_out": 4096, "rank": 16}
    modelled = {f"{path} p={p}": model_bytes(**headline, p=p, act_bytes=2, fused=path == "fused")["total"]
                for path in ("composed", "fused") for p in (0.0, 0.05)}
    partials = partial_bytes(**headline)
    print(f"model at the H100 headline shape {headline}, bf16, fp32 adapters (computed, not counted): "
          f"{modelled}; fp32 partials inside the kernels {partials}")
    path = write_json(args.out, {"environment": environment(), "rows": rows,
                                 "headline_model": {"shape": headline, "bytes": modelled, "partials": partials}})
    print(f"wrote {path}")
    bad = [r for r in rows if r["mask_temporaries"] or r["fused_mask_temporaries"]
           or r["extra_bytes"] != r["model_extra_bytes"] or r["fused_extra_bytes"] != r["fused_model_extra_bytes"]]
    if bad:
        raise SystemExit(f"mismatch: {[(r['p'], r['extra_bytes'], r['model_extra_bytes'], r['mask_temporaries']) for r in bad]}")


if __name__ == "__main__":
    main()
