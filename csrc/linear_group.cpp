// moeedge's group-wise int8 and int4 weights and GGUF Q8_0 (layouts in linear.h)
// multiplied as stored. Q8_0 is int8 with a group of 32 whose scale sits in front of its
// block: the same kernels, with other strides.
//
// x is first rounded to int16 per 32-value block (linear_quant_x.h, shared by both paths,
// so the paths compute the same integer sums and differ only in float rounding). A block's
// 32 weights come out as int16 evens and odds, the order x's blocks are stored in:
// - int8: 32 bytes; a 16-bit lane holds weight 2i in its low byte and 2i + 1 in its high
//   one, split by two arithmetic shifts;
// - int4: 16 bytes, zero-extended to 16-bit lanes; byte i holds weight 2i + 8 in its low
//   nibble and 2i + 1 + 8 in its high one.
// _mm256_madd_epi16 then leaves 8 int32 lanes of 4 products each: |q| <= 127 and
// |x| <= 32767 keep a lane below 2**24, exact in int32 and when converted to float, where
// the block's scale (its group's weight scale times x's block scale) is applied.
//
// Each row's blocks are unpacked once and used by up to kTile tokens, so a call with
// T <= kTile tokens reads the weights once.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "linear.h"
#include "linear_impl.h"
#include "linear_quant_x.h"

namespace moeedge {

namespace {

using detail::half_to_float;
using detail::kXBlock;
using detail::load_u16;
using detail::QuantX;

constexpr size_t kTile = 16;  // tokens per pass over a row

// Where the weights lie: block b of row r at q + r * row_bytes + b * block_bytes, the fp16
// scale of its group g at scales + r * scale_row_bytes + g * scale_stride; `per_group`
// 32-weight blocks share a scale.
struct Matrix {
  const uint8_t* q;
  const uint8_t* scales;
  size_t row_bytes, block_bytes, scale_row_bytes, scale_stride, groups, per_group;

