// GGUF Q4_K, Q5_K and Q6_K multiplied as stored, for many tokens at a time: the prompt
// kernels (linear.h). With AVX-512 VNNI 1.5-1.9x the decode kernels' speed from 16 tokens on,
// about half of it at one token (bench/README.md, "Prompt kernels"), so a prompt takes these and
// a decode step the others; with AVX2 alone they do not pay (moeedge.kernels.prompt_kernels_pay).
//
// x is rounded to int16 per 256 values, one scale per K-quant super-block (QuantX256), and
// each super-block's weights are unpacked to int16 with their sub-block scale already
// multiplied in: w' = sc * q (Q4_K |w'| <= 945, Q5_K <= 1953, Q6_K <= 4096). A super-block's
// sum of w' * x is then one integer sum, exact in int32 lanes: a lane takes at most 16
// products (4096 * 32767 * 16 < 2**31), and float arithmetic comes once per super-block
// (d * dx, and the mins, which go through the exact fp32 sums of x per 32). Folding the
// sub-block scales into the weights is what lets many tokens share one unpacked row: the
// inner loop is one multiply-add instruction per 16 or 32 products (the decode kernels' per-32
// scales of x need a float conversion and a scale for every 32 products).
//
// Rows go through a chunk of kChunkSupers super-blocks at a time: up to kRows rows of the
// chunk unpacked into a buffer (in L1/L2), then tokens kTokens at a time multiply them with
// their sums in registers. Each output is the same float operations in the same order
// whatever the tile, the token count and the threads (batch invariance, linear.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "linear.h"
#include "linear_impl.h"
#include "linear_quant_x.h"

