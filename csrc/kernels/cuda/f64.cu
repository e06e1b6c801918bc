// Every float64 launcher is one strided matrix product, out = alpha L R (+ epilogue), with one
// thread per output element and the dropout mask applied to whichever operand is the
// activation matrix.
#include "f64.cuh"
#include "tile.cuh"

namespace fastlora::cuda::f64 {
namespace {

using detail::DropoutArgs;
using detail::dropout_args;
using detail::elementwise_blocks;
using detail::kThreads;

// Element (i, j) at p[i * s0 + j * s1].
struct View {
  const double* p = nullptr;
  int64_t s0 = 0, s1 = 0;
  __device__ double operator()(int64_t i, int64_t j) const { return p[i * s0 + j * s1]; }
};

View view(const Matrix& m) { return {static_cast<const double*>(m.data), m.s0, m.s1}; }
View contiguous(const void* p, int64_t cols) { return {static_cast<const double*>(p), cols, 1}; }
View transposed(const void* p, int64_t cols) { return {static_cast<const double*>(p), 1, cols}; }

// Which element the dropout mask of the activations (a matrix with mask_cols columns) lands on:
// L's (m, k), R's (k, n) or the result's (m, n).
enum class MaskOn { none, left, right, out };

struct Product {
  int64_t M, N, K;
  View left, right;  // M x K, K x N
  double* out;       // M x N, contiguous
  double alpha = 1.0;
  MaskOn mask_on = MaskOn::none;
  int64_t mask_cols = 0;
  DropoutArgs drop;
  const double* bias = nullptr;  // N elements, added to the result
  View base;                     // M x N, added to the result when base.p is set
};

// Applies `drop`, the dropout of the activations (a matrix with mask_cols columns), at `on`.
void mask(Product& p, MaskOn on, const Dropout& drop, int64_t mask_cols) {
  p.drop = dropout_args(drop);
  if (p.drop.seed != nullptr) {
    p.mask_on = on;
    p.mask_cols = mask_cols;
  }
}

// The dropout multiplier (1 / (1 - p) or 0) of flat element t * cols + k.
__device__ double multiplier(const Product& p, uint64_t key, int64_t t, int64_t k) {
  return dropout_keep(key, p.drop.threshold, static_cast<uint64_t>(t) * p.mask_cols + k) ? p.drop.scale : 0.0;
}

__global__ void product_kernel(Product p) {
  const uint64_t key = p.mask_on != MaskOn::none ? dropout_key(*p.drop.seed) : 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < p.M * p.N;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t m = i / p.N, n = i % p.N;
    double sum = 0.0;
    for (int64_t k = 0; k < p.K; ++k) {
      double l = p.left(m, k), r = p.right(k, n);
      if (p.mask_on == MaskOn::left || p.mask_on == MaskOn::right) {
        const bool left = p.mask_on == MaskOn::left;
        const double f = left ? multiplier(p, key, m, k) : multiplier(p, key, k, n);
        if (f == 0.0) continue;  // dropped: exactly no contribution, even from inf or nan
        (left ? l : r) *= f;
      }
      sum += l * r;
    }
    double v = p.alpha * sum;
    if (p.mask_on == MaskOn::out) {
      const double f = multiplier(p, key, m, n);
      v = f != 0.0 ? f * v : 0.0;
    }
    if (p.bias != nullptr) v += p.bias[n];
    if (p.base.p != nullptr) v += p.base(m, n);
    p.out[i] = v;
  }
}

cudaError_t run(const Product& p, cudaStream_t stream) {
  if (p.M * p.N == 0) return cudaSuccess;
  product_kernel<<<elementwise_blocks(p.M * p.N), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t down(const Matrix& x, const double* a, int64_t r, const Dropout& drop, double* xa,
                 cudaStream_t stream) {
  Product p{x.rows, r, x.cols, view(x), transposed(a, x.cols), xa};
  mask(p, MaskOn::left, drop, x.cols);
  return run(p, stream);
}

cudaError_t expand(const Expand& e, cudaStream_t stream) {
  const View w = e.w_by_rank ? contiguous(e.w, e.cols) : transposed(e.w, e.r);
  Product p{e.rows, e.cols, e.r, contiguous(e.u, e.r), w, static_cast<double*>(e.out), e.alpha};
  mask(p, MaskOn::out, e.drop, e.cols);
  p.bias = static_cast<const double*>(e.bias);
  if (e.base != nullptr) p.base = view(*e.base);
  return run(p, stream);
}

cudaError_t dy_products(const Matrix& dy, const double* xa, int64_t rx, const double* b, int64_t rb,
                        double scale, double* dxa, double* db, cudaStream_t stream) {
  const View dy_t{static_cast<const double*>(dy.data), dy.s1, dy.s0};
  const cudaError_t err = run({dy.rows, rb, dy.cols, view(dy), contiguous(b, rb), dxa, scale}, stream);
  if (err != cudaSuccess) return err;
  return run({dy.cols, rx, dy.rows, dy_t, contiguous(xa, rx), db, scale}, stream);
}

cudaError_t grad_A(const Matrix& x, const double* dxa, int64_t r, const Dropout& drop, double* da,
                   cudaStream_t stream) {
  Product p{r, x.cols, x.rows, transposed(dxa, r), view(x), da};
  mask(p, MaskOn::right, drop, x.cols);
  return run(p, stream);
}

}  // namespace fastlora::cuda::f64
