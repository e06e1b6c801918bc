// Tensors as the plain structs the torch-free kernels take. The CPU and CUDA kernels each define
// a dtype enum (f64, f32, bf16, f16) and a strided-matrix struct {data, rows, cols, s0, s1,
// dtype} with the same members, so one template serves both glue files.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastlora::ops {

template <class DType>
DType kernel_dtype(at::ScalarType s) {
  switch (s) {
    case at::kDouble: return DType::f64;
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: TORCH_CHECK(false, "fastlora: unsupported dtype ", s);
  }
}

// A 2-D tensor as Mat (cpu::ConstMat, cuda::Matrix).
template <class Mat>
Mat kernel_matrix(const at::Tensor& t) {
  return {t.data_ptr(), t.size(0), t.size(1), t.stride(0), t.stride(1),
          kernel_dtype<decltype(Mat::dtype)>(t.scalar_type())};
}

}  // namespace fastlora::ops
