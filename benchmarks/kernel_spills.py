"""Registers, spills and shared memory of every fastlora Triton kernel config, without a GPU.

Compiles each kernel (fused GEMMs: every autotuning config the pruning keeps, rank tiles 16 and 32;
skinny kernels: their tile for rank tiles 16, 32 and 64, in the 32- and 64-bit offset builds) for
sm_90a and sm_80 with the Triton installed here, contiguous operands (unit strides specialized as
Triton does at launch), and runs ptxas -v (the one shipped with Triton) on the PTX. A spilled config is slow, not wrong: the fused GEMMs' autotuner times it away on a
GPU, the skinny kernels' fixed tiles were chosen spill-free with this. Prints a table, writes
JSON; takes a few minutes on one core.

    python benchmarks/kernel_spills.py                    # both architectures, bf16 and fp32
    python benchmarks/kernel_spills.py --arch 90 --dtype bf16
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastlora import fused, fused_kernels, skinny, skinny_kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, write_json  # noqa: E402

_FP32_POINTERS = {"a_ptr", "b_ptr", "part_ptr"}  # fp32 master adapters and partial sums
# Strides that are 1 for contiguous operands: Triton specializes an integer argument equal to 1
# into a constant at launch (unit-stride loads vectorize), so they are constants here too.
_UNIT_STRIDES = {
    "forward": ("sxk", "swk", "s_bias", "sar", "sbr", "syn"), "grad_x": ("sdk", "swn", "sar", "san", "sxn"),
    "down": ("sxk", "sak", "sor"), "dy_products": ("sdn", "sbr", "sar", "sgr"), "grad_a": ("sgr", "sxk"),
    "add_low_rank": ("sdk", "sgr", "sak"),
}
_FLAGS = {
    "forward": dict(HAS_BIAS=True), "grad_x": dict(DROPOUT=True, PAIRED=True),
    "down": dict(DROPOUT=True, PAIRED=True), "dy_products": dict(NEED_DXA=True, NEED_DB=True),
    "grad_a": dict(DROPOUT=True, PAIRED=True),
    "add_low_rank": dict(ACCUMULATE=True, DROPOUT=True, PAIRED=True),
}


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in inspect.signature(fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "seed_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in _FP32_POINTERS else f"*{dtype}"
        elif name in ("scale", "inv_keep"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _ptxas_log(ptx: str, arch: int) -> str:
    """ptxas -v's report, from the first ptxas shipped with Triton that reads this PTX version."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        log = ""
        for tool in ("ptxas", "ptxas-blackwell"):
            run = subprocess.run([str(tools / tool), "-v", f"-arch=sm_{arch}{'a' if arch == 90 else ''}", f.name,
                                  "-o", os.devnull], capture_output=True, text=True)
            log = run.stderr
            if run.returncode == 0:
                return log
        raise RuntimeError(log)
    finally:
        os.unlink(f.name)


def check(name: str, fn, constexprs: dict, warps: int, stages: int, arch: int, dtype: str) -> dict:
    """Compiles one config; its registers, spill stores (bytes) and shared memory (KiB)."""
    constexprs = dict(constexprs, **{stride: 1 for stride in _UNIT_STRIDES[name]})
    source = ASTSource(fn=fused_kernels.compiled(fn), signature=_signature(fn, dtype, constexprs),
                       constexprs=constexprs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=warps, num_stages=stages))
    log = _ptxas_log(kernel.asm["ptx"], arch)
    tiles = " ".join(f"{k[6:]}{v}" for k, v in constexprs.items() if k.startswith("BLOCK_"))
    return {"kernel": name, "arch": f"sm_{arch}", "dtype": dtype, "index_64": constexprs["INDEX_64"],
            "tiles": tiles, "warps": warps, "stages": stages,
            "registers": int(re.findall(r"Used (\d+) registers", log)[0]),
            "spill_bytes": int(re.findall(r"(\d+) bytes spill stores", log)[0]),
            "shared_kib": round(kernel.metadata.shared / 1024, 1)}


def configs(arch: int, dtype: str):
    """(name, kernel, constexprs, warps, stages) of every config to check."""
    capability = (arch // 10, 0)
    element_size = 2 if dtype in ("bf16", "fp16") else 4
    for config in fused._prune(fused._configs(capability), 2**20, element_size, capability):
        for name, fn in (("forward", fused_kernels.fastlora_forward_kernel),
                         ("grad_x", fused_kernels.fastlora_grad_x_kernel)):
            for block_r in (16, fused._MAX_BLOCK_R):
                yield name, fn, dict(_FLAGS[name], PRECISION="tf32", INDEX_64=False, BLOCK_R=block_r,
                                     **config.kwargs), config.num_warps, config.num_stages
    for name in ("down", "dy_products", "grad_a", "add_low_rank"):
        for rank in (16, 32, 64):
            tiles = skinny.tiles(name, "cuda", rank)
            warps = tiles.pop("num_warps")
            for wide in (False, True):
                yield (name, getattr(skinny_kernels, f"fastlora_{name}_kernel"),
                       dict(_FLAGS[name], PRECISION="tf32", INDEX_64=wide, **tiles), warps, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "kernel_spills.json"))
    args = parser.parse_args()
    rows = []
    for arch in args.arch:
        for dtype in args.dtype:
            for name, fn, constexprs, warps, stages in configs(arch, dtype):
                rows.append(check(name, fn, constexprs, warps, stages, arch, dtype))
                print(rows[-1], flush=True)
    print(format_table(rows, ["kernel", "arch", "dtype", "index_64", "tiles", "warps", "stages", "registers",
                              "spill_bytes", "shared_kib"]))
    spilled = [r for r in rows if r["spill_bytes"]]
    print(f"{len(spilled)} of {len(rows)} configs spill (triton {triton.__version__})")
    print(f"wrote {write_json(args.out, {'triton': triton.__version__, 'rows': rows})}")


if __name__ == "__main__":
    main()
