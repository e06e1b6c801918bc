"""The CUDA lora_pro_moments kernel's source, compiled for the host with a thread-per-CUDA-thread
emulation (tests/cuda_emulation/cuda_emu.h) and run against the float64 reference: checks its
tiling, indexing, zero padding and barrier placement on machines without a GPU (CI). It cannot
show speed or every race; tests/cuda runs the real kernel on a GPU."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from test_lora_pro_moments import HYPER, _assert_moments_match, _bounds, _inputs, _reference
from conftest import assert_matches

ROOT = Path(__file__).resolve().parents[1]
KERNEL = ROOT / "csrc" / "kernels" / "cuda" / "lora_pro_moments.cu"
MOMENT_TYPES = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2}  # fastlora::cuda::MomentType

HARNESS = r"""
#include "kernel_host.cpp"
extern "C" int run(int moments, void* m, void* v, int64_t rows, int64_t cols, int64_t r, const void* u,
                   const void* factors, double scale, double b1, double b2, double eps, double bc1,
                   double bc2, void* grad_a, void* grad_b, int sms) {
  emu_sm_count = sms;
  fastlora::cuda::LoraProMomentsArgs a;
  a.exp_avg = m, a.exp_avg_sq = v, a.moments = static_cast<fastlora::cuda::MomentType>(moments);
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
    source = source.replace(
        "extern __shared__ __align__(16) unsigned char smem_raw[];", "unsigned char* smem_raw = emu_smem;"
    )

    def launch(match: re.Match) -> str:
        grid, threads, smem = (p.strip() for p in match.group(2).split(",")[:3])
        return f"emu_launch({grid}, {threads}, {smem}, [&] {{ {match.group(1).strip()}({match.group(3)}); }});"

    host, count = re.subn(r"([\w:<>, ]+?)<<<(.*?)>>>\((.*?)\);", launch, source, flags=re.S)
    assert count == 2 and "<<<" not in host, "the kernel's launches changed; update this test's rewriting"
    return host


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("needs g++")
    build = tmp_path_factory.mktemp("cuda_emulation")
    (build / "cuda_runtime.h").write_text('#include "cuda_emu.h"\n')
    (build / "kernel_host.cpp").write_text(_host_source(KERNEL.read_text()))
    (build / "harness.cpp").write_text(HARNESS)
    includes = [f"-I{build}", f"-I{ROOT / 'tests' / 'cuda_emulation'}", f"-I{KERNEL.parent}", f"-I{ROOT / 'csrc'}"]
    cmd = [compiler, "-std=c++20", "-O2", "-shared", "-fPIC", *includes, str(build / "harness.cpp"),
           "-o", str(build / "libkernel.so"), "-lpthread"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 and "barrier" in result.stderr:
        pytest.skip("the host compiler lacks C++20 <barrier>")
    assert result.returncode == 0, result.stderr[-3000:]
    lib = ctypes.CDLL(str(build / "libkernel.so"))
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
    inputs = _inputs(out, n_in, r, moment_dtype, acc)
    (ref_a, ref_b), ref_m, ref_v = _reference(*inputs, step=3)
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
    mag_a, mag_b = _bounds(a, b)
    assert_matches(grad_a, ref_a, acc, "grad_A", magnitude=mag_a)
    assert_matches(grad_b, ref_b, acc, "grad_B", magnitude=mag_b)
    _assert_moments_match(m, v, ref_m, ref_v)


def test_emulated_rank_limit(kernel):
    m = torch.zeros(4, 4)
    rc = kernel.run(1, m.data_ptr(), m.data_ptr(), 4, 4, 129, 0, 0, 1.0, 0.9, 0.99, 1e-8, 1.0, 1.0, 0, 0, 132)
    assert rc == -1
