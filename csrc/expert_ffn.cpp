#include "expert_ffn.h"

#include <cmath>
#include <stdexcept>
#include <vector>

#include "linear.h"
#include "linear_impl.h"

namespace moeedge {

WeightFormat weight_format(const std::string& name) {
  if (name == "f32") return WeightFormat::f32;
  if (name == "bf16") return WeightFormat::bf16;
  if (name == "q8_0") return WeightFormat::q8_0;
  if (name == "q4_0") return WeightFormat::q4_0;
  if (name == "q4_k") return WeightFormat::q4_k;
  if (name == "q5_k") return WeightFormat::q5_k;
  if (name == "q6_k") return WeightFormat::q6_k;
  if (name == "int8") return WeightFormat::int8;
  if (name == "int4") return WeightFormat::int4;
  throw std::invalid_argument("unknown weight format '" + name +
                              "' (f32, bf16, q8_0, q4_0, q4_k, q5_k, q6_k, int8 or int4)");
}

namespace {

// Weights per block and bytes per block of the block formats.
void block_of(WeightFormat f, size_t* weights, size_t* bytes) {
  switch (f) {
    case WeightFormat::q8_0: *weights = kQ8Block, *bytes = kQ8BlockBytes; return;
    case WeightFormat::q4_0: *weights = kQ4_0Block, *bytes = kQ4_0BlockBytes; return;
    case WeightFormat::q4_k: *weights = kQKBlock, *bytes = kQ4KBlockBytes; return;
    case WeightFormat::q5_k: *weights = kQKBlock, *bytes = kQ5KBlockBytes; return;
    case WeightFormat::q6_k: *weights = kQKBlock, *bytes = kQ6KBlockBytes; return;
    default: *weights = 1, *bytes = 0;
  }
}

size_t group_q_bytes(const StoredMatrix& m) { return m.rows * m.cols * (m.format == WeightFormat::int8 ? 8 : 4) / 8; }

// h = silu(g) * u = g / (1 + e^-g) * u, in place in g. With std::exp one value at a time
// the native FFN was no faster than the separate calls it replaces (482 against 479 µs for
// a Mixtral-medium Q8_0 expert, timed in one process).
void silu_mul_scalar(float* g, const float* u, size_t n) {
  for (size_t i = 0; i < n; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

#ifdef MOEEDGE_X86
MOEEDGE_AVX2 void silu_mul_avx2(float* g, const float* u, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    __m256 e = detail::exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
    // Below -88 exp8 clamps e^-x at e^88, which made silu x e^-88 (~1e-37) where it is
    // far smaller, and -0.0 (x / inf) once e^-x overflows, as std::exp and torch give;
    // weights of 1e36 turned that into a wrong output under the fuzzer. There, e^-x is
    // (e^(-x/2))^2: exact to float rounding down to -176, then inf.
    const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-88.f), _CMP_LT_OQ);
    if (_mm256_movemask_ps(under)) {
      const __m256 half = detail::exp8(_mm256_mul_ps(x, _mm256_set1_ps(-0.5f)));
      e = _mm256_blendv_ps(e, _mm256_mul_ps(half, half), under);
    }
    const __m256 s = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e));
    _mm256_storeu_ps(g + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
  silu_mul_scalar(g + i, u + i, n - i);
}
#endif

void silu_mul(float* g, const float* u, size_t n) {
#ifdef MOEEDGE_X86
  if (detail::use_avx2()) return silu_mul_avx2(g, u, n);
#endif
  silu_mul_scalar(g, u, n);
}

}  // namespace

