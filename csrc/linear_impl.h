// Internals shared by the linear kernels (linear.cpp, linear_kquants.cpp); not API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "thread_pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOEEDGE_X86 1
// Per function, so the rest of the library stays portable; use_avx2() picks at run time.
#define MOEEDGE_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace moeedge::detail {

// IEEE half to float, without F16C (the portable path).
float half_to_float(uint16_t h);

// Whether to take the AVX2+FMA+F16C path: the CPU has it and tests have not forced scalar.
bool use_avx2();

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// fn(begin, end) over all rows, split across the kernel pool when the matrix is big enough.
template <class Fn>
void for_rows(size_t rows, size_t cols, int threads, const Fn& fn) {
  // Below ~64K weights a thread hand-off costs more than it saves.
  if (rows * cols < (1u << 16)) {
    fn(size_t{0}, rows);
    return;
  }
  ThreadPool& pool = kernel_pool();
  pool.parallel_for(rows, threads > 0 ? threads : pool.size(), [&](size_t begin, size_t end) { fn(begin, end); });
}

#ifdef MOEEDGE_X86
MOEEDGE_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

}  // namespace moeedge::detail
