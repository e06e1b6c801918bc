#include "../common/dropout_rng.h"
#include "dropout_mask.cuh"

namespace fastlora::cuda {
namespace {

__global__ void dropout_mask_kernel(const int64_t* __restrict__ seed, uint32_t threshold,
                                    bool enabled, int64_t numel, bool* __restrict__ mask) {
  const uint64_t key = enabled ? dropout_key(*seed) : 0;
  const int64_t pairs = (numel + 1) / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < pairs;
       g += stride) {
    const uint64_t bits = enabled ? dropout_pair_bits(key, static_cast<uint64_t>(g)) : ~0ULL;
    mask[2 * g] = static_cast<uint32_t>(bits) >= threshold;
    if (2 * g + 1 < numel) mask[2 * g + 1] = static_cast<uint32_t>(bits >> 32) >= threshold;
  }
}

}  // namespace

cudaError_t launch_dropout_mask(const int64_t* seed, double dropout_p, int64_t numel, bool* mask,
                                cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride loop covers the rest
  const int64_t pairs = (numel + 1) / 2;
  const int64_t blocks = (pairs + kThreads - 1) / kThreads;
  const bool enabled = dropout_p > 0.0;
  dropout_mask_kernel<<<static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kThreads,
                        0, stream>>>(seed, dropout_threshold(dropout_p), enabled, numel, mask);
  return cudaGetLastError();
}

}  // namespace fastlora::cuda
