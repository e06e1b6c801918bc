// CPU implementations of the fastlora ops: argument checks, preparation of the small
// operands, threading with at::parallel_for, and the frozen GEMMs through ATen (BLAS).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "kernels/common/dropout_rng.h"
#include "kernels/cpu/lora_cpu.h"
#include "ops/accumulate_outer.h"
#include "ops/checks.h"
#include "ops/cpu_helpers.h"
#include "ops/kernel_args.h"

namespace fastlora::ops {
namespace {

DropoutParams dropout_params(double p, const std::optional<at::Tensor>& seed) {
  return p > 0.0 ? make_dropout(p, seed->item<int64_t>()) : DropoutParams{};
}

at::Tensor down(const at::Tensor& x, const at::Tensor& lora_A, double p,
                const std::optional<at::Tensor>& seed) {
  const int64_t r = lora_A.size(0);
  const auto at = prepare(lora_A.t(), acc_type(x.scalar_type()));
  auto xa = at::empty({x.size(0), r}, x.options());
  const Matrix xm = kernel_matrix(x);
  const DropoutParams d = dropout_params(p, seed);
  const auto& k = cpu::kernels();
  at::parallel_for(0, x.size(0), row_grain(x.size(1)), [&](int64_t b, int64_t e) {
    k.down(xm, at.data_ptr(), at.stride(0), r, d, xa.data_ptr(), b, e);
  });
  return xa;
}

// out = [base +] drop(u w) [+ bias], out (T x n) contiguous in `dtype`.
at::Tensor expand(const at::Tensor& u, const at::Tensor& w_prepared, int64_t n,
                  const std::optional<at::Tensor>& bias, const at::Tensor* base,
                  const DropoutParams& d, at::ScalarType dtype) {
  auto out = at::empty({u.size(0), n}, u.options().dtype(dtype));
  const Matrix um = kernel_matrix(u);
  std::optional<Matrix> bm;
  if (base != nullptr) bm = kernel_matrix(*base);
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const void* bias_ptr = bias_c.defined() ? bias_c.data_ptr() : nullptr;
  const auto& k = cpu::kernels();
  at::parallel_for(0, u.size(0), row_grain(n), [&](int64_t b, int64_t e) {
    k.expand(um, w_prepared.data_ptr(), w_prepared.stride(0), bias_ptr, bm ? &*bm : nullptr, d,
             kernel_dtype(dtype), out.data_ptr(), n, b, e);
  });
  return out;
}

at::Tensor lora_down_cpu(const at::Tensor& x, const at::Tensor& lora_A, double p,
                         const std::optional<at::Tensor>& seed) {
  check_down(x, lora_A, p, seed, "lora_down");
  check_cpu(x, "lora_down");
  return down(x, lora_A, p, seed);
}

at::Tensor lora_up_cpu(const at::Tensor& y, const at::Tensor& xa, const at::Tensor& lora_B,
                       double scale) {
  check_lora_up(y, xa, lora_B, scale);
  check_cpu(y, "lora_up");
  const auto w = prepare(lora_B.t(), acc_type(y.scalar_type()), scale);
  return expand(xa, w, y.size(1), std::nullopt, &y, DropoutParams{}, y.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> lora_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias,
                                                    const at::Tensor& lora_A,
                                                    const at::Tensor& lora_B, double scale,
                                                    double p,
                                                    const std::optional<at::Tensor>& seed) {
  check_lora_forward(x, weight, bias, lora_A, lora_B, scale, p, seed);
  check_cpu(x, "lora_forward");
  auto xa = down(x, lora_A, p, seed);
  // The rank-r term and the bias form the C operand of a beta = 1 GEMM: no extra pass over y.
  const auto w = prepare(lora_B.t(), acc_type(x.scalar_type()), scale);
  auto y = expand(xa, w, weight.size(0), bias, nullptr, DropoutParams{}, x.scalar_type());
  y.addmm_(x, weight.t());
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor> lora_dy_products_cpu(const at::Tensor& dy,
                                                        const at::Tensor& xa,
                                                        const at::Tensor& lora_B, double scale) {
  check_lora_dy_products(dy, xa, lora_B, scale);
  check_cpu(dy, "lora_dy_products");
  const int64_t T = dy.size(0), out = dy.size(1), rb = lora_B.size(1), rx = xa.size(1);
  const auto acc = acc_type(dy.scalar_type());
  const auto bm = prepare(lora_B, acc);
  const auto xa_c = xa.contiguous();
  auto dxa = at::empty({T, rb}, dy.options().dtype(acc));
  const int64_t ld = cpu::round_up(out, cpu::kPad);
  const Matrix dym = kernel_matrix(dy);
  const auto& k = cpu::kernels();
  const auto dbt = token_parallel_sum(T, out, rx, ld, dy.options().dtype(acc),
                                      [&](int64_t t0, int64_t t1, void* partial) {
                                        k.dy_products(dym, xa_c.data_ptr(), rx, bm.data_ptr(),
                                                      bm.stride(0), rb, scale, dxa.data_ptr(),
                                                      partial, ld, t0, t1);
                                      });
  auto dB = at::empty({out, rx}, lora_B.options());
  dB.copy_(dbt.narrow(1, 0, out).t());
  return {dxa, dB};
}

at::Tensor lora_grad_A_cpu(const at::Tensor& x, const at::Tensor& dxa, double p,
                           const std::optional<at::Tensor>& seed, at::ScalarType dtype) {
  check_lora_grad_A(x, dxa, p, seed, dtype);
  check_cpu(x, "lora_grad_A");
  const int64_t r = dxa.size(1), n = x.size(1);
  const int64_t ld = cpu::round_up(n, cpu::kPad);
  const auto dxa_c = dxa.contiguous();
  const Matrix xm = kernel_matrix(x);
  const DropoutParams d = dropout_params(p, seed);
  const auto& k = cpu::kernels();
  const auto out = token_parallel_sum(x.size(0), n, r, ld, x.options().dtype(acc_type(x.scalar_type())),
                                      [&](int64_t t0, int64_t t1, void* partial) {
                                        k.rank_update(xm, d, dxa_c.data_ptr(), r, partial, ld, t0, t1);
                                      });
  return out.narrow(1, 0, n).to(dtype, /*non_blocking=*/false, /*copy=*/true);
}

at::Tensor lora_grad_x_cpu(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dxa,
                           const at::Tensor& lora_A, double p,
                           const std::optional<at::Tensor>& seed) {
  check_lora_grad_x(dy, weight, dxa, lora_A, p, seed);
  check_cpu(dy, "lora_grad_x");
  const auto a = prepare(lora_A, acc_type(dy.scalar_type()));
  auto dx = expand(dxa.contiguous(), a, weight.size(1), std::nullopt, nullptr,
                   dropout_params(p, seed), dy.scalar_type());
  dx.addmm_(dy, weight);
  return dx;
}

void accumulate_outer_cpu(at::Tensor& acc, const at::Tensor& dy, const at::Tensor& x,
                          double alpha) {
  check_accumulate_outer(acc, dy, x);
  check_cpu(x, "accumulate_outer");
  if (!accumulate_outer_same_dtype(acc, dy, x, alpha)) accumulate_outer_widened(acc, dy, x, alpha);
}

at::Tensor dropout_mask_cpu(const at::Tensor& seed, int64_t rows, int64_t cols, double p) {
  check_dropout_mask(seed, rows, cols, p);
  check_cpu(seed, "dropout_mask");
  auto mask = at::empty({rows, cols}, seed.options().dtype(at::kBool));
  const DropoutParams d = dropout_params(p, seed);
  bool* out = mask.data_ptr<bool>();
  at::parallel_for(0, rows * cols, 1 << 16, [&](int64_t b, int64_t e) {
    cpu::dropout_mask(d, b, e, out);
  });
  return mask;
}

// Selects the CPU kernel build ("auto", "avx512", "avx2", "baseline"); "" only queries.
std::string cpu_isa(const std::string& name) {
  TORCH_CHECK(name.empty() || cpu::select_isa(name.c_str()), "fastlora: CPU kernel build '", name,
              "' is unknown or not supported by this CPU; use auto, avx512, avx2 or baseline");
  return cpu::kernels().isa;
}

}  // namespace
}  // namespace fastlora::ops

// _cpu_isa takes no tensor, so it dispatches on no backend key: a CompositeImplicitAutograd
// kernel is the kind the dispatcher runs for it (as for aten::_nnpack_available).
TORCH_LIBRARY_IMPL(fastlora, CompositeImplicitAutograd, m) {
  m.impl("_cpu_isa", &fastlora::ops::cpu_isa);
}

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  using namespace fastlora::ops;
  m.impl("lora_down", &lora_down_cpu);
  m.impl("lora_up", &lora_up_cpu);
  m.impl("lora_forward", &lora_forward_cpu);
  m.impl("lora_dy_products", &lora_dy_products_cpu);
  m.impl("lora_grad_A", &lora_grad_A_cpu);
  m.impl("lora_grad_x", &lora_grad_x_cpu);
  m.impl("accumulate_outer", &accumulate_outer_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
}
