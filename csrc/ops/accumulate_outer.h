// acc += alpha dy^T x with ATen's GEMMs (BLAS on CPU, cuBLAS on CUDA): the gradient engine's
// frozen-weight accumulation, shared by the CPU and CUDA implementations of
// fastlora::accumulate_outer. Arguments are checked by the caller (checks.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

namespace fastlora::ops {

// Inputs in the accumulator's dtype: one beta = 1 GEMM.
inline bool accumulate_outer_same_dtype(at::Tensor& acc, const at::Tensor& dy, const at::Tensor& x,
                                        double alpha) {
  const auto dtype = acc.scalar_type();
  if (dy.scalar_type() != dtype || x.scalar_type() != dtype) return false;
  acc.addmm_(dy.t(), x, 1.0, alpha);
  return true;
}

// Lower-precision inputs: widen a slab of tokens at a time (~16 MiB), so the copies stay
// small, and accumulate with a beta = 1 GEMM in the accumulator's precision.
inline void accumulate_outer_widened(at::Tensor& acc, const at::Tensor& dy, const at::Tensor& x,
                                     double alpha) {
  const auto dtype = acc.scalar_type();
  const int64_t tokens = x.size(0);
  const int64_t slab = std::max<int64_t>(1, (int64_t{1} << 22) / (dy.size(1) + x.size(1)));
  for (int64_t t0 = 0; t0 < tokens; t0 += slab) {
    const int64_t n = std::min(slab, tokens - t0);
    acc.addmm_(dy.narrow(0, t0, n).to(dtype).t(), x.narrow(0, t0, n).to(dtype), 1.0, alpha);
  }
}

}  // namespace fastlora::ops
