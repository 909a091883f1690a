#include "linear_bf16.h"

#include <atomic>
#include <cstring>

#include "thread_pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOEEDGE_X86 1
#endif

namespace moeedge {

namespace {

std::atomic<bool> force_scalar{false};

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

void rows_scalar(const float* x, size_t tokens, const uint16_t* w, size_t cols, float* out, size_t rows_total,
                 size_t begin, size_t end) {
  for (size_t r = begin; r < end; ++r) {
    const uint16_t* row = w + r * cols;
    for (size_t t = 0; t < tokens; ++t) {
      const float* xt = x + t * cols;
      float acc = 0.f;
      for (size_t c = 0; c < cols; ++c) acc += xt[c] * bf16_to_float(row[c]);
      out[t * rows_total + r] = acc;
    }
  }
}

#ifdef MOEEDGE_X86
__attribute__((target("avx2,fma"))) inline __m256 load8_bf16(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) void rows_avx2(const float* x, size_t tokens, const uint16_t* w, size_t cols,
                                                   float* out, size_t rows_total, size_t begin, size_t end) {
  const size_t vec = cols / 32 * 32;
  for (size_t r = begin; r < end; ++r) {
    const uint16_t* row = w + r * cols;
    if (r + 1 < end) _mm_prefetch(reinterpret_cast<const char*>(row + cols), _MM_HINT_T0);
    for (size_t t = 0; t < tokens; ++t) {
      const float* xt = x + t * cols;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
             a3 = _mm256_setzero_ps();
      for (size_t c = 0; c < vec; c += 32) {
        a0 = _mm256_fmadd_ps(load8_bf16(row + c), _mm256_loadu_ps(xt + c), a0);
        a1 = _mm256_fmadd_ps(load8_bf16(row + c + 8), _mm256_loadu_ps(xt + c + 8), a1);
        a2 = _mm256_fmadd_ps(load8_bf16(row + c + 16), _mm256_loadu_ps(xt + c + 16), a2);
        a3 = _mm256_fmadd_ps(load8_bf16(row + c + 24), _mm256_loadu_ps(xt + c + 24), a3);
      }
      float acc = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (size_t c = vec; c < cols; ++c) acc += xt[c] * bf16_to_float(row[c]);
      out[t * rows_total + r] = acc;
    }
  }
}

bool has_avx2_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

using RowsFn = void (*)(const float*, size_t, const uint16_t*, size_t, float*, size_t, size_t, size_t);

RowsFn pick() {
#ifdef MOEEDGE_X86
  static const bool avx2 = has_avx2_fma();
  if (avx2 && !force_scalar.load()) return rows_avx2;
#endif
  return rows_scalar;
}

}  // namespace

void linear_bf16(const float* x, size_t tokens, const uint16_t* w, size_t rows, size_t cols, float* out,
                 int threads) {
  RowsFn fn = pick();
  ThreadPool& pool = kernel_pool();
  const int parts = threads > 0 ? threads : pool.size();
  // Below ~64K weights a thread hand-off costs more than it saves.
  if (rows * cols < (1u << 16)) {
    fn(x, tokens, w, cols, out, rows, 0, rows);
    return;
  }
  pool.parallel_for(rows, parts, [&](size_t begin, size_t end) { fn(x, tokens, w, cols, out, rows, begin, end); });
}

const char* linear_bf16_path() { return pick() == rows_scalar ? "scalar" : "avx2"; }

void linear_bf16_force_scalar(bool force) { force_scalar = force; }

}  // namespace moeedge
