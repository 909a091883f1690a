// moeedge's group-wise int8 and int4 weights (layout in linear.h) multiplied as stored.
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

// Where the weights lie: row r's packed weights at q + r * row_bytes, its fp16 scales at
// scales + r * groups * 2; `per_group` 32-weight blocks share a scale.
struct Matrix {
  const uint8_t* q;
  const uint8_t* scales;
  size_t row_bytes, groups, per_group;
};

template <int Bits>
constexpr size_t kBlockBytes = kXBlock * Bits / 8;

// The weight scale of each block of row r, as float: ds[b].
void block_scales(const Matrix& m, size_t r, size_t blocks, float* ds) {
  const uint8_t* sc = m.scales + r * m.groups * 2;
  for (size_t g = 0, b = 0; g < m.groups; ++g) {
    const float d = half_to_float(load_u16(sc + 2 * g));
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
      unpack<Bits>(m.q + r * m.row_bytes + b * kBlockBytes<Bits>, w);
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
  const uint8_t* sc = m.scales + r * m.groups * 2;
  size_t g = 0;
  if (m.per_group == 1) {
    for (; g + 8 <= m.groups; g += 8)
      _mm256_storeu_ps(ds + g, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 2 * g))));
  }
  for (size_t b = g * m.per_group; g < m.groups; ++g) {
    const float d = _cvtsh_ss(load_u16(sc + 2 * g));
    for (const size_t end = std::min(b + m.per_group, blocks); b < end; ++b) ds[b] = d;
  }
}

// The block's 32 products, summed into 8 float lanes (exact: see the top of this file).
MOEEDGE_AVX2 inline __m256 block_dot(const __m256i* w, const int16_t* xq) {
  const __m256i evens = _mm256_madd_epi16(w[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
  const __m256i odds = _mm256_madd_epi16(w[1], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16)));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(evens, odds));
}

// Row r times tokens t0 .. t0 + nt - 1; ds: the row's block scales. kNt = 1 (decode): two
// accumulators, so that consecutive blocks do not wait on each other's FMA.
template <int Bits, size_t kNt>
MOEEDGE_AVX2 void row_tile(const QuantX& x, const uint8_t* row, const float* ds, size_t t0, size_t nt, float* out,
                           size_t rows, size_t r) {
  __m256i w[2];
  if constexpr (kNt == 1) {
    const float* xs = x.scales(t0, 0);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    size_t b = 0;
    for (; b + 2 <= x.blocks; b += 2) {
      load_block<Bits>(row + b * kBlockBytes<Bits>, w);
      a0 = _mm256_fmadd_ps(block_dot(w, x.block(t0, b)), _mm256_set1_ps(ds[b] * xs[b]), a0);
      load_block<Bits>(row + (b + 1) * kBlockBytes<Bits>, w);
      a1 = _mm256_fmadd_ps(block_dot(w, x.block(t0, b + 1)), _mm256_set1_ps(ds[b + 1] * xs[b + 1]), a1);
    }
    if (b < x.blocks) {
      load_block<Bits>(row + b * kBlockBytes<Bits>, w);
      a0 = _mm256_fmadd_ps(block_dot(w, x.block(t0, b)), _mm256_set1_ps(ds[b] * xs[b]), a0);
    }
    out[t0 * rows + r] = detail::hsum(_mm256_add_ps(a0, a1));
  } else {
    __m256 acc[kTile];
    for (size_t t = 0; t < nt; ++t) acc[t] = _mm256_setzero_ps();
    for (size_t b = 0; b < x.blocks; ++b) {
      load_block<Bits>(row + b * kBlockBytes<Bits>, w);
      for (size_t t = 0; t < nt; ++t) {
        const __m256 scale = _mm256_set1_ps(ds[b] * *x.scales(t0 + t, b));
        acc[t] = _mm256_fmadd_ps(block_dot(w, x.block(t0 + t, b)), scale, acc[t]);
      }
    }
    for (size_t t = 0; t < nt; ++t) out[(t0 + t) * rows + r] = detail::hsum(acc[t]);
  }
}

template <int Bits>
MOEEDGE_AVX2 void rows_avx2(const QuantX& x, const Matrix& m, float* out, size_t rows, size_t begin, size_t end) {
  std::vector<float> ds(x.blocks);
  for (size_t r = begin; r < end; ++r) {
    block_scales_avx2(m, r, x.blocks, ds.data());
    const uint8_t* row = m.q + r * m.row_bytes;
    for (size_t t0 = 0; t0 < x.tokens; t0 += kTile) {
      const size_t nt = std::min(kTile, x.tokens - t0);
      if (nt == 1) row_tile<Bits, 1>(x, row, ds.data(), t0, nt, out, rows, r);
      else row_tile<Bits, 0>(x, row, ds.data(), t0, nt, out, rows, r);
    }
  }
}
#endif

template <int Bits>
void run(const float* x, size_t tokens, const uint8_t* q, const uint8_t* scales, size_t rows, size_t cols,
         size_t group, float* out, int threads) {
  if (group == 0 || group % kXBlock != 0)
    throw std::invalid_argument("group must be a positive multiple of 32, got " + std::to_string(group));
  if (cols % kXBlock != 0)
    throw std::invalid_argument("int" + std::to_string(Bits) + " rows must hold whole 32-weight blocks, got in = " +
                                std::to_string(cols));
  const Matrix m{q, scales, cols * Bits / 8, (cols + group - 1) / group, group / kXBlock};
  KernelFn fn = rows_scalar<Bits>;
#ifdef MOEEDGE_X86
  if (detail::use_avx2()) fn = rows_avx2<Bits>;
#endif
  const QuantX qx = detail::quantize_x(x, tokens, cols);
  detail::for_rows(rows, cols, threads, [&](size_t begin, size_t end) { fn(qx, m, out, rows, begin, end); });
}

}  // namespace

void linear_int8(const float* x, size_t tokens, const uint8_t* q, const uint8_t* scales, size_t rows, size_t cols,
                 size_t group, float* out, int threads) {
  run<8>(x, tokens, q, scales, rows, cols, group, out, threads);
}

void linear_int4(const float* x, size_t tokens, const uint8_t* q, const uint8_t* scales, size_t rows, size_t cols,
                 size_t group, float* out, int threads) {
  run<4>(x, tokens, q, scales, rows, cols, group, out, threads);
}

}  // namespace moeedge
