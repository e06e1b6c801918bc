// Building blocks of the tiled LoRA kernels (internal to csrc/kernels/cuda).
//
// - Activation dtypes as raw bits (F32, BF16, F16): global memory is read and written as
//   integers and converted with bit operations, so no kernel needs arithmetic on CUDA half types.
// - TileStage: a tile of a strided operand, global -> registers -> shared memory as float. The
//   split lets a kernel issue the next tile's loads before computing on the current one. Rows
//   that are contiguous and 16-byte aligned are read as 16-byte vectors, anything else element by
//   element; dropout is applied on the way into shared memory.
// - tf32 tensor-core products (WMMA 16x16x8) with float32 accumulation. A float32 operand that
//   must keep float32 accuracy is split into hi = tf32(v) and lo = tf32(v - hi) (22 significant
//   bits) and multiplied as hi*hi + hi*lo + lo*hi; bfloat16/float16 values are exact in tf32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "../common/dropout_rng.h"
#include "lora_cuda.cuh"
#include "smem.cuh"

namespace fastlora::cuda::detail {

constexpr int kThreads = 256;  // every tiled kernel runs 8 warps per block
constexpr int kWarps = kThreads / 32;
// Two resident blocks per SM at least: caps registers at 128 a thread, so the unrolled tile
// products cannot crowd out the other block whose loads hide memory latency. Instantiations
// whose state does not fit 128 registers (float32 operands split into two tf32 halves, many rank
// tiles) ask for one block instead: ptxas spilled them, and a spill fails the build. Launchers
// size their grids from the occupancy a kernel gets (resident_blocks), so either way fills the GPU.
constexpr int kMinBlocks = 2;

// ---- dtypes --------------------------------------------------------------------------------

struct F32 {
  using raw = uint32_t;
  static __device__ __forceinline__ float load(raw b) { return __uint_as_float(b); }
  static __device__ __forceinline__ raw store(float v) { return __float_as_uint(v); }
};
struct BF16 {
  using raw = uint16_t;
  static __device__ __forceinline__ float load(raw b) { return __uint_as_float(uint32_t(b) << 16); }
  static __device__ __forceinline__ raw store(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};
struct F16 {
  using raw = uint16_t;
  static __device__ __forceinline__ float load(raw b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ raw store(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <class Tr>
constexpr bool kIsF32 = std::is_same_v<Tr, F32>;

inline size_t element_size(DType d) {
  return d == DType::f64 ? 8 : d == DType::f32 ? 4 : 2;
}

// ---- operands ------------------------------------------------------------------------------

// A read-only strided matrix of Tr. vec: rows are contiguous and every row starts 16-byte
// aligned, so aligned 16-byte vectors of a row can be loaded whole.
template <class Tr>
struct Operand {
  const typename Tr::raw* p;
  int64_t rows, cols, s0, s1;
  bool vec;
};

template <class Tr>
Operand<Tr> operand(const void* data, int64_t rows, int64_t cols, int64_t s0, int64_t s1) {
  const auto size = static_cast<int64_t>(sizeof(typename Tr::raw));
  const bool vec = s1 == 1 && reinterpret_cast<uintptr_t>(data) % 16 == 0 && (s0 * size) % 16 == 0;
  return {static_cast<const typename Tr::raw*>(data), rows, cols, s0, s1, vec};
}

template <class Tr>
Operand<Tr> operand(const Matrix& m) {
  return operand<Tr>(m.data, m.rows, m.cols, m.s0, m.s1);
}

template <class Tr>
Operand<Tr> contiguous(const void* data, int64_t rows, int64_t cols) {
  return operand<Tr>(data, rows, cols, cols, 1);
}

// One 16-byte vector of raw elements.
template <class Tr>
union Pack {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(typename Tr::raw));
  uint4 u;
  typename Tr::raw e[kVec];
};

// Elements (i, j .. j + kVec) of m one by one, zero outside it: edges, odd strides and
// misaligned rows. Not inlined, so that its address arithmetic does not take registers from
// the vector path around it; arguments and result by value, so that nothing needs the stack.
template <class Tr>
__device__ __noinline__ uint4 load_pack_elementwise(Operand<Tr> m, int64_t i, int64_t j) {
  Pack<Tr> out;
#pragma unroll
  for (int q = 0; q < Pack<Tr>::kVec; ++q)
    out.e[q] = (i < m.rows && j + q < m.cols) ? __ldg(m.p + i * m.s0 + (j + q) * m.s1) : typename Tr::raw(0);
  return out.u;
}

// Elements (i, j .. j + kVec) of m, zero outside it.
template <class Tr>
__device__ __forceinline__ void load_pack(const Operand<Tr>& m, int64_t i, int64_t j, Pack<Tr>& out) {
  if (i < m.rows && m.vec && j + Pack<Tr>::kVec <= m.cols)
    out.u = __ldg(reinterpret_cast<const uint4*>(m.p + i * m.s0 + j));
  else
    out.u = load_pack_elementwise(m, i, j);
}

// ---- dropout -------------------------------------------------------------------------------

// What a kernel receives; seed == nullptr disables dropout.
struct DropoutArgs {
  const int64_t* seed = nullptr;
  uint32_t threshold = 0;
  double scale = 1.0;
};

inline DropoutArgs dropout_args(const Dropout& d) {
  DropoutArgs a;
  if (d.seed != nullptr && d.p > 0.0) {
    a.seed = d.seed;
    a.threshold = dropout_threshold(d.p);
    a.scale = 1.0 / (1.0 - d.p);
  }
  return a;
}

// 1 / (1 - p), or 1 without dropout. Staged tiles hold mask * x, exact in tf32 for 16-bit x
// (x / (1 - p) would not be), and the kernels scale their sums by this instead.
inline double dropout_scale(const Dropout& d) { return dropout_args(d).scale; }

struct DeviceDropout {
  uint64_t key = 0;
  uint32_t threshold = 0;
  float scale = 1.f;
  bool on = false;
};

__device__ __forceinline__ DeviceDropout device_dropout(const DropoutArgs& a) {
  DeviceDropout d;
  if (a.seed != nullptr) {
    d.key = dropout_key(*a.seed);
    d.threshold = a.threshold;
    d.scale = static_cast<float>(a.scale);
    d.on = true;
  }
  return d;
}

// v[q] <- keep(f0 + q) ? v[q] * kept : 0 for N consecutive flat indices. Dropped values are
// exactly zero, also where v is infinite or NaN. (Host-callable for tests/cuda_host.)
template <int N>
__host__ __device__ __forceinline__ void apply_dropout(float (&v)[N], const DeviceDropout& d, uint64_t f0,
                                                       float kept) {
  if ((f0 & 1) == 0) {  // the usual case (even row length): one hash gives two draws
#pragma unroll
    for (int q = 0; q < N; q += 2) {
      const uint64_t bits = dropout_pair_bits(d.key, (f0 + q) >> 1);
      v[q] = static_cast<uint32_t>(bits) >= d.threshold ? v[q] * kept : 0.f;
      if (q + 1 < N) v[q + 1] = static_cast<uint32_t>(bits >> 32) >= d.threshold ? v[q + 1] * kept : 0.f;
    }
  } else {
#pragma unroll
    for (int q = 0; q < N; ++q) v[q] = dropout_keep(d.key, d.threshold, f0 + q) ? v[q] * kept : 0.f;
  }
}

// ---- tile staging --------------------------------------------------------------------------

// The BR x BC tile at (r0, c0) of an operand: load() reads it into registers, store() writes
// it to shared memory as float (row-major, leading dimension ld, a multiple of 4), with the
// dropout mask of a matrix with `cols` columns applied (not the 1 / (1 - p) scale; see
// dropout_scale). Elements outside the operand are zero.
template <class Tr, int BR, int BC>
struct TileStage {
  static constexpr int kVec = Pack<Tr>::kVec;
  static constexpr int kPerRow = BC / kVec;
  static constexpr int kVectors = BR * kPerRow;
  static constexpr int kSlots = (kVectors + kThreads - 1) / kThreads;
  static_assert(BC % kVec == 0, "a tile row must be a whole number of 16-byte vectors");
  Pack<Tr> slot[kSlots];

  __device__ __forceinline__ void load(const Operand<Tr>& m, int64_t r0, int64_t c0) {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int v = threadIdx.x + s * kThreads;
      if (v < kVectors) load_pack(m, r0 + v / kPerRow, c0 + (v % kPerRow) * kVec, slot[s]);
    }
  }

  __device__ __forceinline__ void store(float* sm, int ld, int64_t r0, int64_t c0, int64_t cols,
                                        const DeviceDropout& drop) const {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int v = threadIdx.x + s * kThreads;
      if (v >= kVectors) continue;
      const int row = v / kPerRow, col = (v % kPerRow) * kVec;
      float f[kVec];
#pragma unroll
      for (int q = 0; q < kVec; ++q) f[q] = Tr::load(slot[s].e[q]);
      if (drop.on) apply_dropout(f, drop, static_cast<uint64_t>(r0 + row) * cols + (c0 + col), 1.f);
      float4* dst = reinterpret_cast<float4*>(sm + row * ld + col);
#pragma unroll
      for (int q = 0; q < kVec; q += 4) dst[q / 4] = make_float4(f[q], f[q + 1], f[q + 2], f[q + 3]);
    }
  }
};

// Streams rows [t_begin, t_end) of x (columns [c0, +CO), with x's dropout mask) and of u
// (columns [j0, +RC)) in BM-row tiles staged row-major into shared memory (xs, ldx; us, ldu),
// the next tile's loads in flight while body(t) works on the staged tile between barriers.
template <int BM, int CO, int RC, class Xr, class Ur, class Body>
__device__ __forceinline__ void stream_row_tiles(const Operand<Xr>& x, const Operand<Ur>& u, int64_t t_begin,
                                                 int64_t t_end, int64_t c0, int64_t j0, const DeviceDropout& drop,
                                                 float* xs, int ldx, float* us, int ldu, Body&& body) {
  TileStage<Xr, BM, CO> xt;
  TileStage<Ur, BM, RC> ut;
  xt.load(x, t_begin, c0);
  ut.load(u, t_begin, j0);
  for (int64_t t = t_begin; t < t_end; t += BM) {
    xt.store(xs, ldx, t, c0, x.cols, drop);
    ut.store(us, ldu, t, j0, 0, DeviceDropout{});
    __syncthreads();
    if (t + BM < t_end) {
      xt.load(x, t + BM, c0);
      ut.load(u, t + BM, j0);
    }
    body(t);
    __syncthreads();
  }
}

// ---- tf32 tensor-core products -------------------------------------------------------------

namespace wmma = nvcuda::wmma;
using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

// A tf32 operand fragment loaded from float shared memory (pointer 32-byte aligned, ld a
// multiple of 4); with kSplit also the rounding remainder.
template <class Use, class Layout, bool kSplit>
struct Tf32 {
  static constexpr bool split = kSplit;
  wmma::fragment<Use, 16, 16, 8, wmma::precision::tf32, Layout> hi, lo;

