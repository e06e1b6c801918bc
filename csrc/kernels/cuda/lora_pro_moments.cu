// The fused LoRA-Pro moment pass on CUDA.
//
// A block of 256 threads owns a region of rt x ct tiles of 64 x 64 moments. Per tile:
//  1. g = u v for the tile, each thread a 4 x 4 micro-tile (rows 4ty..4ty+3, columns tx + 16b,
//     so a warp reads whole 32-byte sectors of each moment row), from 16-wide chunks of the
//     rank-2r factors staged in shared memory;
//  2. the moments are read, updated and written once, and D goes to shared memory;
//  3. the pull-back products B^T D (summed over the tile's rows) and D A^T (over its columns)
//     accumulate in shared memory across the region's tiles.
// The region's partial sums go to a workspace, and a second kernel adds them up in a fixed
// order: no atomics, so the result is the same bits on every run (DDP ranks stay identical).
#include <cstdint>

#include "lora_pro_moments.cuh"
#include "smem.cuh"

namespace fastlora::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTM = 64;            // tile rows
constexpr int kTN = 64;            // tile columns
constexpr int kRC = 16;            // rank chunk
constexpr int kUsLd = kTM + 4;     // u chunk, transposed: kRC x kUsLd (padded against conflicts)
constexpr int kAsLd = kRC + 4;     // A chunk, transposed: kTN x kAsLd
constexpr int kDsLd = kTN + 1;     // D tile: kTM x kDsLd
constexpr int kUsSize = kRC * kUsLd;  // also holds the sb chunk, kTM x kRC
constexpr int kVsSize = kTN * kAsLd;  // v chunk kRC x kTN, or A chunk kTN x kAsLd
constexpr int kDsSize = kTM * kDsLd;
constexpr size_t kSmemLimit = 96 * 1024;  // fits every sm_80+ GPU's opt-in shared memory
static_assert(kUsSize >= kTM * kRC && kVsSize >= kRC * kTN, "shared buffers too small");
static_assert(kUsSize % 4 == 0 && kVsSize % 4 == 0 && kDsSize % 4 == 0, "16-byte sections");

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t rank_pad(int64_t r) { return ceil_div(r, kRC) * kRC; }

// Bfloat16 moments are stored as their bit patterns (rounded to nearest even, NaN kept quiet),
// exactly as the CPU kernels do.
struct bf16_bits {
  uint16_t bits;
};

__device__ __forceinline__ float load_moment(const bf16_bits* p) {
  return __uint_as_float(static_cast<uint32_t>(p->bits) << 16);
}
__device__ __forceinline__ float load_moment(const float* p) { return *p; }
__device__ __forceinline__ double load_moment(const double* p) { return *p; }

__device__ __forceinline__ void store_moment(bf16_bits* p, float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    p->bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  p->bits = static_cast<uint16_t>(u >> 16);
}
__device__ __forceinline__ void store_moment(float* p, float f) { *p = f; }
__device__ __forceinline__ void store_moment(double* p, double f) { *p = f; }

