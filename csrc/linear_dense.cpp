// fp32 x times bf16 or fp32 weights (linear_bf16, linear_f32), one kernel for any number of
// tokens: a decode step's one row and a prefill's hundreds take the same code.
//
// Batch invariance: out[t, r] has the same bits whatever else is in the call (other tokens,
// their number, the thread count). Per path and format every output is summed one way only:
// its accumulator lanes take the columns of each step in column order, then the lanes are
// added in one fixed order (and, for f32 rows that are not whole steps, the last columns one
// by one). Everything else here only decides which outputs are computed together and when:
// - tiles of R rows x TT tokens share loads (each weight vector converted once for TT
//   tokens, each x vector used by R rows), each output keeping its own accumulators;
// - with more tokens than one tile, K is cut into chunks so that a panel of x stays in
//   cache; a tile's accumulators wait in memory between chunks, which is exact;
// - threads split the rows (detail::for_rows), never a row's sum.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "linear.h"
#include "linear_impl.h"

namespace moeedge {

namespace {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

struct Dense {
  const float* x;    // [tokens, cols]; the SIMD bf16 kernels take it split_even_odd
  const uint8_t* w;  // [rows, cols], bf16 or fp32
  size_t tokens, rows, cols;
  float* out;  // [tokens, rows]
};

// Where a tile's outputs keep their accumulators between K chunks: output (r + i, t + j)
// at acc + i * row_stride + j * K::kPerOutput. Unused (nullptr) when a tile's K is whole.
struct Slots {
  float* acc;
  size_t row_stride;
};

// --------------------------------------------------------------------------- portable
// 16 lanes per output, as plain arrays: compilers vectorize them (SSE2, NEON) without
// reordering any lane's sum. Rows that are not whole steps end one column at a time.

template <class W>
struct Portable {
  static constexpr size_t kStep = 16, kPerOutput = 16;

  static float weight(const uint8_t* w, size_t i) {
    if constexpr (sizeof(W) == 2) return bf16_to_float(reinterpret_cast<const uint16_t*>(w)[i]);
    else return reinterpret_cast<const float*>(w)[i];
  }

  template <int R, int TT>
  static void tile(const Dense& d, size_t r, size_t t, size_t c0, size_t c1, Slots s) {
    const size_t cols = d.cols;
    const uint8_t* row = d.w + r * cols * sizeof(W);
    float a[R][TT][kStep];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < TT; ++j)
        for (size_t l = 0; l < kStep; ++l) a[i][j][l] = c0 == 0 ? 0.f : s.acc[i * s.row_stride + j * kStep + l];
    size_t c = c0;
    for (; c + kStep <= c1; c += kStep)
      for (int i = 0; i < R; ++i) {
        float wv[kStep];
        for (size_t l = 0; l < kStep; ++l) wv[l] = weight(row, i * cols + c + l);
        for (int j = 0; j < TT; ++j) {
          const float* xj = d.x + (t + j) * cols + c;
          for (size_t l = 0; l < kStep; ++l) a[i][j][l] += xj[l] * wv[l];
        }
      }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < TT; ++j) {
        if (c1 < cols) {
          std::memcpy(s.acc + i * s.row_stride + j * kStep, a[i][j], sizeof a[i][j]);
          continue;
        }
        float* v = a[i][j];
        for (size_t width = kStep / 2; width > 0; width /= 2)
          for (size_t l = 0; l < width; ++l) v[l] += v[l + width];
        float sum = v[0];
        for (size_t k = c; k < cols; ++k) sum += d.x[(t + j) * cols + k] * weight(row, i * cols + k);
        d.out[(t + j) * d.rows + r + i] = sum;
      }
  }
};

#ifdef MOEEDGE_X86
// --------------------------------------------------------------------------- bf16, SIMD
// x is given pre-split (split_even_odd): per step, the step's even columns then its odd
// ones. Then a step's bf16 weights load as one word whose 32-bit lanes' low halves
// (shifted up) are the even columns as fp32 and whose high halves (masked) are the odd
// ones: no widening shuffle per load. Two accumulators per output, evens and odds.

