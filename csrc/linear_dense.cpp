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
#include <type_traits>
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
  const void* w;     // [rows, cols], bf16 or fp32
  size_t tokens, rows, cols;
  float* out;  // [tokens, rows]
};

// One tile: R weight rows times TT tokens over one chunk of columns.
struct Tile {
  const float* x;  // the first token at the chunk's first column; tokens x_stride apart
  size_t x_stride;
  const void* w;  // the first row likewise; rows w_stride weights apart
  size_t w_stride;
  size_t n;           // columns in the chunk: whole steps, but for the last columns of an fp32 row
  bool first, last;   // the chunk begins, ends the rows
  float* out;         // out for the first row and token; tokens out_stride apart, rows adjacent
  size_t out_stride;
  float* acc;  // unless first and last: output (i, j)'s accumulators at acc + i * acc_stride + j * kPerOutput
  size_t acc_stride;
};

// --------------------------------------------------------------------------- portable
// 16 lanes per output as plain arrays: compilers vectorize them (SSE2, NEON) without
// reordering any lane's sum. Lane l takes column l of each step; the last columns of a row
// that is not whole steps are added one by one.

template <class W>
struct Portable {
  using Weight = W;
  static constexpr size_t kStep = 16, kPerOutput = 16;

  static float weight(const W* w, size_t i) {
    if constexpr (sizeof(W) == 2) return bf16_to_float(w[i]);
    else return w[i];
  }

  template <int R, int TT>
  static void tile(const Tile& k, size_t blocks) {
    for (size_t b = 0; b < blocks; ++b) block<R, TT>(k, b);
  }

  template <int R, int TT>
  static void block(const Tile& k, size_t b) {
    const W* w = static_cast<const W*>(k.w) + b * R * k.w_stride;
    float* acc = k.acc + b * R * k.acc_stride;
    float* out = k.out + b * R;
    float a[R][TT][kStep];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < TT; ++j)
        for (size_t l = 0; l < kStep; ++l) a[i][j][l] = k.first ? 0.f : acc[i * k.acc_stride + j * kStep + l];
    size_t c = 0;
    for (; c + kStep <= k.n; c += kStep)
      for (int i = 0; i < R; ++i) {
        float wv[kStep];
        for (size_t l = 0; l < kStep; ++l) wv[l] = weight(w, i * k.w_stride + c + l);
        for (int j = 0; j < TT; ++j) {
          const float* xj = k.x + j * k.x_stride + c;
          for (size_t l = 0; l < kStep; ++l) a[i][j][l] += xj[l] * wv[l];
        }
      }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < TT; ++j) {
        if (!k.last) {
          std::memcpy(acc + i * k.acc_stride + j * kStep, a[i][j], sizeof a[i][j]);
          continue;
        }
        float* v = a[i][j];
        for (size_t width = kStep / 2; width > 0; width /= 2)
          for (size_t l = 0; l < width; ++l) v[l] += v[l + width];
        float sum = v[0];
        for (size_t m = c; m < k.n; ++m) sum += k.x[j * k.x_stride + m] * weight(w, i * k.w_stride + m);
        out[j * k.out_stride + i] = sum;
      }
  }
};

#ifdef MOEEDGE_X86
// --------------------------------------------------------------------------- SIMD
// Two accumulators per output: the first half of each step's columns and the second,
// added and summed across lanes at the end (then, for fp32 rows that are not whole steps,
// the last columns one by one). bf16 x is given pre-split (split_even_odd): per step, the
// step's even columns then its odd ones. Then a step's bf16 weights load as one word whose
// 32-bit lanes' low halves (shifted up) are the even columns as fp32 and whose high halves
// (masked) are the odd ones: no widening shuffle per load.

