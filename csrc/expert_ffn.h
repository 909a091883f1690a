// One expert's feed-forward in one call: out = scale * down(silu(gate(x)) * up(x)), each
// matrix multiplied as stored in the expert's bytes (formats in linear.h). A decode step
// made ~27 Python and torch calls per expert for this; the bytes are all C++ needs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace moeedge {

enum class WeightFormat { f32, bf16, q8_0, q4_0, q4_k, q5_k, q6_k, int8, int4 };

// A format by its name in moeedge ("f32", "bf16", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "int8", "int4");
// std::invalid_argument naming it otherwise.
WeightFormat weight_format(const std::string& name);

// One [rows, cols] matrix inside an expert's bytes, at `offset`; int8/int4: qweight there,
// then fp16 scales [rows, ceil(cols / group)] right after it (moeedge's group-wise layout).
struct StoredMatrix {
  WeightFormat format;
  size_t offset, rows, cols, group;

  // Bytes it spans; std::invalid_argument if cols does not fit the format's blocks.
  size_t nbytes() const;
};

void linear_stored(const float* x, size_t tokens, const uint8_t* expert, const StoredMatrix& m, float* out,
                   int threads);

// std::invalid_argument naming the shapes unless they chain: gate and up [I, H], down [H, I].
void check_chain(const StoredMatrix& gate, const StoredMatrix& up, const StoredMatrix& down);

// g = silu(g) * u over [tokens, n], row by row: each row split into SIMD words and a tail
// the same way whatever the number of rows (a row's bits do not depend on the batch).
void silu_mul_rows(float* g, const float* u, size_t tokens, size_t n);

// x [tokens, gate.cols] -> out [tokens, down.rows]. The shapes must chain (check_chain) and
// every matrix lie within `expert_bytes`: std::invalid_argument naming the role and the
// numbers otherwise.
void expert_ffn(const float* x, size_t tokens, const uint8_t* expert, size_t expert_bytes, const StoredMatrix& gate,
                const StoredMatrix& up, const StoredMatrix& down, float scale, float* out, int threads);

}  // namespace moeedge
