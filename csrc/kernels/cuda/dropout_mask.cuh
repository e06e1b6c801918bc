// Torch-free CUDA launcher for the dropout keep-mask (the same function as the CPU kernels).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastlora::cuda {

// mask[i] = keep(flat index i) for i < numel. The seed is read on the device (CUDA graphs
// replay with whatever the seed tensor then holds); it may be null when dropout_p == 0.
cudaError_t launch_dropout_mask(const int64_t* seed, double dropout_p, int64_t numel, bool* mask,
                                cudaStream_t stream);

}  // namespace fastlora::cuda