  const uint8_t* block(size_t r, size_t b) const { return q + r * row_bytes + b * block_bytes; }
  const uint8_t* scale(size_t r, size_t g) const { return scales + r * scale_row_bytes + g * scale_stride; }
};

// The weight scale of each block of row r, as float: ds[b].
void block_scales(const Matrix& m, size_t r, size_t blocks, float* ds) {
  for (size_t g = 0, b = 0; g < m.groups; ++g) {
    const float d = half_to_float(load_u16(m.scale(r, g)));
    for (const size_t end = std::min(b + m.per_group, blocks); b < end; ++b) ds[b] = d;
  }
}

using KernelFn = void (*)(const QuantX& x, const Matrix& m, float* out, size_t rows, size_t begin, size_t end);

// --------------------------------------------------------------------------- portable

template <int Bits>
void unpack(const uint8_t* p, int8_t* w) {  // a block's 32 weights in natural order
  if constexpr (Bits == 8) {
    std::memcpy(w, p, kXBlock);
  } else {
    for (size_t i = 0; i < kXBlock / 2; ++i) {
      w[2 * i] = static_cast<int8_t>((p[i] & 15) - 8);
      w[2 * i + 1] = static_cast<int8_t>((p[i] >> 4) - 8);
    }
  }
}

template <int Bits>
void rows_scalar(const QuantX& x, const Matrix& m, float* out, size_t rows, size_t begin, size_t end) {
  std::vector<float> ds(x.blocks), acc(x.tokens);
  for (size_t r = begin; r < end; ++r) {
    block_scales(m, r, x.blocks, ds.data());
    std::fill(acc.begin(), acc.end(), 0.f);
    for (size_t b = 0; b < x.blocks; ++b) {
      int8_t w[kXBlock];
      unpack<Bits>(m.block(r, b), w);
      for (size_t t = 0; t < x.tokens; ++t) {
        const int16_t* xq = x.block(t, b);
        int32_t dot = 0;
        for (size_t i = 0; i < kXBlock / 2; ++i) dot += w[2 * i] * xq[i] + w[2 * i + 1] * xq[16 + i];
        acc[t] += ds[b] * *x.scales(t, b) * static_cast<float>(dot);
      }
    }
    for (size_t t = 0; t < x.tokens; ++t) out[t * rows + r] = acc[t];
  }
}

// --------------------------------------------------------------------------- AVX2

#ifdef MOEEDGE_X86
// A block's weights as int16: w[0] the evens, w[1] the odds.
template <int Bits>
MOEEDGE_AVX2 inline void load_block(const uint8_t* p, __m256i* w) {
  if constexpr (Bits == 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    w[0] = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8);
    w[1] = _mm256_srai_epi16(v, 8);
  } else {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i eight = _mm256_set1_epi16(8);
    w[0] = _mm256_sub_epi16(_mm256_and_si256(v, _mm256_set1_epi16(15)), eight);
    w[1] = _mm256_sub_epi16(_mm256_srli_epi16(v, 4), eight);
  }
}

// block_scales with F16C, 8 scales per instruction where each block has its own (G = 32):
// a scalar conversion per block would cost as much as reading the row's weights.
MOEEDGE_AVX2 void block_scales_avx2(const Matrix& m, size_t r, size_t blocks, float* ds) {
  size_t g = 0;
  if (m.per_group == 1 && m.scale_stride == 2) {
    for (; g + 8 <= m.groups; g += 8)
      _mm256_storeu_ps(ds + g, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m.scale(r, g)))));
  } else if (m.per_group == 1) {  // scales between the blocks (Q8_0): gathered 8 at a time
    for (; g + 8 <= m.groups; g += 8) {
      __m128i h = _mm_setzero_si128();
      h = _mm_insert_epi16(h, load_u16(m.scale(r, g)), 0);
      h = _mm_insert_epi16(h, load_u16(m.scale(r, g + 1)), 1);
      h = _mm_insert_epi16(h, load_u16(m.scale(r, g + 2)), 2);
      h = _mm_insert_epi16(h, load_u16(m.scale(r, g + 3)), 3);
      h = _mm_insert_epi16(h, load_u16(m.scale(r, g + 4)), 4);
      h = _mm_insert_epi16(h, load_u16(m.scale(r, g + 5)), 5);
      h = _mm_insert_epi16(h, load_u16(m.scale(r, g + 6)), 6);
      h = _mm_insert_epi16(h, load_u16(m.scale(r, g + 7)), 7);
      _mm256_storeu_ps(ds + g, _mm256_cvtph_ps(h));
    }
  }
  for (size_t b = g * m.per_group; g < m.groups; ++g) {
    const float d = _cvtsh_ss(load_u16(m.scale(r, g)));
    for (const size_t end = std::min(b + m.per_group, blocks); b < end; ++b) ds[b] = d;
  }
}

// The block's 32 products, summed into 8 float lanes (exact: see the top of this file).
MOEEDGE_AVX2 inline __m256 block_dot(const __m256i* w, const int16_t* xq) {
  const __m256i evens = _mm256_madd_epi16(w[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
  const __m256i odds = _mm256_madd_epi16(w[1], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16)));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(evens, odds));
}

// x re-laid in natural order for int8 weights (int8, Q8_0), so that a block's weights
// sign-extend straight from memory (vpmovsxbw) instead of being split into evens and odds
// by three shifts. Q8_0 on Mixtral-medium's 3584 x 1024 experts, one thread, from cache:
// 1.8x the split version's speed. Every token count takes it (row_tile and the decode
// kernel below sum the same way), so that a row's sums do not depend on the batch.
void natural_layout(QuantX& x) {
  constexpr size_t half = kXBlock / 2;
  std::vector<int16_t> q(x.q.size());
  for (size_t t = 0; t < x.tokens; ++t)
    for (size_t b = 0; b < x.stride; ++b) {
      const int16_t* src = x.block(t, b);
      int16_t* dst = q.data() + (t * x.stride + b) * kXBlock;
      for (size_t i = 0; i < half; ++i) {
        dst[2 * i] = src[i];
        dst[2 * i + 1] = src[half + i];
      }
    }
  x.q.swap(q);
}

// A block of int8 weights as int16: lo its first 16, hi its last 16.
MOEEDGE_AVX2 inline void load_natural(const uint8_t* p, __m256i* lo, __m256i* hi) {
  *lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  *hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
}

