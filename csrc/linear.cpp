#include "linear.h"

#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "linear_impl.h"

namespace moeedge {

namespace detail {

namespace {

std::atomic<int> forced{-1};  // a Path, or -1: the CPU's best

Path cpu_path() {
#ifdef MOEEDGE_X86
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c"))
    return Path::scalar;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return Path::avx512;
  return Path::avx2;
#else
  return Path::scalar;
#endif
}

const char* const kPathNames[] = {"scalar", "avx2", "avx512"};

}  // namespace

Path best_path() {
  static const Path best = cpu_path();
  return best;
}

Path path() {
  const int f = forced.load();
  return f < 0 ? best_path() : static_cast<Path>(f);
}

bool has_avx512vnni() {
#ifdef MOEEDGE_X86
  static const bool vnni = (__builtin_cpu_init(), __builtin_cpu_supports("avx512vnni") != 0);
  return vnni;
#else
  return false;
#endif
}

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0 && man == 0) {
    bits = sign;
  } else if (exp == 0) {  // subnormal: normalise
    int e = -1;
    uint32_t m = man;
    do {
      m <<= 1;
      ++e;
    } while (!(m & 0x400));
    bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((m & 0x3ff) << 13);
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace detail

namespace {

using detail::half_to_float;
using detail::use_avx2;

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// One kernel = a function computing out[t, r] for rows [begin, end).
using RowsFn = void (*)(const float* x, size_t tokens, const uint8_t* w, size_t cols, float* out, size_t rows,
                        size_t begin, size_t end);

void bf16_scalar(const float* x, size_t tokens, const uint8_t* w8, size_t cols, float* out, size_t rows,
                 size_t begin, size_t end) {
  const auto* w = reinterpret_cast<const uint16_t*>(w8);
  for (size_t r = begin; r < end; ++r) {
    const uint16_t* row = w + r * cols;
    for (size_t t = 0; t < tokens; ++t) {
      const float* xt = x + t * cols;
      float acc = 0.f;
      for (size_t c = 0; c < cols; ++c) acc += xt[c] * bf16_to_float(row[c]);
      out[t * rows + r] = acc;
    }
  }
}

void f32_scalar(const float* x, size_t tokens, const uint8_t* w8, size_t cols, float* out, size_t rows,
                size_t begin, size_t end) {
  const auto* w = reinterpret_cast<const float*>(w8);
  for (size_t r = begin; r < end; ++r)
    for (size_t t = 0; t < tokens; ++t) {
      const float* xt = x + t * cols;
      float acc = 0.f;
      for (size_t c = 0; c < cols; ++c) acc += xt[c] * w[r * cols + c];
      out[t * rows + r] = acc;
    }
}

#ifdef MOEEDGE_X86
MOEEDGE_AVX2 inline __m256 load8_bf16(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// x is given pre-split (split_even_odd): per 16 columns, their 8 even then their 8 odd
// values. Then 16 bf16 weights load as one 256-bit word whose low halves (shifted up)
// are the even columns as fp32 and whose high halves (masked) are the odd ones: no
// widening shuffle per load. Four rows share each load of x. (Against the one-row,
// widening version it was 1.4x in a standalone side-by-side run on 14336x4096, AVX2,
// 2 threads; `pytest bench/test_bench_kernels.py -k expert_formats` measures it now.)
MOEEDGE_AVX2 inline __m256 even(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
MOEEDGE_AVX2 inline __m256 odd(__m256i v, __m256i high) { return _mm256_castsi256_ps(_mm256_and_si256(v, high)); }

template <int R>
MOEEDGE_AVX2 void bf16_avx2(const float* xs, size_t tokens, const uint8_t* w8, size_t cols, float* out, size_t rows,
                            size_t begin, size_t end) {
  const auto* w = reinterpret_cast<const uint16_t*>(w8);
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  size_t r = begin;
  for (; r + R <= end; r += R) {
    const uint16_t* row[R];
    for (int i = 0; i < R; ++i) row[i] = w + (r + i) * cols;
    for (size_t t = 0; t < tokens; ++t) {
      const float* xt = xs + t * cols;
      __m256 acc[R][2];
      for (auto& a : acc) a[0] = a[1] = _mm256_setzero_ps();
      for (size_t c = 0; c < cols; c += 16) {
        const __m256 xe = _mm256_loadu_ps(xt + c), xo = _mm256_loadu_ps(xt + c + 8);
        for (int i = 0; i < R; ++i) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[i] + c));
          acc[i][0] = _mm256_fmadd_ps(even(v), xe, acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(odd(v, high), xo, acc[i][1]);
        }
      }
      for (int i = 0; i < R; ++i) out[t * rows + r + i] = detail::hsum(_mm256_add_ps(acc[i][0], acc[i][1]));
    }
  }
  if constexpr (R > 1) bf16_avx2<1>(xs, tokens, w8, cols, out, rows, r, end);
}

// fp32 weights (small checkpoints, GGUF's F32 routers): 8 columns per FMA, two
// accumulators; any width (a scalar tail).
MOEEDGE_AVX2 void f32_avx2(const float* x, size_t tokens, const uint8_t* w8, size_t cols, float* out, size_t rows,
                           size_t begin, size_t end) {
  const auto* w = reinterpret_cast<const float*>(w8);
  for (size_t r = begin; r < end; ++r)
    for (size_t t = 0; t < tokens; ++t) {
      const float* xt = x + t * cols;
      const float* row = w + r * cols;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      size_t c = 0;
      for (; c + 16 <= cols; c += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(row + c), _mm256_loadu_ps(xt + c), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(row + c + 8), _mm256_loadu_ps(xt + c + 8), a1);
      }
      float acc = detail::hsum(_mm256_add_ps(a0, a1));
      for (; c < cols; ++c) acc += xt[c] * row[c];
      out[t * rows + r] = acc;
    }
}

MOEEDGE_AVX512 inline __m512 even(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
MOEEDGE_AVX512 inline __m512 odd(__m512i v, __m512i high) { return _mm512_castsi512_ps(_mm512_and_si512(v, high)); }

// The AVX-512 version of bf16_avx2: 32 columns per load, x split per 32 (16 evens, 16 odds).
MOEEDGE_AVX512 void bf16_avx512(const float* xs, size_t tokens, const uint8_t* w8, size_t cols, float* out,
                                size_t rows, size_t begin, size_t end) {
  const auto* w = reinterpret_cast<const uint16_t*>(w8);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  size_t r = begin;
  for (; r + 4 <= end; r += 4) {
    const uint16_t* row[4] = {w + r * cols, w + (r + 1) * cols, w + (r + 2) * cols, w + (r + 3) * cols};
    for (size_t t = 0; t < tokens; ++t) {
      const float* xt = xs + t * cols;
      __m512 acc[4][2];
      for (auto& a : acc) a[0] = a[1] = _mm512_setzero_ps();
      for (size_t c = 0; c < cols; c += 32) {
        const __m512 xe = _mm512_loadu_ps(xt + c), xo = _mm512_loadu_ps(xt + c + 16);
        for (int i = 0; i < 4; ++i) {
          const __m512i v = _mm512_loadu_si512(row[i] + c);
          acc[i][0] = _mm512_fmadd_ps(even(v), xe, acc[i][0]);
          acc[i][1] = _mm512_fmadd_ps(odd(v, high), xo, acc[i][1]);
        }
      }
      for (int i = 0; i < 4; ++i) out[t * rows + r + i] = detail::hsum(_mm512_add_ps(acc[i][0], acc[i][1]));
    }
  }
  for (; r < end; ++r) {
    const uint16_t* row = w + r * cols;
    for (size_t t = 0; t < tokens; ++t) {
      const float* xt = xs + t * cols;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      for (size_t c = 0; c < cols; c += 32) {
        const __m512i v = _mm512_loadu_si512(row + c);
        a0 = _mm512_fmadd_ps(even(v), _mm512_loadu_ps(xt + c), a0);
        a1 = _mm512_fmadd_ps(odd(v, high), _mm512_loadu_ps(xt + c + 16), a1);
      }
      out[t * rows + r] = detail::hsum(_mm512_add_ps(a0, a1));
    }
  }
}
#endif

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

void run_rows(RowsFn fn, const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
              int threads) {
  detail::for_rows(rows, cols, threads,
                   [&](size_t begin, size_t end) { fn(x, tokens, w, cols, out, rows, begin, end); });
}

}  // namespace

void linear_bf16(const float* x, size_t tokens, const uint16_t* w, size_t rows, size_t cols, float* out,
                 int threads) {
  const auto* w8 = reinterpret_cast<const uint8_t*>(w);
#ifdef MOEEDGE_X86
  if (detail::use_avx512() && cols % 32 == 0) {
    run_rows(bf16_avx512, split_even_odd(x, tokens, cols, 32).data(), tokens, w8, rows, cols, out, threads);
    return;
  }
  if (use_avx2() && cols % 16 == 0) {
    // Four rows per pass share x's loads; one token's rows under detail::kSharedRowBytes
    // stream faster one at a time (with more tokens the shared loads of x win).
    const RowsFn fn = tokens == 1 && cols * 2 < detail::kSharedRowBytes ? bf16_avx2<1> : bf16_avx2<4>;
    run_rows(fn, split_even_odd(x, tokens, cols, 16).data(), tokens, w8, rows, cols, out, threads);
    return;
  }
#endif
  run_rows(bf16_scalar, x, tokens, w8, rows, cols, out, threads);
}

void linear_f32(const float* x, size_t tokens, const float* w, size_t rows, size_t cols, float* out, int threads) {
  const auto* w8 = reinterpret_cast<const uint8_t*>(w);
#ifdef MOEEDGE_X86
  if (use_avx2()) return run_rows(f32_avx2, x, tokens, w8, rows, cols, out, threads);
#endif
  run_rows(f32_scalar, x, tokens, w8, rows, cols, out, threads);
}

const char* linear_path() { return detail::kPathNames[static_cast<int>(detail::path())]; }

std::vector<std::string> linear_paths() {
  std::vector<std::string> names;
  for (int p = 0; p <= static_cast<int>(detail::best_path()); ++p) names.emplace_back(detail::kPathNames[p]);
  return names;
}

void linear_force_path(const std::string& name) {
  const auto paths = linear_paths();
  detail::forced = -1;
  if (name.empty()) return;
  for (size_t p = 0; p < paths.size(); ++p)
    if (paths[p] == name) {
      detail::forced = static_cast<int>(p);
      return;
    }
  std::string have;
  for (const auto& p : paths) have += (have.empty() ? "" : ", ") + p;
  throw std::invalid_argument("no kernel path '" + name + "' on this CPU (it has: " + have + ")");
}

}  // namespace moeedge
