"""The CUDA kernels' sources (the layer's: rows_product, rank_product, dy_products, expand,
dropout_mask; and lora_pro_moments), compiled for the host with a thread-per-CUDA-thread
emulation (tests/cuda_emulation/cuda_emu.h) and run against the float64 reference with poisoned
outputs and scratch: checks their tiling, indexing, zero padding, grid splitting (1 and 132 SMs)
and barrier placement on machines without a GPU (CI). It cannot show speed or every race;
tests/cuda runs the real kernels on a GPU."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastlora.testing import reference
from helpers import HYPER, assert_moments_match, moment_bounds, moment_inputs, moment_reference
from conftest import assert_matches, magnitude, make_matrix, seed_tensor

pytestmark = pytest.mark.slow  # compiles the .cu sources and runs a thread per CUDA thread

ROOT = Path(__file__).resolve().parents[2]
CUDA = ROOT / "csrc" / "kernels" / "cuda"
KERNEL = CUDA / "lora_pro_moments.cu"
LAYER_KERNELS = ("rows_product.cu", "rank_product.cu", "dy_products.cu", "expand.cu", "f64.cu", "dropout_mask.cu")
MOMENT_TYPES = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2}  # fastlora::DType

HARNESS = r"""
#include <cuda_runtime.h>
#include <vector>
#include "lora_pro_moments.cuh"
extern "C" int run(int moments, void* m, void* v, int64_t rows, int64_t cols, int64_t r, const void* u,
                   const void* factors, double scale, double b1, double b2, double eps, double bc1,
                   double bc2, void* grad_a, void* grad_b, int sms) {
  emu_sm_count = sms;
  fastlora::cuda::LoraProMomentsArgs a;
  a.exp_avg = m, a.exp_avg_sq = v, a.moments = static_cast<fastlora::DType>(moments);
  a.rows = rows, a.cols = cols, a.r = r, a.u = u, a.v = factors, a.s.scale = scale;
  a.s.beta1 = b1, a.s.beta2 = b2, a.s.eps = eps, a.s.bias_correction1 = bc1, a.s.bias_correction2 = bc2;
  a.grad_a = grad_a, a.grad_b = grad_b;
  const size_t bytes = fastlora::cuda::lora_pro_moments_workspace(a, 0);
  if (bytes == SIZE_MAX) return -1;
  std::vector<unsigned char> workspace(bytes, 0xff);  // poisoned
  return fastlora::cuda::launch_lora_pro_moments(a, workspace.data(), 0, nullptr);
}
"""


def _host_source(source: str) -> str:
    """The .cu with the two things plain C++ lacks replaced: dynamic shared memory and launches."""
    source, count = re.subn(r"extern __shared__ __align__\(\d+\) ([\w ]+?) (\w+)\[\];",
                            r"\1* \2 = reinterpret_cast<\1*>(emu_smem);", source)
    assert count <= 1, "more than one dynamic shared-memory declaration; update this test's rewriting"

    def launch(match: re.Match) -> str:
        grid, threads, smem = (p.strip() for p in match.group(2).split(",")[:3])
        return f"emu_launch({grid}, {threads}, {smem}, [&] {{ {match.group(1).strip()}({match.group(3)}); }});"

    host, count = re.subn(r"([\w:<>, ]+?)<<<(.*?)>>>\((.*?)\);", launch, source, flags=re.S)
    assert count >= 1 and "<<<" not in host, "a kernel launch this test cannot rewrite"
    return host


def _compile(build: Path, sources: dict[str, str], harness: str) -> ctypes.CDLL:
    """Builds the rewritten .cu sources and the harness into one shared library."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("needs g++")
    for header in ("cuda_runtime.h", "cuda_bf16.h", "cuda_fp16.h", "mma.h"):
        (build / header).write_text('#include "cuda_emu.h"\n')
    files = []
    for name, text in {**sources, "harness.cpp": harness}.items():
        (build / name).write_text(text)
        files.append(str(build / name))
    includes = [f"-I{build}", f"-I{ROOT / 'tests' / 'cuda_emulation'}", f"-I{CUDA}", f"-I{ROOT / 'csrc'}"]
    cmd = [compiler, "-std=c++20", "-O2", "-shared", "-fPIC", "-Wno-unknown-pragmas", *includes, *files,
           "-o", str(build / "libkernel.so"), "-lpthread"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 and "barrier" in result.stderr:
        pytest.skip("the host compiler lacks C++20 <barrier>")
    assert result.returncode == 0, result.stderr[-3000:]
    return ctypes.CDLL(str(build / "libkernel.so"))


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    build = tmp_path_factory.mktemp("cuda_emulation")
    lib = _compile(build, {"kernel_host.cpp": _host_source(KERNEL.read_text())}, HARNESS)
    lib.run.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2
    lib.run.argtypes += [ctypes.c_double] * 6 + [ctypes.c_void_p] * 2 + [ctypes.c_int]
    return lib


# (out, in, r, moments, SM count): partial tiles and regions, rank chunks, the rank limit, and
# both the largest regions (1 SM) and the smallest (132 SMs, an H100).
CASES = [
    (1, 1, 1, torch.float32, 132),
    (5, 7, 3, torch.float64, 132),
    (33, 70, 16, torch.bfloat16, 1),
    (130, 257, 17, torch.float32, 1),
    (300, 1030, 8, torch.bfloat16, 132),
    (64, 600, 64, torch.float32, 132),
    (70, 90, 128, torch.bfloat16, 1),
]


@pytest.mark.parametrize("out,n_in,r,moment_dtype,sms", CASES)
def test_emulated_cuda_kernel_matches_reference(kernel, out, n_in, r, moment_dtype, sms):
    acc = torch.float64 if moment_dtype == torch.float64 else torch.float32
    inputs = moment_inputs(out, n_in, r, moment_dtype, acc)
    (ref_a, ref_b), ref_m, ref_v = moment_reference(*inputs, step=3)
    m, v, a, b, grad_a0, grad_b0 = (t.clone() for t in inputs)
    u = torch.cat([b, grad_b0], 1).contiguous()  # what csrc/ops/cuda.cpp passes
    factors = torch.cat([grad_a0, a], 0).contiguous()
    grad_a = torch.full((r, n_in), float("nan"), dtype=acc)
    grad_b = torch.full((out, r), float("nan"), dtype=acc)
    b1, b2 = HYPER["beta1"], HYPER["beta2"]
    rc = kernel.run(MOMENT_TYPES[moment_dtype], m.data_ptr(), v.data_ptr(), out, n_in, r, u.data_ptr(),
                    factors.data_ptr(), HYPER["scale"], b1, b2, HYPER["eps"], 1 - b1**3, 1 - b2**3,
                    grad_a.data_ptr(), grad_b.data_ptr(), sms)
    assert rc == 0
    mag_a, mag_b = moment_bounds(a, b)
    assert_matches(grad_a, ref_a, acc, "grad_A", magnitude=mag_a)
    assert_matches(grad_b, ref_b, acc, "grad_B", magnitude=mag_b)
    assert_moments_match(m, v, ref_m, ref_v)


def test_emulated_rank_limit(kernel):
    m = torch.zeros(4, 4)
    rc = kernel.run(1, m.data_ptr(), m.data_ptr(), 4, 4, 129, 0, 0, 1.0, 0.9, 0.99, 1e-8, 1.0, 1.0, 0, 0, 132)
    assert rc == -1


# ---- the layer's kernels ---------------------------------------------------------------------

LAYER_HARNESS = r"""
#include <cuda_runtime.h>
#include <cstring>
#include <memory>
#include <vector>
#include "dropout_mask.cuh"
#include "lora_cuda.cuh"
using fastlora::DType, fastlora::Matrix;
using namespace fastlora::cuda;
namespace {
// Scratch as the glue hands it out (16-byte aligned), poisoned; freed when the call returns.
struct Pool {
  std::vector<std::unique_ptr<unsigned char[]>> blocks;
  Scratch scratch() {
    return [this](size_t bytes) -> void* {
      blocks.emplace_back(new unsigned char[bytes + 16]);
      std::memset(blocks.back().get(), 0xff, bytes + 16);
      return blocks.back().get();
    };
  }
};
Dropout drop(const int64_t* seed, double p) { return {p > 0 ? seed : nullptr, p}; }
}  // namespace
extern "C" {
void set_gpu(int sms, int blocks_per_sm) { emu_sm_count = sms, emu_blocks_per_sm = blocks_per_sm; }
int down(const void* x, int64_t T, int64_t n, int64_t s0, int64_t s1, int dtype, const void* a, int64_t r,
         const int64_t* seed, double p, void* xa) {
  Pool pool;
  return lora_down({x, T, n, s0, s1, static_cast<DType>(dtype)}, a, r, drop(seed, p), xa, pool.scratch(), nullptr);
}
int expand(const void* u, const void* w, int64_t rows, int64_t cols, int64_t r, int w_by_rank, double alpha,
           const void* bias, const void* base, int64_t s0, int64_t s1, const int64_t* seed, double p, int dtype,
           void* out) {
  const Matrix b{base, rows, cols, s0, s1, static_cast<DType>(dtype)};
  Expand e;
  e.u = u, e.w = w, e.rows = rows, e.cols = cols, e.r = r, e.w_by_rank = w_by_rank != 0, e.alpha = alpha;
  e.bias = bias, e.base = base != nullptr ? &b : nullptr, e.drop = drop(seed, p);
  e.out_dtype = static_cast<DType>(dtype), e.out = out;
  return lora_expand(e, nullptr);
}
int dy_products(const void* dy, int64_t T, int64_t n, int64_t s0, int64_t s1, int dtype, const void* xa,
                int64_t rx, const void* b, int64_t rb, double scale, void* dxa, void* db) {
  Pool pool;
  return lora_dy_products({dy, T, n, s0, s1, static_cast<DType>(dtype)}, xa, rx, b, rb, scale, dxa, db,
                          pool.scratch(), nullptr);
}
int grad_a(const void* x, int64_t T, int64_t n, int64_t s0, int64_t s1, int dtype, const void* dxa, int64_t r,
           const int64_t* seed, double p, void* da) {
  Pool pool;
  return lora_grad_A({x, T, n, s0, s1, static_cast<DType>(dtype)}, dxa, r, drop(seed, p), da, pool.scratch(),
                     nullptr);
}
int mask(const int64_t* seed, double p, int64_t numel, bool* out) {
  return launch_dropout_mask(seed, p, numel, out, nullptr);
}
}
"""
DTYPES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}  # fastlora::DType


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    build = tmp_path_factory.mktemp("cuda_emulation_layer")
    sources = {name.replace(".cu", ".cpp"): _host_source((CUDA / name).read_text()) for name in LAYER_KERNELS}
    lib = _compile(build, sources, LAYER_HARNESS)
    i64, ptr, f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    lib.set_gpu.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.down.argtypes = [ptr, i64, i64, i64, i64, ctypes.c_int, ptr, i64, ptr, f64, ptr]
    lib.expand.argtypes = [ptr, ptr, i64, i64, i64, ctypes.c_int, f64, ptr, ptr, i64, i64, ptr, f64, ctypes.c_int, ptr]
    lib.dy_products.argtypes = [ptr, i64, i64, i64, i64, ctypes.c_int, ptr, i64, ptr, i64, f64, ptr, ptr]
    lib.grad_a.argtypes = [ptr, i64, i64, i64, i64, ctypes.c_int, ptr, i64, ptr, f64, ptr]
    lib.mask.argtypes = [ptr, f64, i64, ptr]
    return lib


