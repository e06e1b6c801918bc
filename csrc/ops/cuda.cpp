// CUDA implementations of the fastlora ops (built only against a CUDA torch). The layer's
// CUDA kernels are not written yet; until they are, fastlora routes CUDA tensors through the
// PyTorch reference path (python/fastlora/functional.py checks which kernels exist).
// lora_pro_moments has its CUDA kernel (kernels/cuda/lora_pro_moments.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "kernels/cuda/dropout_mask.cuh"
#include "kernels/cuda/lora_pro_moments.cuh"
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

std::tuple<at::Tensor, at::Tensor> lora_pro_moments_cuda(
    at::Tensor& exp_avg, at::Tensor& exp_avg_sq, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& grad_A0, const at::Tensor& grad_B0, double scale,
    double beta1, double beta2, double eps, int64_t step) {
  const char* op = "lora_pro_moments";
  check_lora_pro_moments(exp_avg, exp_avg_sq, lora_A, lora_B, grad_A0, grad_B0, scale, beta1,
                         beta2, eps, step);
  TORCH_CHECK(exp_avg.is_cuda(), "fastlora.lora_pro_moments: the CUDA kernel got a tensor on ",
              exp_avg.device());
  const c10::cuda::CUDAGuard guard(exp_avg.device());
  const auto acc = acc_type(exp_avg.scalar_type());
  const auto opts = exp_avg.options().dtype(acc);
  const int64_t out = exp_avg.size(0), in = exp_avg.size(1), r = lora_A.size(0);
  const auto u = at::cat({lora_B.to(acc), grad_B0.to(acc)}, 1);
  const auto v = at::cat({grad_A0.to(acc), lora_A.to(acc)}, 0);
  auto grad_A = at::empty({r, in}, opts);
  auto grad_B = at::empty({out, r}, opts);

  fastlora::cuda::LoraProMomentsArgs a;
  a.exp_avg = exp_avg.data_ptr();
  a.exp_avg_sq = exp_avg_sq.data_ptr();
  a.moments = exp_avg.scalar_type() == at::kDouble  ? fastlora::cuda::MomentType::f64
              : exp_avg.scalar_type() == at::kFloat ? fastlora::cuda::MomentType::f32
                                                    : fastlora::cuda::MomentType::bf16;
  a.rows = out;
  a.cols = in;
  a.r = r;
  a.u = u.data_ptr();
  a.v = v.data_ptr();
  a.s = lora_pro_scalars(scale, beta1, beta2, eps, step);
  a.grad_a = grad_A.data_ptr();
  a.grad_b = grad_B.data_ptr();
  const int device = exp_avg.get_device();
  const size_t bytes = fastlora::cuda::lora_pro_moments_workspace(a, device);
  TORCH_CHECK(bytes != SIZE_MAX, "fastlora.lora_pro_moments: rank ", r,
              " is above the CUDA kernel's limit (", fastlora::cuda::kLoraProMaxRank,
              " for float32/bfloat16 moments, ", fastlora::cuda::kLoraProMaxRankF64,
              " for float64); the optimizer runs larger ranks on the reference path");
  auto workspace = at::empty({static_cast<int64_t>(bytes)}, opts.dtype(at::kByte));
  check_launch(fastlora::cuda::launch_lora_pro_moments(a, workspace.data_ptr(), device,
                                                       c10::cuda::getCurrentCUDAStream()),
               op);
  return {grad_A, grad_B};
}

}  // namespace
}  // namespace fastlora::ops

TORCH_LIBRARY_IMPL(fastlora, CUDA, m) {
  m.impl("dropout_mask", &fastlora::ops::dropout_mask_cuda);
  m.impl("lora_pro_moments", &fastlora::ops::lora_pro_moments_cuda);
}
