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

namespace fastlora::cpu {

enum class DType : int { f64 = 0, f32 = 1, bf16 = 2, f16 = 3 };

constexpr int64_t kPad = 16;  // column padding of prepared small operands

static constexpr int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// A read-only strided 2-D operand; strides are in elements (non-negative;
// zero for broadcast operands such as the gradient of a sum).
struct ConstMat {
  const void* data = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t s0 = 0, s1 = 0;
  DType dtype = DType::f32;
};

struct KernelTable {
  const char* isa;

  // xa[t, j] = sum_k drop(x)[t, k] * at[k, j] for t in [t0, t1).
  // xa: x.rows x r, contiguous, x's dtype. at = A^T: prepared, x.cols rows, row stride ldat.
  void (*down)(const ConstMat& x, const void* at, int64_t ldat, int64_t r,
               const DropoutParams& drop, void* xa, int64_t t0, int64_t t1);

  // out[t, k] = base[t, k] + drop_k(sum_j u[t, j] * w[j, k]) + bias[k] for t in [t0, t1),
  // where drop_k multiplies by the dropout multiplier of element (t, k) of a rows x n matrix.
  // u: T x r in the activation dtype or Acc; w: prepared, r rows, row stride ldw; bias
  // (n, contiguous, out's dtype) and base (T x n, out's dtype, may alias out) are optional.
  // out: T x n contiguous.
  void (*expand)(const ConstMat& u, const void* w, int64_t ldw, const void* bias,
                 const ConstMat* base, const DropoutParams& drop, DType out_dtype, void* out,
                 int64_t n, int64_t t0, int64_t t1);

  // One pass over dy rows [t0, t1): dxa[t, j] = scale * sum_o dy[t, o] * b[o, j] for j < rb
  // (Acc, contiguous T x rb) and dbt[j, o] += scale * sum_t xa[t, j] * dy[t, o] for j < rx (Acc,
  // rx rows with row stride lddbt >= round_up(dy.cols, kPad); callers reduce per-thread
  // partials). xa: T x rx contiguous, dy's dtype. b: prepared, dy.cols rows, row stride ldb.
  void (*dy_products)(const ConstMat& dy, const void* xa, int64_t rx, const void* b, int64_t ldb,
                      int64_t rb, double scale, void* dxa, void* dbt, int64_t lddbt, int64_t t0,
                      int64_t t1);

  // out[j, k] += sum_t u[t, j] * drop(x)[t, k] over rows t in [t0, t1).
  // u: Acc, x.rows x r contiguous. out: Acc, r rows with row stride ldo >= round_up(x.cols,
  // kPad) (callers reduce per-thread partials).
  void (*rank_update)(const ConstMat& x, const DropoutParams& drop, const void* u, int64_t r,
                      void* out, int64_t ldo, int64_t t0, int64_t t1);
};

// mask[i] = keep(flat index i) for i in [begin, end); all true when dropout is disabled.
void dropout_mask(const DropoutParams& drop, int64_t begin, int64_t end, bool* mask);

// The kernels for this CPU (or for the instruction set chosen by select_isa).
const KernelTable& kernels();

// Chooses the instruction set by name ("avx512", "avx2", "baseline") or "auto".
// Returns false if the name is unknown or the CPU lacks it. Used by tests and benchmarks.
bool select_isa(const char* name);

}  // namespace fastlora::cpu