// Four consecutive shared-memory values (16-byte aligned for float).
__device__ __forceinline__ void load4(const float* p, float out[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
}
__device__ __forceinline__ void load4(const double* p, double out[4]) {
  const double2 a = *reinterpret_cast<const double2*>(p);
  const double2 b = *reinterpret_cast<const double2*>(p + 2);
  out[0] = a.x, out[1] = a.y, out[2] = b.x, out[3] = b.y;
}

// dst[i * si + jj * sj] = u[row0 + i, j0 + jj] for the tile's kTM rows and a kRC-wide chunk of
// columns, zero beyond `rows` or column `limit` (u: rows x ld, row-major).
template <class Acc>
__device__ __forceinline__ void stage_rows(Acc* dst, int si, int sj, const Acc* __restrict__ u,
                                           int64_t ld, int64_t row0, int64_t rows, int j0,
                                           int limit) {
  for (int e = threadIdx.x; e < kTM * kRC; e += kThreads) {
    const int i = e / kRC, jj = e % kRC;
    const int64_t row = row0 + i;
    dst[i * si + jj * sj] = (row < rows && j0 + jj < limit) ? u[row * ld + j0 + jj] : Acc(0);
  }
}

// dst[c * sc + jj * sj] = v[j0 + jj, col0 + c] for the tile's kTN columns and kRC rows of v,
// zero beyond `cols` or row `limit` (v: row-major with `cols` columns).
template <class Acc>
__device__ __forceinline__ void stage_cols(Acc* dst, int sc, int sj, const Acc* __restrict__ v,
                                           int64_t col0, int64_t cols, int j0, int limit) {
  for (int e = threadIdx.x; e < kRC * kTN; e += kThreads) {
    const int jj = e / kTN, c = e % kTN;
    const int64_t col = col0 + c;
    dst[c * sc + jj * sj] = (col < cols && j0 + jj < limit) ? v[(j0 + jj) * cols + col] : Acc(0);
  }
}

template <class Acc>
size_t smem_bytes(int64_t r, int rt) {
  const int64_t rp = rank_pad(r);
  return sizeof(Acc) * static_cast<size_t>(kUsSize + kVsSize + kDsSize + rp * kTN + rt * kTM * rp);
}

template <class M, class Acc>
__global__ void __launch_bounds__(kThreads)
    moments_kernel(LoraProMomentsArgs a, LoraProCoefficients<Acc> k, int rt, int ct, Acc* __restrict__ pw,
                   Acc* __restrict__ qw) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t rows = a.rows, cols = a.cols;
  const int r = static_cast<int>(a.r), r2 = 2 * r, rp = static_cast<int>(rank_pad(a.r));
  const Acc* __restrict__ u = static_cast<const Acc*>(a.u);
  const Acc* __restrict__ v = static_cast<const Acc*>(a.v);
  M* __restrict__ exp_avg = static_cast<M*>(a.exp_avg);
  M* __restrict__ exp_avg_sq = static_cast<M*>(a.exp_avg_sq);
  Acc* us = reinterpret_cast<Acc*>(smem_raw);
  Acc* vs = us + kUsSize;
  Acc* ds = vs + kVsSize;
  Acc* ps = ds + kDsSize;  // rp x kTN: B^T D of the current column tile
  Acc* qs = ps + rp * kTN;  // (rt * kTM) x rp: D A^T of the region's rows
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int lane64 = tid & 63, jg = (tid >> 6) * 4;  // step 3: a row or column, 4 ranks
  const int64_t region_row0 = static_cast<int64_t>(blockIdx.y) * rt * kTM;
  const int64_t region_col0 = static_cast<int64_t>(blockIdx.x) * ct * kTN;

  for (int e = tid; e < rt * kTM * rp; e += kThreads) qs[e] = Acc(0);
  for (int ctile = 0; ctile < ct; ++ctile) {
    const int64_t col0 = region_col0 + static_cast<int64_t>(ctile) * kTN;
    if (col0 >= cols) break;  // uniform across the block
    __syncthreads();          // the previous column tile's ps flush is done
    for (int e = tid; e < rp * kTN; e += kThreads) ps[e] = Acc(0);
    for (int rtile = 0; rtile < rt; ++rtile) {
      const int64_t row0 = region_row0 + static_cast<int64_t>(rtile) * kTM;
      if (row0 >= rows) break;

      // 1. g for the tile.
      Acc acc[4][4] = {};
      for (int jc = 0; jc < r2; jc += kRC) {
        __syncthreads();
        stage_rows(us, 1, kUsLd, u, r2, row0, rows, jc, r2);  // transposed: kRC x kUsLd
        stage_cols(vs, 1, kTN, v, col0, cols, jc, r2);        // kRC x kTN
        __syncthreads();
#pragma unroll
        for (int jj = 0; jj < kRC; ++jj) {
          Acc ua[4], vb[4];
          load4(us + jj * kUsLd + 4 * ty, ua);
#pragma unroll
          for (int b = 0; b < 4; ++b) vb[b] = vs[jj * kTN + tx + 16 * b];
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int b = 0; b < 4; ++b) acc[i][b] = fma(ua[i], vb[b], acc[i][b]);
        }
      }

      // 2. Moments, read and written once; D to shared memory.
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t row = row0 + 4 * ty + i;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const int64_t col = col0 + tx + 16 * b;
          Acc d = Acc(0);
          if (row < rows && col < cols) {
            const int64_t idx = row * cols + col;
            const Acc g = k.scale * acc[i][b];
            const Acc mt = k.b1 * load_moment(exp_avg + idx) + k.c1 * g;
            const Acc vt = k.b2 * load_moment(exp_avg_sq + idx) + k.c2 * (g * g);
            store_moment(exp_avg + idx, mt);
            store_moment(exp_avg_sq + idx, vt);
            d = (mt * k.inv_bc1) / (sqrt(vt) * k.inv_sqrt_bc2 + k.eps);
          }
          ds[(4 * ty + i) * kDsLd + tx + 16 * b] = d;
        }
      }

      // 3. Pull-back products, 16 ranks at a time.
      for (int jc = 0; jc < r; jc += kRC) {
        __syncthreads();  // ds is complete; the previous chunk's us / vs reads are done
        Acc* sbs = us;  // B chunk (u's first r columns), kTM x kRC
        Acc* as = vs;   // A chunk (v's last r rows), transposed: kTN x kAsLd
        stage_rows(sbs, kRC, 1, u, r2, row0, rows, jc, r);
        stage_cols(as, kAsLd, 1, v + r * cols, col0, cols, jc, r);
        __syncthreads();
        Acc pacc[4] = {}, qacc[4] = {};
        for (int i = 0; i < kTM; ++i) {  // column lane64 of B^T D
          Acc s4[4];
          load4(sbs + i * kRC + jg, s4);
          const Acc d = ds[i * kDsLd + lane64];
#pragma unroll
          for (int q = 0; q < 4; ++q) pacc[q] = fma(s4[q], d, pacc[q]);
        }
        for (int c = 0; c < kTN; ++c) {  // row lane64 of D A^T
          Acc a4[4];
          load4(as + c * kAsLd + jg, a4);
          const Acc d = ds[lane64 * kDsLd + c];
#pragma unroll
          for (int q = 0; q < 4; ++q) qacc[q] = fma(d, a4[q], qacc[q]);
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          ps[(jc + jg + q) * kTN + lane64] += pacc[q];
          qs[(rtile * kTM + lane64) * rp + jc + jg + q] += qacc[q];
        }
      }
    }
    __syncthreads();
    for (int e = tid; e < r * kTN; e += kThreads) {
      const int j = e / kTN, c = e % kTN;
      const int64_t col = col0 + c;
      if (col < cols) pw[(static_cast<int64_t>(blockIdx.y) * r + j) * cols + col] = ps[j * kTN + c];
    }
  }
  __syncthreads();
  for (int e = tid; e < rt * kTM * r; e += kThreads) {
    const int i = e / r, j = e % r;
    const int64_t row = region_row0 + i;
    if (row < rows) qw[(static_cast<int64_t>(blockIdx.x) * rows + row) * r + j] = qs[i * rp + j];
  }
}

