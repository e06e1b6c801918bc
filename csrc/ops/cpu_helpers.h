// Glue shared by the CPU implementations of the fastlora ops (cpu.cpp, lora_pro_cpu.cpp):
// prepared small operands and deterministic parallel sums over rows.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "kernels/cpu/lora_cpu.h"

namespace fastlora::ops {

inline void check_cpu(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), "fastlora.", op, ": the CPU kernel got a tensor on ",
              x.device());
}

// m (rows x cols) as a zero-padded rows x round_up(cols, kPad) matrix of `acc`, times scale.
inline at::Tensor prepare(const at::Tensor& m, at::ScalarType acc, double scale = 1.0) {
  auto out = at::zeros({m.size(0), cpu::round_up(m.size(1), cpu::kPad)}, m.options().dtype(acc));
  auto body = out.narrow(1, 0, m.size(1));
  body.copy_(m);
  if (scale != 1.0) body.mul_(scale);
  return out;
}

// Rows per task so that a task touches at least ~64K elements.
inline int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(8, (int64_t{1} << 16) / std::max<int64_t>(cols, 1));
}

// Sums over tokens without atomics: token ranges run in parallel, each accumulating into its
// own zeroed (rows x ld) partial, and the partials are added in a fixed order (deterministic
// for a given thread count). body(t0, t1, partial) does one range.
template <class Body>
at::Tensor token_parallel_sum(int64_t tokens, int64_t cols, int64_t rows, int64_t ld,
                              const at::TensorOptions& options, const Body& body) {
  const int64_t grain = row_grain(cols);
  const int64_t chunks =
      std::clamp<int64_t>((tokens + grain - 1) / grain, 1, std::max(1, at::get_num_threads()));
  const int64_t per_chunk = (tokens + chunks - 1) / chunks;
  auto partial = at::zeros({chunks, rows, ld}, options);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t t0 = std::min(tokens, c * per_chunk);
      body(t0, std::min(tokens, t0 + per_chunk), partial[c].data_ptr());
    }
  });
  return chunks == 1 ? partial[0] : partial.sum(0);
}

}  // namespace fastlora::ops
