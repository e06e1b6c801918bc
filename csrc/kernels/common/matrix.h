// The operand descriptor of every torch-free kernel, CPU and CUDA: a strided 2-D matrix of one
// of the four float dtypes. The torch glue fills it from an at::Tensor (ops/kernel_args.h).
#pragma once

#include <cstdint>

namespace fastlora {

// The element types the kernels read and write; the values are part of the host-emulated CUDA
// tests' interface (tests/test_cuda_emulated.py passes them as ints).
enum class DType : int { f64 = 0, f32 = 1, bf16 = 2, f16 = 3 };

// Element (i, j) at data + i * s0 + j * s1: strides in elements, >= 0 (0 broadcasts, e.g. the
// gradient of a sum). Read-only: outputs are contiguous buffers the kernels document.
struct Matrix {
  const void* data = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t s0 = 0, s1 = 0;
  DType dtype = DType::f32;
};

}  // namespace fastlora
