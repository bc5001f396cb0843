// Per-token KL estimators between the policy and the reference log-probs
// (docs/design.md §3.3), shared by kl_shaped_rewards and the KL penalty / loss ops.
// Math only: no ATen, so the C++ unit tests and CUDA device code use it too.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "rlhf_ext/exp_math.h"
#include "rlhf_ext/macros.h"

namespace rlhf_ext {

enum class KLKind : int {
  kK1 = 0,   // "k1" / "kl": lp - ref
  kAbs = 1,  // "abs": |lp - ref|
  kK2 = 2,   // "k2" / "mse": 0.5 * (lp - ref)^2
  kK3 = 3,   // "k3" / "low_var_kl": expm1(d) - d with d = ref - lp (see k3_from_exp)
};

// Bounds that keep k3 finite for log-ratios far outside the trust region
// (verl's low_var_kl clamps the same way).
constexpr float kKLLogRatioClamp = 20.f;
constexpr float kKLValueClamp = 10.f;

// c ? a : b without a branch on the host: GCC compiles float ternaries whose
// condition depends on the data (clip outcomes, signs of advantages) to jumps
// that mispredict about half the time, which made the CPU loss kernels several
// times slower. A bit mask blend cannot become a jump. (CUDA: plain select.)
template <typename T>
RLHF_HD T select_value(bool c, T a, T b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  if constexpr (sizeof(T) == 4 || sizeof(T) == 8) {
    using U = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
    U ua, ub;
    std::memcpy(&ua, &a, sizeof(T));
    std::memcpy(&ub, &b, sizeof(T));
    const U m = U(0) - U(c);
    const U r = (ua & m) | (ub & ~m);
    T out;
    std::memcpy(&out, &r, sizeof(T));
    return out;
  } else {
    return c ? a : b;
  }
#endif
}

// 1 or 0 in T. A select, not T(c): GCC vectorises the select but not a
// bool-to-float conversion of a combined condition (the loss loops stay scalar).
template <typename T>
RLHF_HD T indicator(bool c) {
  return select_value(c, T(1), T(0));
}

// For lo <= hi the same as x < lo ? lo : (x > hi ? hi : x); NaN passes through.
template <typename T>
RLHF_HD T clamp_value(T x, T lo, T hi) {
  const T above_lo = select_value(x < lo, lo, x);
  return select_value(above_lo > hi, hi, above_lo);
}

// k3 = exp(d) - d - 1 = expm1(d) - d, given d and e = exp(d). Near d = 0 the direct form
// cancels (float32: 12% relative error at d = 1e-3, 100% below 3e-4, where it rounds to
// 0 or a multiple of 6e-8), so |d| < 1 takes the Taylor series d^2/2! + ... + d^10/10!
// (the first term left out is below 7e-8 of the value there) and |d| >= 1, where the
// direct form loses at most a few ulp of exp(d), keeps it. float64 (gradcheck, the
// oracle's precision) uses expm1 itself. The gradient 1 - exp(d) = -expm1(d) is
// -(k3 + d), accurate by the same token.
template <typename T>
RLHF_HD T k3_from_exp(T d, T e) {
  if constexpr (sizeof(T) == 8) {
#ifdef __CUDA_ARCH__
    return ::expm1(d) - d;
#else
    return std::expm1(d) - d;
#endif
  } else {
    const T series =
        d * d *
        (T(1.0 / 2) +
         d * (T(1.0 / 6) +
              d * (T(1.0 / 24) +
                   d * (T(1.0 / 120) +
                        d * (T(1.0 / 720) +
                             d * (T(1.0 / 5040) +
                                  d * (T(1.0 / 40320) +
                                       d * (T(1.0 / 362880) + d * T(1.0 / 3628800)))))))));
    const bool small = (d > T(-1)) & (d < T(1));  // NaN: the direct form, NaN
    return select_value(small, series, e - d - T(1));
  }
}

template <typename T>
RLHF_HD T kl_value(KLKind kind, T logprob, T ref_logprob) {
  const T diff = logprob - ref_logprob;
  switch (kind) {
    case KLKind::kK1:
      return diff;
    case KLKind::kAbs:
      return diff < T(0) ? -diff : diff;
    case KLKind::kK2:
      return T(0.5) * diff * diff;
    case KLKind::kK3:
    default: {
      const T d = clamp_value(-diff, T(-kKLLogRatioClamp), T(kKLLogRatioClamp));
      return clamp_value(k3_from_exp(d, exp_small(d)), T(-kKLValueClamp), T(kKLValueClamp));
    }
  }
}

}  // namespace rlhf_ext
