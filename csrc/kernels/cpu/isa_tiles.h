// Per-instruction-set building blocks of the CPU kernels: vector types, dtype conversion,
// scratch memory, dropout on panels, operand panels and the register-tiled micro-kernels.
//
// Included by each kernel file that is compiled once per instruction set (-DFASTLORA_ISA=<name>,
// see lora_cpu_kernels.cpp); everything here gets internal linkage in
// fastlora::cpu::<name>, so every build keeps its own copy.
#pragma once

#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "lora_cpu.h"

#ifndef FASTLORA_ISA
#error "compile with -DFASTLORA_ISA=<namespace name>"
#endif

namespace fastlora::cpu::FASTLORA_ISA {
namespace {

// Tile sizes keep the accumulators, operands and a broadcast in registers (32 with AVX-512,
// 16 otherwise).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kNNTB = 8;     // tokens per NN tile
constexpr int kUpdJB = 8;    // ranks per rank-update tile
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kNNTB = 4;
constexpr int kUpdJB = 4;
#else
constexpr int kVecBytes = 16;
constexpr int kNNTB = 4;
constexpr int kUpdJB = 4;
#endif
constexpr int kKV = 2;                // column vectors per expand / rank-update tile
constexpr int kNNNV = 2;              // vectors of ranks per NN tile
constexpr int64_t kRowBlock = 32;     // tokens per panel in down / dy_products / rank_update
constexpr int64_t kChunk = 128;       // columns per panel in down / dy_products / rank_update
constexpr int64_t kTokBlock = kNNTB;  // tokens per expand tile
constexpr int64_t kColBlock = 256;    // columns per panel in expand

static_assert(kPad * 4 % kVecBytes == 0 && kPad * 8 % kVecBytes == 0,
              "column padding must hold whole vectors of float and double");
static_assert(kColBlock % kPad == 0 && kChunk % kPad == 0, "panel widths must be padded");
static_assert(kRowBlock % kNNTB == 0, "row blocks hold whole NN tiles");

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <class Acc>
inline void fill_zero(Acc* begin, Acc* end) {
  for (Acc* p = begin; p < end; ++p) *p = Acc(0);
}

struct bf16_t {
  uint16_t bits;
};
using f16_t = _Float16;

template <class T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <class Acc>
struct VecOf {
  typedef Acc type __attribute__((vector_size(kVecBytes)));
  static constexpr int64_t N = kVecBytes / sizeof(Acc);
};

template <class V, class Acc>
inline V loadv(const Acc* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <class V, class Acc>
inline void storev(Acc* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// ---- element conversion --------------------------------------------------------------

template <class T>
inline T widen(T v) {
  return v;
}
inline float widen(bf16_t v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <class Acc, class T>
inline Acc to_acc(T v) {
  return static_cast<Acc>(widen(v));
}

template <class T, class Acc>
inline T from_acc(Acc v) {
  return static_cast<T>(v);
}
template <>
inline bf16_t from_acc<bf16_t, float>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {static_cast<uint16_t>(u >> 16)};
}

// Calls f(T{}) with the C++ type of a runtime dtype.
template <class F>
inline void with_type(DType dt, F&& f) {
  switch (dt) {
    case DType::f64: f(double{}); break;
    case DType::f32: f(float{}); break;
    case DType::bf16: f(bf16_t{}); break;
    case DType::f16: f(f16_t{}); break;
  }
}

// Zeroed, cache-line aligned scratch of n elements.
template <class Acc>
class Scratch {
 public:
  explicit Scratch(int64_t n) {
    const size_t bytes = static_cast<size_t>(round_up((n > 0 ? n : 1) * sizeof(Acc), 64));
    mem_ = static_cast<Acc*>(std::aligned_alloc(64, bytes));
    if (mem_ == nullptr) throw std::bad_alloc();
    std::memset(mem_, 0, bytes);
  }
  ~Scratch() { std::free(mem_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  Acc* get() const { return mem_; }

 private:
  Acc* mem_;
};

// ---- dropout ----------------------------------------------------------------------------

// v[i] <- keep(idx0 + i) ? v[i] / (1 - p) : 0, in flat element order.
template <class Acc>
void apply_dropout(Acc* v, int64_t count, const DropoutParams& d, uint64_t idx0) {
  const Acc scale = static_cast<Acc>(d.scale);
  const uint32_t thr = d.threshold;
  int64_t i = 0;
  if ((idx0 & 1) && count > 0) {
    v[0] = dropout_keep(d.key, thr, idx0) ? v[0] * scale : Acc(0);
    i = 1;
  }
  for (; i + 2 <= count; i += 2) {
    const uint64_t bits = dropout_pair_bits(d.key, (idx0 + i) >> 1);
    v[i] = static_cast<uint32_t>(bits) >= thr ? v[i] * scale : Acc(0);
    v[i + 1] = static_cast<uint32_t>(bits >> 32) >= thr ? v[i + 1] * scale : Acc(0);
  }
  if (i < count) v[i] = dropout_keep(d.key, thr, idx0 + i) ? v[i] * scale : Acc(0);
}

// ---- panels -----------------------------------------------------------------------------

// dst[i, c] = drop(m)[t0 + i, k0 + c] for i < nt, c < kc, in Acc; the rest of the
// nt_pad x round_up(kc, kPad) panel is zero.
template <class T, class Acc>
void load_panel(const Matrix& m, int64_t t0, int64_t nt, int64_t nt_pad, int64_t k0,
                int64_t kc, const DropoutParams& d, Acc* dst, int64_t ldd) {
  const T* base = static_cast<const T*>(m.data);
  const int64_t kc_pad = round_up(kc, kPad);
  for (int64_t i = 0; i < nt; ++i) {
    const T* row = base + (t0 + i) * m.s0 + k0 * m.s1;
    Acc* out = dst + i * ldd;
    if (m.s1 == 1) {
      for (int64_t c = 0; c < kc; ++c) out[c] = to_acc<Acc>(row[c]);
    } else {
      for (int64_t c = 0; c < kc; ++c) out[c] = to_acc<Acc>(row[c * m.s1]);
    }
    if (d.enabled) apply_dropout(out, kc, d, static_cast<uint64_t>((t0 + i) * m.cols + k0));
    fill_zero(out + kc, out + kc_pad);
  }
  for (int64_t i = nt; i < nt_pad; ++i) fill_zero(dst + i * ldd, dst + i * ldd + kc_pad);
}

// dst[i, j] = u[t0 + i, j] in Acc for i < nt; rows nt..nt_pad-1 zero.
template <class Acc>
void load_small_rows(const Matrix& u, int64_t t0, int64_t nt, int64_t nt_pad, Acc* dst) {
  const int64_t r = u.cols;
  with_type(u.dtype, [&](auto tag) {
    using U = decltype(tag);
    const U* base = static_cast<const U*>(u.data);
    for (int64_t i = 0; i < nt; ++i)
      for (int64_t j = 0; j < r; ++j) dst[i * r + j] = to_acc<Acc>(base[(t0 + i) * u.s0 + j * u.s1]);
  });
  fill_zero(dst + nt * r, dst + nt_pad * r);
}

// ---- micro-kernels on Acc panels --------------------------------------------------------

// C[t, v] += sum_{k < kc} X[t, k] * M[k, v] for t < TB and NV vectors of columns v: the
// rank dimension is the vector dimension, so no horizontal sums are needed.
template <class Acc, int TB, int NV>
inline void nn_tile(const Acc* X, int64_t ldx, const Acc* M, int64_t ldm, int64_t kc, Acc* C,
                    int64_t ldc) {
  using V = typename VecOf<Acc>::type;
  constexpr int64_t N = VecOf<Acc>::N;
  V acc[TB][NV];
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < NV; ++v) acc[t][v] = loadv<V>(C + t * ldc + v * N);
  for (int64_t k = 0; k < kc; ++k) {
    V m[NV];
    for (int v = 0; v < NV; ++v) m[v] = loadv<V>(M + k * ldm + v * N);
    for (int t = 0; t < TB; ++t) {
      const Acc xb = X[t * ldx + k];
      for (int v = 0; v < NV; ++v) acc[t][v] += xb * m[v];
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < NV; ++v) storev(C + t * ldc + v * N, acc[t][v]);
}

// C[t, 0:r_pad] += X[t, 0:kc] M[0:kc, 0:r_pad] for t < nt (a multiple of kNNTB); r_pad is a
// multiple of the vector width, C has row stride ldc.
template <class Acc>
void nn_rows(const Acc* X, int64_t ldx, int64_t nt, const Acc* M, int64_t ldm, int64_t kc,
             int64_t r_pad, Acc* C, int64_t ldc) {
  constexpr int64_t N = VecOf<Acc>::N;
  for (int64_t t = 0; t < nt; t += kNNTB) {
    const Acc* x = X + t * ldx;
    Acc* c = C + t * ldc;
    int64_t v = 0;
    for (; v + kNNNV * N <= r_pad; v += kNNNV * N)
      nn_tile<Acc, kNNTB, kNNNV>(x, ldx, M + v, ldm, kc, c + v, ldc);
    for (; v < r_pad; v += N) nn_tile<Acc, kNNTB, 1>(x, ldx, M + v, ldm, kc, c + v, ldc);
  }
}

// Y[t, k] = sum_j U[t, j] * W[j, k] for t < TB and KV vectors of columns from k0.
template <class Acc, int TB, int KV>
inline void expand_tile(const Acc* U, int64_t r, const Acc* W, int64_t ldw, int64_t k0, Acc* Y,
                        int64_t ldy) {
  using V = typename VecOf<Acc>::type;
  constexpr int64_t N = VecOf<Acc>::N;
  V acc[TB][KV] = {};
  for (int64_t j = 0; j < r; ++j) {
    V w[KV];
    for (int v = 0; v < KV; ++v) w[v] = loadv<V>(W + j * ldw + k0 + v * N);
    for (int t = 0; t < TB; ++t) {
      const Acc u = U[t * r + j];
      for (int v = 0; v < KV; ++v) acc[t][v] += u * w[v];
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < KV; ++v) storev(Y + t * ldy + k0 + v * N, acc[t][v]);
}

// Y[t, k] = sum_j U[t, j] * W[j, k] for t < kTokBlock, k < kpad (a multiple of the vector).
template <class Acc>
void expand_rows(const Acc* U, int64_t r, const Acc* W, int64_t ldw, int64_t kpad, Acc* Y,
                 int64_t ldy) {
  constexpr int64_t N = VecOf<Acc>::N;
  int64_t k = 0;
  for (; k + kKV * N <= kpad; k += kKV * N) expand_tile<Acc, kTokBlock, kKV>(U, r, W, ldw, k, Y, ldy);
  for (; k < kpad; k += N) expand_tile<Acc, kTokBlock, 1>(U, r, W, ldw, k, Y, ldy);
}

// O[i, k] += sum_t U[t, i] * X[t, k] for i < JB, t < nt, and KV vectors of columns from k0
// (U has row stride ldu).
template <class Acc, int JB, int KV>
inline void update_tile(const Acc* U, int64_t ldu, int64_t nt, const Acc* X, int64_t ldx,
                        int64_t k0, Acc* O, int64_t ldo) {
  using V = typename VecOf<Acc>::type;
  constexpr int64_t N = VecOf<Acc>::N;
  V acc[JB][KV];
  for (int i = 0; i < JB; ++i)
    for (int v = 0; v < KV; ++v) acc[i][v] = loadv<V>(O + i * ldo + k0 + v * N);
  for (int64_t t = 0; t < nt; ++t) {
    V x[KV];
    for (int v = 0; v < KV; ++v) x[v] = loadv<V>(X + t * ldx + k0 + v * N);
    for (int i = 0; i < JB; ++i) {
      const Acc u = U[t * ldu + i];
      for (int v = 0; v < KV; ++v) acc[i][v] += u * x[v];
    }
  }
  for (int i = 0; i < JB; ++i)
    for (int v = 0; v < KV; ++v) storev(O + i * ldo + k0 + v * N, acc[i][v]);
}

// O[i, k] += sum_t U[t, i] * X[t, k] for i < JB, t < nt, k < kpad.
template <class Acc, int JB>
void update_cols(const Acc* U, int64_t ldu, int64_t nt, const Acc* X, int64_t ldx, int64_t kpad,
                 Acc* O, int64_t ldo) {
  constexpr int64_t N = VecOf<Acc>::N;
  int64_t k = 0;
  for (; k + kKV * N <= kpad; k += kKV * N) update_tile<Acc, JB, kKV>(U, ldu, nt, X, ldx, k, O, ldo);
  for (; k < kpad; k += N) update_tile<Acc, JB, 1>(U, ldu, nt, X, ldx, k, O, ldo);
}

// O[j, k] += sum_t U[t, j] * X[t, k] for all j < r.
template <class Acc>
void update_rows(const Acc* U, int64_t r, int64_t nt, const Acc* X, int64_t ldx, int64_t kpad,
                 Acc* O, int64_t ldo) {
  int64_t j = 0;
  for (; j + kUpdJB <= r; j += kUpdJB)
    update_cols<Acc, kUpdJB>(U + j, r, nt, X, ldx, kpad, O + j * ldo, ldo);
  for (; j < r; ++j) update_cols<Acc, 1>(U + j, r, nt, X, ldx, kpad, O + j * ldo, ldo);
}

// A panel of rows [t0, t0 + nt) and columns [k0, k0 + kc) of m in Acc: m itself when its
// elements already are Acc, unit-stride, undropped, and the panel needs no padding; else a
// converted, dropout-masked, zero-padded copy in `buf` (row stride kc_stride).
template <class Acc>
struct Panel {
  const Acc* data;
  int64_t ld;
};

template <class T, class Acc>
Panel<Acc> panel(const Matrix& m, int64_t t0, int64_t nt, int64_t nt_pad, int64_t k0,
                 int64_t kc, const DropoutParams& d, Acc* buf, int64_t kc_stride) {
  constexpr int64_t N = VecOf<Acc>::N;
  if constexpr (std::is_same_v<T, Acc>) {
    if (m.s1 == 1 && !d.enabled && nt == nt_pad && kc % N == 0)
      return {static_cast<const Acc*>(m.data) + t0 * m.s0 + k0, m.s0};
  }
  load_panel<T, Acc>(m, t0, nt, nt_pad, k0, kc, d, buf, kc_stride);
  return {buf, kc_stride};
}

}  // namespace
}  // namespace fastlora::cpu::FASTLORA_ISA