MOEEDGE_AVX2 inline __m256 even(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
MOEEDGE_AVX2 inline __m256 odd(__m256i v) {
  return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
MOEEDGE_AVX512 inline __m512 even(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
MOEEDGE_AVX512 inline __m512 odd(__m512i v) {
  return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

struct Bf16Avx2 {
  static constexpr size_t kStep = 16, kPerOutput = 16;

  template <int R, int TT>
  MOEEDGE_AVX2 static void tile(const Dense& d, size_t r, size_t t, size_t c0, size_t c1, Slots s) {
    const size_t cols = d.cols;
    const auto* w = reinterpret_cast<const uint16_t*>(d.w) + r * cols;
    const float* x = d.x + t * cols;
    __m256 a[R][TT][2];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < TT; ++j)
        for (int h = 0; h < 2; ++h)
          a[i][j][h] = c0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(s.acc + i * s.row_stride + j * kStep + 8 * h);
    for (size_t c = c0; c < c1; c += kStep) {
      __m256 xe[TT], xo[TT];
      for (int j = 0; j < TT; ++j) {
        xe[j] = _mm256_loadu_ps(x + j * cols + c);
        xo[j] = _mm256_loadu_ps(x + j * cols + c + 8);
      }
      for (int i = 0; i < R; ++i) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * cols + c));
        const __m256 e = even(v), o = odd(v);
        for (int j = 0; j < TT; ++j) {
          a[i][j][0] = _mm256_fmadd_ps(e, xe[j], a[i][j][0]);
          a[i][j][1] = _mm256_fmadd_ps(o, xo[j], a[i][j][1]);
        }
      }
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < TT; ++j) {
        if (c1 < cols) {
          for (int h = 0; h < 2; ++h) _mm256_storeu_ps(s.acc + i * s.row_stride + j * kStep + 8 * h, a[i][j][h]);
        } else {
          d.out[(t + j) * d.rows + r + i] = detail::hsum(_mm256_add_ps(a[i][j][0], a[i][j][1]));
        }
      }
  }
};

// The AVX-512 version: 32 columns per step.
struct Bf16Avx512 {
  static constexpr size_t kStep = 32, kPerOutput = 32;

  template <int R, int TT>
  MOEEDGE_AVX512 static void tile(const Dense& d, size_t r, size_t t, size_t c0, size_t c1, Slots s) {
    const size_t cols = d.cols;
    const auto* w = reinterpret_cast<const uint16_t*>(d.w) + r * cols;
    const float* x = d.x + t * cols;
    __m512 a[R][TT][2];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < TT; ++j)
        for (int h = 0; h < 2; ++h)
          a[i][j][h] = c0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(s.acc + i * s.row_stride + j * kStep + 16 * h);
    for (size_t c = c0; c < c1; c += kStep) {
      __m512 xe[TT], xo[TT];
      for (int j = 0; j < TT; ++j) {
        xe[j] = _mm512_loadu_ps(x + j * cols + c);
        xo[j] = _mm512_loadu_ps(x + j * cols + c + 16);
      }
      for (int i = 0; i < R; ++i) {
        const __m512i v = _mm512_loadu_si512(w + i * cols + c);
        const __m512 e = even(v), o = odd(v);
        for (int j = 0; j < TT; ++j) {
          a[i][j][0] = _mm512_fmadd_ps(e, xe[j], a[i][j][0]);
          a[i][j][1] = _mm512_fmadd_ps(o, xo[j], a[i][j][1]);
        }
      }
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < TT; ++j) {
        if (c1 < cols) {
          for (int h = 0; h < 2; ++h) _mm512_storeu_ps(s.acc + i * s.row_stride + j * kStep + 16 * h, a[i][j][h]);
        } else {
          d.out[(t + j) * d.rows + r + i] = detail::hsum(_mm512_add_ps(a[i][j][0], a[i][j][1]));
        }
      }
  }
};