MOEEDGE_AVX2 inline __m256 even(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
MOEEDGE_AVX2 inline __m256 odd(__m256i v) {
  return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
MOEEDGE_AVX512 inline __m512 even(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
MOEEDGE_AVX512 inline __m512 odd(__m512i v) {
  return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// A step's weights as the two halves' fp32 vectors.
struct Avx2Bf16 {
  using Weight = uint16_t;
  MOEEDGE_AVX2 static void load(const uint16_t* p, __m256* lo, __m256* hi) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    *lo = even(v), *hi = odd(v);
  }
};
struct Avx2F32 {
  using Weight = float;
  MOEEDGE_AVX2 static void load(const float* p, __m256* lo, __m256* hi) {
    *lo = _mm256_loadu_ps(p), *hi = _mm256_loadu_ps(p + 8);
  }
};
struct Avx512Bf16 {
  using Weight = uint16_t;
  MOEEDGE_AVX512 static void load(const uint16_t* p, __m512* lo, __m512* hi) {
    const __m512i v = _mm512_loadu_si512(p);
    *lo = even(v), *hi = odd(v);
  }
};
struct Avx512F32 {
  using Weight = float;
  MOEEDGE_AVX512 static void load(const float* p, __m512* lo, __m512* hi) {
    *lo = _mm512_loadu_ps(p), *hi = _mm512_loadu_ps(p + 16);
  }
};

// Tile bodies for one vector width; L: a step's weights (above).
#define MOEEDGE_DENSE_TILE(ATTR, VEC, LANES, ZERO, LOADU, STOREU, FMADD, ADD)                                     \
  using Weight = typename L::Weight;                                                                            \
  static constexpr size_t kStep = 2 * LANES, kPerOutput = 2 * LANES;                                            \
  template <int R, int TT>                                                                                      \
  ATTR static void tile(const Tile& k, size_t blocks) {                                                         \
    for (size_t b = 0; b < blocks; ++b) {                                                                       \
      const Weight* w = static_cast<const Weight*>(k.w) + b * R * k.w_stride;                                   \
      float* acc = k.acc + b * R * k.acc_stride;                                                                \
      float* out = k.out + b * R;                                                                               \
      VEC a[R][TT][2];                                                                                          \
      for (int i = 0; i < R; ++i)                                                                               \
        for (int j = 0; j < TT; ++j)                                                                            \
          for (int h = 0; h < 2; ++h)                                                                           \
            a[i][j][h] = k.first ? ZERO() : LOADU(acc + i * k.acc_stride + j * kStep + LANES * h);              \
      size_t c = 0;                                                                                             \
      for (; c + kStep <= k.n; c += kStep) {                                                                    \
        VEC x0[TT], x1[TT];                                                                                     \
        for (int j = 0; j < TT; ++j) {                                                                          \
          x0[j] = LOADU(k.x + j * k.x_stride + c);                                                              \
          x1[j] = LOADU(k.x + j * k.x_stride + c + LANES);                                                      \
        }                                                                                                       \
        for (int i = 0; i < R; ++i) {                                                                           \
          VEC w0, w1;                                                                                           \
          L::load(w + i * k.w_stride + c, &w0, &w1);                                                            \
          for (int j = 0; j < TT; ++j) {                                                                        \
            a[i][j][0] = FMADD(w0, x0[j], a[i][j][0]);                                                          \
            a[i][j][1] = FMADD(w1, x1[j], a[i][j][1]);                                                          \
          }                                                                                                     \
        }                                                                                                       \
      }                                                                                                         \
      for (int i = 0; i < R; ++i)                                                                               \
        for (int j = 0; j < TT; ++j) {                                                                          \
          if (!k.last) {                                                                                        \
            for (int h = 0; h < 2; ++h) STOREU(acc + i * k.acc_stride + j * kStep + LANES * h, a[i][j][h]);     \
            continue;                                                                                           \
          }                                                                                                     \
          float sum = detail::hsum(ADD(a[i][j][0], a[i][j][1]));                                                \
          if constexpr (std::is_same_v<Weight, float>) /* bf16 rows are whole steps */                         \
            for (size_t m = c; m < k.n; ++m) sum = std::fma(k.x[j * k.x_stride + m], w[i * k.w_stride + m], sum); \
          out[j * k.out_stride + i] = sum;                                                                      \
        }                                                                                                       \
    }                                                                                                           \
  }

template <class L>
struct Avx2 {
  MOEEDGE_DENSE_TILE(MOEEDGE_AVX2, __m256, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps,
                     _mm256_add_ps)
};
template <class L>
struct Avx512 {
  MOEEDGE_DENSE_TILE(MOEEDGE_AVX512, __m512, 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps,
                     _mm512_fmadd_ps, _mm512_add_ps)
};
#undef MOEEDGE_DENSE_TILE
#endif

// --------------------------------------------------------------------------- tiling

// x's rows that one pass over the weights serves: all of them while they fit in L2
// (kWholeBytes), rows then taken whole; else panels of kPanelTokens rows, K cut into chunks
// of kChunkCols columns (a multiple of every kStep) and the weights into panels of
// kPanelRows. One chunk of an x panel (64 x 1024 fp32, 256 KiB) then stays in L2 while
// every row block of the panel passes over it, each row block's chunk (4 x 1024 bf16,
// 8 KiB) stays in L1 while every token tile passes over it, and the panel's accumulators
// take 48 x 64 x 128 B = 384 KiB.
// Fewer tokens than a panel take chunks as wide as the same 256 KiB of x allows (whole
// multiples of kChunkCols): each row's chunk is then read from memory as one long run
// rather than 48 rows' 2 KiB pieces in turn, which the prefetchers follow poorly (default-64m's
// down projection, 192 x 58240; bench/README.md, "Few-row expert calls").
constexpr size_t kWholeBytes = 512 << 10;
constexpr size_t kChunkCols = 1024;
constexpr size_t kPanelTokens = 64;
constexpr size_t kPanelRows = 48;  // a multiple of every R
constexpr size_t kPanelXBytes = kPanelTokens * kChunkCols * sizeof(float);

size_t chunk_cols(size_t tokens) {
  return kChunkCols * std::max<size_t>(1, kPanelXBytes / (std::min(tokens, kPanelTokens) * kChunkCols * sizeof(float)));
}

// `blocks` blocks of R rows from row r on, times tokens t .. t + TT - 1, over columns c0 .. c0 + n - 1.
template <class K, int R, int TT>
void tile(const Dense& d, size_t r, size_t t, size_t c0, size_t n, float* acc, size_t acc_stride, size_t blocks) {
  using W = typename K::Weight;
  const Tile k{d.x + t * d.cols + c0, d.cols, static_cast<const W*>(d.w) + r * d.cols + c0, d.cols, n, c0 == 0,
               c0 + n == d.cols, d.out + t * d.rows + r, d.rows, acc, acc_stride};
  K::template tile<R, TT>(k, blocks);
}

// tile<K, R, n> for the n (0 < n <= TT) tokens left after whole tiles of TT: a call of a
// few tokens then passes over the weights once, whatever their number.
template <class K, int R, int TT>
void tile_n(size_t n, const Dense& d, size_t r, size_t t, size_t c0, size_t cols, float* acc, size_t acc_stride,
            size_t blocks) {
  if constexpr (TT > 1)
    if (n < TT) return tile_n<K, R, TT - 1>(n, d, r, t, c0, cols, acc, acc_stride, blocks);
  tile<K, R, TT>(d, r, t, c0, cols, acc, acc_stride, blocks);
}

// Rows [begin, end) times every token, in tiles of R rows x TT tokens (narrower at the edges).
template <class K, int R, int TT>
void tiled(const Dense& d, size_t begin, size_t end) {
  const bool whole = d.tokens * d.cols * sizeof(float) <= kWholeBytes;
  const size_t chunk = whole ? d.cols : chunk_cols(d.tokens);
  const size_t panel_t = whole ? d.tokens : kPanelTokens, panel_r = whole ? end - begin : kPanelRows;
  std::vector<float> acc(whole ? 0 : std::min(panel_r, end - begin) * std::min(panel_t, d.tokens) * K::kPerOutput);
  for (size_t t0 = 0; t0 < d.tokens; t0 += panel_t) {
    const size_t nt = std::min(panel_t, d.tokens - t0), stride = whole ? 0 : nt * K::kPerOutput;
    const auto at = [&](size_t i, size_t j) { return whole ? nullptr : acc.data() + i * stride + j * K::kPerOutput; };
    for (size_t r0 = begin; r0 < end; r0 += panel_r) {
      const size_t nr = std::min(panel_r, end - r0), blocks = nr / R, rest = nr % R;
      for (size_t c0 = 0; c0 < d.cols; c0 += chunk) {
        const size_t n = std::min(chunk, d.cols - c0);
        // One token tile (a decode step): every row block in one call. Else each row
        // block's chunk stays in cache while every token tile passes over it.
        for (size_t i = 0; i < blocks * R; i += nt <= TT ? blocks * R : R) {
          const size_t count = nt <= TT ? blocks : 1;
          size_t j = 0;
          for (; j + TT <= nt; j += TT) tile<K, R, TT>(d, r0 + i, t0 + j, c0, n, at(i, j), stride, count);
          if (j < nt) tile_n<K, R, TT>(nt - j, d, r0 + i, t0 + j, c0, n, at(i, j), stride, count);
        }
        if (rest)
          for (size_t j = 0; j < nt; j += TT)
            tile_n<K, 1, TT>(std::min<size_t>(TT, nt - j), d, r0 + blocks * R, t0 + j, c0, n, at(blocks * R, j), stride,
                             rest);
      }
    }
  }
}

using RowsFn = void (*)(const Dense& d, size_t begin, size_t end);

void run(RowsFn fn, const Dense& d, int threads) {
  detail::for_rows(d.rows, d.cols, threads, [&](size_t begin, size_t end) { fn(d, begin, end); });
}

#ifdef MOEEDGE_X86
// AVX-512's tiles for a call of `tokens` tokens whose rows are `row_bytes` long. Rows under
// detail::kSharedRowBytes are read one at a time, so that the weights stream from memory in
// order, every token of a call of up to 8 on the same pass (1 x T); four interleaved rows
// streamed slower on our AMD EPYC (Zen 4): mixtral-medium's bf16 expert (rows of 2 and 7 KiB)
// took 0.68x the time at one row, 0.52x at two (bench/README.md, "Few-row expert calls").
// Longer rows share each x load among 4 rows. A call of 2 used to pass over the weights once
// per token (4 x 3 tiles); tile_n now takes both at once. Prefill (over 8 tokens) keeps 4 x 3.
template <class K>
RowsFn avx512_tiles(size_t tokens, size_t row_bytes) {
  const bool shared = row_bytes >= detail::kSharedRowBytes;
  if (tokens == 1) return shared ? tiled<K, 4, 1> : tiled<K, 1, 1>;
  return shared || tokens > 8 ? tiled<K, 4, 3> : tiled<K, 1, 8>;
}

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
  Dense d{x, w, tokens, rows, cols, out};
#ifdef MOEEDGE_X86
  if (detail::use_avx512() && cols % 32 == 0) {
    const std::vector<float> split = split_even_odd(x, tokens, cols, 32);
    d.x = split.data();
    return run(avx512_tiles<Avx512<Avx512Bf16>>(tokens, cols * 2), d, threads);
  }
  if (detail::use_avx2() && cols % 16 == 0) {
    const std::vector<float> split = split_even_odd(x, tokens, cols, 16);
    d.x = split.data();
    // Tiles of 3 x 2 for several tokens (2 x 2 and 4 x 1 were up to 0.8x as fast on 8-16
    // tokens, AVX2 on our Xeon). One token's rows under detail::kSharedRowBytes stream
    // faster one at a time; longer ones, four at a time sharing each load of x.
    if (tokens > 1) return run(tiled<Avx2<Avx2Bf16>, 3, 2>, d, threads);
    return run(cols * 2 < detail::kSharedRowBytes ? tiled<Avx2<Avx2Bf16>, 1, 1> : tiled<Avx2<Avx2Bf16>, 4, 1>, d,
               threads);
  }
#endif
  run(tokens == 1 ? tiled<Portable<uint16_t>, 1, 1> : tiled<Portable<uint16_t>, 2, 2>, d, threads);
}

void linear_f32(const float* x, size_t tokens, const float* w, size_t rows, size_t cols, float* out, int threads) {
  const Dense d{x, w, tokens, rows, cols, out};
#ifdef MOEEDGE_X86
  const bool shared = cols * 4 >= detail::kSharedRowBytes;  // one token on AVX2: as for bf16
  if (detail::use_avx512()) return run(avx512_tiles<Avx512<Avx512F32>>(tokens, cols * 4), d, threads);
  if (detail::use_avx2()) {
    if (tokens > 1) return run(tiled<Avx2<Avx2F32>, 3, 2>, d, threads);
    return run(shared ? tiled<Avx2<Avx2F32>, 4, 1> : tiled<Avx2<Avx2F32>, 1, 1>, d, threads);
  }
#endif
  run(tokens == 1 ? tiled<Portable<float>, 1, 1> : tiled<Portable<float>, 2, 2>, d, threads);
}

}  // namespace moeedge