MOEEDGE_AVX2 inline __m256 natural_dot(__m256i lo, __m256i hi, const int16_t* xq) {
  const __m256i a = _mm256_madd_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
  const __m256i b = _mm256_madd_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16)));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(a, b));
}

MOEEDGE_AVX2 inline __m256 block_dot_natural(const uint8_t* p, const int16_t* xq) {
  __m256i lo, hi;
  load_natural(p, &lo, &hi);
  return natural_dot(lo, hi, xq);
}

template <int Bits>
MOEEDGE_AVX2 inline void load_weights(const Matrix& m, size_t r, size_t b, __m256i* w) {
  if constexpr (Bits == 8) load_natural(m.block(r, b), &w[0], &w[1]);
  else load_block<Bits>(m.block(r, b), w);
}

// a + block b's products with token t's x, times the block's scale ds[b] * x's.
template <int Bits>
MOEEDGE_AVX2 inline __m256 add_block(__m256 a, const __m256i* w, const QuantX& x, size_t t, size_t b, const float* ds) {
  const int16_t* xq = x.block(t, b);
  const __m256 dot = Bits == 8 ? natural_dot(w[0], w[1], xq) : block_dot(w, xq);
  return _mm256_fmadd_ps(dot, _mm256_set1_ps(ds[b] * *x.scales(t, b)), a);
}