  __device__ __forceinline__ void load(const float* p, int ld) {
    wmma::load_matrix_sync(hi, p, static_cast<unsigned>(ld));
#pragma unroll
    for (int i = 0; i < hi.num_elements; ++i) {
      const float v = hi.x[i];
      hi.x[i] = wmma::__float_to_tf32(v);
      if constexpr (kSplit) lo.x[i] = wmma::__float_to_tf32(v - hi.x[i]);
    }
  }
};

// c += a b (lo * lo is below float32 resolution and skipped).
template <class A, class B>
__device__ __forceinline__ void mma(Acc& c, const A& a, const B& b) {
  if constexpr (A::split) wmma::mma_sync(c, a.lo, b.hi, c);
  if constexpr (B::split) wmma::mma_sync(c, a.hi, b.lo, c);
  wmma::mma_sync(c, a.hi, b.hi, c);
}

// acc += X W over K (a multiple of 8): x points at 16 rows of a row-major float tile (ldx), w
// at 16 columns of a float tile stored [k][n] (kWRowMajor) or [n][k].
template <int K, bool kSplitX, bool kSplitW, bool kWRowMajor>
__device__ __forceinline__ void rows_times(Acc& acc, const float* x, int ldx, const float* w, int ldw) {
  using WLayout = std::conditional_t<kWRowMajor, wmma::row_major, wmma::col_major>;
#pragma unroll 2
  for (int k = 0; k < K; k += 8) {
    Tf32<wmma::matrix_a, wmma::row_major, kSplitX> a;
    Tf32<wmma::matrix_b, WLayout, kSplitW> b;
    a.load(x + k, ldx);
    b.load(kWRowMajor ? w + k * ldw : w + k, ldw);
    mma(acc, a, b);
  }
}

// The (16*RT) x CO sum U^T X over many row tiles: each call adds the BM rows staged in shared
// memory, U (BM x 16*RT, ldu) and X (BM x CO, ldx), both row-major float. The RT x CO/16
// accumulator tiles are spread over the warps and live in registers between calls.
template <int RT, int CO, int BM, bool kSplitU, bool kSplitX>
struct RankUpdate {
  static constexpr int kColTiles = CO / 16;
  static constexpr int kPerWarp = RT * kColTiles / kWarps;
  static_assert(RT * kColTiles % kWarps == 0, "the accumulator tiles must divide among the warps");
  Acc acc[kPerWarp];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) wmma::fill_fragment(acc[i], 0.f);
  }