// grad_a = scale * sum over region rows of pw, grad_b = scale * sum over region columns of qw,
// each summed in index order.
template <class Acc>
__global__ void reduce_kernel(const Acc* __restrict__ pw, int64_t n_pw, const Acc* __restrict__ qw,
                              int64_t n_qw, int64_t r, int64_t rows, int64_t cols, Acc scale,
                              Acc* __restrict__ grad_a, Acc* __restrict__ grad_b) {
  const int64_t na = r * cols, nb = rows * r;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < na + nb;
       e += stride) {
    Acc sum = Acc(0);
    if (e < na) {
      for (int64_t k = 0; k < n_pw; ++k) sum += pw[k * na + e];
      grad_a[e] = scale * sum;
    } else {
      const int64_t f = e - na;
      for (int64_t k = 0; k < n_qw; ++k) sum += qw[k * nb + f];
      grad_b[f] = scale * sum;
    }
  }
}

struct Plan {
  int rt = 0, ct = 0;  // tiles per region (rows, columns); rt == 0: unsupported rank
  int64_t grid_x = 0, grid_y = 0;
  size_t smem = 0, workspace = 0;
};

template <class Acc>
Plan make_plan(const LoraProMomentsArgs& a, int device) {
  Plan p;
  int rt = 4;
  while (rt > 1 && smem_bytes<Acc>(a.r, rt) > kSmemLimit) rt /= 2;
  if (smem_bytes<Acc>(a.r, rt) > kSmemLimit) return p;
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) sms = 1;
  // Regions as large as possible (fewer partials) while leaving ~4 blocks per SM.
  int ct = 4;
  const auto blocks = [&](int rt_, int ct_) {
    return ceil_div(a.cols, int64_t{ct_} * kTN) * ceil_div(a.rows, int64_t{rt_} * kTM);
  };
  while (ct > 1 && blocks(rt, ct) < 4 * sms) ct /= 2;
  while (rt > 1 && blocks(rt, ct) < 4 * sms) rt /= 2;
  p.rt = rt;
  p.ct = ct;
  p.grid_x = ceil_div(a.cols, int64_t{ct} * kTN);
  p.grid_y = ceil_div(a.rows, int64_t{rt} * kTM);
  p.smem = smem_bytes<Acc>(a.r, rt);
  p.workspace =
      sizeof(Acc) * static_cast<size_t>(p.grid_y * a.r * a.cols + p.grid_x * a.rows * a.r);
  return p;
}