// Row r times tokens t0 .. t0 + nt - 1; ds: the row's block scales. kNt: nt known at
// compile time (1: the sums stay in registers), or 0 for nt. A token's blocks are summed
// the same way for any nt (batch invariance):
// - int8: x in natural_layout, one accumulator, as rows_avx2_int8_decode sums;
// - int4: two accumulators, the blocks alternating between them, so that a decode step's
//   consecutive blocks do not wait on each other's FMA.
template <int Bits, size_t kNt>
MOEEDGE_AVX2 void row_tile(const QuantX& x, const Matrix& m, size_t r, const float* ds, size_t t0, size_t nt,
                           float* out, size_t rows) {
  if (kNt) nt = kNt;
  __m256i w[2][2];
  if constexpr (Bits == 8) {
    __m256 acc[kTile];
    for (size_t t = 0; t < nt; ++t) acc[t] = _mm256_setzero_ps();
    for (size_t b = 0; b < x.blocks; ++b) {
      load_weights<Bits>(m, r, b, w[0]);
      for (size_t t = 0; t < nt; ++t) acc[t] = add_block<Bits>(acc[t], w[0], x, t0 + t, b, ds);
    }
    for (size_t t = 0; t < nt; ++t) out[(t0 + t) * rows + r] = detail::hsum(acc[t]);
  } else {
    __m256 acc[kTile][2];
    for (size_t t = 0; t < nt; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    size_t b = 0;
    for (; b + 2 <= x.blocks; b += 2) {
      load_weights<Bits>(m, r, b, w[0]);
      load_weights<Bits>(m, r, b + 1, w[1]);
      for (size_t t = 0; t < nt; ++t) {
        acc[t][0] = add_block<Bits>(acc[t][0], w[0], x, t0 + t, b, ds);
        acc[t][1] = add_block<Bits>(acc[t][1], w[1], x, t0 + t, b + 1, ds);
      }
    }
    if (b < x.blocks) {
      load_weights<Bits>(m, r, b, w[0]);
      for (size_t t = 0; t < nt; ++t) acc[t][0] = add_block<Bits>(acc[t][0], w[0], x, t0 + t, b, ds);
    }
    for (size_t t = 0; t < nt; ++t) out[(t0 + t) * rows + r] = detail::hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
  }
}

template <int Bits>
MOEEDGE_AVX2 void rows_avx2(const QuantX& x, const Matrix& m, float* out, size_t rows, size_t begin, size_t end) {
  std::vector<float> ds(x.blocks);
  for (size_t r = begin; r < end; ++r) {
    block_scales_avx2(m, r, x.blocks, ds.data());
    for (size_t t0 = 0; t0 < x.tokens; t0 += kTile) {
      const size_t nt = std::min(kTile, x.tokens - t0);
      if (nt == 1) row_tile<Bits, 1>(x, m, r, ds.data(), t0, nt, out, rows);
      else row_tile<Bits, 0>(x, m, r, ds.data(), t0, nt, out, rows);
    }
  }
}

// s[b] = ds[b] * xs[b] for row r: its blocks' weight scales times x's.
MOEEDGE_AVX2 void row_scales(const Matrix& m, size_t r, const QuantX& x, float* s) {
  block_scales_avx2(m, r, x.blocks, s);
  const float* xs = x.scales(0, 0);
  size_t b = 0;
  for (; b + 8 <= x.blocks; b += 8)
    _mm256_storeu_ps(s + b, _mm256_mul_ps(_mm256_loadu_ps(s + b), _mm256_loadu_ps(xs + b)));
  for (; b < x.blocks; ++b) s[b] *= xs[b];
}

// Rows read ahead, the same blocks kAheadRows rows on: without it a matrix streamed from
// memory ran at 0.76x ggml's Q8_0 speed on the same bytes (bench/ggml_compare.py, 14336 x
// 4096, one thread). 2, 4 and 8 rows were within noise of each other.
constexpr size_t kAheadRows = 4;

// A block's scale times x's. kInline: the weight scale read with its block (one per block;
// Q8_0's sit between its 34-byte blocks, where gathering a row's first cost 1.6x the
// time); otherwise from the row's block scales formed first, 8 per instruction (row_scales).
template <bool kInline>
MOEEDGE_AVX2 inline __m256 decode_scale(const Matrix& m, size_t r, size_t b, const float* xs, const float* s) {
  if constexpr (kInline) return _mm256_set1_ps(_cvtsh_ss(load_u16(m.scale(r, b))) * xs[b]);
  else return _mm256_broadcast_ss(s + b);
}

// One token, int8 weights: row_tile<8>'s sums (x in natural_layout, one accumulator, a
// block's scale ds[b] * xs[b]), R rows per pass sharing x's loads; rows under
// detail::kSharedRowBytes take one per pass.
template <bool kInline, int R>
MOEEDGE_AVX2 void rows_avx2_int8_decode(const QuantX& x, const Matrix& m, float* out, size_t rows, size_t begin,
                                          size_t end) {
  const float* xs = x.scales(0, 0);
  std::vector<float> s[R];
  if constexpr (!kInline) for (auto& v : s) v.resize(x.stride);
  size_t r = begin;
  for (; r + R <= end; r += R) {
    if constexpr (!kInline) for (int i = 0; i < R; ++i) row_scales(m, r + i, x, s[i].data());
    __m256 a[R];
    for (int i = 0; i < R; ++i) a[i] = _mm256_setzero_ps();
    for (size_t b = 0; b < x.blocks; ++b) {
      const int16_t* xq = x.block(0, b);
      for (int i = 0; i < R; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(m.block(r + kAheadRows + i, b)), _MM_HINT_T0);
        a[i] = _mm256_fmadd_ps(block_dot_natural(m.block(r + i, b), xq), decode_scale<kInline>(m, r + i, b, xs, kInline ? nullptr : s[i].data()), a[i]);
      }
    }
    for (int i = 0; i < R; ++i) out[r + i] = detail::hsum(a[i]);
  }
  for (; r < end; ++r) {
    if constexpr (!kInline) row_scales(m, r, x, s[0].data());
    __m256 a0 = _mm256_setzero_ps();
    for (size_t b = 0; b < x.blocks; ++b)
      a0 = _mm256_fmadd_ps(block_dot_natural(m.block(r, b), x.block(0, b)), decode_scale<kInline>(m, r, b, xs, kInline ? nullptr : s[0].data()), a0);
    out[r] = detail::hsum(a0);
  }
}

// --------------------------------------------------------------------------- AVX-512 VNNI

