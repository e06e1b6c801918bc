// CUDA implementations of the fastlora ops (built only against a CUDA torch): argument checks,
// preparation of the small operands, the launchers of csrc/kernels/cuda, and the frozen GEMMs
// through ATen (cuBLAS inside torch) on the current stream, with the rank-r term as their C
// operand. No host synchronisation, and all allocations (outputs, prepared operands, kernel
// scratch) have sizes fixed by the shapes: CUDA graphs and torch.compile can capture the ops.
//
// The layer only routes CUDA tensors here when fastlora.set_cuda_layer_kernels(True) (or
// FASTLORA_CUDA_LAYER=1) is set: these kernels are experimental until benchmarks/gpu_check.sh
// has validated them on a GPU. lora_pro_moments has its kernel in kernels/cuda/lora_pro_moments.cu;
// accumulate_outer (the gradient engine's) is library GEMMs only and runs whatever that switch says.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels/cuda/dropout_mask.cuh"
#include "kernels/cuda/lora_cuda.cuh"
#include "kernels/cuda/lora_pro_moments.cuh"
#include "ops/accumulate_outer.h"
#include "ops/checks.h"
#include "ops/kernel_args.h"

namespace fastlora::ops {
namespace {

namespace kc = fastlora::cuda;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastlora.", op, ": CUDA error: ", cudaGetErrorString(err));
}

void check_cuda(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cuda(), "fastlora.", op, ": the CUDA kernel got a tensor on ", t.device());
}