namespace moeedge {

namespace {

using detail::half_to_float;
using detail::load_u16;
using detail::QuantX256;
using detail::q4_k_scales;
using detail::quantize_x256;

constexpr size_t kChunkSupers = 16;  // 4096 columns: kRows unpacked rows stay in L1/L2
constexpr size_t kRows = 4, kTokens = 4;

// One super-block of a row, unpacked: w' = sc * q in natural order, d, and dmin * m per 32 (zero for Q6_K).
struct Unpacked {
  alignas(64) int16_t w[kQKBlock];
  alignas(32) float mins[8];
  float d;
};

// Q4_K and Q5_K share the header (d, dmin, 6-bit scales and mins) and the nibbles; Q5_K
// puts qh[32] before them, bit j of qh[i] the fifth bit of weight i of sub-block j.
void q4_5_k_header(const uint8_t* block, Unpacked& u, int* scales) {
  uint64_t sc, m;
  q4_k_scales(block + 4, sc, m);
  u.d = half_to_float(load_u16(block));
  const float dmin = half_to_float(load_u16(block + 2));
  for (int j = 0; j < 8; ++j) {
    scales[j] = static_cast<int>((sc >> 8 * j) & 63);
    u.mins[j] = dmin * static_cast<float>((m >> 8 * j) & 63);
  }
}

template <bool kFifthBit>
void q4_5_k_unpack(const uint8_t* block, Unpacked& u) {
  int sc[8];
  q4_5_k_header(block, u, sc);
  const uint8_t *qh = block + 16, *qs = block + (kFifthBit ? 48 : 16);
  for (int j = 0; j < 8; ++j)  // sub-block j: nibbles (j % 2: high) of the 32 bytes qs[32 * (j / 2) ...]
    for (int i = 0; i < 32; ++i) {
      const int high = kFifthBit ? ((qh[i] >> j) & 1) << 4 : 0;
      u.w[32 * j + i] = static_cast<int16_t>(sc[j] * (((qs[32 * (j / 2) + i] >> (4 * (j % 2))) & 15) | high));
    }
}

void q6_k_unpack(const uint8_t* block, Unpacked& u) {
  const uint8_t *ql = block, *qh = block + 128;
  const auto* sc = reinterpret_cast<const int8_t*>(block + 192);
  u.d = half_to_float(load_u16(block + 208));
  std::fill(u.mins, u.mins + 8, 0.f);
  // Group g = 4n + k of 32 weights: half n, low 4 bits from nibble k / 2 of ql[64n + 32 (k % 2) + l],
  // high 2 bits from bits 2k, 2k+1 of qh[32n + l]; scales sc[2g] (l < 16) and sc[2g + 1].
  for (int g = 0; g < 8; ++g) {
    const int n = g / 4, k = g % 4;
    for (int l = 0; l < 32; ++l) {
      const int low = (ql[64 * n + 32 * (k % 2) + l] >> (4 * (k / 2))) & 15;
      const int high = (qh[32 * n + l] >> (2 * k)) & 3;
      u.w[32 * g + l] = static_cast<int16_t>(sc[2 * g + l / 16] * ((low | high << 4) - 32));
    }
  }
}

using UnpackFn = void (*)(const uint8_t* block, Unpacked& u);

// --------------------------------------------------------------------------- portable

// Rows [begin, end) times every token, a super-block at a time.
void rows_scalar(size_t block_bytes, UnpackFn unpack, const QuantX256& x, const uint8_t* w, float* out,
                 size_t rows, size_t begin, size_t end) {
  Unpacked u;
  for (size_t r = begin; r < end; ++r) {
    for (size_t t = 0; t < x.tokens; ++t) out[t * rows + r] = 0.f;
    for (size_t s = 0; s < x.supers; ++s) {
      unpack(w + (r * x.supers + s) * block_bytes, u);
      for (size_t t = 0; t < x.tokens; ++t) {
        const int16_t* xq = x.block(t, s);
        int64_t dot = 0;
        for (size_t i = 0; i < kQKBlock; ++i) dot += int32_t{u.w[i]} * xq[i];
        float acc = static_cast<float>(dot) * (u.d * *x.scale(t, s));
        for (int j = 0; j < 8; ++j) acc -= u.mins[j] * x.sums(t, s)[j];
        out[t * rows + r] += acc;
      }
    }
  }
}

// --------------------------------------------------------------------------- AVX2, AVX-512

#ifdef MOEEDGE_X86
MOEEDGE_AVX2 inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// 32 bytes of q (0..63) times their scales into w[0..31]: bytes 0-15 times s0, 16-31 times s1.
MOEEDGE_AVX2 inline void store_scaled(int16_t* w, __m256i q, int s0, int s1, __m256i bias) {
  const __m256i lo = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(q)), bias);
  const __m256i hi = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(q, 1)), bias);
  _mm256_store_si256(reinterpret_cast<__m256i*>(w), _mm256_mullo_epi16(lo, _mm256_set1_epi16(static_cast<short>(s0))));
  _mm256_store_si256(reinterpret_cast<__m256i*>(w + 16),
                     _mm256_mullo_epi16(hi, _mm256_set1_epi16(static_cast<short>(s1))));
}

// Bit k (< 8) of each byte of h, moved to bit 4 (16-bit shifts; the mask keeps each byte's own bit).
MOEEDGE_AVX2 inline __m256i fifth_bit(__m256i h, int k) {
  const __m256i moved = _mm256_sll_epi16(_mm256_srl_epi16(h, _mm_cvtsi32_si128(k)), _mm_cvtsi32_si128(4));
  return _mm256_and_si256(moved, _mm256_set1_epi8(0x10));
}

MOEEDGE_AVX2 inline __m256 u64_bytes_to_ps(uint64_t bytes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(bytes))));
}

// q4_5_k_header with F16C and vectors: the scales as bytes of sc.
MOEEDGE_AVX2 inline uint64_t q4_5_k_header_avx2(const uint8_t* block, Unpacked& u) {
  uint64_t sc, m;
  q4_k_scales(block + 4, sc, m);
  u.d = _cvtsh_ss(load_u16(block));
  _mm256_store_ps(u.mins, _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(load_u16(block + 2))), u64_bytes_to_ps(m)));
  return sc;
}

