// out = [base +] drop(alpha u w) [+ bias]: the rank-r term written once, as the C operand of
// the frozen GEMM that follows (y = x W^T + C, dx = dy W + C) or, for lora_up, added to y.
// Each block computes a 64 x 128 tile of out from u's 64 rows and w's 128 columns (K = r, in
// chunks of 32) on tf32 tensor cores, then applies alpha, dropout, bias and base and writes
// 16-byte vectors. The output write is the kernel's only large memory traffic.
#include "f64.cuh"
#include "tile.cuh"

namespace fastlora::cuda {
namespace {

using namespace detail;

constexpr int kEM = 64, kEN = 128;   // output tile
constexpr int kRK = 32;              // ranks per staged chunk
constexpr int kLdu = kRK + 4;        // u chunk: kEM x kRK
constexpr int kLdwRank = kEN + 4;    // w chunk stored [j][n] (w_by_rank: A)
constexpr int kLdwCol = kRK + 4;     // w chunk stored [n][j] (B)
constexpr int kLdo = kEN + 4;
constexpr int kUFloats = kEM * kLdu;
constexpr int kWFloats = kRK * kLdwRank > kEN * kLdwCol ? kRK * kLdwRank : kEN * kLdwCol;
constexpr int kOutFloats = kEM * kLdo;
constexpr size_t kSmem = sizeof(float) * (kUFloats + kWFloats > kOutFloats ? kUFloats + kWFloats : kOutFloats);

template <class Tr, bool kByRank>
struct ExpandArgs {
  using Ur = std::conditional_t<kByRank, F32, Tr>;  // dxa and A are float32; xa and B are Tr
  Operand<Ur> u;     // rows x r
  Operand<Ur> w;     // r x cols (kByRank) or cols x r
  Operand<Tr> base;  // rows x cols; p == nullptr: none
  const typename Tr::raw* bias;
  typename Tr::raw* out;
  bool out_vec;      // out's rows can be written as aligned 16-byte vectors
  float alpha;
  DropoutArgs drop;
};

template <class Tr, bool kByRank>
__global__ void __launch_bounds__(kThreads, kMinBlocks) expand_kernel(ExpandArgs<Tr, kByRank> p) {
  using Ur = typename ExpandArgs<Tr, kByRank>::Ur;
  // xa and B are exact in tf32 unless float32; dxa (float32) keeps its precision, and A's tf32
  // rounding (2^-12) is below a 16-bit result's.
  constexpr bool kSplitU = kByRank || kIsF32<Tr>, kSplitW = kIsF32<Tr>;
  extern __shared__ __align__(128) float smem[];
  float* us = smem;
  float* ws = smem + kUFloats;
  const int64_t rows = p.u.rows, r = p.u.cols, cols = kByRank ? p.w.cols : p.w.rows;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kEM, n0 = static_cast<int64_t>(blockIdx.y) * kEN;
  const int warp = threadIdx.x / 32, mi = warp % 4;  // row tile; column tiles warp / 4 + 2 i
  Acc acc[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) wmma::fill_fragment(acc[i], 0.f);

  for (int64_t j0 = 0; j0 < r; j0 += kRK) {
    {
      TileStage<Ur, kEM, kRK> ut;
      ut.load(p.u, t0, j0);
      ut.store(us, kLdu, t0, j0, 0, DeviceDropout{});
      if constexpr (kByRank) {
        TileStage<F32, kRK, kEN> wt;
        wt.load(p.w, j0, n0);
        wt.store(ws, kLdwRank, j0, n0, 0, DeviceDropout{});
      } else {
        TileStage<Tr, kEN, kRK> wt;
        wt.load(p.w, n0, j0);
        wt.store(ws, kLdwCol, n0, j0, 0, DeviceDropout{});
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int nj = warp / 4 + 2 * i;
      rows_times<kRK, kSplitU, kSplitW, kByRank>(acc[i], us + mi * 16 * kLdu, kLdu,
                                               kByRank ? ws + nj * 16 : ws + nj * 16 * kLdwCol,
                                               kByRank ? kLdwRank : kLdwCol);
    }
    __syncthreads();
  }

  float* os = smem;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    wmma::store_matrix_sync(os + mi * 16 * kLdo + (warp / 4 + 2 * i) * 16, acc[i], kLdo, wmma::mem_row_major);
  __syncthreads();

  constexpr int kVec = Pack<Tr>::kVec, kPerRow = kEN / kVec;
  const DeviceDropout drop = device_dropout(p.drop);
  for (int v = threadIdx.x; v < kEM * kPerRow; v += kThreads) {
    const int row = v / kPerRow, col = (v % kPerRow) * kVec;
    const int64_t t = t0 + row, k = n0 + col;
    if (t >= rows || k >= cols) continue;
    float f[kVec];
#pragma unroll
    for (int q = 0; q < kVec; ++q) f[q] = p.alpha * os[row * kLdo + col + q];
    if (drop.on) apply_dropout(f, drop, static_cast<uint64_t>(t) * cols + k, drop.scale);
    if (p.bias != nullptr) {
#pragma unroll
      for (int q = 0; q < kVec; ++q)
        if (k + q < cols) f[q] += Tr::load(p.bias[k + q]);
    }
    if (p.base.p != nullptr) {
      Pack<Tr> b;
      load_pack(p.base, t, k, b);
#pragma unroll
      for (int q = 0; q < kVec; ++q) f[q] += Tr::load(b.e[q]);
    }
    Pack<Tr> o;
#pragma unroll
    for (int q = 0; q < kVec; ++q) o.e[q] = Tr::store(f[q]);
    typename Tr::raw* dst = p.out + t * cols + k;
    if (p.out_vec && k + kVec <= cols) {
      *reinterpret_cast<uint4*>(dst) = o.u;
    } else {
#pragma unroll
      for (int q = 0; q < kVec; ++q)
        if (k + q < cols) dst[q] = o.e[q];
    }
  }
}

template <class Tr, bool kByRank>
cudaError_t launch_expand(const Expand& e, cudaStream_t stream) {
  using A = ExpandArgs<Tr, kByRank>;
  using Ur = typename A::Ur;
  A p;
  p.u = contiguous<Ur>(e.u, e.rows, e.r);
  p.w = kByRank ? contiguous<Ur>(e.w, e.r, e.cols) : contiguous<Ur>(e.w, e.cols, e.r);
  p.base = e.base != nullptr ? operand<Tr>(*e.base) : Operand<Tr>{};
  p.bias = static_cast<const typename Tr::raw*>(e.bias);
  p.out = static_cast<typename Tr::raw*>(e.out);
  p.out_vec = contiguous<Tr>(e.out, e.rows, e.cols).vec;
  p.alpha = static_cast<float>(e.alpha);
  p.drop = dropout_args(e.drop);
  constexpr auto kernel = expand_kernel<Tr, kByRank>;
  if (cudaError_t err = allow_smem<kernel>(kSmem); err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(e.rows, kEM)), static_cast<unsigned>(ceil_div(e.cols, kEN)));
  kernel<<<grid, kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t lora_expand(const Expand& e, cudaStream_t stream) {
  if (e.out_dtype == DType::f64) return f64::expand(e, stream);
  if (e.rows == 0 || e.cols == 0) return cudaSuccess;
  return with_activation(e.out_dtype, [&](auto tr) {
    using Tr = decltype(tr);
    return e.w_by_rank ? launch_expand<Tr, true>(e, stream) : launch_expand<Tr, false>(e, stream);
  });
}

}  // namespace fastlora::cuda
