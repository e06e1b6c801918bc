// Opting kernels into large dynamic shared memory, once per kernel and device.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace fastlora::cuda {

// Dynamic shared memory above 48 KiB must be opted into per kernel and device (all ours stay
// below the 99 KiB that every sm_80+ GPU offers). Done once per device, at the first launch, so
// that a CUDA graph capture (which follows a warm-up) makes no attribute calls.
template <auto kKernel>
cudaError_t allow_smem(size_t bytes) {
  static std::atomic<uint64_t> done{0};  // bit d: set on device d
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) done.fetch_or(bit, std::memory_order_release);
  return err;
}

}  // namespace fastlora::cuda
