// Host emulation of the CUDA features the fastlora kernels use, for tests/backends/test_cuda_emulated.py:
// a block's threads are std::threads sharing one shared-memory buffer (poisoned) and a
// std::barrier for __syncthreads; blocks run one after another over a 3-D grid. It checks a
// kernel's indexing, tiling and synchronisation logic on machines without a GPU; it says nothing
// about speed, and races between threads show up only by chance. WMMA fragments hold their whole
// matrix in every thread of the warp (each thread computes the warp's product itself), so element
// loops over fragment.x and the loads, products and stores agree as on the GPU.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <type_traits>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__  // a register-pressure hint; libstdc++ uses the name in its own attributes
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
struct dim3 { unsigned x = 1, y = 1, z = 1; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct float4 { float x, y, z, w; };
struct uint4 { unsigned x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
template <class T> T __ldg(const T* p) { return *p; }
using std::max;
using std::min;
struct double2 { double x, y; };
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 gridDim, blockDim;
inline thread_local unsigned char* emu_smem;
inline thread_local std::barrier<>* emu_barrier;
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
using std::fma;
using std::sqrt;
// bfloat16 and float16 as their bits; conversions round to nearest even (as __float2*_rn).
struct __nv_bfloat16 { uint16_t bits; };
struct __half { uint16_t bits; };
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = __float_as_uint(f);
  if (std::isnan(f)) return {0x7fc0};
  return {static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline __half __float2half_rn(float f) { const _Float16 h = static_cast<_Float16>(f); __half r; std::memcpy(&r.bits, &h, 2); return r; }
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return static_cast<float>(f); }
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
// Tensor-core fragments (see the note at the top) with tf32 inputs and float accumulators.
namespace nvcuda::wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
struct row_major {}; struct col_major {};
namespace precision { struct tf32 {}; }
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {  // element (i, j) at x[i * kCols + j]
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = kRows * kCols;
  float x[num_elements];
};
template <class F> void fill_fragment(F& f, float v) { std::fill(f.x, f.x + F::num_elements, v); }
template <class Use, int M, int N, int K, class T, class Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const float* p, unsigned ld) {
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int i = 0; i < F::kRows; ++i)
    for (int j = 0; j < F::kCols; ++j)
      f.x[i * F::kCols + j] = std::is_same_v<Layout, row_major> ? p[i * ld + j] : p[j * ld + i];
}
template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ld, layout_t layout) {
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) (layout == mem_row_major ? p[i * ld + j] : p[j * ld + i]) = f.x[i * N + j];
}
template <int M, int N, int K, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, precision::tf32, LA>& a,
              const fragment<matrix_b, M, N, K, precision::tf32, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float sum = c.x[i * N + j];
      for (int k = 0; k < K; ++k) sum += a.x[i * K + k] * b.x[k * N + j];
      out[i * N + j] = sum;
    }
  std::memcpy(d.x, out, sizeof(out));
}
// cvt.rna.tf32.f32: 10 mantissa bits, ties away from zero.
inline float __float_to_tf32(float f) {
  if (!std::isfinite(f)) return f;
  return __uint_as_float((__float_as_uint(f) + 0x1000u) & ~0x1fffu);
}
}  // namespace nvcuda::wmma
typedef int cudaError_t;
constexpr int cudaSuccess = 0, cudaErrorInvalidValue = 1;
typedef void* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
inline int emu_sm_count = 132, emu_blocks_per_sm = 2;
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = emu_sm_count; return 0; }
template <class F> cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F, int, size_t) {
  *n = emu_blocks_per_sm;
  return 0;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t bytes, cudaStream_t) { std::memset(p, v, bytes); return 0; }
template <class F> cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return 0; }
inline cudaError_t cudaGetLastError() { return 0; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return 0; }
// kernel<<<grid, threads, smem, stream>>>(args) becomes emu_launch(grid, threads, smem, [&] { kernel(args); }).
inline void emu_launch(dim3 grid, unsigned threads, size_t smem, const std::function<void()>& body) {
  gridDim = grid; blockDim = dim3(threads);
  for (unsigned bz = 0; bz < grid.z; ++bz)
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::vector<unsigned char> mem(smem + 16);  // poisoned: a kernel must write what it reads
      std::memset(mem.data(), 0xff, mem.size());
      std::barrier<> bar(threads);
      std::vector<std::thread> ts;
      for (unsigned t = 0; t < threads; ++t)
        ts.emplace_back([&, t] {
          threadIdx = dim3(t); blockIdx = dim3(bx, by, bz);
          emu_smem = mem.data(); emu_barrier = &bar;
          body();
        });
      for (auto& th : ts) th.join();
    }
}