// Two blocks per 512-bit word: x's blocks are re-laid in pairs (pair_layout), the evens of
// blocks b and b + 1, then their odds; load_pair splits a pair of weight blocks the same
// way. Two vpdpwssd then leave 16 int32 lanes, 0-7 block b's and 8-15 block b + 1's, each
// lane 4 products as in the AVX2 path, and each half takes its own block's scale. (One
// block per word, with the AVX2 split, spent as many instructions per block as AVX2 and
// ran at 0.5-0.9x its speed on a Sapphire Rapids Xeon; bench/kernel_paths.py.)
void pair_layout(QuantX& x) {
  std::vector<int16_t> q(x.q.size());
  constexpr size_t half = kXBlock / 2;
  for (size_t t = 0; t < x.tokens; ++t)
    for (size_t b = 0; b < x.stride; b += 2) {  // stride is a multiple of 8
      const int16_t* src = x.block(t, b);        // evens b, odds b, evens b + 1, odds b + 1
      int16_t* dst = q.data() + (t * x.stride + b) * kXBlock;
      std::memcpy(dst, src, half * 2);
      std::memcpy(dst + half, src + 2 * half, half * 2);
      std::memcpy(dst + 2 * half, src + half, half * 2);
      std::memcpy(dst + 3 * half, src + 3 * half, half * 2);
    }
  x.q.swap(q);
}

// Blocks b and b + 1 of row r (b alone when `lone`: its partner's lanes are zero or meet
// x's zero padding) as int16: e the evens of both, o the odds.
template <int Bits>
MOEEDGE_AVX512VNNI inline void load_pair(const Matrix& m, size_t r, size_t b, bool lone, __m512i* e, __m512i* o) {
  if constexpr (Bits == 8) {
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m.block(r, b)));
    const __m512i v = lone ? _mm512_zextsi256_si512(lo)
                           : _mm512_inserti64x4(_mm512_castsi256_si512(lo),
                                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m.block(r, b + 1))), 1);
    *e = _mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8);
    *o = _mm512_srai_epi16(v, 8);
  } else {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m.block(r, b)));
    const __m128i hi = lone ? _mm_setzero_si128() : _mm_loadu_si128(reinterpret_cast<const __m128i*>(m.block(r, b + 1)));
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
    const __m512i eight = _mm512_set1_epi16(8);
    *e = _mm512_sub_epi16(_mm512_and_si512(v, _mm512_set1_epi16(15)), eight);
    *o = _mm512_sub_epi16(_mm512_srli_epi16(v, 4), eight);
  }
}

MOEEDGE_AVX512VNNI inline __m128 two_floats(const float* p) {
  return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)));
}

// Tokens per pass over a row on AVX-512: their sums stay in registers (16 spilled).
constexpr size_t kTile512 = 8;

// Row r times tokens t0 .. t0 + NT - 1 (x in pair_layout; ds: the row's block scales, zero
// past x.blocks, as x's scales are). Each pair of weight blocks is loaded and split once
// for the NT tokens, whose sums stay in registers, NT known at compile time (with a runtime
// count they lived in memory: mixtral-medium's Q8_0 expert at 4 rows took 0.71x the time
// now; bench/README.md, "Few-row expert calls"). A token's sums do not depend on NT.
template <int Bits, int NT>
MOEEDGE_AVX512VNNI void row_avx512(const QuantX& x, const Matrix& m, size_t r, const float* ds, size_t t0,
                                   float* out, size_t rows) {
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  for (size_t b = 0; b < x.blocks; b += 2) {
    __m512i e, o;
    load_pair<Bits>(m, r, b, b + 1 == x.blocks, &e, &o);
    const __m128 d2 = two_floats(&ds[b]);
    for (int t = 0; t < NT; ++t) {
      const int16_t* xq = x.block(t0 + t, b);
      __m512i sum = _mm512_dpwssd_epi32(_mm512_setzero_si512(), e, _mm512_loadu_si512(xq));
      sum = _mm512_dpwssd_epi32(sum, o, _mm512_loadu_si512(xq + kXBlock));
      const __m128 s2 = _mm_mul_ps(d2, two_floats(x.scales(t0 + t, b)));
      const __m512 scale = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(s2));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) out[(t0 + t) * rows + r] = detail::hsum(acc[t]);
}

