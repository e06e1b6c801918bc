// The fastlora operator schemas; per-device kernels live in cpu.cpp / cuda.cpp and the fake
// (meta) kernels and autograd formulas in python/fastlora/_ops.py.
//
// Shapes: x (T, in), weight (out, in), lora_A (r, in), lora_B (out, r), xa (T, r),
// dy (T, out), dxa (T, r). `seed` is a one-element int64 tensor on the activations' device
// (read on the device, so CUDA graphs replay with fresh masks); it is required when
// dropout_p > 0 and ignored otherwise.
#include <torch/library.h>

TORCH_LIBRARY(fastlora, m) {
  // xa = drop(x) A^T, in x's dtype.
  m.def("lora_down(Tensor x, Tensor lora_A, float dropout_p, Tensor? seed) -> Tensor");
  // y + scale * xa B^T.
  m.def("lora_up(Tensor y, Tensor xa, Tensor lora_B, float scale) -> Tensor");
  // (y, xa): y = x W^T + bias + scale * xa B^T with xa = drop(x) A^T.
  m.def(
      "lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  // (dxa, dB) from one pass over dy: dxa = scale * dy B (float32, or float64 for float64
  // activations), dB = scale * dy^T xa in lora_B's dtype. For the layer xa and B have the same
  // rank; they may differ (dB then has xa's width).
  m.def("lora_dy_products(Tensor dy, Tensor xa, Tensor lora_B, float scale) -> (Tensor, Tensor)");
  // dA = dxa^T drop(x) with the forward's mask regenerated, in `dtype`.
  m.def(
      "lora_grad_A(Tensor x, Tensor dxa, float dropout_p, Tensor? seed, ScalarType dtype) -> "
      "Tensor");
  // dx = dy W + mask / (1 - p) * (dxa A).
  m.def(
      "lora_grad_x(Tensor dy, Tensor weight, Tensor dxa, Tensor lora_A, float dropout_p, "
      "Tensor? seed) -> Tensor");
  // Gradient engine: acc += alpha * dy^T x with acc float32 (or float64) and dy, x in any float
  // dtype: the frozen weight's gradient streamed into an accumulator, never materialised.
  m.def("accumulate_outer(Tensor(a!) acc, Tensor dy, Tensor x, float alpha) -> ()");
  // The keep mask (bool, rows x cols) that dropout with this seed and p applies.
  m.def("dropout_mask(Tensor seed, int rows, int cols, float dropout_p) -> Tensor");
  // Selects the CPU kernel build ("auto", "avx512", "avx2", "baseline") and returns the one in
  // use; "" only queries. Implemented by the CPU glue (cpu.cpp).
  m.def("_cpu_isa(str name) -> str");
}

// LoRA-Pro (docs/lora_pro.md). Shapes: exp_avg, exp_avg_sq (out, in); lora_A, grad_A0 (r, in);
// lora_B, grad_B0 (out, r).
TORCH_LIBRARY_FRAGMENT(fastlora, m) {
  // One fused full-mode pass over the moments: rebuilds g = scale * (lora_B grad_A0 +
  // grad_B0 lora_A) tile by tile, updates exp_avg and exp_avg_sq in place (Adam, bias
  // correction for `step` >= 1), forms D = m_hat / (sqrt(v_hat) + eps) and returns the LoRA
  // gradients D would give, (scale * lora_B^T D, scale * D lora_A^T), in float32 (float64 for
  // float64 moments). The moments are float64, float32 or bfloat16 (math in the former two).
  m.def(
      "lora_pro_moments(Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, Tensor lora_A, "
      "Tensor lora_B, Tensor grad_A0, Tensor grad_B0, float scale, float beta1, float beta2, "
      "float eps, int step) -> (Tensor, Tensor)");
}
