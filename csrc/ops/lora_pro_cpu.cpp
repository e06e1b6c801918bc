// CPU implementation of fastlora::lora_pro_moments: prepares the small factors in the
// accumulation type, splits the rows of the moments across threads, and reduces the per-thread
// partials of grad_A in a fixed order.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "kernels/cpu/lora_cpu.h"
#include "ops/checks.h"
#include "ops/cpu_helpers.h"
#include "ops/kernel_args.h"

namespace fastlora::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> lora_pro_moments_cpu(
    at::Tensor& exp_avg, at::Tensor& exp_avg_sq, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& grad_A0, const at::Tensor& grad_B0, double scale,
    double beta1, double beta2, double eps, int64_t step) {
  check_lora_pro_moments(exp_avg, exp_avg_sq, lora_A, lora_B, grad_A0, grad_B0, scale, beta1,
                         beta2, eps, step);
  check_cpu(exp_avg, "lora_pro_moments");
  const auto acc = acc_type(exp_avg.scalar_type());
  const auto opts = exp_avg.options().dtype(acc);
  const int64_t out = exp_avg.size(0), in = exp_avg.size(1), r = lora_A.size(0);

  const auto sb = lora_B.to(acc).mul(scale).contiguous();
  const auto u = at::cat({sb, grad_B0.to(acc).mul(scale)}, 1);
  const auto v = prepare(at::cat({grad_A0.to(acc), lora_A.to(acc)}, 0), acc);
  const auto at_ = prepare(lora_A.t(), acc);
  auto grad_B = at::empty({out, r}, opts);

  cpu::LoraProMoments p;
  p.exp_avg = exp_avg.data_ptr();
  p.exp_avg_sq = exp_avg_sq.data_ptr();
  p.moment_dtype = kernel_dtype(exp_avg.scalar_type());
  p.rows = out;
  p.cols = in;
  p.r = r;
  p.u = u.data_ptr();
  p.v = v.data_ptr();
  p.ldv = v.stride(0);
  p.sb = sb.data_ptr();
  p.at = at_.data_ptr();
  p.ldat = at_.stride(0);
  p.s = lora_pro_scalars(scale, beta1, beta2, eps, step);
  p.grad_b = grad_B.data_ptr();

  const int64_t ld = cpu::round_up(in, cpu::kPad);
  const auto& k = cpu::kernels();
  const auto grad_A = token_parallel_sum(out, in, r, ld, opts,
                                         [&](int64_t i0, int64_t i1, void* partial) {
                                           k.lora_pro_moments(p, partial, ld, i0, i1);
                                         });
  return {grad_A.narrow(1, 0, in).contiguous(), grad_B};
}

}  // namespace
}  // namespace fastlora::ops

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("lora_pro_moments", &fastlora::ops::lora_pro_moments_cpu);
}