// fp32 weights (small checkpoints, GGUF's F32 routers): 8 columns per FMA, two accumulators
// (columns 0-7 and 8-15 of each step); rows of any width, the last columns one by one.
struct F32Avx2 {
  static constexpr size_t kStep = 16, kPerOutput = 16;

  template <int R, int TT>
  MOEEDGE_AVX2 static void tile(const Dense& d, size_t r, size_t t, size_t c0, size_t c1, Slots s) {
    const size_t cols = d.cols;
    const float* w = reinterpret_cast<const float*>(d.w) + r * cols;
    const float* x = d.x + t * cols;
    __m256 a[R][TT][2];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < TT; ++j)
        for (int h = 0; h < 2; ++h)
          a[i][j][h] = c0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(s.acc + i * s.row_stride + j * kStep + 8 * h);
    size_t c = c0;
    for (; c + kStep <= c1; c += kStep) {
      __m256 x0[TT], x1[TT];
      for (int j = 0; j < TT; ++j) {
        x0[j] = _mm256_loadu_ps(x + j * cols + c);
        x1[j] = _mm256_loadu_ps(x + j * cols + c + 8);
      }
      for (int i = 0; i < R; ++i) {
        const __m256 w0 = _mm256_loadu_ps(w + i * cols + c), w1 = _mm256_loadu_ps(w + i * cols + c + 8);
        for (int j = 0; j < TT; ++j) {
          a[i][j][0] = _mm256_fmadd_ps(w0, x0[j], a[i][j][0]);
          a[i][j][1] = _mm256_fmadd_ps(w1, x1[j], a[i][j][1]);
        }
      }
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < TT; ++j) {
        if (c1 < cols) {
          for (int h = 0; h < 2; ++h) _mm256_storeu_ps(s.acc + i * s.row_stride + j * kStep + 8 * h, a[i][j][h]);
          continue;
        }
        float sum = detail::hsum(_mm256_add_ps(a[i][j][0], a[i][j][1]));
        for (size_t k = c; k < cols; ++k) sum = std::fma(x[j * cols + k], w[i * cols + k], sum);
        d.out[(t + j) * d.rows + r + i] = sum;
      }
  }
};
#endif

// --------------------------------------------------------------------------- tiling

// Above one tile of tokens: K in chunks of this many columns (a multiple of every kStep), x
// in panels of kPanelTokens rows and the weights in panels of kPanelRows. One chunk of an
// x panel (48 x 1024 fp32, 192 KiB) then stays in L2 while every row block of the panel
// passes over it, each row block's chunk (4 x 1024 bf16, 8 KiB) stays in L1 while every
// token tile passes over it, and the panel's accumulators take 48 x 64 x 128 B = 384 KiB.
constexpr size_t kChunkCols = 1024;
constexpr size_t kPanelTokens = 48;  // a multiple of every TT below
constexpr size_t kPanelRows = 64;    // a multiple of every R

