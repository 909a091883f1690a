// Activations rounded to int16 per 32 values, for kernels that multiply integers exactly
// (AVX2 madd_epi16, 16 products per instruction): x[i] ~= scale * q[i], which moves each
// x[i] by at most 0.51 scale, scale = max|x| over its 32-block / 32767 (error bound in
// linear.h). Within a block the int16s are stored evens first, then odds: a 16-bit lane of
// packed weights splits into its even and odd weight without shuffles.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace moeedge::detail {

constexpr size_t kXBlock = 32;  // activations per int16 scale

// x [tokens, cols] as int16 blocks. Each token's blocks are padded with zeros to a multiple
// of 8, so an AVX2 loop may always take 8 blocks at a time.
struct QuantX {
  size_t tokens = 0, blocks = 0, stride = 0;  // blocks per token: cols / 32, padded to `stride`
  std::vector<int16_t> q;                     // [tokens, stride, 32], each block evens then odds
  std::vector<float> scale;                   // [tokens, stride]; NaN where the block holds NaN or inf
  std::vector<float> sum;                     // [tokens, stride] fp32 sum of the block's x

  const int16_t* block(size_t t, size_t b) const { return q.data() + (t * stride + b) * kXBlock; }
  const float* scales(size_t t, size_t b) const { return scale.data() + t * stride + b; }
  const float* sums(size_t t, size_t b) const { return sum.data() + t * stride + b; }
};

// cols must be a multiple of 32.
QuantX quantize_x(const float* x, size_t tokens, size_t cols);

// x [tokens, cols] rounded to int16 per 256 values (a K-quant super-block), in natural order:
// x[i] ~= scale * q[i], scale = max|x| over the 256 / 32767, which moves x[i] by at most
// 0.51 scale; with each 32 values' exact fp32 sum (Q4_K's and Q5_K's mins use it).
struct QuantX256 {
  size_t tokens = 0, supers = 0;  // supers: cols / 256
  std::vector<int16_t> q;         // [tokens, supers, 256]
  std::vector<float> scales;      // [tokens, supers]; NaN where the 256 hold NaN or inf
  std::vector<float> sum;         // [tokens, supers, 8]

  const int16_t* block(size_t t, size_t s) const { return q.data() + (t * supers + s) * 256; }
  const float* scale(size_t t, size_t s) const { return scales.data() + t * supers + s; }
  const float* sums(size_t t, size_t s) const { return sum.data() + (t * supers + s) * 8; }
};

// cols must be a multiple of 256.
QuantX256 quantize_x256(const float* x, size_t tokens, size_t cols);

}  // namespace moeedge::detail