// row_avx512 for the n (1 <= n <= NT) tokens from t0 on.
template <int Bits, int NT>
MOEEDGE_AVX512VNNI void row_avx512_n(size_t n, const QuantX& x, const Matrix& m, size_t r, const float* ds, size_t t0,
                                     float* out, size_t rows) {
  if constexpr (NT > 1)
    if (n < NT) return row_avx512_n<Bits, NT - 1>(n, x, m, r, ds, t0, out, rows);
  row_avx512<Bits, NT>(x, m, r, ds, t0, out, rows);
}

template <int Bits>
MOEEDGE_AVX512VNNI void rows_avx512(const QuantX& x, const Matrix& m, float* out, size_t rows, size_t begin,
                                    size_t end) {
  std::vector<float> ds(x.stride);  // zero past x.blocks, as x's scales are
  for (size_t r = begin; r < end; ++r) {
    block_scales_avx2(m, r, x.blocks, ds.data());
    for (size_t t0 = 0; t0 < x.tokens; t0 += kTile512)
      row_avx512_n<Bits, kTile512>(std::min(kTile512, x.tokens - t0), x, m, r, ds.data(), t0, out, rows);
  }
}
#endif

template <int Bits>
void run(const float* x, size_t tokens, const Matrix& m, size_t rows, size_t cols, float* out, int threads) {
  KernelFn fn = rows_scalar<Bits>;
#ifdef MOEEDGE_X86
  if (detail::use_avx512() && detail::has_avx512vnni()) fn = rows_avx512<Bits>;
  else if (detail::use_avx2()) fn = rows_avx2<Bits>;
#endif
  QuantX qx = detail::quantize_x(x, tokens, cols);
#ifdef MOEEDGE_X86
  if (fn == rows_avx512<Bits>) pair_layout(qx);
  if constexpr (Bits == 8) {
    if (fn == rows_avx2<Bits>) natural_layout(qx);
    if (fn == rows_avx2<Bits> && tokens == 1) {
      const bool shared = m.row_bytes >= detail::kSharedRowBytes;
      if (m.per_group == 1) fn = shared ? rows_avx2_int8_decode<true, 2> : rows_avx2_int8_decode<true, 1>;
      else fn = shared ? rows_avx2_int8_decode<false, 2> : rows_avx2_int8_decode<false, 1>;
    }
  }
#endif
  detail::for_rows(rows, cols, threads, [&](size_t begin, size_t end) { fn(qx, m, out, rows, begin, end); });
}

template <int Bits>
void run_group(const float* x, size_t tokens, const uint8_t* q, const uint8_t* scales, size_t rows, size_t cols,
               size_t group, float* out, int threads) {
  if (group == 0 || group % kXBlock != 0)
    throw std::invalid_argument("group must be a positive multiple of 32, got " + std::to_string(group));
  if (cols % kXBlock != 0)
    throw std::invalid_argument("int" + std::to_string(Bits) + " rows must hold whole 32-weight blocks, got in = " +
                                std::to_string(cols));
  const size_t groups = (cols + group - 1) / group;
  const Matrix m{q, scales, cols * Bits / 8, kXBlock * Bits / 8, groups * 2, 2, groups, group / kXBlock};
  run<Bits>(x, tokens, m, rows, cols, out, threads);
}

}  // namespace

void linear_int8(const float* x, size_t tokens, const uint8_t* q, const uint8_t* scales, size_t rows, size_t cols,
                 size_t group, float* out, int threads) {
  run_group<8>(x, tokens, q, scales, rows, cols, group, out, threads);
}

void linear_int4(const float* x, size_t tokens, const uint8_t* q, const uint8_t* scales, size_t rows, size_t cols,
                 size_t group, float* out, int threads) {
  run_group<4>(x, tokens, q, scales, rows, cols, group, out, threads);
}

void linear_q8_0(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                 int threads) {
  const size_t blocks = cols / kQ8Block, row_bytes = blocks * kQ8BlockBytes;
  const Matrix m{w + 2, w, row_bytes, kQ8BlockBytes, row_bytes, kQ8BlockBytes, blocks, 1};
  run<8>(x, tokens, m, rows, cols, out, threads);
}

}  // namespace moeedge
