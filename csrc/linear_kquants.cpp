// GGUF Q4_0, Q4_K, Q5_K and Q6_K multiplied as stored (block layouts in linear.h).
//
// x is first rounded to int16 per 32-value block (quantize_x in linear_quant_x.h, shared by both paths, so
// the paths compute the same integer sums and differ only in float rounding). Within a
// block the int16s are stored evens first, then odds: a 16-bit lane of 32 weight bytes
// splits into its even byte (& 0xff) and odd byte (>> 8) without shuffles, and
// _mm256_madd_epi16 multiplies each half against its half of the block. madd sums
// pairs, so 32-bit lane k of madd(even) + madd(odd) holds weights 4k..4k+3: lanes 0-3
// the block's first 16 weights, lanes 4-7 its last 16 (Q6_K's scales are per 16).
// With |q| <= 32 and |x| <= 32767 the sums over 16 weights stay below 2**24: exact in
// int32 and when converted to float, where the scales are applied.
//
// Tokens go through in passes whose int16 x fits in L2 (rows_avx2), so a call reads the weights
// from memory once per pass: once for up to 32 tokens of a 4096-wide matrix.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
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
using detail::q4_k_scales;
using detail::quantize_x;

// sum of w[i] * x[i] over weights 2*first .. 2*(first+count)-1 of a block: w in natural
// order, xq evens then odds.
inline int32_t dot_pairs(const int8_t* w, const int16_t* xq, int first, int count) {
  int32_t s = 0;
  for (int i = first; i < first + count; ++i) s += w[2 * i] * xq[i] + w[2 * i + 1] * xq[16 + i];
  return s;
}

using KernelFn = void (*)(const QuantX& x, const uint8_t* w, float* out, size_t rows, size_t begin, size_t end);

// --------------------------------------------------------------------------- portable

void q4_0_scalar(const QuantX& x, const uint8_t* w, float* out, size_t rows, size_t begin, size_t end) {
  for (size_t r = begin; r < end; ++r) {
    const uint8_t* row = w + r * x.blocks * kQ4_0BlockBytes;
    for (size_t t = 0; t < x.tokens; ++t) {
      float acc = 0.f;
      for (size_t b = 0; b < x.blocks; ++b) {
        const uint8_t* block = row + b * kQ4_0BlockBytes;
        int8_t q[32];
        for (int i = 0; i < 16; ++i) {
          q[i] = static_cast<int8_t>((block[2 + i] & 15) - 8);
          q[i + 16] = static_cast<int8_t>((block[2 + i] >> 4) - 8);
        }
        acc += half_to_float(load_u16(block)) * *x.scales(t, b) * dot_pairs(q, x.block(t, b), 0, 16);
      }
      out[t * rows + r] = acc;
    }
  }
}

// Q4_K and Q5_K share the header (d, dmin, 6-bit scales and mins) and the nibbles; Q5_K
// puts qh[32] before them, bit j of qh[i] the fifth bit of weight i of sub-block j.
template <bool kFifthBit>
void q4_5_k_scalar(const QuantX& x, const uint8_t* w, float* out, size_t rows, size_t begin, size_t end) {
  constexpr size_t kBytes = kFifthBit ? kQ5KBlockBytes : kQ4KBlockBytes;
  const size_t supers = x.blocks / 8;
  for (size_t r = begin; r < end; ++r) {
    const uint8_t* row = w + r * supers * kBytes;
    for (size_t t = 0; t < x.tokens; ++t) {
      float acc = 0.f;
      for (size_t s = 0; s < supers; ++s) {
        const uint8_t* block = row + s * kBytes;
        const float d = half_to_float(load_u16(block)), dmin = half_to_float(load_u16(block + 2));
        uint64_t sc, m;
        q4_k_scales(block + 4, sc, m);
        const uint8_t *qh = block + 16, *qs = block + (kFifthBit ? 48 : 16);
        for (int j = 0; j < 8; ++j) {  // sub-block j: nibbles (j % 2: high) of the 32 bytes qs[32 * (j / 2) ...]
          int8_t q[32];
          for (int i = 0; i < 32; ++i) {
            const int high = kFifthBit ? ((qh[i] >> j) & 1) << 4 : 0;
            q[i] = static_cast<int8_t>(((qs[32 * (j / 2) + i] >> (4 * (j % 2))) & 15) | high);
          }
          const size_t b = s * 8 + j;
          const int scale = (sc >> 8 * j) & 63, min = (m >> 8 * j) & 63;
          acc += d * scale * *x.scales(t, b) * dot_pairs(q, x.block(t, b), 0, 16) - dmin * min * *x.sums(t, b);
        }
      }
      out[t * rows + r] = acc;
    }
  }
}