def _poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _strided(t):
    return t.data_ptr(), *t.shape, *t.stride()


# (T, in, out, r, dtype, p, x/dy layout, SMs, blocks per SM): one row, ranks 1 to 130 (1, 2, 4
# and 8 rank tiles; fused and two-pass dy products), partial tiles everywhere, every layout,
# and grids for 1 SM (no splitting) and 132 SMs (split K, row groups).
LAYER_CASES = [
    (1, 5, 3, 1, torch.float32, 0.0, "contiguous", 132, 2),
    (33, 70, 19, 3, torch.bfloat16, 0.3, "transposed", 1, 1),
    (70, 130, 65, 17, torch.float16, 0.1, "strided", 132, 2),
    (65, 96, 40, 40, torch.float32, 0.2, "contiguous", 1, 2),
    (20, 64, 24, 130, torch.bfloat16, 0.5, "contiguous", 132, 3),
]


def _case_id(case) -> str:
    T, n_in, n_out, r, dtype, p, layout, sms, per_sm = case
    return f"T{T}-{n_in}x{n_out}-r{r}-{str(dtype)[6:]}-p{p}-{layout}-{sms}SMx{per_sm}"


@pytest.mark.parametrize("T,n_in,n_out,r,dtype,p,layout,sms,per_sm", LAYER_CASES, ids=map(_case_id, LAYER_CASES))
def test_emulated_layer_kernels_match_reference(layer, T, n_in, n_out, r, dtype, p, layout, sms, per_sm):
    layer.set_gpu(sms, per_sm)
    g = torch.Generator().manual_seed(T + r)
    x, dy = make_matrix(T, n_in, dtype, layout, g), make_matrix(T, n_out, dtype, layout, g)
    a = torch.randn(r, n_in, generator=g) / n_in**0.5
    b = torch.randn(n_out, r, generator=g)
    bias, base = torch.randn(n_out, generator=g).to(dtype), make_matrix(T, n_out, dtype, layout, g)
    dxa = torch.randn(T, r, generator=g)
    seed, code, s = seed_tensor(11), DTYPES[dtype], 1.7
    X, DY, BASE, BIAS = x.double(), dy.double(), base.double(), bias.double()

    a_x = a.to(dtype)  # lora_down takes A in x's dtype
    xa = _poisoned(T, r, dtype=dtype)
    assert layer.down(*_strided(x), code, a_x.data_ptr(), r, seed.data_ptr(), p, xa.data_ptr()) == 0
    args = (X, a_x.double(), p, seed)
    assert_matches(xa, reference.lora_down(*args), dtype, "xa", magnitude(reference.lora_down, *args))

    # The forward's C operand: base + s xa B^T + bias (xa, B in x's dtype), and the backward's
    # masked rank-r term of dx: drop(s dxa A) (dxa, A float32), each with and without a base.
    b_x = b.to(dtype)
    for w_by_rank, u, w, with_base in ((False, xa, b_x, True), (True, dxa, a, False), (True, dxa, a, True)):
        out = _poisoned(T, n_out if not w_by_rank else n_in, dtype=dtype)
        if w_by_rank and with_base:
            base_m, base_64 = x, X  # a T x in base in the layout under test
        else:
            base_m, base_64 = (base, BASE) if with_base else (None, None)
        cols = out.shape[1]
        rc = layer.expand(u.data_ptr(), w.data_ptr(), T, cols, r, int(w_by_rank), s,
                          None if w_by_rank else bias.data_ptr(), None if base_m is None else base_m.data_ptr(),
                          *(base_m.stride() if base_m is not None else (0, 0)), seed.data_ptr(),
                          p if w_by_rank else 0.0, code, out.data_ptr())
        assert rc == 0

        def want(u, w, base, bias):
            low = s * (u @ (w if w_by_rank else w.t()))
            low = reference.dropout(low, p, seed) if w_by_rank else low
            return low + (0 if base is None else base) + (0 if bias is None else bias)

        ref_args = (u.double(), w.double(), base_64, None if w_by_rank else BIAS)
        what = f"expand(w_by_rank={w_by_rank}, base={with_base})"
        assert_matches(out, want(*ref_args), dtype, what, magnitude(want, *ref_args))

    d_xa, d_b = _poisoned(T, r, dtype=torch.float32), _poisoned(n_out, r, dtype=torch.float32)
    rc = layer.dy_products(*_strided(dy), code, xa.data_ptr(), r, b.data_ptr(), r, s, d_xa.data_ptr(), d_b.data_ptr())
    assert rc == 0
    args = (DY, xa.double(), b.double(), s)
    for i, (name, got) in enumerate((("dxa", d_xa), ("dB", d_b))):
        fn = lambda *v, i=i: reference.lora_dy_products(*v)[i]  # noqa: E731
        assert_matches(got, fn(*args), dtype, name, magnitude(fn, *args))

    d_a = _poisoned(r, n_in, dtype=torch.float32)
    assert layer.grad_a(*_strided(x), code, dxa.data_ptr(), r, seed.data_ptr(), p, d_a.data_ptr()) == 0
    args = (X, dxa.double(), p, seed, torch.float64)
    assert_matches(d_a, reference.lora_grad_A(*args), dtype, "dA", magnitude(reference.lora_grad_A, *args))

    mask = torch.zeros(T, n_in, dtype=torch.bool)
    assert layer.mask(seed.data_ptr(), p, T * n_in, mask.data_ptr()) == 0
    assert torch.equal(mask, reference.dropout_mask(seed, T, n_in, p))
