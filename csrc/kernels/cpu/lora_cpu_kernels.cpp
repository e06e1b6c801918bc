// CPU kernels of the fused LoRA layer, compiled once per instruction set.
//
// The build compiles this file several times with different -march flags and
// -DFASTLORA_ISA=<name>; everything lives in namespace fastlora::cpu::<name> with internal
// linkage, and dispatch.cpp picks one table at run time. Standard-library templates are
// avoided on purpose: their out-of-line copies are shared between the builds at link time, so
// one compiled for AVX-512 could end up in the baseline path.
//
// Structure: strided big operands (x, dy) are read in panels of the accumulation type (the
// operand itself when it already is one, else a converted, dropout-masked, zero-padded copy),
// and three register-tiled micro-kernels (isa_tiles.h) work on them: an NN tile (x A^T, dy B: the rank is
// the vector dimension), an expand tile (xa B^T, dxa A: rank-r combinations along the long
// dimension) and a rank-update tile (dy^T xa, dxa^T x: sums over tokens).
#include "isa_tiles.h"

namespace fastlora::cpu::FASTLORA_ISA {
namespace {

// ---- kernels ----------------------------------------------------------------------------

template <class T>
void down_impl(const Matrix& x, const void* at_, int64_t ldat, int64_t r, const DropoutParams& d,
               void* xa_, int64_t t0, int64_t t1) {
  using Acc = typename AccOf<T>::type;
  const Acc* at = static_cast<const Acc*>(at_);
  T* xa = static_cast<T*>(xa_);
  const int64_t r_pad = round_up(r, VecOf<Acc>::N);
  Scratch<Acc> buf(kRowBlock * kChunk), sums(kRowBlock * r_pad);
  for (int64_t tb = t0; tb < t1; tb += kRowBlock) {
    const int64_t nt = imin(kRowBlock, t1 - tb), nt_pad = round_up(nt, kNNTB);
    fill_zero(sums.get(), sums.get() + nt_pad * r_pad);
    for (int64_t k0 = 0; k0 < x.cols; k0 += kChunk) {
      const int64_t kc = imin(kChunk, x.cols - k0);
      const auto p = panel<T, Acc>(x, tb, nt, nt_pad, k0, kc, d, buf.get(), kChunk);
      nn_rows(p.data, p.ld, nt_pad, at + k0 * ldat, ldat, kc, r_pad, sums.get(), r_pad);
    }
    for (int64_t i = 0; i < nt; ++i)
      for (int64_t j = 0; j < r; ++j) xa[(tb + i) * r + j] = from_acc<T>(sums.get()[i * r_pad + j]);
  }
}

template <class T>
void expand_impl(const Matrix& u, const void* w_, int64_t ldw, const void* bias_,
                 const Matrix* base, const DropoutParams& d, void* out_, int64_t n, int64_t t0,
                 int64_t t1) {
  using Acc = typename AccOf<T>::type;
  const Acc* w = static_cast<const Acc*>(w_);
  const T* bias = static_cast<const T*>(bias_);
  T* out = static_cast<T*>(out_);
  const T* base_data = base ? static_cast<const T*>(base->data) : nullptr;
  const int64_t r = u.cols;
  Scratch<Acc> urows(kTokBlock * r), ybuf(kTokBlock * kColBlock);
  for (int64_t tb = t0; tb < t1; tb += kTokBlock) {
    const int64_t nt = imin(kTokBlock, t1 - tb);
    load_small_rows(u, tb, nt, kTokBlock, urows.get());
    for (int64_t k0 = 0; k0 < n; k0 += kColBlock) {
      const int64_t kc = imin(kColBlock, n - k0);
      expand_rows(urows.get(), r, w + k0, ldw, round_up(kc, VecOf<Acc>::N), ybuf.get(), kColBlock);
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t t = tb + i;
        Acc* y = ybuf.get() + i * kColBlock;
        if (d.enabled) apply_dropout(y, kc, d, static_cast<uint64_t>(t * n + k0));
        if (bias)
          for (int64_t c = 0; c < kc; ++c) y[c] += to_acc<Acc>(bias[k0 + c]);
        if (base_data) {
          const T* b = base_data + t * base->s0 + k0 * base->s1;
          if (base->s1 == 1) {
            for (int64_t c = 0; c < kc; ++c) y[c] += to_acc<Acc>(b[c]);
          } else {
            for (int64_t c = 0; c < kc; ++c) y[c] += to_acc<Acc>(b[c * base->s1]);
          }
        }
        T* o = out + t * n + k0;
        for (int64_t c = 0; c < kc; ++c) o[c] = from_acc<T>(y[c]);
      }
    }
  }
}

template <class T>
void dy_products_impl(const Matrix& dy, const void* xa_, int64_t rx, const void* b_, int64_t ldb,
                      int64_t rb, double scale, void* dxa_, void* dbt_, int64_t lddbt, int64_t t0,
                      int64_t t1) {
  using Acc = typename AccOf<T>::type;
  const T* xa = static_cast<const T*>(xa_);
  const Acc* b = static_cast<const Acc*>(b_);
  Acc* dxa = static_cast<Acc*>(dxa_);
  Acc* dbt = static_cast<Acc*>(dbt_);
  const Acc s = static_cast<Acc>(scale);
  const int64_t rb_pad = round_up(rb, VecOf<Acc>::N);
  Scratch<Acc> buf(kRowBlock * kChunk), sums(kRowBlock * rb_pad), sxa(kRowBlock * rx);
  const DropoutParams no_dropout;
  for (int64_t tb = t0; tb < t1; tb += kRowBlock) {
    const int64_t nt = imin(kRowBlock, t1 - tb), nt_pad = round_up(nt, kNNTB);
    fill_zero(sums.get(), sums.get() + nt_pad * rb_pad);
    for (int64_t i = 0; i < nt * rx; ++i) sxa.get()[i] = s * to_acc<Acc>(xa[tb * rx + i]);
    // Each panel of dy feeds both products while it is in cache: one pass over dy.
    for (int64_t k0 = 0; k0 < dy.cols; k0 += kChunk) {
      const int64_t kc = imin(kChunk, dy.cols - k0);
      const auto p = panel<T, Acc>(dy, tb, nt, nt_pad, k0, kc, no_dropout, buf.get(), kChunk);
      nn_rows(p.data, p.ld, nt_pad, b + k0 * ldb, ldb, kc, rb_pad, sums.get(), rb_pad);
      update_rows(sxa.get(), rx, nt, p.data, p.ld, round_up(kc, VecOf<Acc>::N), dbt + k0, lddbt);
    }
    for (int64_t i = 0; i < nt; ++i)
      for (int64_t j = 0; j < rb; ++j) dxa[(tb + i) * rb + j] = s * sums.get()[i * rb_pad + j];
  }
}

template <class T>
void rank_update_impl(const Matrix& x, const DropoutParams& d, const void* u_, int64_t r,
                      void* out_, int64_t ldo, int64_t t0, int64_t t1) {
  using Acc = typename AccOf<T>::type;
  const Acc* u = static_cast<const Acc*>(u_);
  Acc* out = static_cast<Acc*>(out_);
  Scratch<Acc> buf(kRowBlock * kChunk);
  // Row blocks stream x in order (prefetch friendly); each panel updates all r rows of out.
  for (int64_t tb = t0; tb < t1; tb += kRowBlock) {
    const int64_t nt = imin(kRowBlock, t1 - tb);
    for (int64_t k0 = 0; k0 < x.cols; k0 += kChunk) {
      const int64_t kc = imin(kChunk, x.cols - k0);
      const auto p = panel<T, Acc>(x, tb, nt, nt, k0, kc, d, buf.get(), kChunk);
      update_rows(u + tb * r, r, nt, p.data, p.ld, round_up(kc, VecOf<Acc>::N), out + k0, ldo);
    }
  }
}

// ---- type-dispatching entry points ------------------------------------------------------

void down(const Matrix& x, const void* at, int64_t ldat, int64_t r, const DropoutParams& d,
          void* xa, int64_t t0, int64_t t1) {
  with_type(x.dtype, [&](auto tag) { down_impl<decltype(tag)>(x, at, ldat, r, d, xa, t0, t1); });
}

void expand(const Matrix& u, const void* w, int64_t ldw, const void* bias, const Matrix* base,
            const DropoutParams& d, DType out_dtype, void* out, int64_t n, int64_t t0,
            int64_t t1) {
  with_type(out_dtype, [&](auto tag) {
    expand_impl<decltype(tag)>(u, w, ldw, bias, base, d, out, n, t0, t1);
  });
}

void dy_products(const Matrix& dy, const void* xa, int64_t rx, const void* b, int64_t ldb,
                 int64_t rb, double scale, void* dxa, void* dbt, int64_t lddbt, int64_t t0,
                 int64_t t1) {
  with_type(dy.dtype, [&](auto tag) {
    dy_products_impl<decltype(tag)>(dy, xa, rx, b, ldb, rb, scale, dxa, dbt, lddbt, t0, t1);
  });
}

void rank_update(const Matrix& x, const DropoutParams& d, const void* u, int64_t r, void* out,
                 int64_t ldo, int64_t t0, int64_t t1) {
  with_type(x.dtype,
            [&](auto tag) { rank_update_impl<decltype(tag)>(x, d, u, r, out, ldo, t0, t1); });
}

#define FASTLORA_STR2(x) #x
#define FASTLORA_STR(x) FASTLORA_STR2(x)

}  // namespace

// Defined in lora_pro_kernels.cpp (same instruction set).
void lora_pro_moments(const LoraProMoments& p, void* grad_a, int64_t ldga, int64_t i0,
                      int64_t i1);

const KernelTable* kernel_table() {
  static const KernelTable table{FASTLORA_STR(FASTLORA_ISA), &down, &expand, &dy_products,
                                 &rank_update, &lora_pro_moments};
  return &table;
}

}  // namespace fastlora::cpu::FASTLORA_ISA
