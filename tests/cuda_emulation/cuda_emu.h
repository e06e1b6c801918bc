// Host emulation of the CUDA features the fastlora kernels use, for tests/test_cuda_emulated.py:
// a block's threads are std::threads sharing one shared-memory buffer (poisoned) and a
// std::barrier for __syncthreads; blocks run one after another. It checks a kernel's indexing,
// tiling and synchronisation logic on machines without a GPU; it says nothing about speed, and
// races between threads show up only by chance.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
struct dim3 { unsigned x = 1, y = 1, z = 1; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct float4 { float x, y, z, w; };
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
typedef int cudaError_t;
constexpr int cudaSuccess = 0, cudaErrorInvalidValue = 1;
typedef void* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
inline int emu_sm_count = 132;
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = emu_sm_count; return 0; }
template <class F> cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return 0; }
inline cudaError_t cudaGetLastError() { return 0; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return 0; }
// kernel<<<grid, threads, smem, stream>>>(args) becomes emu_launch(grid, threads, smem, [&] { kernel(args); }).
inline void emu_launch(dim3 grid, unsigned threads, size_t smem, const std::function<void()>& body) {
  gridDim = grid; blockDim = dim3(threads);
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::vector<unsigned char> mem(smem + 16);  // poisoned: a kernel must write what it reads
      std::memset(mem.data(), 0xff, mem.size());
      std::barrier<> bar(threads);
      std::vector<std::thread> ts;
      for (unsigned t = 0; t < threads; ++t)
        ts.emplace_back([&, t] {
          threadIdx = dim3(t); blockIdx = dim3(bx, by);
          emu_smem = mem.data(); emu_barrier = &bar;
          body();
        });
      for (auto& th : ts) th.join();
    }
}
