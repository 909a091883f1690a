#include "attention_step.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

#include "linear.h"
#include "linear_impl.h"

namespace moeedge {

namespace {

std::string shape_of(size_t rows, size_t cols) { return "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]"; }

void check_matrix(const DenseMatrix& m, const char* name, size_t rows, size_t cols) {
  if (!m.present()) throw std::invalid_argument(std::string(name) + " is missing");
  if (m.layout.rows != rows || m.layout.cols != cols)
    throw std::invalid_argument(std::string(name) + " is " + shape_of(m.layout.rows, m.layout.cols) + ", the layer needs " +
                                shape_of(rows, cols));
}

void check_vector(const std::vector<float>& v, const char* name, size_t n, bool required) {
  if (v.empty() && !required) return;
  if (v.size() != n)
    throw std::invalid_argument(std::string(name) + " has " + std::to_string(v.size()) + " values, the layer needs " +
                                std::to_string(n));
}

float dot_scalar(const float* a, const float* b, size_t n) {
  float acc = 0.f;
  for (size_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// y += a * x
void axpy_scalar(float a, const float* x, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// p[i] = e^(p[i] - shift); returns their sum.
float exp_shifted_scalar(float* p, size_t n, float shift) {
  float sum = 0.f;
  for (size_t i = 0; i < n; ++i) sum += (p[i] = std::exp(p[i] - shift));
  return sum;
}

#ifdef MOEEDGE_X86
MOEEDGE_AVX2 float dot_avx2(const float* a, const float* b, size_t n) {
  __m256 acc = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  return detail::hsum(acc) + dot_scalar(a + i, b + i, n - i);
}

MOEEDGE_AVX2 void axpy_avx2(float a, const float* x, float* y, size_t n) {
  const __m256 va = _mm256_set1_ps(a);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  axpy_scalar(a, x + i, y + i, n - i);
}

MOEEDGE_AVX2 float exp_shifted_avx2(float* p, size_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = detail::exp8(_mm256_sub_ps(_mm256_loadu_ps(p + i), s));
    _mm256_storeu_ps(p + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  return detail::hsum(acc) + exp_shifted_scalar(p + i, n - i, shift);
}
#endif

float dot(const float* a, const float* b, size_t n) {
#ifdef MOEEDGE_X86
  if (detail::use_avx2()) return dot_avx2(a, b, n);
#endif
  return dot_scalar(a, b, n);
}

void axpy(float a, const float* x, float* y, size_t n) {
#ifdef MOEEDGE_X86
  if (detail::use_avx2()) return axpy_avx2(a, x, y, n);
#endif
  axpy_scalar(a, x, y, n);
}

float exp_shifted(float* p, size_t n, float shift) {
#ifdef MOEEDGE_X86
  if (detail::use_avx2()) return exp_shifted_avx2(p, n, shift);
#endif
  return exp_shifted_scalar(p, n, shift);
}

// rows x [rows, cols] -> out [rows, m.rows]: each row the same bits whatever `rows` is (linear.h).
void multiply(const DenseMatrix& m, const float* x, size_t rows, float* out, int threads) {
  linear_stored(x, rows, m.data, m.layout, out, threads);
}

bool same_matrix(const DenseMatrix& a, const DenseMatrix& b) {
  return a.data == b.data && a.layout.format == b.layout.format && a.layout.rows == b.layout.rows &&
         a.layout.cols == b.layout.cols && a.layout.group == b.layout.group;
}

void add_bias(float* x, const std::vector<float>& bias) {
  for (size_t i = 0; i < bias.size(); ++i) x[i] += bias[i];
}

void clip(float* x, size_t n, float limit) {
  for (size_t i = 0; i < n; ++i) x[i] = std::clamp(x[i], -limit, limit);
}

// The rotate-half convention: x[i], x[i + D/2] as one pair, as transformers' Mixtral,
// Qwen2-MoE and OLMoE rotate (a GGUF's q and k rows are put back in that order on load).
void rotate(float* x, size_t heads, size_t d, const float* cos, const float* sin) {
  const size_t half = d / 2;
  for (size_t h = 0; h < heads; ++h) {
    float* v = x + h * d;
    for (size_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

}  // namespace

void rms_norm(const float* x, const float* weight, size_t n, float eps, float* out) {
  double squares = 0.0;
  for (size_t i = 0; i < n; ++i) squares += static_cast<double>(x[i]) * x[i];
  const float inv = 1.f / std::sqrt(static_cast<float>(squares / static_cast<double>(n)) + eps);
  for (size_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * inv);
}

AttentionStep::AttentionStep(const AttentionShape& shape, AttentionWeights weights, float* k_cache, float* v_cache)
    : shape_(shape), w_(std::move(weights)), k_cache_(k_cache), v_cache_(v_cache) {
  const AttentionShape& s = shape_;
  if (s.hidden == 0 || s.heads == 0 || s.kv_heads == 0 || s.head_dim == 0 || s.capacity == 0)
    throw std::invalid_argument("hidden, heads, kv_heads, head_dim and capacity must be positive");
  if (s.heads % s.kv_heads != 0)
    throw std::invalid_argument(std::to_string(s.heads) + " query heads do not split into " +
                                std::to_string(s.kv_heads) + " KV-head groups");
  if (s.head_dim % 2 != 0) throw std::invalid_argument("head_dim must be even, got " + std::to_string(s.head_dim));
  if (!k_cache_ || !v_cache_) throw std::invalid_argument("the KV cache is missing");
  const size_t qd = s.heads * s.head_dim, kvd = s.kv_heads * s.head_dim;
  check_matrix(w_.q, "q_proj", qd, s.hidden);
  check_matrix(w_.k, "k_proj", kvd, s.hidden);
  check_matrix(w_.v, "v_proj", kvd, s.hidden);
  check_matrix(w_.o, "o_proj", s.hidden, qd);
  if (w_.router.present() && w_.router.layout.cols != s.hidden)
    throw std::invalid_argument("the router is " + shape_of(w_.router.layout.rows, w_.router.layout.cols) +
                                ", its input must be the hidden size " + std::to_string(s.hidden));
  check_vector(w_.in_norm, "input_layernorm", s.hidden, true);
  check_vector(w_.post_norm, "post_attention_layernorm", s.hidden, true);
  check_vector(w_.q_bias, "q_proj.bias", qd, false);
  check_vector(w_.k_bias, "k_proj.bias", kvd, false);
  check_vector(w_.v_bias, "v_proj.bias", kvd, false);
  check_vector(w_.q_norm, "q_norm", qd, false);
  check_vector(w_.k_norm, "k_norm", kvd, false);
}

void AttentionStep::check_position(size_t pos) const {
  if (pos >= shape_.capacity)
    throw std::out_of_range("position " + std::to_string(pos) + " is past the KV cache's " +
                            std::to_string(shape_.capacity));
}

void AttentionStep::run(float* h, size_t pos, const float* cos, const float* sin, float* post, float* logits,
                        int threads) const {
  const AttentionShape& s = shape_;
  check_position(pos);
  const size_t qd = s.heads * s.head_dim, kvd = s.kv_heads * s.head_dim;
  std::vector<float> n(s.hidden), q(qd), attn(qd);
  rms_norm(h, w_.in_norm.data(), s.hidden, s.eps, n.data());
  project(n.data(), 1, q.data(), k_cache_ + pos * kvd, v_cache_ + pos * kvd, threads);
  finish_row(q.data(), pos, cos, sin, attn.data(), threads);
  close(h, attn.data(), 1, post, logits, threads);
}

void AttentionStep::run_rows(const std::vector<const AttentionStep*>& steps, float* h, const size_t* pos,
                             const float* cos, const float* sin, float* post, float* logits, int threads) {
  if (steps.empty()) throw std::invalid_argument("no steps: run_rows needs one per row");
  for (size_t i = 0; i < steps.size(); ++i) {
    if (!steps[i]) throw std::invalid_argument("step " + std::to_string(i) + " is missing");
    steps[i]->check_position(pos[i]);
  }
  const AttentionStep& first = *steps[0];
  for (size_t i = 1; i < steps.size(); ++i) first.check_same_layer(*steps[i], i);
  const AttentionShape& s = first.shape_;
  const size_t rows = steps.size(), qd = s.heads * s.head_dim, kvd = s.kv_heads * s.head_dim;
  std::vector<float> n(rows * s.hidden), q(rows * qd), k(rows * kvd), v(rows * kvd), attn(rows * qd);
  for (size_t r = 0; r < rows; ++r)
    rms_norm(h + r * s.hidden, first.w_.in_norm.data(), s.hidden, s.eps, n.data() + r * s.hidden);
  first.project(n.data(), rows, q.data(), k.data(), v.data(), threads);
  for (size_t r = 0; r < rows; ++r) {  // each row's k and v into its own slot, then as run goes on
    const AttentionStep& step = *steps[r];
    std::copy_n(k.data() + r * kvd, kvd, step.k_cache_ + pos[r] * kvd);
    std::copy_n(v.data() + r * kvd, kvd, step.v_cache_ + pos[r] * kvd);
    step.finish_row(q.data() + r * qd, pos[r], cos + r * s.head_dim, sin + r * s.head_dim, attn.data() + r * qd,
                    threads);
  }
  first.close(h, attn.data(), rows, post, logits, threads);
}

void AttentionStep::check_same_layer(const AttentionStep& other, size_t index) const {
  const AttentionShape &a = shape_, &b = other.shape_;
  const std::string which = "step " + std::to_string(index);
  const auto describe = [](const AttentionShape& x) {
    return "hidden " + std::to_string(x.hidden) + ", " + std::to_string(x.heads) + " heads (" +
           std::to_string(x.kv_heads) + " KV) of " + std::to_string(x.head_dim);
  };
  if (a.hidden != b.hidden || a.heads != b.heads || a.kv_heads != b.kv_heads || a.head_dim != b.head_dim)
    throw std::invalid_argument(which + " has " + describe(b) + ", step 0 " + describe(a) +
                                ": the steps must be one layer's");
  const auto differs = [&](const char* what) {
    return std::invalid_argument(which + "'s " + what + " is not step 0's: the steps must be one layer's");
  };
  if (a.eps != b.eps || a.clip != b.clip) throw differs("eps or clip");
  using W = AttentionWeights;
  const std::pair<DenseMatrix W::*, const char*> matrices[] = {
      {&W::q, "q_proj"}, {&W::k, "k_proj"}, {&W::v, "v_proj"}, {&W::o, "o_proj"}, {&W::router, "router"}};
  for (const auto& [m, name] : matrices)
    if (!same_matrix(w_.*m, other.w_.*m)) throw differs(name);
  const std::pair<std::vector<float> W::*, const char*> vectors[] = {
      {&W::in_norm, "input_layernorm"}, {&W::post_norm, "post_attention_layernorm"}, {&W::q_bias, "q_proj.bias"},
      {&W::k_bias, "k_proj.bias"},      {&W::v_bias, "v_proj.bias"},                 {&W::q_norm, "q_norm"},
      {&W::k_norm, "k_norm"}};
  for (const auto& [v, name] : vectors)
    if (w_.*v != other.w_.*v) throw differs(name);
}

void AttentionStep::project(const float* n, size_t rows, float* q, float* k, float* v, int threads) const {
  multiply(w_.q, n, rows, q, threads);
  multiply(w_.k, n, rows, k, threads);
  multiply(w_.v, n, rows, v, threads);
}

// k and v of the row are at pos in the cache already.
void AttentionStep::finish_row(float* q, size_t pos, const float* cos, const float* sin, float* attn,
                               int threads) const {
  const AttentionShape& s = shape_;
  const size_t qd = s.heads * s.head_dim, kvd = s.kv_heads * s.head_dim;
  float* k = k_cache_ + pos * kvd;
  float* v = v_cache_ + pos * kvd;
  add_bias(q, w_.q_bias);
  add_bias(k, w_.k_bias);
  add_bias(v, w_.v_bias);
  if (!w_.q_norm.empty()) rms_norm(q, w_.q_norm.data(), qd, s.eps, q);
  if (!w_.k_norm.empty()) rms_norm(k, w_.k_norm.data(), kvd, s.eps, k);
  if (s.clip > 0.f) {
    clip(q, qd, s.clip);
    clip(k, kvd, s.clip);
    clip(v, kvd, s.clip);
  }
  rotate(q, s.heads, s.head_dim, cos, sin);
  rotate(k, s.kv_heads, s.head_dim, cos, sin);
  attend(q, pos + 1, attn, threads);
}

void AttentionStep::close(float* h, const float* attn, size_t rows, float* post, float* logits, int threads) const {
  const size_t hidden = shape_.hidden;
  std::vector<float> out(rows * hidden);
  multiply(w_.o, attn, rows, out.data(), threads);
  for (size_t i = 0; i < rows * hidden; ++i) h[i] += out[i];
  for (size_t r = 0; r < rows; ++r)
    rms_norm(h + r * hidden, w_.post_norm.data(), hidden, shape_.eps, post + r * hidden);
  if (w_.router.present()) multiply(w_.router, post, rows, logits, threads);
}

void AttentionStep::attend(const float* q, size_t positions, float* out, int threads) const {
  const size_t d = shape_.head_dim, kv = shape_.kv_heads, group = shape_.heads / kv;
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const auto heads = [&](size_t begin, size_t end) {
    std::vector<float> p(positions);
    for (size_t head = begin; head < end; ++head) {
      const float* qh = q + head * d;
      const size_t g = head / group;
      float top = -std::numeric_limits<float>::infinity();
      for (size_t t = 0; t < positions; ++t) {
        p[t] = dot(qh, k_cache_ + (t * kv + g) * d, d) * scale;
        top = std::max(top, p[t]);
      }
      const float inv = 1.f / exp_shifted(p.data(), positions, top);
      float* oh = out + head * d;
      std::fill(oh, oh + d, 0.f);
      for (size_t t = 0; t < positions; ++t) axpy(p[t] * inv, v_cache_ + (t * kv + g) * d, oh, d);
    }
  };
  // Short contexts: one thread (a hand-off costs more than the few thousand products).
  if (shape_.heads < 2 || positions * shape_.heads * d < (1u << 15)) return heads(0, shape_.heads);
  ThreadPool& pool = kernel_pool();
  pool.parallel_for(shape_.heads, threads > 0 ? threads : kernel_threads(), heads);
}

}  // namespace moeedge
