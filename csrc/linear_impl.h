// Internals shared by the linear kernels (linear.cpp, linear_kquants.cpp); not API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "thread_pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOEEDGE_X86 1
// Per function, so the rest of the library stays portable; path() picks at run time.
#define MOEEDGE_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MOEEDGE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define MOEEDGE_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#endif

namespace moeedge::detail {

// IEEE half to float, without F16C (the portable path).
float half_to_float(uint16_t h);

// The widest path the CPU has, unless tests forced a narrower one (linear_force_path):
// scalar; AVX2+FMA+F16C; AVX-512 F+BW+VL on top of those. Kernels without an AVX-512
// version take AVX2 on the AVX-512 path.
enum class Path { scalar, avx2, avx512 };
Path best_path();  // what the CPU has
Path path();       // what the kernels take now
inline bool use_avx2() { return path() >= Path::avx2; }
inline bool use_avx512() { return path() == Path::avx512; }
// AVX-512 VNNI (one instruction for madd + add of int16 pairs), checked once.
bool has_avx512vnni();

// Rows shorter than this stream faster one per pass than several interleaved (which share
// x's loads): on our AMD EPYC, Q8_0 and bf16 rows of 1-2 KiB (3584 x 1024, 32000 x 1024,
// read from memory, 2 threads) ran at 0.7-0.8x one stream's speed two or four at a time
// (11-14 against 14-18 GB/s); rows of 4 KiB and more were as fast or a little faster
// shared. (`python bench/kernel_paths.py --rows R --cols C --copies N`).
constexpr size_t kSharedRowBytes = 4096;

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Q4_K's 12 scale bytes -> the 6-bit scales and mins of its 8 sub-blocks, byte j of each
// for sub-block j (ggml's get_scale_min_k4, on 4 bytes at a time; little-endian).
inline void q4_k_scales(const uint8_t* s, uint64_t& sc, uint64_t& m) {
  uint32_t a, b, c;  // bytes 0-3: low 6 bits scales 0-3, top 2 bits the high bits of scales 4-7; 4-7 the same for mins
  std::memcpy(&a, s, 4);
  std::memcpy(&b, s + 4, 4);
  std::memcpy(&c, s + 8, 4);  // low nibbles: low 4 bits of scales 4-7; high nibbles: of mins 4-7
  sc = (a & 0x3f3f3f3fu) | uint64_t{(c & 0x0f0f0f0fu) | ((a >> 2) & 0x30303030u)} << 32;
  m = (b & 0x3f3f3f3fu) | uint64_t{((c >> 4) & 0x0f0f0f0fu) | ((b >> 2) & 0x30303030u)} << 32;
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
  pool.parallel_for(rows, threads > 0 ? threads : kernel_threads(), [&](size_t begin, size_t end) { fn(begin, end); });
}

#ifdef MOEEDGE_X86
MOEEDGE_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

MOEEDGE_AVX512 inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// e^x for 8 floats: 2^k * e^r with k = round(x / ln 2), |r| <= ln 2 / 2, e^r by its
// degree-6 Taylor polynomial (relative error below 2e-7, a few float roundings); x is
// clamped to [-88, 88], where e^x stays a normal float, which silu needs no more of.
MOEEDGE_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.f)), _mm256_set1_ps(-88.f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - k ln 2, ln 2 in two parts so that k * its first part is exact
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

}  // namespace moeedge::detail
