// dxa = s dy B and dB = s dy^T xa from one pass over dy.
//
// Fused kernel (ranks <= 32): block (c, g, z) owns columns [c*CO, +CO) of dy, the rows of row
// group g and ranks [z*RC, +RC). It streams its rows in 32-row tiles; each tile feeds
//   dB^T[ranks, cols] += xa_tile^T dy_tile   (accumulated in registers over the whole group) and
//   dxa[rows, ranks]   = dy_tile B[cols, :]   (a partial over this block's columns, stored).
// dxa partials (one per column chunk) and dB partials (one per row group) are then added in a
// fixed order by a second small kernel: deterministic, no atomics. Those partials cost
// ~2 r sqrt(blocks * T * out) floats of traffic, which beats a second pass over dy only for
// small ranks; wider ranks use two single-product kernels (rows_product and rank_product).
#include "f64.cuh"
#include "products.cuh"
#include "tile.cuh"

namespace fastlora::cuda {
namespace {

using namespace detail;

template <int RT>
struct DyShape {
  static constexpr int kRC = 16 * RT;
  static constexpr int kCO = 256;  // columns of dy per block
  static constexpr int kBM = 32;   // rows per tile
  static constexpr int kLdd = kCO + 4, kLdr = kRC + 4;
  // The 2*RT dxa tiles of a row tile; with fewer tiles than warps each is summed by kSlices
  // warps over slices of the columns, and the slices are added in order.
  static constexpr int kDxaTiles = 2 * RT;
  static constexpr int kSlices = kWarps / kDxaTiles;
  static_assert(kSlices >= 1 && kDxaTiles * kSlices == kWarps, "fused kernel: RT must be 1 or 2");
  static constexpr int kDy = kBM * kLdd, kXa = kBM * kLdr, kB = kCO * kLdr, kDxa = kSlices * kBM * kLdr;
  static constexpr size_t kDb = RankUpdate<RT, kCO, kBM, false, false>::kBufFloats;
  static constexpr size_t kSmem = sizeof(float) * (kDy + kXa + kB + kDxa > kDb ? kDy + kXa + kB + kDxa : kDb);
};

template <class Tr, int RT>
__global__ void __launch_bounds__(kThreads, kIsF32<Tr> ? 1 : kMinBlocks)
    dy_products_kernel(Operand<Tr> dy, Operand<Tr> xa, Operand<F32> b, int64_t rows_per_group,
                       float* __restrict__ dxa_part, float* __restrict__ db_part) {
  using S = DyShape<RT>;
  constexpr bool kSplit = kIsF32<Tr>;
  extern __shared__ __align__(128) float smem[];
  float* ds = smem;
  float* xs = ds + S::kDy;
  float* bs = xs + S::kXa;
  float* dxs = bs + S::kB;
  const int64_t T = dy.rows, n = dy.cols, rx = xa.cols, rb = b.cols;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * S::kCO, j0 = static_cast<int64_t>(blockIdx.z) * S::kRC;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * rows_per_group;
  const int64_t t_end = min(T, t_begin + rows_per_group);
  const int warp = threadIdx.x / 32;
  // This warp's dxa tile (row tile mi, rank tile nj) and column slice.
  const int tile = warp % S::kDxaTiles, slice = warp / S::kDxaTiles, mi = tile % 2, nj = tile / 2;
  constexpr int kSliceCols = S::kCO / S::kSlices;

  {  // B's rows for this block's columns, for the whole kernel (visible after the first barrier)
    TileStage<F32, S::kCO, S::kRC> bt;
    bt.load(b, o0, j0);
    bt.store(bs, S::kLdr, o0, j0, 0, DeviceDropout{});
  }
  RankUpdate<RT, S::kCO, S::kBM, kSplit, kSplit> db;  // dB^T = xa^T dy over this row group
  db.zero();
  // Per staged tile: dB's sums, then this block's partial dxa of the tile's rows.
  auto tile_products = [&](int64_t t) {
    db.accumulate(xs, S::kLdr, ds, S::kLdd);
    Acc dxa;
    wmma::fill_fragment(dxa, 0.f);
    rows_times<kSliceCols, kSplit, true, true>(dxa, ds + mi * 16 * S::kLdd + slice * kSliceCols, S::kLdd,
                                               bs + slice * kSliceCols * S::kLdr + nj * 16, S::kLdr);
    wmma::store_matrix_sync(dxs + (slice * S::kBM + mi * 16) * S::kLdr + nj * 16, dxa, S::kLdr,
                            wmma::mem_row_major);
    __syncthreads();
    for (int e = threadIdx.x; e < S::kBM * S::kRC; e += kThreads) {
      const int row = e / S::kRC, j = e % S::kRC;
      const int64_t tt = t + row, jr = j0 + j;
      if (tt >= t_end || jr >= rb) continue;
      float sum = 0.f;
#pragma unroll
      for (int q = 0; q < S::kSlices; ++q) sum += dxs[(q * S::kBM + row) * S::kLdr + j];
      dxa_part[(static_cast<int64_t>(blockIdx.x) * T + tt) * rb + jr] = sum;
    }
  };
  stream_row_tiles<S::kBM, S::kCO, S::kRC>(dy, xa, t_begin, t_end, o0, j0, DeviceDropout{}, ds, S::kLdd, xs,
                                           S::kLdr, tile_products);
  db.write(smem, db_part + static_cast<int64_t>(blockIdx.y) * rx * n, rx, n, j0, o0);
}

// dxa[t, j] = s sum_c dxa_part[c][t][j]; db[o, j] = s sum_g db_part[g][j][o] (one launch).
__global__ void __launch_bounds__(kThreads)
    dy_products_sum_kernel(const float* __restrict__ dxa_part, int64_t chunks, int64_t dxa_count,
                           const float* __restrict__ db_part, int64_t groups, int64_t rx, int64_t n,
                           float scale, float* __restrict__ dxa, float* __restrict__ db) {
  const int64_t total = dxa_count + n * rx, stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
    if (i < dxa_count) {
      dxa[i] = scale * partial_sum(dxa_part, chunks, dxa_count, i);
    } else {
      const int64_t q = i - dxa_count;
      db[q] = scale * transposed_sum(db_part, groups, rx, n, q / rx, q % rx);
    }
  }
}

template <class Tr, int RT>
cudaError_t launch_fused(const Matrix& dy, const void* xa, int64_t rx, const void* b, int64_t rb, float scale,
                         float* dxa, float* db, const Scratch& scratch, cudaStream_t stream) {
  using S = DyShape<RT>;
  const int64_t T = dy.rows, n = dy.cols;
  constexpr auto kernel = dy_products_kernel<Tr, RT>;
  if (cudaError_t err = allow_smem<kernel>(S::kSmem); err != cudaSuccess) return err;
  int64_t resident = 1;
  if (cudaError_t err = resident_blocks<kernel>(S::kSmem, &resident); err != cudaSuccess) return err;
  const int64_t chunks = ceil_div(n, S::kCO), ranks = ceil_div(rx > rb ? rx : rb, S::kRC);
  const int64_t row_tiles = ceil_div(T, S::kBM);
  // One wave of resident blocks: more row groups would only add dB partials.
  const int64_t per_group = group_size(row_tiles, ceil_div(resident, chunks * ranks));
  const int64_t groups = ceil_div(row_tiles, per_group);
  const int64_t dxa_count = T * rb;
  auto* dxa_part = static_cast<float*>(scratch(sizeof(float) * (chunks * dxa_count + groups * rx * n)));
  float* db_part = dxa_part + chunks * dxa_count;
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(groups), static_cast<unsigned>(ranks));
  kernel<<<grid, kThreads, S::kSmem, stream>>>(operand<Tr>(dy), contiguous<Tr>(xa, T, rx), contiguous<F32>(b, n, rb),
                                               per_group * S::kBM, dxa_part, db_part);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  dy_products_sum_kernel<<<elementwise_blocks(dxa_count + n * rx), kThreads, 0, stream>>>(
      dxa_part, chunks, dxa_count, db_part, groups, rx, n, scale, dxa, db);
  return cudaGetLastError();
}

}  // namespace

