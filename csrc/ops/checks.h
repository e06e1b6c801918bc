// Argument checks shared by the CPU and CUDA implementations of the fastlora ops.
// The Python API validates user input earlier with friendlier messages; these guard direct
// calls of torch.ops.fastlora.* so that no kernel ever sees an inconsistent argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "kernels/common/lora_pro_scalars.h"

namespace fastlora::ops {

inline bool is_supported_float(at::ScalarType s) {
  return s == at::kDouble || s == at::kFloat || s == at::kBFloat16 || s == at::kHalf;
}

// float64 activations accumulate in float64, all others in float32.
inline at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_matrix(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, "fastlora.", op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(is_supported_float(t.scalar_type()), "fastlora.", op, ": ", name,
              " must be float64, float32, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "fastlora.", op, ": ", name, " is on ", t.device(),
              " but the activations are on ", ref.device());
}

inline void check_rank(int64_t r, const char* op) {
  TORCH_CHECK(r >= 1, "fastlora.", op, ": the rank must be at least 1, got ", r);
}

inline void check_scale(double scale, const char* op) {
  TORCH_CHECK(std::isfinite(scale), "fastlora.", op, ": scale must be finite, got ", scale);
}

// dropout_p in [0, 1); a one-element int64 seed on the activations' device when p > 0.
inline void check_dropout(double p, const std::optional<at::Tensor>& seed, const at::Tensor& like,
                          const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fastlora.", op, ": dropout_p must be in [0, 1), got ", p);
  if (p == 0.0) return;
  TORCH_CHECK(seed.has_value(), "fastlora.", op, ": dropout_p > 0 needs a seed tensor");
  TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong, "fastlora.", op,
              ": seed must be a one-element int64 tensor, got ", seed->scalar_type(), " of shape ",
              seed->sizes());
  check_same_device(*seed, like, op, "seed");
}

// x (T, in) and lora_A (r, in).
inline void check_down(const at::Tensor& x, const at::Tensor& lora_A, double p,
                       const std::optional<at::Tensor>& seed, const char* op) {
  check_matrix(x, op, "x");
  check_matrix(lora_A, op, "lora_A");
  check_same_device(lora_A, x, op, "lora_A");
  check_rank(lora_A.size(0), op);
  TORCH_CHECK(lora_A.size(1) == x.size(1), "fastlora.", op, ": lora_A has ", lora_A.size(1),
              " input features but x has ", x.size(1));
  check_dropout(p, seed, x, op);
}

// xa (T, r) in the activations' dtype and lora_B (out, r).
inline void check_up(const at::Tensor& xa, const at::Tensor& lora_B, at::ScalarType act,
                     int64_t tokens, const char* op) {
  check_matrix(xa, op, "xa");
  check_matrix(lora_B, op, "lora_B");
  check_same_device(lora_B, xa, op, "lora_B");
  TORCH_CHECK(xa.scalar_type() == act, "fastlora.", op, ": xa must have the activations' dtype ",
              act, ", got ", xa.scalar_type());
  TORCH_CHECK(xa.size(0) == tokens, "fastlora.", op, ": xa has ", xa.size(0), " rows, expected ",
              tokens);
  TORCH_CHECK(lora_B.size(1) == xa.size(1), "fastlora.", op, ": lora_B has rank ",
              lora_B.size(1), " but xa has ", xa.size(1), " columns");
}

// dy (T, out), xa (T, rx) in dy's dtype, lora_B (out, rb); rx and rb may differ (the gradient
// engine's sketches use one pass over dy for two products of different widths).
inline void check_dy_products(const at::Tensor& dy, const at::Tensor& xa, const at::Tensor& lora_B) {
  const char* op = "lora_dy_products";
  check_matrix(xa, op, "xa");
  check_matrix(lora_B, op, "lora_B");
  check_same_device(xa, dy, op, "xa");
  check_same_device(lora_B, dy, op, "lora_B");
  TORCH_CHECK(xa.scalar_type() == dy.scalar_type(), "fastlora.lora_dy_products: xa must have dy's dtype ",
              dy.scalar_type(), ", got ", xa.scalar_type());
  TORCH_CHECK(xa.size(0) == dy.size(0), "fastlora.lora_dy_products: xa has ", xa.size(0),
              " rows but dy has ", dy.size(0));
  TORCH_CHECK(lora_B.size(0) == dy.size(1), "fastlora.lora_dy_products: lora_B has ",
              lora_B.size(0), " output features but dy has ", dy.size(1));
  check_rank(lora_B.size(1), op);
  check_rank(xa.size(1), op);
}

