// Torch-free launchers of the fused LoRA layer's CUDA kernels (called by csrc/ops/cuda.cpp).
//
// Shapes as in csrc/ops/schemas.cpp: x (T, in), A (r, in), B (out, r), xa (T, r), dy (T, out).
// Big operands (x, dy, the base of lora_up) are strided matrices of the activation dtype, read
// once; small operands (A, B, xa, dxa) are contiguous and prepared by the caller in the dtype
// each launcher names. Outputs are contiguous. Every launcher enqueues on `stream` only, never
// synchronises, and takes its temporary memory (of a size fixed by the shapes) from `scratch`.
// float32/bfloat16/float16 activations run tf32 tensor-core tiles with float32 accumulation;
// float64 runs simple exact kernels (a test dtype).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>

#include "../common/matrix.h"

namespace fastlora::cuda {

// Inverted dropout of the element with flat index t * cols + k (dropout_rng.h); the seed is
// read on the device so CUDA graphs replay with whatever the seed tensor then holds.
// seed == nullptr disables dropout.
struct Dropout {
  const int64_t* seed = nullptr;
  double p = 0.0;
};

// Device memory for one launch (bytes -> pointer, 16-byte aligned), valid until the kernels
// enqueued on the stream have run. The torch glue hands out caching-allocator blocks.
using Scratch = std::function<void*(size_t bytes)>;

// xa (T x r, x's dtype) = drop(x) a^T; a: r x in, contiguous, x's dtype.
cudaError_t lora_down(const Matrix& x, const void* a, int64_t r, const Dropout& drop, void* xa,
                      const Scratch& scratch, cudaStream_t stream);

// out (rows x cols, contiguous, out_dtype) = [base +] drop(alpha * u w) [+ bias], drop acting on
// element (t, k) of a rows x cols matrix. Two forms:
//  - w_by_rank == false (forward, lora_up): u is xa (rows x r, out_dtype), w is B (cols x r,
//    out_dtype), both contiguous;
//  - w_by_rank == true (the low-rank term of dx): u is dxa (rows x r), w is A (r x cols), both
//    contiguous in the accumulation dtype (float32; float64 for float64).
// bias: cols elements of out_dtype or null; base: rows x cols of out_dtype or null.
struct Expand {
  const void* u = nullptr;
  const void* w = nullptr;
  int64_t rows = 0, cols = 0, r = 0;
  bool w_by_rank = false;
  double alpha = 1.0;
  const void* bias = nullptr;
  const Matrix* base = nullptr;
  Dropout drop;
  DType out_dtype = DType::f32;
  void* out = nullptr;
};
cudaError_t lora_expand(const Expand& e, cudaStream_t stream);

// One pass over dy (T x out): dxa = scale dy b (T x rb) and db = scale dy^T xa (out x rx), both
// contiguous in the accumulation dtype. xa: T x rx, contiguous, dy's dtype; b: out x rb,
// contiguous, accumulation dtype. Deterministic (fixed-order reductions, no atomics).
cudaError_t lora_dy_products(const Matrix& dy, const void* xa, int64_t rx, const void* b,
                             int64_t rb, double scale, void* dxa, void* db,
                             const Scratch& scratch, cudaStream_t stream);

// da (r x in, accumulation dtype, contiguous) = dxa^T drop(x); dxa: T x r, contiguous,
// accumulation dtype. Deterministic.
cudaError_t lora_grad_A(const Matrix& x, const void* dxa, int64_t r, const Dropout& drop, void* da,
                        const Scratch& scratch, cudaStream_t stream);

}  // namespace fastlora::cuda
