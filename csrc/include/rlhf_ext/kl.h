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
  kK3 = 3,   // "k3" / "low_var_kl": exp(d) - d - 1 with d = ref - lp
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
      return clamp_value(exp_small(d) - d - T(1), T(-kKLValueClamp), T(kKLValueClamp));
    }
  }
}

}  // namespace rlhf_ext