// Sub-blocks 2c (lo) and 2c + 1 (hi) of a Q4_K or Q5_K super-block as bytes q: the low and
// high nibbles of 32 bytes, and Q5_K's fifth bits.
template <bool kFifthBit>
MOEEDGE_AVX2 inline void q4_5_k_bytes(const uint8_t* block, int c, __m256i* lo, __m256i* hi) {
  const __m256i nibble = _mm256_set1_epi8(0x0F), v = load256(block + (kFifthBit ? 48 : 16) + 32 * c);
  *lo = _mm256_and_si256(v, nibble);
  *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
  if (kFifthBit) {
    const __m256i h = load256(block + 16);
    *lo = _mm256_or_si256(*lo, fifth_bit(h, 2 * c));
    *hi = _mm256_or_si256(*hi, fifth_bit(h, 2 * c + 1));
  }
}

template <bool kFifthBit>
MOEEDGE_AVX2 void q4_5_k_unpack_avx2(const uint8_t* block, Unpacked& u) {
  uint64_t scales = q4_5_k_header_avx2(block, u);
  int sc[8];
  for (int j = 0; j < 8; ++j) sc[j] = static_cast<int>((scales >> 8 * j) & 0xFF);
  const __m256i zero = _mm256_setzero_si256();
  for (int c = 0; c < 4; ++c) {
    __m256i lo, hi;
    q4_5_k_bytes<kFifthBit>(block, c, &lo, &hi);
    store_scaled(u.w + 64 * c, lo, sc[2 * c], sc[2 * c], zero);
    store_scaled(u.w + 64 * c + 32, hi, sc[2 * c + 1], sc[2 * c + 1], zero);
  }
}

// Groups 4n .. 4n + 3 of a Q6_K super-block as bytes q (0..63), as ggml's dequantize_row_q6_K
// (q6_k_unpack): low 4 bits from ql[64n ...] and ql[64n + 32 ...], high 2 from qh[32n ...].
MOEEDGE_AVX2 inline void q6_k_bytes(const uint8_t* block, int n, __m256i* q) {
  const __m256i m0f = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
  const __m256i ql0 = load256(block + 64 * n), ql1 = load256(block + 64 * n + 32), h = load256(block + 128 + 32 * n);
  q[0] = _mm256_or_si256(_mm256_and_si256(ql0, m0f), _mm256_and_si256(_mm256_slli_epi16(h, 4), m30));
  q[1] = _mm256_or_si256(_mm256_and_si256(ql1, m0f), _mm256_and_si256(_mm256_slli_epi16(h, 2), m30));
  q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m0f), _mm256_and_si256(h, m30));
  q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m0f),
                         _mm256_and_si256(_mm256_srli_epi16(h, 2), m30));
}

MOEEDGE_AVX2 void q6_k_unpack_avx2(const uint8_t* block, Unpacked& u) {
  const auto* sc = reinterpret_cast<const int8_t*>(block + 192);
  u.d = _cvtsh_ss(load_u16(block + 208));
  _mm256_store_ps(u.mins, _mm256_setzero_ps());
  const __m256i bias = _mm256_set1_epi16(32);
  for (int n = 0; n < 2; ++n) {  // groups 4n + k as ggml's dequantize_row_q6_K (q6_k_unpack)
    __m256i q[4];
    q6_k_bytes(block, n, q);
    for (int k = 0; k < 4; ++k) {
      const int g = 4 * n + k;
      store_scaled(u.w + 32 * g, q[k], sc[2 * g], sc[2 * g + 1], bias);
    }
  }
}

// The same unpacking in zmm (same w' as the AVX2 and portable ones): 32 weights an instruction.
MOEEDGE_AVX512VNNI inline void store_scaled512(int16_t* w, __m256i q, __m512i scale, __m512i bias) {
  const __m512i wide = _mm512_sub_epi16(_mm512_cvtepu8_epi16(q), bias);
  _mm512_store_si512(w, _mm512_mullo_epi16(wide, scale));
}

template <bool kFifthBit>
MOEEDGE_AVX512VNNI void q4_5_k_unpack_avx512(const uint8_t* block, Unpacked& u) {
  const uint64_t sc = q4_5_k_header_avx2(block, u);
  // 16-bit lane i of scales: sub-block i's scale, broadcast by permutexvar below
  const __m512i scales = _mm512_cvtepu8_epi16(_mm256_castsi128_si256(_mm_cvtsi64_si128(static_cast<long long>(sc))));
  for (int c = 0; c < 4; ++c) {
    __m256i lo, hi;
    q4_5_k_bytes<kFifthBit>(block, c, &lo, &hi);
    const __m512i none = _mm512_setzero_si512();
    store_scaled512(u.w + 64 * c, lo, _mm512_permutexvar_epi16(_mm512_set1_epi16(2 * c), scales), none);
    store_scaled512(u.w + 64 * c + 32, hi, _mm512_permutexvar_epi16(_mm512_set1_epi16(2 * c + 1), scales), none);
  }
}

