// out = alpha drop(x) w^T (T x r): each block owns 64 rows of x and up to 128 ranks and streams
// its rows once in 64 x 64 tiles (dropout applied as a tile is staged, the next tile's loads in
// flight during the products), with w's matching tile beside it in shared memory. When there
// are too few row blocks to fill the GPU, the columns of x are split over blocks as well
// (split-K) and a second kernel adds the float32 partial sums in a fixed order.
#include "f64.cuh"
#include "products.cuh"
#include "tile.cuh"

namespace fastlora::cuda {
namespace detail {
namespace {

constexpr int kBM = 64;  // rows of x per block
constexpr int kBK = 64;  // columns of x per tile

template <bool kWByK, int RT>
struct RowsShape {
  static constexpr int kRC = 16 * RT;  // ranks per block
  static constexpr int kLdx = kBK + 4;
  static constexpr int kLdw = kWByK ? kRC + 4 : kBK + 4;  // w tile stored [k][j] or [j][k]
  static constexpr int kWFloats = kWByK ? kBK * kLdw : kRC * kLdw;
  static constexpr int kLdo = kRC + 4;
  static constexpr int kTiles = kBM * kLdx + kWFloats;
  static constexpr int kOut = kBM * kLdo;
  static constexpr size_t kSmem = sizeof(float) * (kTiles > kOut ? kTiles : kOut);
};

// w: r x n (kWByK false) or n x r (true). Block (row block, split, rank chunk).
template <class Xr, class Wr, class Or, bool kWByK, int RT>
__global__ void __launch_bounds__(kThreads, RT >= 8 && (kIsF32<Xr> || kIsF32<Wr>) ? 1 : kMinBlocks)
    rows_kernel(Operand<Xr> x, Operand<Wr> w, DropoutArgs drop_args, int64_t k_per_split, float alpha,
                typename Or::raw* __restrict__ out, float* __restrict__ partial) {
  using S = RowsShape<kWByK, RT>;
  extern __shared__ __align__(128) float smem[];
  float* xs = smem;
  float* ws = smem + kBM * S::kLdx;
  const int64_t T = x.rows, n = x.cols, r = kWByK ? w.cols : w.rows;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * k_per_split;
  const int64_t k_end = min(n, k_begin + k_per_split);
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * S::kRC;
  const DeviceDropout drop = device_dropout(drop_args);
  // Warp w owns row tile w % 4 and rank tiles w / 4, w / 4 + 2, ...
  const int warp = threadIdx.x / 32, mi = warp % 4;
  constexpr int kPerWarp = (RT + 1) / 2;
  Acc acc[kPerWarp];
#pragma unroll
  for (int i = 0; i < kPerWarp; ++i) wmma::fill_fragment(acc[i], 0.f);

  TileStage<Xr, kBM, kBK> xt;
  std::conditional_t<kWByK, TileStage<Wr, kBK, S::kRC>, TileStage<Wr, S::kRC, kBK>> wt;
  auto load = [&](int64_t k) {
    xt.load(x, t0, k);
    if constexpr (kWByK) wt.load(w, k, j0); else wt.load(w, j0, k);
  };
  if (k_begin < k_end) load(k_begin);
  for (int64_t k = k_begin; k < k_end; k += kBK) {
    xt.store(xs, S::kLdx, t0, k, n, drop);
    if constexpr (kWByK) wt.store(ws, S::kLdw, k, j0, 0, DeviceDropout{});
    else wt.store(ws, S::kLdw, j0, k, 0, DeviceDropout{});
    __syncthreads();
    if (k + kBK < k_end) load(k + kBK);
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) {
      const int nj = warp / 4 + 2 * i;
      if (nj < RT)
        rows_times<kBK, kIsF32<Xr>, kIsF32<Wr>, kWByK>(
            acc[i], xs + mi * 16 * S::kLdx, S::kLdx, kWByK ? ws + nj * 16 : ws + nj * 16 * S::kLdw, S::kLdw);
    }
    __syncthreads();
  }

