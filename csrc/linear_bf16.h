// out[T, rows] = x[T, cols] (fp32) times W[rows, cols]^T with W in bf16, read as
// stored: no dequantized copy of W is ever made. Memory-bound for small T, so the
// win is reading 2 bytes per weight once. AVX2+FMA where the CPU has it (chosen at
// run time), a portable loop otherwise; both accumulate in fp32.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moeedge {

void linear_bf16(const float* x, size_t tokens, const uint16_t* w, size_t rows, size_t cols, float* out,
                 int threads);

// Which path linear_bf16 takes on this CPU: "avx2" or "scalar".
const char* linear_bf16_path();

// For tests: force the portable path (true) or go back to run-time choice (false).
void linear_bf16_force_scalar(bool force);

}  // namespace moeedge
