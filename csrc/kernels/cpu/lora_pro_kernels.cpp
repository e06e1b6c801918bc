// The fused LoRA-Pro moment pass (LoraProMoments in lora_cpu.h), compiled once per instruction
// set like lora_cpu_kernels.cpp.
//
// Rows are processed in blocks and columns in panels. For each block x panel the equivalent
// gradient is rebuilt in an L1-resident buffer from its rank-2r factors (expand tile), each
// element's moments are read, updated and written back once and the buffer is overwritten
// with the Adam direction D, which then feeds both pull-back products while it is still in
// cache: sb^T D (rank-update tile, summed over rows) and D A^T (NN tile, summed over columns).
// The moments are the only full-size data touched, each read and written exactly once.
#include "isa_tiles.h"

namespace fastlora::cpu::FASTLORA_ISA {
namespace {

// Blocks of 16 rows x 512 columns (D buffer 32 KiB, L1-resident): 16 rows are few enough
// read streams for the hardware prefetchers and enough to reuse each panel of v and A^T.
constexpr int64_t kMomRows = 16;
constexpr int64_t kMomCols = 512;
static_assert(kMomRows % kNNTB == 0, "row blocks hold whole NN tiles");

inline float sqrt_acc(float x) { return __builtin_sqrtf(x); }
inline double sqrt_acc(double x) { return __builtin_sqrt(x); }

template <class Acc>
constexpr DType acc_dtype() {
  return sizeof(Acc) == sizeof(double) ? DType::f64 : DType::f32;
}

// Moments of one row segment: d holds g on entry and D on exit.
template <class M, class Acc>
inline void update_segment(M* __restrict__ m, M* __restrict__ v, Acc* __restrict__ d, int64_t n,
                           Acc b1, Acc c1, Acc b2, Acc c2, Acc inv_bc1, Acc inv_sqrt_bc2,
                           Acc eps) {
  for (int64_t c = 0; c < n; ++c) {
    const Acc g = d[c];
    const Acc mt = b1 * to_acc<Acc>(m[c]) + c1 * g;
    const Acc vt = b2 * to_acc<Acc>(v[c]) + c2 * (g * g);
    m[c] = from_acc<M>(mt);
    v[c] = from_acc<M>(vt);
    d[c] = (mt * inv_bc1) / (sqrt_acc(vt) * inv_sqrt_bc2 + eps);
  }
}

template <class M>
void moments_impl(const LoraProMoments& p, void* grad_a_, int64_t ldga, int64_t i0, int64_t i1) {
  using Acc = typename AccOf<M>::type;
  constexpr int64_t N = VecOf<Acc>::N;
  const int64_t r = p.r, r2 = 2 * r, n = p.cols;
  const int64_t r_pad = round_up(r, N);
  const Acc* v = static_cast<const Acc*>(p.v);
  const Acc* sb = static_cast<const Acc*>(p.sb);
  const Acc* at = static_cast<const Acc*>(p.at);
  Acc* grad_a = static_cast<Acc*>(grad_a_);
  Acc* grad_b = static_cast<Acc*>(p.grad_b);
  M* exp_avg = static_cast<M*>(p.exp_avg);
  M* exp_avg_sq = static_cast<M*>(p.exp_avg_sq);
  const auto [scale, b1, c1, b2, c2, inv_bc1, inv_sqrt_bc2, eps] = lora_pro_coefficients<Acc>(p.s);
  const Matrix u{p.u, p.rows, r2, r2, 1, acc_dtype<Acc>()};

  // v regrouped so that each group of kGroup columns is a contiguous 2r x kGroup block: the
  // expand tile then streams it sequentially (rows of v are far apart for large n).
  constexpr int64_t kGroup = kKV * N;
  static_assert(kMomCols % kGroup == 0, "panels hold whole expand tiles");
  const int64_t groups = round_up(n, kGroup) / kGroup;
  Scratch<Acc> vp(groups * r2 * kGroup);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t j = 0; j < r2; ++j)
      for (int64_t c = 0; c < kGroup && g * kGroup + c < n; ++c)
        vp.get()[(g * r2 + j) * kGroup + c] = v[j * p.ldv + g * kGroup + c];
  Scratch<Acc> urows(kMomRows * r2), dbuf(kMomRows * kMomCols), gb(kMomRows * r_pad);
  for (int64_t ib = i0; ib < i1; ib += kMomRows) {
    const int64_t nt = imin(kMomRows, i1 - ib), nt_pad = round_up(nt, kTokBlock);
    load_small_rows(u, ib, nt, nt_pad, urows.get());
    fill_zero(gb.get(), gb.get() + nt_pad * r_pad);
    for (int64_t k0 = 0; k0 < n; k0 += kMomCols) {
      const int64_t kc = imin(kMomCols, n - k0), kpad = round_up(kc, N);
      Acc* d = dbuf.get();
      for (int64_t t = 0; t < nt_pad; t += kTokBlock)
        for (int64_t c = 0; c < kc; c += kGroup)
          expand_tile<Acc, kTokBlock, kKV>(urows.get() + t * r2, r2, vp.get() + (k0 + c) * r2,
                                           kGroup, 0, d + t * kMomCols + c, kMomCols);
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t off = (ib + i) * n + k0;
        update_segment(exp_avg + off, exp_avg_sq + off, d + i * kMomCols, kc, b1, c1, b2, c2,
                       inv_bc1, inv_sqrt_bc2, eps);
        fill_zero(d + i * kMomCols + kc, d + i * kMomCols + kpad);
      }
      for (int64_t i = nt; i < nt_pad; ++i) fill_zero(d + i * kMomCols, d + i * kMomCols + kpad);
      update_rows(sb + ib * r, r, nt, d, kMomCols, kpad, grad_a + k0, ldga);
      nn_rows(d, kMomCols, nt_pad, at + k0 * p.ldat, p.ldat, kc, r_pad, gb.get(), r_pad);
    }
    for (int64_t i = 0; i < nt; ++i)
      for (int64_t j = 0; j < r; ++j) grad_b[(ib + i) * r + j] = scale * gb.get()[i * r_pad + j];
  }
}

}  // namespace

void lora_pro_moments(const LoraProMoments& p, void* grad_a, int64_t ldga, int64_t i0,
                      int64_t i1) {
  switch (p.moment_dtype) {
    case DType::f64: moments_impl<double>(p, grad_a, ldga, i0, i1); break;
    case DType::f32: moments_impl<float>(p, grad_a, ldga, i0, i1); break;
    case DType::bf16: moments_impl<bf16_t>(p, grad_a, ldga, i0, i1); break;
    case DType::f16: break;  // rejected by the caller (float16 cannot hold v)
  }
}

}  // namespace fastlora::cpu::FASTLORA_ISA
