// Per-element math of token_logprobs, shared by the CPU and CUDA kernels.
//
// A row of logits x is read once. With z = x / T the softmax is kept online
// relative to the running max m of x (so no exponential ever overflows):
//   sum_exp   = sum_k exp((x_k - m) / T)
//   sum_shift = sum_k exp((x_k - m) / T) * (x_k - m)
// and at the end
//   lse     = m / T + log(sum_exp)                  (log-sum-exp of z)
//   entropy = log(sum_exp) - sum_shift / (T sum_exp)  (= lse - E_p[z])
// Entropy thus costs one multiply-add per element and no second pass.
// Exponentials are exp2 of pre-scaled arguments: `scale_log2` = log2(e) / T.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "rlhf_ext/exp_math.h"
#include "rlhf_ext/macros.h"

namespace rlhf_ext {

// One partial softmax of a row (a chunk, a thread's share, a whole row).
// An empty state has sum_exp == 0; its max may be anything (-inf at start).
template <typename acc_t>
struct SoftmaxState {
  acc_t max;
  acc_t sum_exp;
  acc_t sum_shift;
};

template <typename acc_t>
RLHF_HD SoftmaxState<acc_t> softmax_empty() {
  return {-std::numeric_limits<acc_t>::infinity(), acc_t(0), acc_t(0)};
}

// The state re-expressed relative to new_max >= state.max:
//   exp((x - m') / T) = f exp((x - m) / T) with f = exp((m - m') / T), and
//   (x - m') = (x - m) + (m - m').
template <typename acc_t>
RLHF_HD SoftmaxState<acc_t> softmax_rebase(SoftmaxState<acc_t> s, acc_t new_max,
                                           acc_t scale_log2) {
  if (!(s.sum_exp > acc_t(0))) return {new_max, s.sum_exp, s.sum_shift};  // empty (or NaN)
  const acc_t delta = s.max - new_max;
  const acc_t f = exp2_nonpositive(delta * scale_log2);
  return {new_max, f * s.sum_exp, f * (s.sum_shift + delta * s.sum_exp)};
}

// Merge of two partial states. Symmetric in (a, b) bit for bit, so a
// butterfly reduction gives every lane the same result.
template <typename acc_t>
RLHF_HD SoftmaxState<acc_t> softmax_merge(SoftmaxState<acc_t> a, SoftmaxState<acc_t> b,
                                          acc_t scale_log2) {
  const acc_t m = a.max > b.max ? a.max : b.max;
  const SoftmaxState<acc_t> ra = softmax_rebase(a, m, scale_log2);
  const SoftmaxState<acc_t> rb = softmax_rebase(b, m, scale_log2);
  return {m, ra.sum_exp + rb.sum_exp, ra.sum_shift + rb.sum_shift};
}

// Adds element x to sums kept relative to `max` (x <= max). A -inf logit
// (a masked vocabulary entry) adds exactly 0, not 0 * -inf.
template <typename acc_t>
RLHF_HD void softmax_add(acc_t x, acc_t max, acc_t scale_log2, acc_t& sum_exp,
                         acc_t& sum_shift) {
  const acc_t shifted = x - max;
  const acc_t e = exp2_nonpositive(shifted * scale_log2);
  sum_exp += e;
  sum_shift += e > acc_t(0) ? e * shifted : acc_t(0);
}

// softmax_add that also adds the square of the exponential to `sum_sq`: the sum of
// exp(2 (x - max) / T), the softmax at twice the multiplier on the same max (log sum p^2
// = its log-sum-exp - 2 lse), without a second exponential.
template <typename acc_t>
RLHF_HD void softmax_add_with_square(acc_t x, acc_t max, acc_t scale_log2, acc_t& sum_exp,
                                     acc_t& sum_shift, acc_t& sum_sq) {
  const acc_t shifted = x - max;
  const acc_t e = exp2_nonpositive(shifted * scale_log2);
  sum_exp += e;
  sum_shift += e > acc_t(0) ? e * shifted : acc_t(0);
  sum_sq += e * e;
}

// log-sum-exp of z = x / T over the row. An all -inf row (sum_exp == 0)
// gives -inf, and then NaN log-probs: no probability distribution exists.
template <typename acc_t>
RLHF_HD acc_t softmax_lse(SoftmaxState<acc_t> s, acc_t inv_temp) {
  return s.max * inv_temp + std::log(s.sum_exp);
}

// The log-sum-exp as the ops return it: +inf for a row with a +inf logit (torch's
// logsumexp), where the sums above are NaN and so is every log-prob. The backward maps it
// back (lse_input), so that such a row's gradient stays NaN.
template <typename acc_t>
RLHF_HD acc_t lse_output(SoftmaxState<acc_t> s, acc_t lse) {
  return s.max == std::numeric_limits<acc_t>::infinity() ? s.max : lse;
}

template <typename acc_t>
RLHF_HD acc_t lse_input(acc_t lse) {
  return lse == std::numeric_limits<acc_t>::infinity() ? std::numeric_limits<acc_t>::quiet_NaN()
                                                       : lse;
}

template <typename acc_t>
RLHF_HD acc_t softmax_entropy(SoftmaxState<acc_t> s, acc_t inv_temp) {
  return std::log(s.sum_exp) - inv_temp * s.sum_shift / s.sum_exp;
}

// The upstream gradients of the extra outputs (token_logprobs' `outputs=`), per row:
// g_lse of the log-sum-exp, g_sq2 = 2 g of log_sum_sq_probs with inv_s2 = 1 / sum_k p_k^2,
// g_mean_v = g of mean_logits / V. All 0 (the default) adds nothing.
// softmax_terms false: no upstream gradient of a softmax-weighted output reaches the row
// (only mean_logits'), so its gradient is g_mean_v / T even where p is NaN (a NaN logit),
// as autograd through the mean gives.
template <typename acc_t>
struct ExtraGrad {
  acc_t g_lse = acc_t(0);
  acc_t g_sq2 = acc_t(0);
  acc_t inv_s2 = acc_t(0);
  acc_t g_mean_v = acc_t(0);
  bool softmax_terms = true;
};

// d(loss)/d(x_k) for loss = g_lp * logprob[target] + g_ent * entropy (+ the extra
// outputs' terms), from logp_k = x_k / T - lse and p_k = exp(logp_k):
//   d logprob / d z_k          = [k == target] - p_k
//   d entropy / d z_k          = -p_k (logp_k + entropy)
//   d lse / d z_k              = p_k
//   d log sum p^2 / d z_k      = 2 p_k (p_k / sum p^2 - 1)
//   d mean_logits / d z_k      = 1 / V
// and d z / d x = 1 / T. The [k == target] term is added by the caller
// (target_grad) so that this stays a pure per-element map.
template <typename acc_t>
RLHF_HD acc_t logits_grad(acc_t x, acc_t inv_temp, acc_t lse, acc_t entropy, acc_t g_lp,
                          acc_t g_ent, const ExtraGrad<acc_t>& extra = ExtraGrad<acc_t>()) {
  if (!extra.softmax_terms) return extra.g_mean_v * inv_temp;
  const acc_t logp = x * inv_temp - lse;
  const acc_t p = exp2_nonpositive(logp * acc_t(kLog2e));
  const acc_t weighted = (g_lp - extra.g_lse) + g_ent * (logp + entropy) +
                         extra.g_sq2 * (acc_t(1) - p * extra.inv_s2);
  // p == 0 (a -inf logit) contributes nothing, even where logp is -inf.
  const acc_t g = p > acc_t(0) ? -p * weighted * inv_temp : (p != p ? p : acc_t(0));
  return g + extra.g_mean_v * inv_temp;
}

template <typename acc_t>
RLHF_HD acc_t target_grad(acc_t g_lp, acc_t inv_temp) {
  return g_lp * inv_temp;
}

}  // namespace rlhf_ext
