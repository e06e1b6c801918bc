// Torch-free CUDA launcher for the fused LoRA-Pro moment pass (the CPU kernel's LoraProMoments
// in kernels/cpu/lora_cpu.h computes the same function; docs/lora_pro.md gives the formulas).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../common/lora_pro_scalars.h"
#include "../common/matrix.h"

namespace fastlora::cuda {

// Largest rank the kernel takes: its per-block accumulators live in shared memory.
// python/fastlora/backends/registry.py mirrors these limits (larger ranks run the reference).
constexpr int64_t kLoraProMaxRank = 128;     // float32 / bfloat16 moments (float32 math)
constexpr int64_t kLoraProMaxRankF64 = 32;   // float64 moments (float64 math)

// Device pointers; Acc is double for float64 moments, float otherwise.
struct LoraProMomentsArgs {
  void* exp_avg = nullptr;     // rows x cols, contiguous
  void* exp_avg_sq = nullptr;  // rows x cols, contiguous
  DType moments = DType::f32;  // f64, f32 or bf16
  int64_t rows = 0, cols = 0, r = 0;
  const void* u = nullptr;  // rows x 2r, Acc, contiguous: [B | gB0]
  const void* v = nullptr;  // 2r x cols, Acc, contiguous: [gA0; A]
  LoraProScalars s;  // g = s.scale * u v
  void* grad_a = nullptr;  // r x cols, Acc, contiguous: scale * B^T D
  void* grad_b = nullptr;  // rows x r, Acc, contiguous: scale * D A^T
};

// Bytes of scratch the launch needs on `device` (per-block partial sums, reduced in a fixed
// order so the result is deterministic), or SIZE_MAX when the rank is above the limit.
size_t lora_pro_moments_workspace(const LoraProMomentsArgs& args, int device);

// Two kernels on `stream`: the fused pass, then the reduction of its partials into grad_a and
// grad_b. `workspace` holds lora_pro_moments_workspace(args, device) bytes.
cudaError_t launch_lora_pro_moments(const LoraProMomentsArgs& args, void* workspace, int device,
                                    cudaStream_t stream);

}  // namespace fastlora::cuda
