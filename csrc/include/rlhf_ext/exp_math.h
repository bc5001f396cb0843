// Exponentials that a compiler vectorises on the CPU, shared by the softmax
// (softmax_math.h) and the loss math (kl.h, ppo_math.h). On CUDA they are the
// hardware's own. On the host, glibc's expf is a call per element (~4 ns here)
// that keeps every loop around it scalar; these are straight-line FMA code with
// no calls and no branches (built with -fno-trapping-math, which lets GCC turn
// the selects into blends), 8 or 16 lanes at a time.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "rlhf_ext/macros.h"

namespace rlhf_ext {

constexpr double kLog2e = 1.4426950408889634;

// 2^f * 2^n for f in [-0.5, 0.5] and an integer-valued n with 2^n * 2^f a
// normal float: a minimax polynomial of 2^f (relative error < 2e-7), then n
// added to the exponent bits.
inline float exp2_reduced(float f, float n) {
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) * (1 << 23);
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

// Round to the nearest integer by the 1.5 * 2^23 trick (no SSE4.1 needed);
// exact for |x| < 2^22.
inline float round_small(float x) {
  return (x + 12582912.0f) - 12582912.0f;
}

// exp2(x) for x <= 0.5 (the online softmax only produces x <= 0, up to
// rounding). Accurate to ~2 ulp; results below 2^-125 flush to 0 (they cannot
// move a sum that holds the row max's term, 1). NaN stays NaN.
RLHF_HD float exp2_nonpositive(float x) {
#ifdef __CUDA_ARCH__
  return exp2f(x);  // the hardware's ex2: one instruction
#else
  const float clamped = x < -125.0f ? -125.0f : x;  // NaN compares false: kept
  const float rounded = round_small(clamped);
  float result = exp2_reduced(clamped - rounded, rounded);
  // A multiply, not a select: GCC if-converts (vectorises) only the former here.
  result *= static_cast<float>(x >= -125.0f);
  return x != x ? x : result;
#endif
}

RLHF_HD double exp2_nonpositive(double x) {
  return std::exp2(x);
}

// exp(x) for |x| <= 80, the range of every clamped log-ratio in the loss math
// (their clamps are at +-20); accurate to ~2 ulp. NaN stays NaN.
RLHF_HD float exp_small(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  // Cody-Waite: x = n ln2 + r with |r| <= ln2 / 2, ln2 split so that n * ln2_hi
  // is exact; then exp(x) = 2^n 2^(r log2 e).
  constexpr float kLn2Hi = 0.693145751953125f;  // 12 significant bits
  constexpr float kLn2Lo = 1.428606765330187e-06f;
  const float n = round_small(x * static_cast<float>(kLog2e));
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  const float result = exp2_reduced(r * static_cast<float>(kLog2e), n);
  return x != x ? x : result;
#endif
}

RLHF_HD double exp_small(double x) {
#ifdef __CUDA_ARCH__
  return exp(x);
#else
  return std::exp(x);
#endif
}

}  // namespace rlhf_ext
