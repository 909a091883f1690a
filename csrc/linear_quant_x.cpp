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

QuantX256 quantize_x256(const float* x, size_t tokens, size_t cols) {
  QuantX256 qx;
  qx.tokens = tokens;
  qx.supers = cols / 256;
  qx.q.assign(tokens * cols, 0);
  qx.scales.resize(tokens * qx.supers);
  qx.sum.resize(tokens * qx.supers * 8);
  for (size_t t = 0; t < tokens; ++t) {
    for (size_t s = 0; s < qx.supers; ++s) {
      const float* xb = x + t * cols + s * 256;
      int16_t* q = &qx.q[(t * qx.supers + s) * 256];
      float* sums = &qx.sum[(t * qx.supers + s) * 8];
      float amax = 0.f;
      bool nan = false;
      for (size_t j = 0; j < 8; ++j) {
        float sum = 0.f;
        for (size_t i = 32 * j; i < 32 * j + 32; ++i) {
          amax = std::max(amax, std::fabs(xb[i]));  // drops NaN, which sum keeps
          sum += xb[i];
        }
        sums[j] = sum;
        nan = nan || std::isnan(sum);
      }
      float& scale = qx.scales[t * qx.supers + s];
      if (!std::isfinite(amax) || nan) {  // NaN or inf: NaN out, as fp32 arithmetic would give
        scale = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      // x / amax first: |x / amax| <= 1 even for subnormal amax, where 32767 / amax would overflow.
      for (size_t i = 0; i < 256; ++i) {
        const float v = amax > 0.f ? xb[i] / amax * 32767.f : 0.f;
        q[i] = static_cast<int16_t>(v + (v < 0.f ? -0.5f : 0.5f));  // half away from zero; |v| <= 32767
      }
      scale = amax / 32767.f;
    }
  }
  return qx;
}

}  // namespace moeedge::detail