void q4_k_scalar(const QuantX& x, const uint8_t* w, float* out, size_t rows, size_t begin, size_t end) {
  q4_5_k_scalar<false>(x, w, out, rows, begin, end);
}

void q5_k_scalar(const QuantX& x, const uint8_t* w, float* out, size_t rows, size_t begin, size_t end) {
  q4_5_k_scalar<true>(x, w, out, rows, begin, end);
}

void q6_k_scalar(const QuantX& x, const uint8_t* w, float* out, size_t rows, size_t begin, size_t end) {
  const size_t supers = x.blocks / 8;
  for (size_t r = begin; r < end; ++r) {
    const uint8_t* row = w + r * supers * kQ6KBlockBytes;
    for (size_t t = 0; t < x.tokens; ++t) {
      float acc = 0.f;
      for (size_t s = 0; s < supers; ++s) {
        const uint8_t *ql = row + s * kQ6KBlockBytes, *qh = ql + 128;
        const auto* sc = reinterpret_cast<const int8_t*>(ql + 192);
        const float d = half_to_float(load_u16(ql + 208));
        // Group g = 4n + k of 32 weights: half n, low 4 bits from nibble k / 2 of ql[64n + 32 (k % 2) + l],
        // high 2 bits from bits 2k, 2k+1 of qh[32n + l]; scales sc[2g] (l < 16) and sc[2g + 1].
        for (int g = 0; g < 8; ++g) {
          const int n = g / 4, k = g % 4;
          int8_t q[32];
          for (int l = 0; l < 32; ++l) {
            const int low = (ql[64 * n + 32 * (k % 2) + l] >> (4 * (k / 2))) & 15;
            const int high = (qh[32 * n + l] >> (2 * k)) & 3;
            q[l] = static_cast<int8_t>((low | high << 4) - 32);
          }
          const size_t b = s * 8 + g;
          const int16_t* xq = x.block(t, b);
          const float xs = *x.scales(t, b);
          acc += d * sc[2 * g] * xs * dot_pairs(q, xq, 0, 8) + d * sc[2 * g + 1] * xs * dot_pairs(q, xq, 8, 8);
        }
      }
      out[t * rows + r] = acc;
    }
  }
}

// --------------------------------------------------------------------------- AVX2

#ifdef MOEEDGE_X86
// The AVX2 path takes a row 8 blocks (256 weights, one K-quant super-block) at a time,
// 2 blocks per step. For a group of 8 blocks starting at `group`, nb of them real (Q4_0
// rows may end inside a group; blocks past the end count as zero), a format provides
// - scales(group, nb, scale, min): the weight scales as group sums come out: scale[k]
//   lane i (< 4) for weights 0..15 of block 4k + i, lane 4 + i for its weights 16..31;
//   min: Q4_K's dmin * m per block (subtracted times the block's sum of x), else zero;
// - pair(group, nb, c, w): blocks 2c and 2c + 1 as int16 evens, odds, evens, odds.

MOEEDGE_AVX2 inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// A block's 32 weights, given as bytes in natural order, as int16 evens and odds minus bias.
MOEEDGE_AVX2 inline void split(__m256i bytes, __m256i bias, __m256i* w) {
  w[0] = _mm256_sub_epi16(_mm256_and_si256(bytes, _mm256_set1_epi16(0xFF)), bias);
  w[1] = _mm256_sub_epi16(_mm256_srli_epi16(bytes, 8), bias);
}

// Per-block scales [8] -> the two scale vectors (both halves of a block share its scale).
MOEEDGE_AVX2 inline void block_scales(__m256 per_block, __m256* scale) {
  scale[0] = _mm256_permutevar8x32_ps(per_block, _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3));
  scale[1] = _mm256_permutevar8x32_ps(per_block, _mm256_setr_epi32(4, 5, 6, 7, 4, 5, 6, 7));
}

MOEEDGE_AVX2 inline __m256 u64_bytes_to_ps(uint64_t bytes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(bytes))));
}