cudaError_t lora_dy_products(const Matrix& dy, const void* xa, int64_t rx, const void* b,
                             int64_t rb, double scale, void* dxa, void* db,
                             const Scratch& scratch, cudaStream_t stream) {
  if (dy.dtype == DType::f64)
    return f64::dy_products(dy, static_cast<const double*>(xa), rx, static_cast<const double*>(b), rb, scale,
                            static_cast<double*>(dxa), static_cast<double*>(db), stream);
  const int64_t T = dy.rows, n = dy.cols;
  if (T == 0 || n == 0) {  // empty sums
    if (cudaError_t err = cudaMemsetAsync(dxa, 0, sizeof(float) * T * rb, stream); err != cudaSuccess) return err;
    return cudaMemsetAsync(db, 0, sizeof(float) * n * rx, stream);
  }
  auto* dxa_f = static_cast<float*>(dxa);
  auto* db_f = static_cast<float*>(db);
  if (rx <= 32 && rb <= 32) {
    return with_activation(dy.dtype, [&](auto tr) {
      return with_rank_tiles<1, 2>(rx > rb ? rx : rb, [&](auto rt) {
        return launch_fused<decltype(tr), decltype(rt)::value>(dy, xa, rx, b, rb, static_cast<float>(scale), dxa_f,
                                                                db_f, scratch, stream);
      });
    });
  }
  if (cudaError_t err = detail::rows_product(dy, b, DType::f32, true, rb, Dropout{}, scale, DType::f32, dxa, scratch,
                                             stream);
      err != cudaSuccess)
    return err;
  return detail::rank_product(dy, xa, dy.dtype, rx, Dropout{}, scale, true, db_f, scratch, stream);
}

}  // namespace fastlora::cuda
