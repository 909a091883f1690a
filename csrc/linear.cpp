#include "linear.h"

#include <atomic>
#include <cstring>
#include <vector>

#include "linear_impl.h"

namespace moeedge {

namespace detail {

namespace {

std::atomic<bool> force_scalar{false};

#ifdef MOEEDGE_X86
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif

}  // namespace

bool use_avx2() {
#ifdef MOEEDGE_X86
  static const bool avx2 = has_avx2();
  return avx2 && !force_scalar.load();
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

void q8_0_scalar(const float* x, size_t tokens, const uint8_t* w, size_t cols, float* out, size_t rows,
                 size_t begin, size_t end) {
  const size_t blocks = cols / kQ8Block;
  for (size_t r = begin; r < end; ++r) {
    const uint8_t* row = w + r * blocks * kQ8BlockBytes;
    for (size_t t = 0; t < tokens; ++t) {
      const float* xt = x + t * cols;
      float acc = 0.f;
      for (size_t b = 0; b < blocks; ++b) {
        const uint8_t* block = row + b * kQ8BlockBytes;
        uint16_t d;
        std::memcpy(&d, block, 2);
        const auto* q = reinterpret_cast<const int8_t*>(block + 2);
        float dot = 0.f;
        for (size_t i = 0; i < kQ8Block; ++i) dot += xt[b * kQ8Block + i] * q[i];
        acc += half_to_float(d) * dot;
      }
      out[t * rows + r] = acc;
    }
  }
}

#ifdef MOEEDGE_X86
MOEEDGE_AVX2 inline __m256 load8_bf16(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

MOEEDGE_AVX2 inline __m256 load8_q8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// x is given pre-split (split_even_odd): per 16 columns, their 8 even then their 8 odd
// values. Then 16 bf16 weights load as one 256-bit word whose low halves (shifted up)
// are the even columns as fp32 and whose high halves (masked) are the odd ones: no
// widening shuffle per load. Four rows share each load of x. (Against the one-row,
// widening version it was 1.4x in a standalone side-by-side run on 14336x4096, AVX2,
// 2 threads; `pytest bench/test_bench_kernels.py -k expert_formats` measures it now.)
MOEEDGE_AVX2 inline __m256 even(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
MOEEDGE_AVX2 inline __m256 odd(__m256i v, __m256i high) { return _mm256_castsi256_ps(_mm256_and_si256(v, high)); }

MOEEDGE_AVX2 void bf16_avx2(const float* xs, size_t tokens, const uint8_t* w8, size_t cols, float* out, size_t rows,
                            size_t begin, size_t end) {
  const auto* w = reinterpret_cast<const uint16_t*>(w8);
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  size_t r = begin;
  for (; r + 4 <= end; r += 4) {
    const uint16_t* row[4] = {w + r * cols, w + (r + 1) * cols, w + (r + 2) * cols, w + (r + 3) * cols};
    for (size_t t = 0; t < tokens; ++t) {
      const float* xt = xs + t * cols;
      __m256 acc[4][2];
      for (auto& a : acc) a[0] = a[1] = _mm256_setzero_ps();
      for (size_t c = 0; c < cols; c += 16) {
        const __m256 xe = _mm256_loadu_ps(xt + c), xo = _mm256_loadu_ps(xt + c + 8);
        for (int i = 0; i < 4; ++i) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[i] + c));
          acc[i][0] = _mm256_fmadd_ps(even(v), xe, acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(odd(v, high), xo, acc[i][1]);
        }
      }
      for (int i = 0; i < 4; ++i) out[t * rows + r + i] = detail::hsum(_mm256_add_ps(acc[i][0], acc[i][1]));
    }
  }
  for (; r < end; ++r) {
    const uint16_t* row = w + r * cols;
    for (size_t t = 0; t < tokens; ++t) {
      const float* xt = xs + t * cols;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      for (size_t c = 0; c < cols; c += 16) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c));
        a0 = _mm256_fmadd_ps(even(v), _mm256_loadu_ps(xt + c), a0);
        a1 = _mm256_fmadd_ps(odd(v, high), _mm256_loadu_ps(xt + c + 8), a1);
      }
      out[t * rows + r] = detail::hsum(_mm256_add_ps(a0, a1));
    }
  }
}

MOEEDGE_AVX2 void q8_0_avx2(const float* x, size_t tokens, const uint8_t* w, size_t cols, float* out, size_t rows,
                            size_t begin, size_t end) {
  const size_t blocks = cols / kQ8Block;
  for (size_t r = begin; r < end; ++r) {
    const uint8_t* row = w + r * blocks * kQ8BlockBytes;
    for (size_t t = 0; t < tokens; ++t) {
      const float* xt = x + t * cols;
      __m256 acc = _mm256_setzero_ps();
      for (size_t b = 0; b < blocks; ++b) {
        const uint8_t* block = row + b * kQ8BlockBytes;
        uint16_t d;
        std::memcpy(&d, block, 2);
        const auto* q = reinterpret_cast<const int8_t*>(block + 2);
        const float* xb = xt + b * kQ8Block;
        __m256 dot = _mm256_mul_ps(load8_q8(q), _mm256_loadu_ps(xb));
        dot = _mm256_fmadd_ps(load8_q8(q + 8), _mm256_loadu_ps(xb + 8), dot);
        dot = _mm256_fmadd_ps(load8_q8(q + 16), _mm256_loadu_ps(xb + 16), dot);
        dot = _mm256_fmadd_ps(load8_q8(q + 24), _mm256_loadu_ps(xb + 24), dot);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(d)), dot, acc);
      }
      out[t * rows + r] = detail::hsum(acc);
    }
  }
}
#endif

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
  if (use_avx2() && cols % 16 == 0) {
    // Even/odd columns apart, per 16 (what bf16_avx2 reads); x is small beside W.
    std::vector<float> split(tokens * cols);
    for (size_t t = 0; t < tokens; ++t)
      for (size_t c = 0; c < cols; c += 16)
        for (size_t j = 0; j < 8; ++j) {
          split[t * cols + c + j] = x[t * cols + c + 2 * j];
          split[t * cols + c + 8 + j] = x[t * cols + c + 2 * j + 1];
        }
    run_rows(bf16_avx2, split.data(), tokens, w8, rows, cols, out, threads);
    return;
  }
#endif
  run_rows(bf16_scalar, x, tokens, w8, rows, cols, out, threads);
}

void linear_q8_0(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                 int threads) {
#ifdef MOEEDGE_X86
  RowsFn fn = use_avx2() ? q8_0_avx2 : q8_0_scalar;
#else
  RowsFn fn = q8_0_scalar;
#endif
  run_rows(fn, x, tokens, w, rows, cols, out, threads);
}

const char* linear_path() { return use_avx2() ? "avx2" : "scalar"; }

void linear_force_scalar(bool force) { detail::force_scalar = force; }

}  // namespace moeedge
