// CUDA implementations of the fastlora ops (built only against a CUDA torch). The layer's
// CUDA kernels are not written yet; until they are, fastlora routes CUDA tensors through the
// PyTorch reference path (python/fastlora/functional.py checks which kernels exist).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels/cuda/dropout_mask.cuh"
#include "ops/checks.h"

namespace fastlora::ops {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastlora.", op, ": CUDA error: ", cudaGetErrorString(err));
}

at::Tensor dropout_mask_cuda(const at::Tensor& seed, int64_t rows, int64_t cols, double p) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "fastlora.dropout_mask: rows and cols must be >= 0");
  TORCH_CHECK(seed.is_cuda(), "fastlora.dropout_mask: the CUDA kernel got a tensor on ",
              seed.device());
  check_dropout(p, seed, seed, "dropout_mask");
  const c10::cuda::CUDAGuard guard(seed.device());
  auto mask = at::empty({rows, cols}, seed.options().dtype(at::kBool));
  check_launch(fastlora::cuda::launch_dropout_mask(p > 0.0 ? seed.data_ptr<int64_t>() : nullptr,
                                                   p, rows * cols, mask.data_ptr<bool>(),
                                                   c10::cuda::getCurrentCUDAStream()),
               "dropout_mask");
  return mask;
}

}  // namespace
}  // namespace fastlora::ops

TORCH_LIBRARY_IMPL(fastlora, CUDA, m) { m.impl("dropout_mask", &fastlora::ops::dropout_mask_cuda); }
