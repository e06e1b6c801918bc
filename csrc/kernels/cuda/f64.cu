#include "f64.cuh"
#include "tile.cuh"

namespace fastlora::cuda::f64 {
namespace {

using detail::DropoutArgs;
using detail::dropout_args;
using detail::elementwise_blocks;
using detail::kThreads;

struct Strided {
  const double* p;
  int64_t rows, cols, s0, s1;
  __device__ double operator()(int64_t i, int64_t j) const { return p[i * s0 + j * s1]; }
};

Strided strided(const Matrix& m) { return {static_cast<const double*>(m.data), m.rows, m.cols, m.s0, m.s1}; }

// The dropout multiplier of element (t, k) of a matrix with `cols` columns.
struct Mask {
  uint64_t key;
  uint32_t threshold;
  double scale;
  bool on;
  __device__ explicit Mask(const DropoutArgs& a)
      : key(a.seed != nullptr ? dropout_key(*a.seed) : 0), threshold(a.threshold), scale(a.scale),
        on(a.seed != nullptr) {}
  __device__ double operator()(int64_t t, int64_t k, int64_t cols) const {
    if (!on) return 1.0;
    return dropout_keep(key, threshold, static_cast<uint64_t>(t) * cols + k) ? scale : 0.0;
  }
};

// Grid-stride loop over n outputs.
#define FASTLORA_FOR_EACH(i, n)                                                                   \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < (n);            \
       i += static_cast<int64_t>(gridDim.x) * kThreads)

__global__ void down_kernel(Strided x, const double* a, int64_t r, DropoutArgs drop, double* xa) {
  const Mask mask(drop);
  FASTLORA_FOR_EACH(i, x.rows * r) {
    const int64_t t = i / r, j = i % r;
    double sum = 0.0;
    for (int64_t k = 0; k < x.cols; ++k) {
      const double m = mask(t, k, x.cols);
      if (m != 0.0) sum += m * x(t, k) * a[j * x.cols + k];
    }
    xa[i] = sum;
  }
}

__global__ void expand_kernel(Expand e, Strided base, DropoutArgs drop) {
  const Mask mask(drop);
  const auto* u = static_cast<const double*>(e.u);
  const auto* w = static_cast<const double*>(e.w);
  const auto* bias = static_cast<const double*>(e.bias);
  auto* out = static_cast<double*>(e.out);
  FASTLORA_FOR_EACH(i, e.rows * e.cols) {
    const int64_t t = i / e.cols, k = i % e.cols;
    double sum = 0.0;
    for (int64_t j = 0; j < e.r; ++j) sum += u[t * e.r + j] * (e.w_by_rank ? w[j * e.cols + k] : w[k * e.r + j]);
    const double m = mask(t, k, e.cols);
    double v = m != 0.0 ? m * (e.alpha * sum) : 0.0;
    if (bias != nullptr) v += bias[k];
    if (base.p != nullptr) v += base(t, k);
    out[i] = v;
  }
}

__global__ void dxa_kernel(Strided dy, const double* b, int64_t rb, double scale, double* dxa) {
  FASTLORA_FOR_EACH(i, dy.rows * rb) {
    const int64_t t = i / rb, j = i % rb;
    double sum = 0.0;
    for (int64_t o = 0; o < dy.cols; ++o) sum += dy(t, o) * b[o * rb + j];
    dxa[i] = scale * sum;
  }
}

__global__ void db_kernel(Strided dy, const double* xa, int64_t rx, double scale, double* db) {
  FASTLORA_FOR_EACH(i, dy.cols * rx) {
    const int64_t o = i / rx, j = i % rx;
    double sum = 0.0;
    for (int64_t t = 0; t < dy.rows; ++t) sum += dy(t, o) * xa[t * rx + j];
    db[i] = scale * sum;
  }
}

__global__ void grad_a_kernel(Strided x, const double* dxa, int64_t r, DropoutArgs drop, double* da) {
  const Mask mask(drop);
  FASTLORA_FOR_EACH(i, r * x.cols) {
    const int64_t j = i / x.cols, k = i % x.cols;
    double sum = 0.0;
    for (int64_t t = 0; t < x.rows; ++t) {
      const double m = mask(t, k, x.cols);
      if (m != 0.0) sum += dxa[t * r + j] * m * x(t, k);
    }
    da[i] = sum;
  }
}

#undef FASTLORA_FOR_EACH

}  // namespace

cudaError_t down(const Matrix& x, const double* a, int64_t r, const Dropout& drop, double* xa,
                 cudaStream_t stream) {
  if (x.rows * r == 0) return cudaSuccess;
  down_kernel<<<elementwise_blocks(x.rows * r), kThreads, 0, stream>>>(strided(x), a, r, dropout_args(drop), xa);
  return cudaGetLastError();
}

cudaError_t expand(const Expand& e, cudaStream_t stream) {
  if (e.rows * e.cols == 0) return cudaSuccess;
  const Strided base = e.base != nullptr ? strided(*e.base) : Strided{};
  expand_kernel<<<elementwise_blocks(e.rows * e.cols), kThreads, 0, stream>>>(e, base, dropout_args(e.drop));
  return cudaGetLastError();
}

cudaError_t dy_products(const Matrix& dy, const double* xa, int64_t rx, const double* b, int64_t rb,
                        double scale, double* dxa, double* db, cudaStream_t stream) {
  if (dy.rows * rb > 0) dxa_kernel<<<elementwise_blocks(dy.rows * rb), kThreads, 0, stream>>>(strided(dy), b, rb, scale, dxa);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  if (dy.cols * rx > 0) db_kernel<<<elementwise_blocks(dy.cols * rx), kThreads, 0, stream>>>(strided(dy), xa, rx, scale, db);
  return cudaGetLastError();
}

cudaError_t grad_A(const Matrix& x, const double* dxa, int64_t r, const Dropout& drop, double* da,
                   cudaStream_t stream) {
  if (r * x.cols == 0) return cudaSuccess;
  grad_a_kernel<<<elementwise_blocks(r * x.cols), kThreads, 0, stream>>>(strided(x), dxa, r, dropout_args(drop), da);
  return cudaGetLastError();
}

}  // namespace fastlora::cuda::f64