  float* os = smem;  // the tiles are dead: kBM x kLdo results
#pragma unroll
  for (int i = 0; i < kPerWarp; ++i) {
    const int nj = warp / 4 + 2 * i;
    if (nj < RT) wmma::store_matrix_sync(os + mi * 16 * S::kLdo + nj * 16, acc[i], S::kLdo, wmma::mem_row_major);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kBM * S::kRC; e += kThreads) {
    const int row = e / S::kRC, j = e % S::kRC;
    const int64_t t = t0 + row, jr = j0 + j;
    if (t >= T || jr >= r) continue;
    const float v = os[row * S::kLdo + j];
    if (partial != nullptr) partial[(static_cast<int64_t>(blockIdx.y) * T + t) * r + jr] = v;
    else out[t * r + jr] = Or::store(alpha * v);
  }
}

template <class Xr, class Wr, class Or, bool kWByK, int RT>
cudaError_t launch_rows(const Matrix& x, const void* w, int64_t r, const Dropout& drop, float alpha,
                        void* out, const Scratch& scratch, cudaStream_t stream) {
  using S = RowsShape<kWByK, RT>;
  const int64_t T = x.rows, n = x.cols;
  constexpr auto kernel = rows_kernel<Xr, Wr, Or, kWByK, RT>;
  if (cudaError_t err = allow_smem<kernel>(S::kSmem); err != cudaSuccess) return err;
  int64_t resident = 1;
  if (cudaError_t err = resident_blocks<kernel>(S::kSmem, &resident); err != cudaSuccess) return err;
  const int64_t row_blocks = ceil_div(T, kBM), chunks = ceil_div(r, S::kRC), k_tiles = ceil_div(n, kBK);
  // Split K until every SM holds as many blocks as fit: enough loads in flight to stream x.
  const int64_t per_split = group_size(k_tiles, ceil_div(resident, row_blocks * chunks));
  const int64_t splits = ceil_div(k_tiles, per_split);
  float* partial = splits > 1 ? static_cast<float*>(scratch(sizeof(float) * splits * T * r)) : nullptr;
  const Operand<Wr> wop = kWByK ? contiguous<Wr>(w, n, r) : contiguous<Wr>(w, r, n);
  auto* o = static_cast<typename Or::raw*>(out);
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits), static_cast<unsigned>(chunks));
  kernel<<<grid, kThreads, S::kSmem, stream>>>(operand<Xr>(x), wop, dropout_args(drop), per_split * kBK, alpha, o,
                                               partial);
  if (splits > 1) {
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    sum_partials_kernel<Or><<<elementwise_blocks(T * r), kThreads, 0, stream>>>(partial, splits, T * r, alpha, o);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t rows_product(const Matrix& x, const void* w, DType w_dtype, bool w_by_k, int64_t r,
                         const Dropout& drop, double alpha, DType out_dtype, void* out,
                         const Scratch& scratch, cudaStream_t stream) {
  if (x.rows == 0) return cudaSuccess;
  if (x.cols == 0) return cudaMemsetAsync(out, 0, x.rows * r * element_size(out_dtype), stream);
  const auto a = static_cast<float>(alpha * dropout_scale(drop));
  return with_activation(x.dtype, [&](auto xr) -> cudaError_t {
    using Xr = decltype(xr);
    if (!w_by_k && w_dtype == x.dtype && out_dtype == x.dtype)  // xa = drop(x) A^T
      return with_rank_tiles(r, [&](auto rt) {
        return launch_rows<Xr, Xr, Xr, false, decltype(rt)::value>(x, w, r, drop, a, out, scratch, stream);
      });
    // dxa = s dy B on lora_dy_products' two-pass path (ranks above 32, so RT >= 4 suffices)
    if (w_by_k && w_dtype == DType::f32 && out_dtype == DType::f32)
      return with_rank_tiles<4>(r, [&](auto rt) {
        return launch_rows<Xr, F32, F32, true, decltype(rt)::value>(x, w, r, drop, a, out, scratch, stream);
      });
    return cudaErrorInvalidValue;
  });
}

}  // namespace detail

cudaError_t lora_down(const Matrix& x, const void* a, int64_t r, const Dropout& drop, void* xa,
                      const Scratch& scratch, cudaStream_t stream) {
  if (x.dtype == DType::f64)
    return f64::down(x, static_cast<const double*>(a), r, drop, static_cast<double*>(xa), stream);
  return detail::rows_product(x, a, x.dtype, false, r, drop, 1.0, x.dtype, xa, scratch, stream);
}

}  // namespace fastlora::cuda