  __device__ __forceinline__ void accumulate(const float* u, int ldu, const float* x, int ldx) {
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) {
      const int tile = threadIdx.x / 32 + i * kWarps, rt = tile / kColTiles, ct = tile % kColTiles;
#pragma unroll 1
      for (int k = 0; k < BM; k += 8) {
        Tf32<wmma::matrix_a, wmma::col_major, kSplitU> a;  // U^T: element (j, t) at u[t * ldu + j]
        Tf32<wmma::matrix_b, wmma::row_major, kSplitX> b;
        a.load(u + k * ldu + rt * 16, ldu);
        b.load(x + k * ldx + ct * 16, ldx);
        mma(acc[i], a, b);
      }
    }
  }

  // Writes the sum to rows [j0, +16*RT) and columns [c0, +CO) of a rows x cols float32 matrix in
  // global memory (what lies outside it is dropped), through `buf`: (16*RT) x (CO + 4) floats of
  // shared memory that no warp uses any more.
  static constexpr size_t kBufFloats = 16 * RT * (CO + 4);
  __device__ __forceinline__ void write(float* buf, float* out, int64_t rows, int64_t cols, int64_t j0,
                                        int64_t c0) const {
    constexpr int kLd = CO + 4;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) {
      const int tile = threadIdx.x / 32 + i * kWarps, rt = tile / kColTiles, ct = tile % kColTiles;
      wmma::store_matrix_sync(buf + rt * 16 * kLd + ct * 16, acc[i], kLd, wmma::mem_row_major);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < 16 * RT * CO; e += kThreads) {
      const int j = e / CO, c = e % CO;
      if (j0 + j < rows && c0 + c < cols) out[(j0 + j) * cols + c0 + c] = buf[j * kLd + c];
    }
  }
};