kc::Dropout dropout(double p, const std::optional<at::Tensor>& seed) {
  return p > 0.0 ? kc::Dropout{seed->data_ptr<int64_t>(), p} : kc::Dropout{};
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Kernel scratch from the caching allocator. The blocks are released when the op returns,
// while its kernels may still be queued: the allocator hands them out again only in the
// current stream's order, after those kernels.
class Scratch {
 public:
  explicit Scratch(const at::Tensor& like) : options_(like.options().dtype(at::kByte)) {}
  kc::Scratch get() {
    return [this](size_t bytes) {
      blocks_.push_back(at::empty({static_cast<int64_t>(bytes)}, options_));
      return blocks_.back().data_ptr();
    };
  }

 private:
  at::TensorOptions options_;
  std::vector<at::Tensor> blocks_;
};

// The small operand m, contiguous in dtype (a no-op when it already is).
at::Tensor prepared(const at::Tensor& m, at::ScalarType dtype) { return m.to(dtype).contiguous(); }

at::Tensor down(const at::Tensor& x, const at::Tensor& lora_A, double p, const std::optional<at::Tensor>& seed) {
  const int64_t r = lora_A.size(0);
  // The branch runs in x's dtype (reference: lora_A.to(x.dtype)).
  const auto a = prepared(lora_A, x.scalar_type());
  auto xa = at::empty({x.size(0), r}, x.options());
  Scratch scratch(x);
  check_launch(
      kc::lora_down(kernel_matrix(x), a.data_ptr(), r, dropout(p, seed), xa.data_ptr(), scratch.get(), stream()),
      "lora_down");
  return xa;
}

// The rank-r term, (rows, cols) in `dtype`: [base +] drop(alpha u w) [+ bias] (kc::Expand).
at::Tensor expand(const at::Tensor& u, const at::Tensor& w, bool w_by_rank, int64_t cols, double alpha,
                  const std::optional<at::Tensor>& bias, const at::Tensor* base, const kc::Dropout& drop,
                  at::ScalarType dtype, const char* op) {
  auto out = at::empty({u.size(0), cols}, u.options().dtype(dtype));
  const std::optional<Matrix> base_m = base != nullptr ? std::optional(kernel_matrix(*base)) : std::nullopt;
  kc::Expand e;
  e.u = u.data_ptr();
  e.w = w.data_ptr();
  e.rows = u.size(0);
  e.cols = cols;
  e.r = u.size(1);
  e.w_by_rank = w_by_rank;
  e.alpha = alpha;
  e.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  e.base = base_m.has_value() ? &*base_m : nullptr;
  e.drop = drop;
  e.out_dtype = kernel_dtype(dtype);
  e.out = out.data_ptr();
  check_launch(kc::lora_expand(e, stream()), op);
  return out;
}

// [base +] scale xa B^T [+ bias] in xa's dtype.
at::Tensor up(const at::Tensor& xa, const at::Tensor& lora_B, double scale, const std::optional<at::Tensor>& bias,
              const at::Tensor* base, const char* op) {
  const auto b = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  return expand(xa.contiguous(), prepared(lora_B, xa.scalar_type()), false, lora_B.size(0), scale, b, base,
                kc::Dropout{}, xa.scalar_type(), op);
}

at::Tensor lora_down_cuda(const at::Tensor& x, const at::Tensor& lora_A, double p,
                          const std::optional<at::Tensor>& seed) {
  check_down(x, lora_A, p, seed, "lora_down");
  check_cuda(x, "lora_down");
  const c10::cuda::CUDAGuard guard(x.device());
  return down(x, lora_A, p, seed);
}

at::Tensor lora_up_cuda(const at::Tensor& y, const at::Tensor& xa, const at::Tensor& lora_B, double scale) {
  check_lora_up(y, xa, lora_B, scale);
  check_cuda(y, "lora_up");
  const c10::cuda::CUDAGuard guard(y.device());
  return up(xa, lora_B, scale, std::nullopt, &y, "lora_up");
}

std::tuple<at::Tensor, at::Tensor> lora_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias,
                                                     const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                     double scale, double p,
                                                     const std::optional<at::Tensor>& seed) {
  check_lora_forward(x, weight, bias, lora_A, lora_B, scale, p, seed);
  check_cuda(x, "lora_forward");
  const c10::cuda::CUDAGuard guard(x.device());
  auto xa = down(x, lora_A, p, seed);
  // The rank-r term and the bias are the C operand of a beta = 1 GEMM: no extra pass over y.
  auto y = up(xa, lora_B, scale, bias, nullptr, "lora_forward");
  y.addmm_(x, weight.t());
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor> lora_dy_products_cuda(const at::Tensor& dy, const at::Tensor& xa,
                                                         const at::Tensor& lora_B, double scale) {
  check_lora_dy_products(dy, xa, lora_B, scale);
  check_cuda(dy, "lora_dy_products");
  const c10::cuda::CUDAGuard guard(dy.device());
  const auto acc = acc_type(dy.scalar_type());
  const auto xa_c = xa.contiguous();
  const auto b = prepared(lora_B, acc);
  const int64_t rb = lora_B.size(1), rx = xa.size(1);
  auto dxa = at::empty({dy.size(0), rb}, dy.options().dtype(acc));
  auto db = at::empty({dy.size(1), rx}, dy.options().dtype(acc));
  Scratch scratch(dy);
  check_launch(kc::lora_dy_products(kernel_matrix(dy), xa_c.data_ptr(), rx, b.data_ptr(), rb, scale, dxa.data_ptr(),
                                    db.data_ptr(), scratch.get(), stream()),
               "lora_dy_products");
  return {dxa, db.to(lora_B.scalar_type())};
}

at::Tensor lora_grad_A_cuda(const at::Tensor& x, const at::Tensor& dxa, double p,
                            const std::optional<at::Tensor>& seed, at::ScalarType dtype) {
  check_lora_grad_A(x, dxa, p, seed, dtype);
  check_cuda(x, "lora_grad_A");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dxa_c = dxa.contiguous();
  const int64_t r = dxa.size(1);
  auto da = at::empty({r, x.size(1)}, x.options().dtype(acc_type(x.scalar_type())));
  Scratch scratch(x);
  check_launch(kc::lora_grad_A(kernel_matrix(x), dxa_c.data_ptr(), r, dropout(p, seed), da.data_ptr(), scratch.get(),
                               stream()),
               "lora_grad_A");
  return da.to(dtype);
}

at::Tensor lora_grad_x_cuda(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dxa,
                            const at::Tensor& lora_A, double p, const std::optional<at::Tensor>& seed) {
  check_lora_grad_x(dy, weight, dxa, lora_A, p, seed);
  check_cuda(dy, "lora_grad_x");
  const c10::cuda::CUDAGuard guard(dy.device());
  const auto a = prepared(lora_A, acc_type(dy.scalar_type()));
  auto dx = expand(dxa.contiguous(), a, true, weight.size(1), 1.0, std::nullopt, nullptr, dropout(p, seed),
                   dy.scalar_type(), "lora_grad_x");
  // The masked rank-r term is the C operand of dy W.
  dx.addmm_(dy, weight);
  return dx;
}

// aten::addmm.dtype_out: cuBLAS's mixed-precision GEMM (bfloat16/float16 inputs, float32
// accumulation and output), looked up through the dispatcher because older torch lacks it.
using AddmmDtypeOut = at::Tensor&(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ScalarType,
                                  const at::Scalar&, const at::Scalar&, at::Tensor&);

const std::optional<c10::TypedOperatorHandle<AddmmDtypeOut>>& addmm_dtype_out() {
  static const auto op = []() -> std::optional<c10::TypedOperatorHandle<AddmmDtypeOut>> {
    const auto handle = c10::Dispatcher::singleton().findSchema({"aten::addmm", "dtype_out"});
    if (!handle.has_value()) return std::nullopt;
    return handle->typed<AddmmDtypeOut>();
  }();
  return op;
}

// The library GEMMs: inputs in acc's dtype as one addmm_, others through cuBLAS's mixed-precision
// GEMM when this torch has it, else widened a slab of tokens at a time.
void accumulate_outer_cuda(at::Tensor& acc, const at::Tensor& dy, const at::Tensor& x, double alpha) {
  check_accumulate_outer(acc, dy, x);
  check_cuda(x, "accumulate_outer");
  const c10::cuda::CUDAGuard guard(x.device());
  if (accumulate_outer_same_dtype(acc, dy, x, alpha)) return;
  if (const auto& mixed = addmm_dtype_out()) {
    mixed->call(acc, dy.t(), x, acc.scalar_type(), 1, alpha, acc);
    return;
  }
  accumulate_outer_widened(acc, dy, x, alpha);
}

at::Tensor dropout_mask_cuda(const at::Tensor& seed, int64_t rows, int64_t cols, double p) {
  check_dropout_mask(seed, rows, cols, p);
  check_cuda(seed, "dropout_mask");
  const c10::cuda::CUDAGuard guard(seed.device());
  auto mask = at::empty({rows, cols}, seed.options().dtype(at::kBool));
  check_launch(fastlora::cuda::launch_dropout_mask(p > 0.0 ? seed.data_ptr<int64_t>() : nullptr, p, rows * cols,
                                                   mask.data_ptr<bool>(), stream()),
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
  check_cuda(exp_avg, op);
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
  a.moments = kernel_dtype(exp_avg.scalar_type());
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
  check_launch(fastlora::cuda::launch_lora_pro_moments(a, workspace.data_ptr(), device, stream()), op);
  return {grad_A, grad_B};
}

}  // namespace
}  // namespace fastlora::ops

TORCH_LIBRARY_IMPL(fastlora, CUDA, m) {
  using namespace fastlora::ops;
  m.impl("lora_down", &lora_down_cuda);
  m.impl("lora_up", &lora_up_cuda);
  m.impl("lora_forward", &lora_forward_cuda);
  m.impl("lora_dy_products", &lora_dy_products_cuda);
  m.impl("lora_grad_A", &lora_grad_A_cuda);
  m.impl("lora_grad_x", &lora_grad_x_cuda);
  m.impl("accumulate_outer", &accumulate_outer_cuda);
  m.impl("dropout_mask", &dropout_mask_cuda);
  m.impl("lora_pro_moments", &lora_pro_moments_cuda);
}