struct Q4_0Avx2 {
  static constexpr size_t kGroupBytes = 8 * kQ4_0BlockBytes;
  MOEEDGE_AVX2 static void scales(const uint8_t* group, size_t nb, __m256* scale, __m256* min) {
    __m128i d;  // fp16 scales; 0 for blocks past the end of the row
    if (nb == 8) {  // from registers: 8 small stores read back as one vector would stall store forwarding
      const auto at = [group](size_t j) { return static_cast<short>(load_u16(group + j * kQ4_0BlockBytes)); };
      d = _mm_setr_epi16(at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7));
    } else {
      alignas(16) uint16_t tail[8] = {};
      for (size_t j = 0; j < nb; ++j) tail[j] = load_u16(group + j * kQ4_0BlockBytes);
      d = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
    }
    block_scales(_mm256_cvtph_ps(d), scale);
    *min = _mm256_setzero_ps();
  }
  MOEEDGE_AVX2 static void pair(const uint8_t* group, size_t nb, int c, __m256i* w) {
    static const uint8_t zeros[kQ4_0BlockBytes] = {};  // past the end of the row: x is 0 there, and so is d
    const size_t j = 2 * c;
    block(j < nb ? group + j * kQ4_0BlockBytes : zeros, w);
    block(j + 1 < nb ? group + (j + 1) * kQ4_0BlockBytes : zeros, w + 2);
  }
  MOEEDGE_AVX2 static void block(const uint8_t* block, __m256i* w) {
    // The 16 bytes in both halves, the upper copy shifted to its high nibbles: bytes = weights 0..31.
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2)));
    const __m256i high_half = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    split(_mm256_and_si256(_mm256_srlv_epi32(both, high_half), _mm256_set1_epi8(0x0F)), _mm256_set1_epi16(8), w);
  }
};

struct Q4_KAvx2 {
  static constexpr size_t kGroupBytes = kQ4KBlockBytes;
  MOEEDGE_AVX2 static void scales(const uint8_t* block, size_t, __m256* scale, __m256* min) {
    uint64_t sc, m;
    q4_k_scales(block + 4, sc, m);
    block_scales(_mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(load_u16(block))), u64_bytes_to_ps(sc)), scale);
    *min = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(load_u16(block + 2))), u64_bytes_to_ps(m));
  }
  MOEEDGE_AVX2 static void pair(const uint8_t* block, size_t, int c, __m256i* w) {
    // 32 bytes: block 2c in the low nibbles, 2c + 1 in the high ones
    const __m256i v = load256(block + 16 + 32 * c), nibble = _mm256_set1_epi16(0x0F);
    w[0] = _mm256_and_si256(v, nibble);
    w[1] = _mm256_and_si256(_mm256_srli_epi16(v, 8), nibble);
    w[2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    w[3] = _mm256_srli_epi16(v, 12);
  }
};

// Bit k (< 8) of each byte of h, moved to bit 4 (16-bit shifts; the mask keeps each byte's own bit).
MOEEDGE_AVX2 inline __m256i fifth_bit(__m256i h, int k) {
  const __m256i moved = _mm256_sll_epi16(_mm256_srl_epi16(h, _mm_cvtsi32_si128(k)), _mm_cvtsi32_si128(4));
  return _mm256_and_si256(moved, _mm256_set1_epi8(0x10));
}

// Q5_K: Q4_K's header and scales, then qh[32] (bit j of byte l: the fifth bit of weight l
// of sub-block j), then Q4_K's 128 bytes of nibbles.
struct Q5_KAvx2 {
  static constexpr size_t kGroupBytes = kQ5KBlockBytes;
  MOEEDGE_AVX2 static void scales(const uint8_t* block, size_t nb, __m256* scale, __m256* min) {
    Q4_KAvx2::scales(block, nb, scale, min);
  }
  MOEEDGE_AVX2 static void pair(const uint8_t* block, size_t, int c, __m256i* w) {
    const __m256i v = load256(block + 48 + 32 * c), h = load256(block + 16), nibble = _mm256_set1_epi8(0x0F);
    const __m256i zero = _mm256_setzero_si256();
    const __m256i h0 = fifth_bit(h, 2 * c), h1 = fifth_bit(h, 2 * c + 1);
    split(_mm256_or_si256(_mm256_and_si256(v, nibble), h0), zero, w);
    split(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), nibble), h1), zero, w + 2);
  }
};