// ---- host-side helpers ---------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline cudaError_t sm_count(int* count) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
  return err;
}

// Blocks of kKernel (kThreads threads, `smem` bytes of dynamic shared memory, already allowed)
// resident on the whole GPU at once, as the occupancy calculator finds for the compiled kernel:
// its register count decides, not an assumed number per SM. Asked once per kernel and device
// (smem is fixed per kernel), so a CUDA graph capture makes no such call.
template <auto kKernel>
cudaError_t resident_blocks(size_t smem, int64_t* blocks) {
  static std::atomic<int> per_sm_of[64]{};  // per device; 0: not asked yet
  int device = 0, sms = 1;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  if (cudaError_t err = sm_count(&sms); err != cudaSuccess) return err;
  int per_sm = device < 64 ? per_sm_of[device].load(std::memory_order_relaxed) : 0;
  if (per_sm == 0) {
    if (cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, kThreads, smem);
        err != cudaSuccess)
      return err;
    per_sm = per_sm > 1 ? per_sm : 1;
    if (device < 64) per_sm_of[device].store(per_sm, std::memory_order_relaxed);
  }
  *blocks = static_cast<int64_t>(sms) * per_sm;
  return cudaSuccess;
}

// Splits `tiles` units of work into at most `want` contiguous groups; returns the group size
// (groups = ceil_div(tiles, size), none empty).
inline int64_t group_size(int64_t tiles, int64_t want) {
  const int64_t most = tiles < 65535 ? tiles : 65535;  // a grid's y and z extents are 16-bit
  return ceil_div(tiles, want < 1 ? 1 : (want > most ? most : want));
}

