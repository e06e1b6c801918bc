// Counter-based dropout masks shared by the CPU and CUDA kernels.
//
// The keep/drop decision for element (t, k) of a T x n matrix is a pure function of
// (seed, t * n + k), so backward regenerates exactly the mask forward used and nothing is
// stored. The generator is SplitMix64's output function applied to a counter
// (state = key + group * gamma), which passes BigCrush as a sequence; each 64-bit hash
// gives two 32-bit lanes, so the drop probability is resolved to 2^-32.
// python/fastlora/_numerics.py implements the same function in PyTorch; tests compare them.
#pragma once

#include <cstdint>

// Internal linkage on the host: the CPU kernels are compiled once per instruction set, and a
// shared inline definition could let the linker hand an AVX-512 copy to the baseline build.
#if defined(__CUDACC__)
#define FASTLORA_HD static __host__ __device__ __forceinline__
#else
#define FASTLORA_HD static inline
#endif

namespace fastlora {

constexpr uint64_t kGoldenGamma = 0x9e3779b97f4a7c15ULL;

FASTLORA_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Per-call key from the user-visible seed (adjacent seeds give unrelated streams).
FASTLORA_HD uint64_t dropout_key(int64_t seed) {
  return mix64(static_cast<uint64_t>(seed) + kGoldenGamma);
}

// Elements with a 32-bit draw below the threshold are dropped; p in [0, 1).
FASTLORA_HD uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;  // p * 2^32
  if (t <= 0.0) return 0u;
  if (t >= 4294967295.0) return 0xffffffffu;
  return static_cast<uint32_t>(t + 0.5);
}

// The two 32-bit draws of the pair of elements (2g, 2g + 1) in flat index order.
FASTLORA_HD uint64_t dropout_pair_bits(uint64_t key, uint64_t group) {
  return mix64(key + group * kGoldenGamma);
}

FASTLORA_HD bool dropout_keep(uint64_t key, uint32_t threshold, uint64_t flat_index) {
  const uint64_t bits = dropout_pair_bits(key, flat_index >> 1);
  const uint32_t draw = static_cast<uint32_t>((flat_index & 1) ? (bits >> 32) : bits);
  return draw >= threshold;
}

// Everything a kernel needs to apply inverted dropout; enabled == false means identity.
struct DropoutParams {
  uint64_t key = 0;
  uint32_t threshold = 0;
  double scale = 1.0;  // 1 / (1 - p)
  bool enabled = false;
};

static inline DropoutParams make_dropout(double p, int64_t seed) {
  DropoutParams d;
  if (p > 0.0) {
    d.key = dropout_key(seed);
    d.threshold = dropout_threshold(p);
    d.scale = 1.0 / (1.0 - p);
    d.enabled = true;
  }
  return d;
}

}  // namespace fastlora