size_t StoredMatrix::nbytes() const {
  switch (format) {
    case WeightFormat::f32:
      return rows * cols * 4;
    case WeightFormat::bf16:
      return rows * cols * 2;
    case WeightFormat::int8:
    case WeightFormat::int4:
      if (group == 0 || group % 32 != 0 || cols % 32 != 0)
        throw std::invalid_argument("int8/int4 need in a multiple of 32 and group a positive multiple of 32, got in = " +
                                    std::to_string(cols) + ", group " + std::to_string(group));
      return group_q_bytes(*this) + rows * ((cols + group - 1) / group) * 2;
    default: {
      size_t weights, bytes;
      block_of(format, &weights, &bytes);
      if (cols % weights != 0)
        throw std::invalid_argument("rows of this format hold whole " + std::to_string(weights) +
                                    "-weight blocks, got in = " + std::to_string(cols));
      return rows * (cols / weights) * bytes;
    }
  }
}

void linear_stored(const float* x, size_t tokens, const uint8_t* expert, const StoredMatrix& m, float* out,
                   int threads) {
  const uint8_t* w = expert + m.offset;
  switch (m.format) {
    case WeightFormat::f32:
      return linear_f32(x, tokens, reinterpret_cast<const float*>(w), m.rows, m.cols, out, threads);
    case WeightFormat::bf16:
      return linear_bf16(x, tokens, reinterpret_cast<const uint16_t*>(w), m.rows, m.cols, out, threads);
    case WeightFormat::q8_0: return linear_q8_0(x, tokens, w, m.rows, m.cols, out, threads);
    case WeightFormat::q4_0: return linear_q4_0(x, tokens, w, m.rows, m.cols, out, threads);
    case WeightFormat::q4_k: return linear_q4_k(x, tokens, w, m.rows, m.cols, out, threads);
    case WeightFormat::q5_k: return linear_q5_k(x, tokens, w, m.rows, m.cols, out, threads);
    case WeightFormat::q6_k: return linear_q6_k(x, tokens, w, m.rows, m.cols, out, threads);
    case WeightFormat::int8:
      return linear_int8(x, tokens, w, w + group_q_bytes(m), m.rows, m.cols, m.group, out, threads);
    case WeightFormat::int4:
      return linear_int4(x, tokens, w, w + group_q_bytes(m), m.rows, m.cols, m.group, out, threads);
  }
}

void silu_mul_rows(float* g, const float* u, size_t tokens, size_t n) {
  for (size_t t = 0; t < tokens; ++t) silu_mul(g + t * n, u + t * n, n);
}

void check_chain(const StoredMatrix& gate, const StoredMatrix& up, const StoredMatrix& down) {
  if (up.rows != gate.rows || up.cols != gate.cols || down.cols != gate.rows)
    throw std::invalid_argument("expert shapes do not chain: gate [" + std::to_string(gate.rows) + ", " +
                                std::to_string(gate.cols) + "], up [" + std::to_string(up.rows) + ", " +
                                std::to_string(up.cols) + "], down [" + std::to_string(down.rows) + ", " +
                                std::to_string(down.cols) + "]");
}

void expert_ffn(const float* x, size_t tokens, const uint8_t* expert, size_t expert_bytes, const StoredMatrix& gate,
                const StoredMatrix& up, const StoredMatrix& down, float scale, float* out, int threads) {
  const char* roles[] = {"gate", "up", "down"};
  const StoredMatrix* ms[] = {&gate, &up, &down};
  for (int i = 0; i < 3; ++i) {
    const size_t n = ms[i]->nbytes();
    if (ms[i]->offset > expert_bytes || n > expert_bytes - ms[i]->offset)
      throw std::invalid_argument(std::string(roles[i]) + " spans bytes " + std::to_string(ms[i]->offset) + ".." +
                                  std::to_string(ms[i]->offset + n) + " of an expert of " +
                                  std::to_string(expert_bytes));
  }
  check_chain(gate, up, down);
  std::vector<float> g(tokens * gate.rows), u(tokens * gate.rows);
  linear_stored(x, tokens, expert, gate, g.data(), threads);
  linear_stored(x, tokens, expert, up, u.data(), threads);
  silu_mul_rows(g.data(), u.data(), tokens, gate.rows);
  linear_stored(g.data(), tokens, expert, down, out, threads);
  if (scale != 1.f)
    for (size_t i = 0; i < tokens * down.rows; ++i) out[i] *= scale;
}

}  // namespace moeedge
