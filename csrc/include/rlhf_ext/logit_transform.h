// The map from a logit x to the z that token_logprobs' softmax sees, shared by the
// CPU and CUDA kernels (rlhf_ext/triton/token_logprobs.py has its Triton twin):
//   z = cap * tanh(x * scale / cap) / T    with a softcap (Gemma's final_logit_softcapping)
//   z = x * scale / T                      without one (cap == 0)
// `scale` is the head's logit_scale (Cohere, Granite, Falcon-H1), T the temperature:
// one float for every row, or one per row (per-sample / per-token temperature).
//
// The kernels split it as y = squash(x) (the identity without a cap), then
// z = y * row_mult(row). Without a cap the scale folds into row_mult, so the default
// path costs what it did before any of this existed. The softmax state
// (softmax_math.h) is kept over y with multiplier row_mult, the role 1 / T had.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "rlhf_ext/exp_math.h"
#include "rlhf_ext/macros.h"

namespace rlhf_ext {

// Below this |u|, tanh_with_slope takes its odd series (the exp form would lose digits to
// 1 - exp(-2|u|)): the series' first dropped term (u^15) is < 1e-8 relative at 0.25 in
// float32 and < 1e-20 at 0.05 in float64. The Triton twin (rlhf_ext/triton/_common.py)
// uses the same split and coefficients.
RLHF_HD float tanh_series_max(float) { return 0.25f; }
RLHF_HD double tanh_series_max(double) { return 0.05; }

// tanh(u), and dtanh/du = 1 - tanh(u)^2 in `slope`, in straight-line code that the CPU's
// loops vectorise (std::tanh is a call per element, which kept the softcap loop scalar and
// 7x slower than the softmax it feeds): the odd Taylor series below tanh_series_max,
// (1 - e) / (1 + e) with e = exp(-2|u|) above it, and the slope 4e / (1 + e)^2 there (no
// 1 - t^2 cancellation near |t| = 1). Within 4 ulps of tanh, and of its slope within
// 4 + 3|u| ulps (the slope's own condition number is 2|u| tanh u); NaN stays NaN, +-inf
// gives +-1 with slope 0 (tests: csrc/tests/test_logit_transform.cpp).
template <typename acc_t>
RLHF_HD acc_t tanh_with_slope(acc_t u, acc_t& slope) {
  const acc_t a = u < acc_t(0) ? -u : u;
  const acc_t u2 = u * u;
  acc_t s = acc_t(21844.0 / 6081075);
  s = s * u2 + acc_t(-1382.0 / 155925);
  s = s * u2 + acc_t(62.0 / 2835);
  s = s * u2 + acc_t(-17.0 / 315);
  s = s * u2 + acc_t(2.0 / 15);
  s = s * u2 + acc_t(-1.0 / 3);
  s = s * u2 + acc_t(1);
  const acc_t series = u * s;
  const acc_t e = exp2_nonpositive(acc_t(-2 * kLog2e) * a);
  const acc_t one_plus_e = acc_t(1) + e;
  const acc_t big = (acc_t(1) - e) / one_plus_e;
  const bool small = a < tanh_series_max(acc_t(0));
  slope = small ? acc_t(1) - series * series : acc_t(4) * e / (one_plus_e * one_plus_e);
  return small ? series : (u < acc_t(0) ? -big : big);
}

template <typename acc_t>
struct LogitTransform {
  acc_t inv_temp = acc_t(1);       // row_mult with one temperature for all rows
  const acc_t* temps = nullptr;    // one temperature per row, or nullptr
  acc_t numerator = acc_t(1);      // row_mult = numerator / T: scale without a cap, else 1
  acc_t cap = acc_t(0);            // the softcap; 0: none
  acc_t cap_in = acc_t(0);         // scale / cap
  acc_t cap_scale = acc_t(1);      // scale, the slope of squash at 0

  // dz / dy of this row. A per-row temperature that is not finite and > 0, or whose
  // multiplier overflows (reachable with validate=False only), gives the row NaN.
  RLHF_HD acc_t row_mult(int64_t row) const {
    if (temps == nullptr) return inv_temp;
    const acc_t t = temps[row];
    const acc_t mult = numerator / t;
    constexpr acc_t kMax = std::numeric_limits<acc_t>::max();
    return (t > acc_t(0) && t <= kMax && mult <= kMax)
               ? mult
               : std::numeric_limits<acc_t>::quiet_NaN();
  }

  RLHF_HD bool capped() const { return cap > acc_t(0); }

  // y of a logit, on the float32 (float64) upcast. Callers apply it to real logits
  // only: -inf padding must stay -inf, while a real -inf logit becomes -cap.
  RLHF_HD acc_t squash(acc_t x) const {
    acc_t unused;
    return capped() ? cap * tanh_with_slope(x * cap_in, unused) : x;
  }

  // y and dy / dx of a logit, for the backward: dy/dx = scale (1 - tanh^2).
  RLHF_HD acc_t squash_with_slope(acc_t x, acc_t& slope) const {
    if (!capped()) {
      slope = acc_t(1);
      return x;
    }
    acc_t dtanh;
    const acc_t t = tanh_with_slope(x * cap_in, dtanh);
    slope = cap_scale * dtanh;
    return cap * t;
  }
};

}  // namespace rlhf_ext