template <class Acc>
Plan plan_for(const LoraProMomentsArgs& a, int device) {
  const int64_t max_rank = sizeof(Acc) == sizeof(double) ? kLoraProMaxRankF64 : kLoraProMaxRank;
  return a.r >= 1 && a.r <= max_rank ? make_plan<Acc>(a, device) : Plan{};
}

template <class M, class Acc>
cudaError_t launch(const LoraProMomentsArgs& a, void* workspace, int device, cudaStream_t stream) {
  const Plan p = plan_for<Acc>(a, device);
  if (p.rt == 0 || p.grid_y > 65535) return cudaErrorInvalidValue;
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;
  const auto k = lora_pro_coefficients<Acc>(a.s);
  Acc* pw = static_cast<Acc*>(workspace);
  Acc* qw = pw + p.grid_y * a.r * a.cols;
  // The limit every plan stays under, so one opt-in per device serves every rank.
  cudaError_t err = allow_smem<moments_kernel<M, Acc>>(kSmemLimit);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(p.grid_x), static_cast<unsigned>(p.grid_y));
  moments_kernel<M, Acc><<<grid, kThreads, p.smem, stream>>>(a, k, p.rt, p.ct, pw, qw);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t outputs = a.r * a.cols + a.rows * a.r;
  const int64_t blocks = ceil_div(outputs, kThreads);
  reduce_kernel<Acc><<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), kThreads, 0,
                       stream>>>(pw, p.grid_y, qw, p.grid_x, a.r, a.rows, a.cols,
                                 k.scale, static_cast<Acc*>(a.grad_a),
                                 static_cast<Acc*>(a.grad_b));
  return cudaGetLastError();
}

}  // namespace

size_t lora_pro_moments_workspace(const LoraProMomentsArgs& a, int device) {
  const Plan p =
      a.moments == DType::f64 ? plan_for<double>(a, device) : plan_for<float>(a, device);
  return p.rt == 0 ? SIZE_MAX : p.workspace;
}

cudaError_t launch_lora_pro_moments(const LoraProMomentsArgs& a, void* workspace, int device,
                                    cudaStream_t stream) {
  switch (a.moments) {
    case DType::f64: return launch<double, double>(a, workspace, device, stream);
    case DType::f32: return launch<float, float>(a, workspace, device, stream);
    case DType::bf16: return launch<bf16_bits, float>(a, workspace, device, stream);
    case DType::f16: break;  // rejected by the glue (float16 cannot hold the second moment)
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastlora::cuda