// Rows [begin, end) times every token, in tiles of R rows x TT tokens (1 x 1 at the edges).
template <class K, int R, int TT>
void tiled(const Dense& d, size_t begin, size_t end) {
  const bool whole = d.tokens <= static_cast<size_t>(TT) || d.cols <= kChunkCols;
  const size_t chunk = whole ? d.cols : kChunkCols;
  const size_t panel_t = whole ? d.tokens : kPanelTokens, panel_r = whole ? end - begin : kPanelRows;
  std::vector<float> acc(whole ? 0 : panel_r * panel_t * K::kPerOutput);
  for (size_t t0 = 0; t0 < d.tokens; t0 += panel_t) {
    const size_t nt = std::min(panel_t, d.tokens - t0);
    for (size_t r0 = begin; r0 < end; r0 += panel_r) {
      const size_t nr = std::min(panel_r, end - r0);
      for (size_t c0 = 0; c0 < d.cols; c0 += chunk) {
        const size_t c1 = std::min(c0 + chunk, d.cols);
        const auto at = [&](size_t i, size_t j) {
          return whole ? Slots{nullptr, 0} : Slots{acc.data() + (i * nt + j) * K::kPerOutput, nt * K::kPerOutput};
        };
        size_t i = 0;
        for (; i + R <= nr; i += R) {
          size_t j = 0;
          for (; j + TT <= nt; j += TT) K::template tile<R, TT>(d, r0 + i, t0 + j, c0, c1, at(i, j));
          for (; j < nt; ++j) K::template tile<R, 1>(d, r0 + i, t0 + j, c0, c1, at(i, j));
        }
        for (; i < nr; ++i)
          for (size_t j = 0; j < nt; ++j) K::template tile<1, 1>(d, r0 + i, t0 + j, c0, c1, at(i, j));
      }
    }
  }
}

using RowsFn = void (*)(const Dense& d, size_t begin, size_t end);

void run(RowsFn fn, const Dense& d, int threads) {
  detail::for_rows(d.rows, d.cols, threads, [&](size_t begin, size_t end) { fn(d, begin, end); });
}

#ifdef MOEEDGE_X86
// x with each `width` columns' evens first, then their odds (what the SIMD bf16 kernels read).
std::vector<float> split_even_odd(const float* x, size_t tokens, size_t cols, size_t width) {
  std::vector<float> split(tokens * cols);
  for (size_t t = 0; t < tokens; ++t)
    for (size_t c = 0; c < cols; c += width)
      for (size_t j = 0; j < width / 2; ++j) {
        split[t * cols + c + j] = x[t * cols + c + 2 * j];
        split[t * cols + c + width / 2 + j] = x[t * cols + c + 2 * j + 1];
      }
  return split;
}
#endif

}  // namespace

void linear_bf16(const float* x, size_t tokens, const uint16_t* w, size_t rows, size_t cols, float* out,
                 int threads) {
  Dense d{x, reinterpret_cast<const uint8_t*>(w), tokens, rows, cols, out};
#ifdef MOEEDGE_X86
  if (detail::use_avx512() && cols % 32 == 0) {
    const std::vector<float> split = split_even_odd(x, tokens, cols, 32);
    d.x = split.data();
    return run(tokens == 1 ? tiled<Bf16Avx512, 4, 1> : tiled<Bf16Avx512, 4, 3>, d, threads);
  }
  if (detail::use_avx2() && cols % 16 == 0) {
    const std::vector<float> split = split_even_odd(x, tokens, cols, 16);
    d.x = split.data();
    // One token's rows under detail::kSharedRowBytes stream faster one at a time; with
    // more tokens, or longer rows, four rows share each load of x.
    if (tokens == 1) return run(cols * 2 < detail::kSharedRowBytes ? tiled<Bf16Avx2, 1, 1> : tiled<Bf16Avx2, 4, 1>, d, threads);
    return run(tiled<Bf16Avx2, 2, 2>, d, threads);
  }
#endif
  run(tokens == 1 ? tiled<Portable<uint16_t>, 1, 1> : tiled<Portable<uint16_t>, 2, 2>, d, threads);
}

void linear_f32(const float* x, size_t tokens, const float* w, size_t rows, size_t cols, float* out, int threads) {
  const Dense d{x, reinterpret_cast<const uint8_t*>(w), tokens, rows, cols, out};
#ifdef MOEEDGE_X86
  if (detail::use_avx2()) return run(tokens == 1 ? tiled<F32Avx2, 1, 1> : tiled<F32Avx2, 2, 2>, d, threads);
#endif
  run(tokens == 1 ? tiled<Portable<float>, 1, 1> : tiled<Portable<float>, 2, 2>, d, threads);
}

}  // namespace moeedge
