// out = alpha u^T drop(x) (r x n, or its transpose): block (c, g, z) owns columns [c*CO, +CO)
// of x, the rows of row group g and ranks [z*RC, +RC); it streams its rows once in 32-row tiles
// (dropout applied as they are staged, the next tile's loads in flight) into register
// accumulators, then stores its float32 partial. A second kernel adds the row groups' partials
// in a fixed order. Partials are r x n per row group, small next to x for the ranks of LoRA.
#include "f64.cuh"
#include "products.cuh"
#include "tile.cuh"

namespace fastlora::cuda {
namespace detail {
namespace {

template <int RT>
struct RankShape {
  static constexpr int kRC = 16 * RT;
  static constexpr int kCO = RT <= 4 ? 256 : 128;  // columns per block; accumulators stay in registers
  static constexpr int kBM = 32;                   // rows per tile
  static constexpr int kLdx = kCO + 4, kLdu = kRC + 4;
  static constexpr size_t kTiles = kBM * kLdx + kBM * kLdu;
  static constexpr size_t kOut = RankUpdate<RT, kCO, kBM, false, false>::kBufFloats;
  static constexpr size_t kSmem = sizeof(float) * (kTiles > kOut ? kTiles : kOut);
};

template <class Xr, class Ur, int RT>
__global__ void __launch_bounds__(kThreads, kIsF32<Xr> || kIsF32<Ur> || RT >= 4 ? 1 : kMinBlocks)
    rank_kernel(Operand<Xr> x, Operand<Ur> u, DropoutArgs drop_args, int64_t rows_per_group,
                float* __restrict__ part) {
  using S = RankShape<RT>;
  extern __shared__ __align__(128) float smem[];
  float* xs = smem;
  float* us = smem + S::kBM * S::kLdx;
  const int64_t T = x.rows, n = x.cols, r = u.cols;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * S::kCO, j0 = static_cast<int64_t>(blockIdx.z) * S::kRC;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * rows_per_group;
  const int64_t t_end = min(T, t_begin + rows_per_group);
  const DeviceDropout drop = device_dropout(drop_args);
  RankUpdate<RT, S::kCO, S::kBM, kIsF32<Ur>, kIsF32<Xr>> acc;
  acc.zero();
  stream_row_tiles<S::kBM, S::kCO, S::kRC>(x, u, t_begin, t_end, k0, j0, drop, xs, S::kLdx, us, S::kLdu,
                                           [&](int64_t) { acc.accumulate(us, S::kLdu, xs, S::kLdx); });
  acc.write(smem, part + static_cast<int64_t>(blockIdx.y) * r * n, r, n, j0, k0);
}

// out[k, j] = alpha * sum_g part[g][j][k] (n x r).
__global__ void __launch_bounds__(kThreads)
    transposed_sum_kernel(const float* __restrict__ part, int64_t groups, int64_t r, int64_t n, float alpha,
                          float* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n * r; i += stride)
    out[i] = alpha * transposed_sum(part, groups, r, n, i / r, i % r);
}

template <class Xr, class Ur, int RT>
cudaError_t launch_rank(const Matrix& x, const void* u, int64_t r, const Dropout& drop, float alpha,
                        bool transposed, float* out, const Scratch& scratch, cudaStream_t stream) {
  using S = RankShape<RT>;
  const int64_t T = x.rows, n = x.cols;
  constexpr auto kernel = rank_kernel<Xr, Ur, RT>;
  if (cudaError_t err = allow_smem<kernel>(S::kSmem); err != cudaSuccess) return err;
  int64_t resident = 1;
  if (cudaError_t err = resident_blocks<kernel>(S::kSmem, &resident); err != cudaSuccess) return err;
  const int64_t chunks = ceil_div(n, S::kCO), ranks = ceil_div(r, S::kRC), row_tiles = ceil_div(T, S::kBM);
  // One wave of resident blocks; more row groups would only add partials.
  const int64_t per_group = group_size(row_tiles, ceil_div(resident, chunks * ranks));
  const int64_t groups = ceil_div(row_tiles, per_group);
  auto* part = static_cast<float*>(scratch(sizeof(float) * groups * r * n));
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(groups), static_cast<unsigned>(ranks));
  kernel<<<grid, kThreads, S::kSmem, stream>>>(operand<Xr>(x), contiguous<Ur>(u, T, r), dropout_args(drop),
                                               per_group * S::kBM, part);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  if (transposed)
    transposed_sum_kernel<<<elementwise_blocks(n * r), kThreads, 0, stream>>>(part, groups, r, n, alpha, out);
  else
    sum_partials_kernel<F32><<<elementwise_blocks(r * n), kThreads, 0, stream>>>(part, groups, r * n, alpha,
                                                                                 reinterpret_cast<uint32_t*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t rank_product(const Matrix& x, const void* u, DType u_dtype, int64_t r,
                         const Dropout& drop, double alpha, bool transposed, float* out,
                         const Scratch& scratch, cudaStream_t stream) {
  if (x.cols == 0) return cudaSuccess;
  if (x.rows == 0) return cudaMemsetAsync(out, 0, sizeof(float) * r * x.cols, stream);
  const auto a = static_cast<float>(alpha * dropout_scale(drop));
  return with_activation(x.dtype, [&](auto xr) -> cudaError_t {
    using Xr = decltype(xr);
    if (u_dtype == DType::f32)  // dA = dxa^T drop(x) (and dB for float32 activations)
      return with_rank_tiles(r, [&](auto rt) {
        return launch_rank<Xr, F32, decltype(rt)::value>(x, u, r, drop, a, transposed, out, scratch, stream);
      });
    // dB of lora_dy_products' two-pass path (ranks above 32, so RT >= 4 suffices)
    if (u_dtype == x.dtype)
      return with_rank_tiles<4>(r, [&](auto rt) {
        return launch_rank<Xr, Xr, decltype(rt)::value>(x, u, r, drop, a, transposed, out, scratch, stream);
      });
    return cudaErrorInvalidValue;
  });
}

}  // namespace detail

cudaError_t lora_grad_A(const Matrix& x, const void* dxa, int64_t r, const Dropout& drop, void* da,
                        const Scratch& scratch, cudaStream_t stream) {
  if (x.dtype == DType::f64)
    return f64::grad_A(x, static_cast<const double*>(dxa), r, drop, static_cast<double*>(da), stream);
  return detail::rank_product(x, dxa, DType::f32, r, drop, 1.0, false, static_cast<float*>(da), scratch, stream);
}

}  // namespace fastlora::cuda
