// Tensors as the descriptor the torch-free kernels take (kernels/common/matrix.h), for the CPU
// and the CUDA glue alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "kernels/common/matrix.h"

namespace fastlora::ops {

inline DType kernel_dtype(at::ScalarType s) {
  switch (s) {
    case at::kDouble: return DType::f64;
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: TORCH_CHECK(false, "fastlora: unsupported dtype ", s);
  }
}

// A 2-D tensor as the kernels' strided matrix.
inline Matrix kernel_matrix(const at::Tensor& t) {
  return {t.data_ptr(), t.size(0), t.size(1), t.stride(0), t.stride(1), kernel_dtype(t.scalar_type())};
}

}  // namespace fastlora::ops