MOEEDGE_AVX512VNNI void q6_k_unpack_avx512(const uint8_t* block, Unpacked& u) {
  u.d = _cvtsh_ss(load_u16(block + 208));
  _mm256_store_ps(u.mins, _mm256_setzero_ps());
  // 16-bit lane i: scale i (int8), for weights 16i .. 16i + 15
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 192));
  const __m512i scales = _mm512_cvtepi8_epi16(_mm256_castsi128_si256(bytes));
  const __m512i bias = _mm512_set1_epi16(32);
  const __m512i halves = _mm512_set_epi16(1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                          0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int n = 0; n < 2; ++n) {  // groups 4n + k as ggml's dequantize_row_q6_K (q6_k_unpack)
    __m256i q[4];
    q6_k_bytes(block, n, q);
    for (int k = 0; k < 4; ++k) {
      const int g = 4 * n + k;
      const __m512i scale = _mm512_permutexvar_epi16(_mm512_add_epi16(halves, _mm512_set1_epi16(2 * g)), scales);
      store_scaled512(u.w + 32 * g, q[k], scale, bias);
    }
  }
}

// Tokens t0 .. t0 + kT - 1 times rows u[0..kR) over a chunk of `count` super-blocks from s0;
// out (first chunk) or out + (later ones) each (row, token)'s sum. Same operations per
// output whatever kR and kT are.
template <size_t kR, size_t kT, bool kMins>
MOEEDGE_AVX2 void tile_avx2(const Unpacked* const* u, const QuantX256& x, size_t t0, size_t s0, size_t count,
                            bool first, float* out, size_t rows, size_t r0) {
  __m256 acc[kR][kT];
  for (size_t r = 0; r < kR; ++r)
    for (size_t t = 0; t < kT; ++t) acc[r][t] = _mm256_setzero_ps();
  for (size_t s = 0; s < count; ++s) {
    __m256i even[kR][kT], odd[kR][kT];  // 16 products a lane at most in each
    for (size_t r = 0; r < kR; ++r)
      for (size_t t = 0; t < kT; ++t) even[r][t] = odd[r][t] = _mm256_setzero_si256();
    for (size_t v = 0; v < 16; v += 2) {
      __m256i x0[kT], x1[kT];
      for (size_t t = 0; t < kT; ++t) {
        x0[t] = load256(x.block(t0 + t, s0 + s) + 16 * v);
        x1[t] = load256(x.block(t0 + t, s0 + s) + 16 * v + 16);
      }
      for (size_t r = 0; r < kR; ++r) {
        const __m256i w0 = load256(u[r][s].w + 16 * v), w1 = load256(u[r][s].w + 16 * v + 16);
        for (size_t t = 0; t < kT; ++t) {
          even[r][t] = _mm256_add_epi32(even[r][t], _mm256_madd_epi16(w0, x0[t]));
          odd[r][t] = _mm256_add_epi32(odd[r][t], _mm256_madd_epi16(w1, x1[t]));
        }
      }
    }
    for (size_t r = 0; r < kR; ++r) {
      const float d = u[r][s].d;
      for (size_t t = 0; t < kT; ++t) {
        const __m256 dot = _mm256_add_ps(_mm256_cvtepi32_ps(even[r][t]), _mm256_cvtepi32_ps(odd[r][t]));
        acc[r][t] = _mm256_fmadd_ps(dot, _mm256_set1_ps(d * *x.scale(t0 + t, s0 + s)), acc[r][t]);
        if (kMins)
          acc[r][t] = _mm256_fnmadd_ps(_mm256_load_ps(u[r][s].mins), _mm256_loadu_ps(x.sums(t0 + t, s0 + s)), acc[r][t]);
      }
    }
  }
  for (size_t r = 0; r < kR; ++r)
    for (size_t t = 0; t < kT; ++t) {
      float& o = out[(t0 + t) * rows + r0 + r];
      o = first ? detail::hsum(acc[r][t]) : o + detail::hsum(acc[r][t]);
    }
}