// weight (out, in) and optional bias (out) for activations x (T, in).
inline void check_weight(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& x, int64_t out_features, const char* op) {
  check_matrix(weight, op, "weight");
  check_same_device(weight, x, op, "weight");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "fastlora.", op, ": weight is ",
              weight.scalar_type(), " but the activations are ", x.scalar_type());
  TORCH_CHECK(weight.size(0) == out_features && weight.size(1) == x.size(1), "fastlora.", op,
              ": weight has shape ", weight.sizes(), ", expected [", out_features, ", ", x.size(1),
              "]");
  if (bias.has_value()) {
    check_same_device(*bias, x, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "fastlora.", op,
                ": bias must have shape [", out_features, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "fastlora.", op, ": bias is ",
                bias->scalar_type(), " but the activations are ", x.scalar_type());
  }
}

// dxa (T, r) in the accumulation dtype, contiguous.
inline void check_dxa(const at::Tensor& dxa, const at::Tensor& act, int64_t r, const char* op) {
  TORCH_CHECK(dxa.dim() == 2 && dxa.size(0) == act.size(0) && dxa.size(1) == r, "fastlora.", op,
              ": dxa must have shape [", act.size(0), ", ", r, "], got ", dxa.sizes());
  TORCH_CHECK(dxa.scalar_type() == acc_type(act.scalar_type()), "fastlora.", op, ": dxa must be ",
              acc_type(act.scalar_type()), " for ", act.scalar_type(), " activations, got ",
              dxa.scalar_type());
  check_same_device(dxa, act, op, "dxa");
}

// acc (out, in) float32/float64 += dy^T (T, out) x (T, in).
inline void check_accumulate_outer(const at::Tensor& acc, const at::Tensor& dy, const at::Tensor& x) {
  const char* op = "accumulate_outer";
  check_matrix(dy, op, "dy");
  check_matrix(x, op, "x");
  TORCH_CHECK(acc.dim() == 2 && (acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble),
              "fastlora.accumulate_outer: acc must be a 2-D float32 or float64 tensor, got ",
              acc.scalar_type(), " of shape ", acc.sizes());
  TORCH_CHECK(dy.size(0) == x.size(0), "fastlora.accumulate_outer: dy has ", dy.size(0),
              " rows but x has ", x.size(0));
  TORCH_CHECK(acc.size(0) == dy.size(1) && acc.size(1) == x.size(1),
              "fastlora.accumulate_outer: acc has shape ", acc.sizes(), ", expected [", dy.size(1),
              ", ", x.size(1), "]");
  check_same_device(dy, x, op, "dy");
  check_same_device(acc, x, op, "acc");
}

// The kernels' scalars for lora_pro_moments (bias corrections precomputed for `step`).
inline LoraProScalars lora_pro_scalars(double scale, double beta1, double beta2, double eps,
                                       int64_t step) {
  LoraProScalars s;
  s.scale = scale;
  s.beta1 = beta1;
  s.beta2 = beta2;
  s.eps = eps;
  s.bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  s.bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  return s;
}

// lora_pro_moments: exp_avg and exp_avg_sq (out, in), contiguous, float64/float32/bfloat16,
// distinct; lora_A and grad_A0 (r, in); lora_B and grad_B0 (out, r); Adam hyperparameters.
inline void check_lora_pro_moments(const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                   const at::Tensor& lora_A, const at::Tensor& lora_B,
                                   const at::Tensor& grad_A0, const at::Tensor& grad_B0,
                                   double scale, double beta1, double beta2, double eps,
                                   int64_t step) {
  const char* op = "lora_pro_moments";
  TORCH_CHECK(exp_avg.dim() == 2, "fastlora.lora_pro_moments: exp_avg must be 2-D, got shape ",
              exp_avg.sizes());
  const auto md = exp_avg.scalar_type();
  TORCH_CHECK(md == at::kDouble || md == at::kFloat || md == at::kBFloat16,
              "fastlora.lora_pro_moments: the moments must be float64, float32 or bfloat16, got ",
              md);
  TORCH_CHECK(exp_avg_sq.sizes() == exp_avg.sizes() && exp_avg_sq.scalar_type() == md,
              "fastlora.lora_pro_moments: exp_avg_sq (", exp_avg_sq.scalar_type(), " ",
              exp_avg_sq.sizes(), ") must match exp_avg (", md, " ", exp_avg.sizes(), ")");
  TORCH_CHECK(exp_avg.is_contiguous() && exp_avg_sq.is_contiguous(),
              "fastlora.lora_pro_moments: the moments must be contiguous");
  TORCH_CHECK(exp_avg.numel() == 0 || exp_avg.data_ptr() != exp_avg_sq.data_ptr(),
              "fastlora.lora_pro_moments: exp_avg and exp_avg_sq must be different tensors");
  check_same_device(exp_avg_sq, exp_avg, op, "exp_avg_sq");
  const int64_t out = exp_avg.size(0), in = exp_avg.size(1), r = lora_A.size(0);
  const at::Tensor* adapters[] = {&lora_A, &lora_B, &grad_A0, &grad_B0};
  const char* names[] = {"lora_A", "lora_B", "grad_A0", "grad_B0"};
  const int64_t shapes[][2] = {{r, in}, {out, r}, {r, in}, {out, r}};
  for (int i = 0; i < 4; ++i) {
    check_matrix(*adapters[i], op, names[i]);
    check_same_device(*adapters[i], exp_avg, op, names[i]);
    TORCH_CHECK(adapters[i]->size(0) == shapes[i][0] && adapters[i]->size(1) == shapes[i][1],
                "fastlora.lora_pro_moments: ", names[i], " has shape ", adapters[i]->sizes(),
                ", expected [", shapes[i][0], ", ", shapes[i][1], "] for ", out, " x ", in,
                " moments and rank ", r);
  }
  check_rank(r, op);
  check_scale(scale, op);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0,
              "fastlora.lora_pro_moments: betas must be in [0, 1), got ", beta1, ", ", beta2);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0,
              "fastlora.lora_pro_moments: eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(step >= 1, "fastlora.lora_pro_moments: step counts from 1, got ", step);
}

