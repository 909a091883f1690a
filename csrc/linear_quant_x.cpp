#include "linear_quant_x.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace moeedge::detail {

QuantX quantize_x(const float* x, size_t tokens, size_t cols) {
  QuantX qx;
  qx.tokens = tokens;
  qx.blocks = cols / kXBlock;
  qx.stride = (qx.blocks + 7) / 8 * 8;
  qx.q.resize(tokens * qx.stride * kXBlock);
  qx.scale.resize(tokens * qx.stride);
  qx.sum.resize(tokens * qx.stride);
  for (size_t t = 0; t < tokens; ++t) {
    for (size_t b = 0; b < qx.blocks; ++b) {
      const float* xb = x + t * cols + b * kXBlock;
      int16_t* q = &qx.q[(t * qx.stride + b) * kXBlock];
      float amax = 0.f, sum = 0.f;
      for (size_t i = 0; i < kXBlock; ++i) {
        amax = std::max(amax, std::fabs(xb[i]));  // drops NaN, which sum keeps
        sum += xb[i];
      }
      if (!std::isfinite(amax) || std::isnan(sum)) {  // NaN or inf: NaN out, as fp32 arithmetic would give
        qx.scale[t * qx.stride + b] = qx.sum[t * qx.stride + b] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      // x / amax first: |x / amax| <= 1 even for subnormal amax, where 32767 / amax would overflow.
      const auto round = [amax](float v) {
        v = amax > 0.f ? v / amax * 32767.f : 0.f;
        return static_cast<int16_t>(v + (v < 0.f ? -0.5f : 0.5f));  // half away from zero; |v| <= 32767
      };
      for (size_t i = 0; i < kXBlock / 2; ++i) {
        q[i] = round(xb[2 * i]);
        q[16 + i] = round(xb[2 * i + 1]);
      }
      qx.scale[t * qx.stride + b] = amax / 32767.f;
      qx.sum[t * qx.stride + b] = sum;
    }
  }
  return qx;
}

}  // namespace moeedge::detail
