// Torch-free CPU kernels of the fused LoRA layer.
//
// Each kernel works on a range of rows (tokens) or columns so the caller can split the work
// across threads; none allocates beyond small per-call scratch panels. Big operands (x, dy)
// are read once through strided loads with on-the-fly dtype conversion and dropout; small
// operands (A, B^T) come prepared by the caller in the accumulation type `Acc` (double for
// float64 activations, float otherwise), row-major with a row stride that is a multiple of
// kPad, padding zero.
#pragma once

#include <cstdint>

#include "../common/dropout_rng.h"
#include "../common/lora_pro_scalars.h"
#include "../common/matrix.h"

namespace fastlora::cpu {

constexpr int64_t kPad = 16;  // column padding of prepared small operands

static constexpr int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// One fused LoRA-Pro full-mode pass over the rows x cols Adam moments (docs/lora_pro.md),
// with the equivalent gradient g = u v rebuilt tile by tile from its rank-2r factors:
//   exp_avg    <- beta1 exp_avg + (1 - beta1) g,   exp_avg_sq <- beta2 exp_avg_sq + (1 - beta2) g^2
//   D           = (exp_avg / bc1) / (sqrt(exp_avg_sq) / sqrt(bc2) + eps)  (before rounding to
//                 the moments' dtype)
//   grad_a[j, k] += sum_i sb[i, j] D[i, k]        grad_b[i, j] = s.scale * sum_k D[i, k] at[k, j]
// All small operands are prepared by the caller in Acc (double for float64 moments, else
// float).
struct LoraProMoments {
  void* exp_avg;     // rows x cols, contiguous, moment_dtype
  void* exp_avg_sq;  // likewise
  DType moment_dtype;  // f64, f32 or bf16
  int64_t rows = 0, cols = 0, r = 0;
  const void* u;     // rows x 2r, contiguous: scale * [B | gB0]
  const void* v;     // 2r rows, row stride ldv >= round_up(cols, kPad), zero padded: [gA0; A]
  int64_t ldv = 0;
  const void* sb;    // rows x r, contiguous: scale * B
  const void* at;    // cols rows, row stride ldat >= round_up(r, kPad), zero padded: A^T
  int64_t ldat = 0;
  LoraProScalars s;  // s.scale multiplies grad_b (u and sb include it already)
  void* grad_b;      // rows x r, contiguous (written for the rows a call covers)
};

struct KernelTable {
  const char* isa;

  // xa[t, j] = sum_k drop(x)[t, k] * at[k, j] for t in [t0, t1).
  // xa: x.rows x r, contiguous, x's dtype. at = A^T: prepared, x.cols rows, row stride ldat.
  void (*down)(const Matrix& x, const void* at, int64_t ldat, int64_t r,
               const DropoutParams& drop, void* xa, int64_t t0, int64_t t1);

  // out[t, k] = base[t, k] + drop_k(sum_j u[t, j] * w[j, k]) + bias[k] for t in [t0, t1),
  // where drop_k multiplies by the dropout multiplier of element (t, k) of a rows x n matrix.
  // u: T x r in the activation dtype or Acc; w: prepared, r rows, row stride ldw; bias
  // (n, contiguous, out's dtype) and base (T x n, out's dtype, may alias out) are optional.
  // out: T x n contiguous.
  void (*expand)(const Matrix& u, const void* w, int64_t ldw, const void* bias,
                 const Matrix* base, const DropoutParams& drop, DType out_dtype, void* out,
                 int64_t n, int64_t t0, int64_t t1);

  // One pass over dy rows [t0, t1): dxa[t, j] = scale * sum_o dy[t, o] * b[o, j] for j < rb
  // (Acc, contiguous T x rb) and dbt[j, o] += scale * sum_t xa[t, j] * dy[t, o] for j < rx (Acc,
  // rx rows with row stride lddbt >= round_up(dy.cols, kPad); callers reduce per-thread
  // partials). xa: T x rx contiguous, dy's dtype. b: prepared, dy.cols rows, row stride ldb.
  void (*dy_products)(const Matrix& dy, const void* xa, int64_t rx, const void* b, int64_t ldb,
                      int64_t rb, double scale, void* dxa, void* dbt, int64_t lddbt, int64_t t0,
                      int64_t t1);

  // out[j, k] += sum_t u[t, j] * drop(x)[t, k] over rows t in [t0, t1).
  // u: Acc, x.rows x r contiguous. out: Acc, r rows with row stride ldo >= round_up(x.cols,
  // kPad) (callers reduce per-thread partials).
  void (*rank_update)(const Matrix& x, const DropoutParams& drop, const void* u, int64_t r,
                      void* out, int64_t ldo, int64_t t0, int64_t t1);

  // LoraProMoments for rows [i0, i1): updates those rows of the moments, writes their rows of
  // grad_b and adds their terms to grad_a (Acc, r rows with row stride ldga >=
  // round_up(cols, kPad); callers reduce per-thread partials).
  void (*lora_pro_moments)(const LoraProMoments& p, void* grad_a, int64_t ldga, int64_t i0,
                           int64_t i1);
};

// mask[i] = keep(flat index i) for i in [begin, end); all true when dropout is disabled.
void dropout_mask(const DropoutParams& drop, int64_t begin, int64_t end, bool* mask);

// The kernels for this CPU (or for the instruction set chosen by select_isa).
const KernelTable& kernels();

// Chooses the instruction set by name ("avx512", "avx2", "baseline") or "auto".
// Returns false if the name is unknown or the CPU lacks it. Used by tests and benchmarks.
bool select_isa(const char* name);

}  // namespace fastlora::cpu