// Calls f(Tr{}) for a float32/bfloat16/float16 activation dtype.
template <class F>
cudaError_t with_activation(DType d, F&& f) {
  switch (d) {
    case DType::f32: return f(F32{});
    case DType::bf16: return f(BF16{});
    case DType::f16: return f(F16{});
    default: return cudaErrorInvalidValue;
  }
}

// Calls f(std::integral_constant<int, RT>{}) with RT 16-wide rank tiles per block: the fewest
// of 1, 2, 4, 8 in [kMin, kMax] covering r, else kMax (wider ranks take several blocks). The
// bounds keep instantiations a caller never needs (or cannot use) from being compiled.
template <int kMin = 1, int kMax = 8, class F>
cudaError_t with_rank_tiles(int64_t r, F&& f) {
  if constexpr (kMin <= 1 && kMax > 1) if (r <= 16) return f(std::integral_constant<int, 1>{});
  if constexpr (kMin <= 2 && kMax > 2) if (r <= 32) return f(std::integral_constant<int, 2>{});
  if constexpr (kMin <= 4 && kMax > 4) if (r <= 64) return f(std::integral_constant<int, 4>{});
  return f(std::integral_constant<int, kMax>{});
}

// Grid for the elementwise kernels below.
inline unsigned elementwise_blocks(int64_t n) {
  const int64_t b = ceil_div(n, kThreads);
  return static_cast<unsigned>(b < 1 ? 1 : (b > 8192 ? 8192 : b));
}

// Sums of per-block float32 partials, always in the same order (deterministic):
// element i of `parts` stacked arrays of `count` elements ...
__device__ __forceinline__ float partial_sum(const float* part, int64_t parts, int64_t count, int64_t i) {
  float sum = 0.f;
  for (int64_t s = 0; s < parts; ++s) sum += part[s * count + i];
  return sum;
}

// ... and element (k, j) of the transpose of `parts` stacked r x n arrays.
__device__ __forceinline__ float transposed_sum(const float* part, int64_t parts, int64_t r, int64_t n,
                                                int64_t k, int64_t j) {
  float sum = 0.f;
  for (int64_t s = 0; s < parts; ++s) sum += part[(s * r + j) * n + k];
  return sum;
}

// out[i] = alpha * partial_sum(i) in Or.
template <class Or>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const float* __restrict__ part, int64_t parts, int64_t count, float alpha,
                        typename Or::raw* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < count; i += stride)
    out[i] = Or::store(alpha * partial_sum(part, parts, count, i));
}

}  // namespace fastlora::cuda::detail
