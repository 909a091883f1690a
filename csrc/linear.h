// out[T, rows] = x[T, cols] (fp32) times W[rows, cols]^T with W as stored (bf16, GGUF
// Q8_0, Q4_0, Q4_K, Q5_K or Q6_K blocks, moeedge's group-wise int8/int4): no dequantized copy of W is ever made. Memory-bound
// for small T, so the win is reading the stored bytes once. AVX2+FMA(+F16C) where the
// CPU has it (chosen at run time), a portable loop otherwise; both accumulate in fp32.
// Batch invariance: on a given path each output is summed one way only, so out[t] has the
// same bits whatever the number of tokens, the other tokens and the thread count (threads
// split the rows, never a row's sum; tests/test_batch_invariance.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace moeedge {

void linear_bf16(const float* x, size_t tokens, const uint16_t* w, size_t rows, size_t cols, float* out,
                 int threads);
void linear_f32(const float* x, size_t tokens, const float* w, size_t rows, size_t cols, float* out, int threads);

// GGUF Q8_0, multiplied by linear_group.cpp as int8 with groups of 32: each row is
// cols / 32 blocks of {fp16 scale d, 32 int8 q}, weight = d * q.
constexpr size_t kQ8Block = 32;
constexpr size_t kQ8BlockBytes = 34;
void linear_q8_0(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                 int threads);

// GGUF Q4_0, Q4_K, Q5_K and Q6_K (ggml-common.h layouts), multiplied by linear_kquants.cpp:
// - Q4_0: 32 weights in 18 bytes {fp16 d, 16 bytes of nibbles}: weights 0..15 in the
//   low nibbles, 16..31 in the high ones; weight = d * (q - 8).
// - Q4_K: 256 weights in 144 bytes {fp16 d, fp16 dmin, 12 bytes of 6-bit scales and
//   mins for 8 sub-blocks of 32, 128 bytes of nibbles}; weight = d * sc * q - dmin * m.
// - Q5_K: 256 weights in 176 bytes {Q4_K's d, dmin and 12 scale bytes, qh[32] (bit j of
//   byte l: the fifth bit of weight l of sub-block j), Q4_K's 128 bytes of nibbles}; q in 0..31.
// - Q6_K: 256 weights in 210 bytes {ql[128] low 4 bits, qh[64] high 2 bits, int8
//   scales[16] for 16 weights each, fp16 d}; weight = d * scale * (q - 32).
// Unlike bf16 they (and Q8_0) take x rounded to int16 with one fp32 scale per 32 values,
// so that the products are exact integer multiply-adds (AVX2 madd_epi16, 16 per
// instruction). That moves each x[i] by at most 0.51 s, s = max|x| over its 32-block /
// 32767, so an output differs from fp32 arithmetic on the dequantized weights by at most
// sum_i |a[i]| * 0.51 s(i) (a relative 2**-16 of each block's largest activation) plus
// float rounding; a[i] = w[i], except Q4_K and Q5_K: d * sc * q (its mins use the exact sum of x).
constexpr size_t kQ4_0Block = 32;
constexpr size_t kQ4_0BlockBytes = 18;
constexpr size_t kQKBlock = 256;  // weights per K-quant super-block
constexpr size_t kQ4KBlockBytes = 144;
constexpr size_t kQ5KBlockBytes = 176;
constexpr size_t kQ6KBlockBytes = 210;
void linear_q4_0(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                 int threads);
void linear_q4_k(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                 int threads);
void linear_q5_k(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                 int threads);
void linear_q6_k(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                 int threads);

// The prompt kernels: Q4_K, Q5_K and Q6_K with x rounded to int16 per 256 values (one scale per
// super-block) and each super-block's sub-block scales multiplied into its unpacked weights,
// so that many tokens share one unpacked row and a super-block's products are one exact
// integer sum (linear_kquants_x256.cpp). With AVX-512 VNNI 1.5-1.9x the speed of the kernels
// above from 16 tokens on, about half of it at one token; the error bound above with s = max|x| over the 256 and
// a[i] = w[i] + dmin * m (the mins go through the exact fp32 sums of x per 32). Batch invariant
// like the others, but not bit-equal to them: a prompt's products take these, a decode step's
// the others (moeedge.kernels.linear's `prompt`).
void linear_q4_k_x256(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                      int threads);
void linear_q5_k_x256(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                      int threads);
void linear_q6_k_x256(const float* x, size_t tokens, const uint8_t* w, size_t rows, size_t cols, float* out,
                      int threads);

// moeedge's group-wise symmetric int8 and int4 (python/moeedge/formats/group_quant.py),
// multiplied by linear_group.cpp. Row r of an [rows, cols] matrix is cut into groups of
// `group` consecutive weights (a multiple of 32; the last group of a row may be shorter),
// each with one fp16 scale: weight = scale * q. `q` holds the rows back to back:
// - int8: cols bytes per row, q in -127..127;
// - int4: cols / 2 bytes per row, byte i holding weight 2i in its low nibble and 2i + 1 in
//   its high one, each as q + 8, q in -8..7;
// `scales`: fp16 [rows, ceil(cols / group)], little-endian, any alignment. x is rounded to
// int16 per 32 values, as for Q4_0 above, with the same error bound (a[i] = w[i]).
// cols must be a multiple of 32; std::invalid_argument otherwise or for a bad group.
void linear_int8(const float* x, size_t tokens, const uint8_t* q, const uint8_t* scales, size_t rows, size_t cols,
                 size_t group, float* out, int threads);
void linear_int4(const float* x, size_t tokens, const uint8_t* q, const uint8_t* scales, size_t rows, size_t cols,
                 size_t group, float* out, int threads);

// Which path the kernels take now: "scalar", "avx2" or "avx512" (AVX-512 F+BW+VL: bf16,
// Q8_0 and group-wise int8/int4, with VNNI where the CPU has it; the K-quants and Q4_0
// take AVX2 there).
const char* linear_path();

// The paths this CPU can take, narrowest first.
std::vector<std::string> linear_paths();

// For tests and benchmarks: take this path (one of linear_paths()), or the CPU's best for
// "". std::invalid_argument for a path the CPU lacks.
void linear_force_path(const std::string& name);

}  // namespace moeedge