// tile_avx2 in zmm with VNNI: 32 products an instruction (dpwssd), 16 a lane at most.
// (AVX-512 without VNNI takes tile_avx2: no instruction here may be one such a CPU lacks.)
template <size_t kR, size_t kT, bool kMins>
MOEEDGE_AVX512VNNI void tile_avx512(const Unpacked* const* u, const QuantX256& x, size_t t0, size_t s0, size_t count,
                                    bool first, float* out, size_t rows, size_t r0) {
  __m512 acc[kR][kT];
  for (size_t r = 0; r < kR; ++r)
    for (size_t t = 0; t < kT; ++t) acc[r][t] = _mm512_setzero_ps();
  for (size_t s = 0; s < count; ++s) {
    __m512i dot[kR][kT];
    for (size_t r = 0; r < kR; ++r)
      for (size_t t = 0; t < kT; ++t) dot[r][t] = _mm512_setzero_si512();
    for (size_t v = 0; v < 8; ++v) {
      __m512i xv[kT];
      for (size_t t = 0; t < kT; ++t) xv[t] = _mm512_loadu_si512(x.block(t0 + t, s0 + s) + 32 * v);
      for (size_t r = 0; r < kR; ++r) {
        const __m512i wv = _mm512_load_si512(u[r][s].w + 32 * v);
        for (size_t t = 0; t < kT; ++t)
          dot[r][t] = _mm512_dpwssd_epi32(dot[r][t], wv, xv[t]);
      }
    }
    for (size_t r = 0; r < kR; ++r) {
      const float d = u[r][s].d;
      for (size_t t = 0; t < kT; ++t) {
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][t]), _mm512_set1_ps(d * *x.scale(t0 + t, s0 + s)),
                                    acc[r][t]);
        if (kMins)
          acc[r][t] = _mm512_fnmadd_ps(_mm512_zextps256_ps512(_mm256_load_ps(u[r][s].mins)),
                                       _mm512_zextps256_ps512(_mm256_loadu_ps(x.sums(t0 + t, s0 + s))), acc[r][t]);
      }
    }
  }
  for (size_t r = 0; r < kR; ++r)
    for (size_t t = 0; t < kT; ++t) {
      float& o = out[(t0 + t) * rows + r0 + r];
      o = first ? detail::hsum(acc[r][t]) : o + detail::hsum(acc[r][t]);
    }
}

using TileFn = void (*)(const Unpacked* const*, const QuantX256&, size_t, size_t, size_t, bool, float*, size_t, size_t);

enum class Simd { avx2, avx512_vnni };

template <size_t kR, size_t kT>
TileFn tile_for(Simd simd, bool mins) {
  if (simd == Simd::avx2) return mins ? tile_avx2<kR, kT, true> : tile_avx2<kR, kT, false>;
  return mins ? tile_avx512<kR, kT, true> : tile_avx512<kR, kT, false>;
}

template <size_t kR>
TileFn tile_for(Simd simd, bool mins, size_t tokens) {
  switch (tokens) {
    case 1: return tile_for<kR, 1>(simd, mins);
    case 2: return tile_for<kR, 2>(simd, mins);
    case 3: return tile_for<kR, 3>(simd, mins);
    default: return tile_for<kR, 4>(simd, mins);
  }
}

// mins: whether the format has them (Q4_K, Q5_K); Q6_K's are zero and its tiles skip them.
TileFn tile_for(Simd simd, bool mins, size_t rows, size_t tokens) {
  switch (rows) {
    case 1: return tile_for<1>(simd, mins, tokens);
    case 2: return tile_for<2>(simd, mins, tokens);
    case 3: return tile_for<3>(simd, mins, tokens);
    default: return tile_for<4>(simd, mins, tokens);
  }
}

// Tokens in passes whose int16 x of one chunk fits in kXPassBytes (L2), so a chunk's rows are
// unpacked once per pass; within a pass kRows rows x kTokens tokens at a time.
constexpr size_t kXPassBytes = 256 << 10;