struct Q6_KAvx2 {
  static constexpr size_t kGroupBytes = kQ6KBlockBytes;
  MOEEDGE_AVX2 static void scales(const uint8_t* block, size_t, __m256* scale, __m256* min) {
    // Block j's halves use scales 2j and 2j + 1: reorder them to the scale vectors' lanes.
    const __m128i sc = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 192)),
                                        _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15));
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(load_u16(block + 208)));
    scale[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
    scale[1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))));
    *min = _mm256_setzero_ps();
  }
  MOEEDGE_AVX2 static void pair(const uint8_t* block, size_t, int c, __m256i* w) {
    // Blocks 4n + k, k = 2 (c % 2) and k + 1, as ggml's dequantize_row_q6_K: low 4 bits from nibble
    // k / 2 of ql[64n ...] and ql[64n + 32 ...], high 2 bits from bits 2k.. of qh[32n ...].
    const int n = c / 2;
    const __m256i m0f = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30), bias = _mm256_set1_epi16(32);
    const __m256i ql0 = load256(block + 64 * n), ql1 = load256(block + 64 * n + 32), h = load256(block + 128 + 32 * n);
    if (c % 2 == 0) {
      split(_mm256_or_si256(_mm256_and_si256(ql0, m0f), _mm256_and_si256(_mm256_slli_epi16(h, 4), m30)), bias, w);
      split(_mm256_or_si256(_mm256_and_si256(ql1, m0f), _mm256_and_si256(_mm256_slli_epi16(h, 2), m30)), bias, w + 2);
    } else {
      split(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m0f), _mm256_and_si256(h, m30)), bias, w);
      split(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m0f),
                            _mm256_and_si256(_mm256_srli_epi16(h, 2), m30)),
            bias, w + 2);
    }
  }
};

// Two blocks (w: evens, odds, evens, odds) times x: lanes 0, 1 sum the first block's weights
// 0..7 and 8..15, lanes 2, 3 the second's; lanes 4-7 the same for weights 16..31.
MOEEDGE_AVX2 inline __m256i pair_dot(const __m256i* w, const int16_t* xq) {
  __m256i d[4];  // lane k of d[i]: 2 products of weights 4k.., evens (i even) or odds, of block i / 2
  for (int i = 0; i < 4; ++i) d[i] = _mm256_madd_epi16(w[i], load256(xq + 16 * i));
  return _mm256_hadd_epi32(_mm256_add_epi32(d[0], d[1]), _mm256_add_epi32(d[2], d[3]));
}

// Row r times tokens t0 .. t0 + kNt - 1: the count known at compile time, up to kFewTokens, so
// the per-token sums stay in registers (a runtime count kept them in memory; more tokens would
// spill AVX2's 16 registers).
constexpr size_t kFewTokens = 4;
template <class Format, size_t kNt>
MOEEDGE_AVX2 void row_tile(const QuantX& x, const uint8_t* row, size_t t0, float* out, size_t rows, size_t r) {
  constexpr size_t nt = kNt;
  __m256 acc[kNt];
  __m256i half[kNt], sums[kNt][2];  // hadd of pairs 0 and 1 (then 2 and 3) of a group, per token
  for (size_t t = 0; t < nt; ++t) acc[t] = _mm256_setzero_ps();
  for (size_t g = 0; g < (x.blocks + 7) / 8; ++g) {
    const uint8_t* group = row + g * Format::kGroupBytes;
    const size_t nb = std::min<size_t>(8, x.blocks - 8 * g);
    for (int c = 0; c < 4; ++c) {
      __m256i wq[4];
      Format::pair(group, nb, c, wq);
      for (size_t t = 0; t < nt; ++t) {
        const __m256i p = pair_dot(wq, x.block(t0 + t, 8 * g + 2 * c));
        // sums[t][k] lane i: the first half of block 4k + i, lane 4 + i its second half
        if (c % 2 == 0) half[t] = p;
        else sums[t][c / 2] = _mm256_hadd_epi32(half[t], p);
      }
    }
    __m256 scale[2], min;
    Format::scales(group, nb, scale, &min);
    for (size_t t = 0; t < nt; ++t) {
      const float* xs = x.scales(t0 + t, 8 * g);  // x scales of blocks 4k .. 4k + 3 in both halves
      const __m256 xs0 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xs));
      const __m256 xs1 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xs + 4));
      __m256 a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[t][0]), _mm256_mul_ps(scale[0], xs0), acc[t]);
      a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[t][1]), _mm256_mul_ps(scale[1], xs1), a);
      acc[t] = _mm256_fnmadd_ps(min, _mm256_loadu_ps(x.sums(t0 + t, 8 * g)), a);
    }
  }
  for (size_t t = 0; t < nt; ++t) out[(t0 + t) * rows + r] = detail::hsum(acc[t]);
}