// ---- each op's arguments, complete (the CPU and CUDA glue add only their device check) ----

inline void check_lora_up(const at::Tensor& y, const at::Tensor& xa, const at::Tensor& lora_B, double scale) {
  check_matrix(y, "lora_up", "y");
  check_up(xa, lora_B, y.scalar_type(), y.size(0), "lora_up");
  check_same_device(xa, y, "lora_up", "xa");
  check_scale(scale, "lora_up");
  TORCH_CHECK(lora_B.size(0) == y.size(1), "fastlora.lora_up: lora_B has ", lora_B.size(0),
              " output features but y has ", y.size(1));
}

inline void check_lora_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& lora_A, const at::Tensor& lora_B, double scale, double p,
                               const std::optional<at::Tensor>& seed) {
  const char* op = "lora_forward";
  check_down(x, lora_A, p, seed, op);
  check_matrix(lora_B, op, "lora_B");
  check_same_device(lora_B, x, op, "lora_B");
  TORCH_CHECK(lora_B.size(1) == lora_A.size(0), "fastlora.lora_forward: lora_B has rank ", lora_B.size(1),
              " but lora_A has rank ", lora_A.size(0));
  check_weight(weight, bias, x, lora_B.size(0), op);
  check_scale(scale, op);
}

inline void check_lora_dy_products(const at::Tensor& dy, const at::Tensor& xa, const at::Tensor& lora_B,
                                   double scale) {
  check_matrix(dy, "lora_dy_products", "dy");
  check_dy_products(dy, xa, lora_B);
  check_scale(scale, "lora_dy_products");
}

inline void check_lora_grad_A(const at::Tensor& x, const at::Tensor& dxa, double p,
                              const std::optional<at::Tensor>& seed, at::ScalarType dtype) {
  const char* op = "lora_grad_A";
  check_matrix(x, op, "x");
  check_dxa(dxa, x, dxa.size(1), op);
  check_rank(dxa.size(1), op);
  check_dropout(p, seed, x, op);
  TORCH_CHECK(is_supported_float(dtype), "fastlora.lora_grad_A: unsupported dtype ", dtype);
}

inline void check_lora_grad_x(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dxa,
                              const at::Tensor& lora_A, double p, const std::optional<at::Tensor>& seed) {
  const char* op = "lora_grad_x";
  check_matrix(dy, op, "dy");
  check_matrix(weight, op, "weight");
  check_matrix(lora_A, op, "lora_A");
  check_same_device(weight, dy, op, "weight");
  check_same_device(lora_A, dy, op, "lora_A");
  TORCH_CHECK(weight.scalar_type() == dy.scalar_type(), "fastlora.lora_grad_x: weight is ", weight.scalar_type(),
              " but dy is ", dy.scalar_type());
  TORCH_CHECK(weight.size(0) == dy.size(1), "fastlora.lora_grad_x: weight has ", weight.size(0),
              " output features but dy has ", dy.size(1));
  TORCH_CHECK(lora_A.size(1) == weight.size(1), "fastlora.lora_grad_x: lora_A has ", lora_A.size(1),
              " input features but weight has ", weight.size(1));
  check_rank(lora_A.size(0), op);
  check_dxa(dxa, dy, lora_A.size(0), op);
  check_dropout(p, seed, dy, op);
}

inline void check_dropout_mask(const at::Tensor& seed, int64_t rows, int64_t cols, double p) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "fastlora.dropout_mask: rows and cols must be >= 0");
  check_dropout(p, seed, seed, "dropout_mask");
}

}  // namespace fastlora::ops
