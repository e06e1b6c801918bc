// Host-side checks of csrc/kernels/cuda/tile.cuh, run at build time by CMake when nvcc is
// present (no GPU needed): the vectorised dropout against the scalar definition, the operand
// layout flags and the work-splitting helpers. Exits non-zero on the first failure.
#include <cstdio>
#include <cstdlib>

#include "kernels/cuda/tile.cuh"

using namespace fastlora;
using namespace fastlora::cuda;
using namespace fastlora::cuda::detail;

#define CHECK(...)                                                                   \
  do {                                                                               \
    if (!(__VA_ARGS__)) {                                                            \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #__VA_ARGS__); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

template <int N>
void check_dropout(uint64_t key, uint32_t threshold, uint64_t f0) {
  DeviceDropout d;
  d.key = key;
  d.threshold = threshold;
  d.scale = 2.f;
  d.on = true;
  float v[N];
  for (int q = 0; q < N; ++q) v[q] = static_cast<float>(q + 1);
  apply_dropout(v, d, f0, 2.f);
  for (int q = 0; q < N; ++q) CHECK(v[q] == (dropout_keep(key, threshold, f0 + q) ? 2.f * (q + 1) : 0.f));
}

int main() {
  // Even and odd first indices (odd row lengths), for both vector widths.
  for (uint64_t seed = 0; seed < 50; ++seed) {
    const uint64_t key = dropout_key(static_cast<int64_t>(seed));
    for (uint32_t threshold : {0u, dropout_threshold(0.05), dropout_threshold(0.5), dropout_threshold(0.99)}) {
      for (uint64_t f0 : {0ull, 1ull, 6ull, 7ull, 1ull << 33, (1ull << 33) + 5}) {
        check_dropout<4>(key, threshold, f0);
        check_dropout<8>(key, threshold, f0);
      }
    }
  }
  // Host dropout parameters match the CPU kernels'.
  const DropoutArgs a = dropout_args(Dropout{reinterpret_cast<const int64_t*>(8), 0.25});
  CHECK(a.threshold == make_dropout(0.25, 1).threshold && a.scale == 1.0 / 0.75 && dropout_scale(Dropout{}) == 1.0);

  // 16-byte vectors only where every row starts aligned and rows are contiguous.
  alignas(16) static uint16_t buf[64];
  CHECK(operand<BF16>(buf, 4, 8, 8, 1).vec);
  CHECK(!operand<BF16>(buf + 1, 4, 8, 8, 1).vec);   // misaligned start
  CHECK(!operand<BF16>(buf, 4, 7, 7, 1).vec);       // row length not a multiple of 8
  CHECK(!operand<BF16>(buf, 4, 8, 1, 4).vec);       // transposed
  CHECK(operand<BF16>(buf, 4, 8, 0, 1).vec);        // broadcast rows
  CHECK(operand<F32>(buf, 4, 4, 4, 1).vec && !operand<F32>(buf, 4, 6, 6, 1).vec);

  // Work splitting: groups cover every tile, none is empty, grid extents stay 16-bit.
  for (int64_t tiles : {1ll, 2ll, 7ll, 64ll, 1000ll, 70000ll, 5000000ll}) {
    for (int64_t want : {-3ll, 0ll, 1ll, 5ll, 528ll, 100000ll}) {
      const int64_t size = group_size(tiles, want), groups = ceil_div(tiles, size);
      CHECK(size >= 1 && groups >= 1 && groups <= 65535 && (groups - 1) * size < tiles && groups * size >= tiles);
      if (want >= 1 && want <= tiles && want <= 65535) CHECK(groups <= want);
    }
  }
  // Rank tiles: the fewest covering r within the bounds.
  const auto count = [](auto rt) { return static_cast<cudaError_t>(decltype(rt)::value); };
  const auto tiles_for = [&](int64_t r) { return with_rank_tiles(r, count); };
  CHECK(tiles_for(1) == 1 && tiles_for(16) == 1 && tiles_for(17) == 2 && tiles_for(33) == 4 && tiles_for(64) == 4);
  CHECK(tiles_for(65) == 8 && tiles_for(1000) == 8);
  CHECK(with_rank_tiles<4>(3, count) == 4);
  CHECK(with_rank_tiles<1, 2>(100, count) == 2);
  std::puts("tile_host_test: all checks passed");
  return 0;
}