// row_tile for the n tokens from t0 on: n known at compile time up to NT.
template <class Format, size_t NT>
MOEEDGE_AVX2 void row_tile_n(size_t n, const QuantX& x, const uint8_t* row, size_t t0, float* out, size_t rows,
                             size_t r) {
  if constexpr (NT > 1)
    if (n < NT) return row_tile_n<Format, NT - 1>(n, x, row, t0, out, rows, r);
  row_tile<Format, NT>(x, row, t0, out, rows, r);
}

// Tokens in passes whose int16 x fits in kXPassBytes (L2): each row then reads its tokens' x from
// L2, not memory (each row streaming every token's x ran Q4_K at a tenth of ggml's speed at 128
// tokens: bench/ggml_compare.py), and the weights are read from memory once per pass. Within a
// pass each row's bytes stay in L1 while its tokens go through kFewTokens at a time, their sums
// in registers.
constexpr size_t kXPassBytes = 256 << 10;

template <class Format>
MOEEDGE_AVX2 void rows_avx2(const QuantX& x, const uint8_t* w, size_t row_bytes, float* out, size_t rows, size_t begin,
                            size_t end) {
  const size_t fit = kXPassBytes / (x.stride * kXBlock * sizeof(int16_t));
  const size_t pass = std::max(kFewTokens, fit / kFewTokens * kFewTokens);
  for (size_t p0 = 0; p0 < x.tokens; p0 += pass) {
    const size_t p1 = std::min(x.tokens, p0 + pass);
    for (size_t r = begin; r < end; ++r)
      for (size_t t0 = p0; t0 < p1; t0 += kFewTokens)
        row_tile_n<Format, kFewTokens>(std::min(kFewTokens, p1 - t0), x, w + r * row_bytes, t0, out, rows, r);
  }
}

MOEEDGE_AVX2 void q4_0_avx2(const QuantX& x, const uint8_t* w, float* out, size_t rows, size_t begin, size_t end) {
  rows_avx2<Q4_0Avx2>(x, w, x.blocks * kQ4_0BlockBytes, out, rows, begin, end);
}
MOEEDGE_AVX2 void q4_k_avx2(const QuantX& x, const uint8_t* w, float* out, size_t rows, size_t begin, size_t end) {
  rows_avx2<Q4_KAvx2>(x, w, x.blocks / 8 * kQ4KBlockBytes, out, rows, begin, end);
}
MOEEDGE_AVX2 void q5_k_avx2(const QuantX& x, const uint8_t* w, float* out, size_t rows, size_t begin, size_t end) {
  rows_avx2<Q5_KAvx2>(x, w, x.blocks / 8 * kQ5KBlockBytes, out, rows, begin, end);
}
MOEEDGE_AVX2 void q6_k_avx2(const QuantX& x, const uint8_t* w, float* out, size_t rows, size_t begin, size_t end) {
  rows_avx2<Q6_KAvx2>(x, w, x.blocks / 8 * kQ6KBlockBytes, out, rows, begin, end);
}
#endif

void run(KernelFn fn, const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
         int threads) {
  const QuantX qx = quantize_x(x, tokens, cols);
  detail::for_rows(rows, cols, threads, [&](size_t begin, size_t end) { fn(qx, w, out, rows, begin, end); });
}

#ifdef MOEEDGE_X86
KernelFn pick(KernelFn scalar, KernelFn avx2) { return detail::use_avx2() ? avx2 : scalar; }
#define MOEEDGE_KERNEL(name) pick(name##_scalar, name##_avx2)
#else
#define MOEEDGE_KERNEL(name) name##_scalar
#endif

}  // namespace

void linear_q4_0(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                 int threads) {
  run(MOEEDGE_KERNEL(q4_0), x, tokens, w, rows, cols, out, threads);
}

void linear_q4_k(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                 int threads) {
  run(MOEEDGE_KERNEL(q4_k), x, tokens, w, rows, cols, out, threads);
}

void linear_q5_k(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                 int threads) {
  run(MOEEDGE_KERNEL(q5_k), x, tokens, w, rows, cols, out, threads);
}

void linear_q6_k(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                 int threads) {
  run(MOEEDGE_KERNEL(q6_k), x, tokens, w, rows, cols, out, threads);
}

}  // namespace moeedge

