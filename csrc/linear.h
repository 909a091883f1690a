// out[T, rows] = x[T, cols] (fp32) times W[rows, cols]^T with W as stored (bf16, or
// GGUF Q8_0 blocks): no dequantized copy of W is ever made. Memory-bound for small T,
// so the win is reading the stored bytes once. AVX2+FMA(+F16C) where the CPU has it
// (chosen at run time), a portable loop otherwise; both accumulate in fp32.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moeedge {

void linear_bf16(const float* x, size_t tokens, const uint16_t* w, size_t rows, size_t cols, float* out,
                 int threads);

// Q8_0: each row is cols / 32 blocks of {fp16 scale d, 32 int8 q}, weight = d * q.
constexpr size_t kQ8Block = 32;
constexpr size_t kQ8BlockBytes = 34;
void linear_q8_0(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                 int threads);

// Which path the kernels take on this CPU: "avx2" or "scalar".
const char* linear_path();

// For tests: force the portable path (true) or go back to run-time choice (false).
void linear_force_scalar(bool force);

}  // namespace moeedge
