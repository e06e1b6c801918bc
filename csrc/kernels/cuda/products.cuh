// The two skinny-product kernels shared by several ops (internal to csrc/kernels/cuda).
#pragma once

#include "lora_cuda.cuh"

namespace fastlora::cuda::detail {

// out (T x r, contiguous, out_dtype) = alpha drop(x) w^T for x (T x n), with w (r x n) given
// either as itself (w_by_k == false, contiguous r x n) or as its transpose (w_by_k == true,
// contiguous n x r). One pass over x. Used for xa = drop(x) A^T (w = A in x's dtype, out in
// x's dtype) and for dxa = s dy B (w = B, float32, out float32).
cudaError_t rows_product(const Matrix& x, const void* w, DType w_dtype, bool w_by_k, int64_t r,
                         const Dropout& drop, double alpha, DType out_dtype, void* out,
                         const Scratch& scratch, cudaStream_t stream);

// out = alpha u^T drop(x) as an r x n float32 matrix, or its transpose (n x r) when
// `transposed`; x (T x n), u (T x r, contiguous, float32 or x's dtype). One pass over x,
// deterministic. Used for dA = dxa^T drop(x) and dB = s (xa^T dy)^T.
cudaError_t rank_product(const Matrix& x, const void* u, DType u_dtype, int64_t r,
                         const Dropout& drop, double alpha, bool transposed, float* out,
                         const Scratch& scratch, cudaStream_t stream);

}  // namespace fastlora::cuda::detail
