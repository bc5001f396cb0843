// Per-token KL estimators between the policy and the reference log-probs
// (DESIGN 3.3), shared by kl_shaped_rewards and the KL penalty / loss ops.
// Math only: no ATen, so the C++ unit tests and CUDA device code use it too.
#pragma once
#include <cmath>

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

template <typename T>
RLHF_HD T clamp_value(T x, T lo, T hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

template <typename T>
RLHF_HD T exp_value(T x) {
#if defined(__CUDA_ARCH__)
  return exp(x);  // CUDA's float/double overloads
#else
  return std::exp(x);
#endif
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
      return clamp_value(exp_value(d) - d - T(1), T(-kKLValueClamp), T(kKLValueClamp));
    }
  }
}

}  // namespace rlhf_ext
