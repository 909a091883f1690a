// One token through a decoder layer's attention block, in one call: a decode step made
// about 70 Python and torch calls a layer for this (norms, projections, rotary embedding,
// the KV cache, attention, router), 40% of a resident Q8_0 token's time.
//
//   n = rms_norm(h) * in_norm
//   q, k, v = Wq n + bq, Wk n + bk, Wv n + bv       (q, k then rms-normed whole if q_norm, k_norm;
//                                                     q, k, v clamped to +-clip if clip > 0)
//   q, k rotated by (cos, sin) of the position       (the rotate-half convention)
//   k, v written to the cache at pos; attention of q over positions 0..pos (grouped heads)
//   h += Wo attention
//   post = rms_norm(h) * post_norm;  logits = Wr post (where there is a router)
//
// Weights are multiplied as stored (the formats of expert_ffn.h); everything else is fp32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "expert_ffn.h"

namespace moeedge {

// A matrix at its own address (offset 0), as stored.
struct DenseMatrix {
  const uint8_t* data = nullptr;
  StoredMatrix layout{};
  bool present() const { return data != nullptr; }
};

struct AttentionShape {
  size_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0;
  size_t capacity = 0;  // positions the KV cache holds
  float eps = 1e-6f;
  float clip = 0.f;  // 0: no clamp
};

struct AttentionWeights {
  DenseMatrix q, k, v, o, router;  // router: absent in a dense layer
  // Empty: none. Norm and bias weights as fp32.
  std::vector<float> in_norm, post_norm, q_bias, k_bias, v_bias, q_norm, k_norm;
};

class AttentionStep {
 public:
  // k_cache and v_cache: this layer's [capacity, kv_heads, head_dim] fp32, owned by the
  // caller. std::invalid_argument naming the weight and the shapes unless everything fits.
  AttentionStep(const AttentionShape& shape, AttentionWeights weights, float* k_cache, float* v_cache);

  // h [hidden] in place; cos, sin [head_dim]; post [hidden]; logits [router rows] (ignored
  // without a router). std::out_of_range if pos >= capacity.
  void run(float* h, size_t pos, const float* cos, const float* sin, float* post, float* logits, int threads) const;

  // One token of each of several sequences through this layer at once: steps[i] is the
  // layer's step on row i's KV slot, all with the same weights (std::invalid_argument naming
  // the first that differs: another layer's, or another model's). h [rows, hidden] in place;
  // pos [rows]; cos, sin [rows, head_dim]; post [rows, hidden]; logits [rows, router rows].
  // The q/k/v, o and router products read each weight once for all rows, and row i gets the
  // bits steps[i]->run would give it (the kernels are batch-invariant); nothing is written
  // unless every position fits (std::out_of_range).
  static void run_rows(const std::vector<const AttentionStep*>& steps, float* h, const size_t* pos,
                       const float* cos, const float* sin, float* post, float* logits, int threads);

  const AttentionShape& shape() const { return shape_; }
  size_t router_rows() const { return w_.router.present() ? w_.router.layout.rows : 0; }

 private:
  // The pieces of run, each over `rows` rows where it multiplies by a weight (run_rows).
  void check_position(size_t pos) const;
  void check_same_layer(const AttentionStep& other, size_t index) const;
  void project(const float* n, size_t rows, float* q, float* k, float* v, int threads) const;
  void finish_row(float* q, size_t pos, const float* cos, const float* sin, float* attn, int threads) const;
  void close(float* h, const float* attn, size_t rows, float* post, float* logits, int threads) const;
  void attend(const float* q, size_t positions, float* out, int threads) const;

  AttentionShape shape_;
  AttentionWeights w_;
  float* k_cache_;
  float* v_cache_;
};

// out = rms_norm(x) * weight over n values (fp32): x / sqrt(mean(x^2) + eps) * weight.
void rms_norm(const float* x, const float* weight, size_t n, float eps, float* out);

}  // namespace moeedge