void rows_simd(Simd simd, bool mins, size_t block_bytes, UnpackFn unpack, const QuantX256& x, const uint8_t* w, float* out,
               size_t rows, size_t begin, size_t end) {
  std::vector<Unpacked> buffer(kRows * kChunkSupers);
  const size_t chunk_bytes = std::min(x.supers, kChunkSupers) * kQKBlock * sizeof(int16_t);
  const size_t pass = std::max(kTokens, kXPassBytes / chunk_bytes / kTokens * kTokens);
  for (size_t p0 = 0; p0 < x.tokens; p0 += pass) {
    const size_t p1 = std::min(x.tokens, p0 + pass);
    for (size_t s0 = 0; s0 < x.supers; s0 += kChunkSupers) {
      const size_t count = std::min(kChunkSupers, x.supers - s0);
      for (size_t r0 = begin; r0 < end; r0 += kRows) {
        const size_t nr = std::min(kRows, end - r0);
        const Unpacked* u[kRows];
        for (size_t r = 0; r < nr; ++r) {
          Unpacked* row = buffer.data() + r * kChunkSupers;
          for (size_t s = 0; s < count; ++s) unpack(w + ((r0 + r) * x.supers + s0 + s) * block_bytes, row[s]);
          u[r] = row;
        }
        for (size_t t0 = p0; t0 < p1; t0 += kTokens) {
          const size_t nt = std::min(kTokens, p1 - t0);
          tile_for(simd, mins, nr, nt)(u, x, t0, s0, count, s0 == 0, out, rows, r0);
        }
      }
    }
  }
}
#endif

// A format: its super-block's bytes, and its unpacking on each path (all give the same w').
struct Kernel {
  size_t block_bytes;
  bool mins;  // dmin * m per 32 weights (Q4_K, Q5_K); none in Q6_K
  UnpackFn scalar, avx2, avx512;
};

void run(const Kernel& k, const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
         int threads) {
  const QuantX256 qx = quantize_x256(x, tokens, cols);
#ifdef MOEEDGE_X86
  if (detail::use_avx2()) {
    const Simd simd = detail::use_avx512() && detail::has_avx512vnni() ? Simd::avx512_vnni : Simd::avx2;
    const UnpackFn unpack = simd == Simd::avx2 ? k.avx2 : k.avx512;
    detail::for_rows(rows, cols, threads, [&](size_t begin, size_t end) {
      rows_simd(simd, k.mins, k.block_bytes, unpack, qx, w, out, rows, begin, end);
    });
    return;
  }
#endif
  detail::for_rows(rows, cols, threads,
                   [&](size_t begin, size_t end) {
                     rows_scalar(k.block_bytes, k.scalar, qx, w, out, rows, begin, end);
                   });
}

#ifdef MOEEDGE_X86
const Kernel kQ4K{kQ4KBlockBytes, true, q4_5_k_unpack<false>, q4_5_k_unpack_avx2<false>, q4_5_k_unpack_avx512<false>};
const Kernel kQ5K{kQ5KBlockBytes, true, q4_5_k_unpack<true>, q4_5_k_unpack_avx2<true>, q4_5_k_unpack_avx512<true>};
const Kernel kQ6K{kQ6KBlockBytes, false, q6_k_unpack, q6_k_unpack_avx2, q6_k_unpack_avx512};
#else
const Kernel kQ4K{kQ4KBlockBytes, true, q4_5_k_unpack<false>};
const Kernel kQ5K{kQ5KBlockBytes, true, q4_5_k_unpack<true>};
const Kernel kQ6K{kQ6KBlockBytes, false, q6_k_unpack};
#endif

}  // namespace

void linear_q4_k_x256(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                 int threads) {
  run(kQ4K, x, tokens, w, rows, cols, out, threads);
}

void linear_q5_k_x256(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                 int threads) {
  run(kQ5K, x, tokens, w, rows, cols, out, threads);
}

void linear_q6_k_x256(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                 int threads) {
  run(kQ6K, x, tokens, w, rows, cols, out, threads);
}

}  // namespace moeedge
