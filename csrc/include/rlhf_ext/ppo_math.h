// Per-token math of the PPO policy loss, the value loss and the KL loss
// (DESIGN 3.3), and the aggregation modes that turn per-row partial sums into
// one loss. Math only: no ATen, so the CPU kernels, the CUDA kernels and the
// C++ unit tests share one definition.
//
// Every loss op works in two levels. Level 1 visits each valid token once and
// yields its loss, its derivative w.r.t. the differentiable input (before
// aggregation) and its statistics, summed per row into kCols partials:
//   column 0: loss sum, column 1: valid-token count, columns 2..: statistics
//   (sums, except Family::kMaxCol, which is a max).
// Level 2 reduces the rows in a fixed order and gives the loss, each
// statistic's mean over valid tokens, and a per-row weight such that
// d loss / d input[b, t] = grad[b, t] * row_weight[b].
#pragma once

#include "rlhf_ext/kl.h"
#include "rlhf_ext/macros.h"

namespace rlhf_ext {

enum class LossAgg : int {
  kTokenMean = 0,            // sum over valid tokens / valid-token count
  kSeqMeanTokenSum = 1,      // mean over non-empty rows of the row's sum
  kSeqMeanTokenMean = 2,     // mean over non-empty rows of the row's mean
  kSeqMeanTokenSumNorm = 3,  // sum over tokens / a fixed factor (default T)
};

template <typename T>
RLHF_HD T max_value(T a, T b) {
  return a < b ? b : a;
}

// One token of the clipped PPO objective.
template <typename T>
struct PolicyToken {
  T loss;
  T grad;           // d loss / d logprob
  T ratio;          // exp(clamped log-ratio)
  T neg_log_ratio;  // old - new, clamped like the ratio (the approx_kl term)
  bool clipped;     // the clipped surrogate won the max
  bool clipped_lower;  // the dual clip (A < 0) won the min
};

// ratio = exp(clamp(lp - old, -20, 20)); loss = max(-A r, -A clamp(r, lo, hi));
// with dual_clip = c > 0 and A < 0: min(loss, -A c). The gradient is the one of
// the branch that wins: 0 for a clipped or dual-clipped token and for a
// log-ratio beyond the +-20 clamp, -A r otherwise.
template <typename T>
RLHF_HD PolicyToken<T> policy_token(T logprob, T old_logprob, T advantage, T ratio_lo, T ratio_hi,
                                    T dual_clip) {
  const T raw = logprob - old_logprob;
  const T log_ratio = clamp_value(raw, T(-kKLLogRatioClamp), T(kKLLogRatioClamp));
  const T ratio = exp_value(log_ratio);
  const T unclipped = -advantage * ratio;
  const T clipped = -advantage * clamp_value(ratio, ratio_lo, ratio_hi);
  PolicyToken<T> out;
  out.ratio = ratio;
  out.neg_log_ratio = -log_ratio;
  out.clipped = clipped > unclipped;
  out.clipped_lower = false;
  out.loss = out.clipped ? clipped : unclipped;
  const bool in_clamp = raw >= T(-kKLLogRatioClamp) && raw <= T(kKLLogRatioClamp);
  out.grad = (out.clipped || !in_clamp) ? T(0) : unclipped;
  if (dual_clip > T(0) && advantage < T(0)) {
    const T floor_loss = -advantage * dual_clip;
    if (out.loss > floor_loss) {
      out.loss = floor_loss;
      out.grad = T(0);
      out.clipped_lower = true;
    }
  }
  return out;
}

// One token of the (optionally clipped) value loss, 0.5 included.
template <typename T>
struct ValueToken {
  T loss;
  T grad;  // d loss / d value
  bool clipped;
};

// 0.5 max((v - R)^2, (clamp(v, old - eps, old + eps) - R)^2), or 0.5 (v - R)^2
// when clip_eps <= 0 (no clipping).
template <typename T>
RLHF_HD ValueToken<T> value_token(T value, T old_value, T ret, T clip_eps) {
  const T err = value - ret;
  const T loss = err * err;
  if (!(clip_eps > T(0))) return ValueToken<T>{T(0.5) * loss, err, false};
  const T clipped_err = clamp_value(value, old_value - clip_eps, old_value + clip_eps) - ret;
  const T clipped_loss = clipped_err * clipped_err;
  const bool clipped = clipped_loss > loss;
  // The clipped branch only wins when v is outside the band, where it is constant in v.
  return ValueToken<T>{T(0.5) * (clipped ? clipped_loss : loss), clipped ? T(0) : err, clipped};
}

// d kl_value / d logprob; with straight_through ("+" kinds) the gradient of k2.
template <typename T>
RLHF_HD T kl_grad(KLKind kind, bool straight_through, T logprob, T ref_logprob) {
  const T diff = logprob - ref_logprob;
  if (straight_through) return diff;
  switch (kind) {
    case KLKind::kK1:
      return T(1);
    case KLKind::kAbs:
      return diff > T(0) ? T(1) : (diff < T(0) ? T(-1) : T(0));
    case KLKind::kK2:
      return diff;
    case KLKind::kK3:
    default: {
      const T d = -diff;
      if (d < T(-kKLLogRatioClamp) || d > T(kKLLogRatioClamp)) return T(0);
      const T e = exp_value(d);
      // The value clamp at 10 is the only one that can bind (exp(d) - d - 1 >= 0).
      if (e - d - T(1) > T(kKLValueClamp)) return T(0);
      return T(1) - e;
    }
  }
}

// Level-1 families: `kCols` partial columns per row; accumulate() adds one valid
// token to `acc` and returns its un-aggregated derivative.
template <typename T>
struct PolicyFamily {
  static constexpr int kInputs = 3;
  static constexpr int kCols = 7;  // loss, count, clipfrac, clipfrac_lower, approx_kl,
                                   // ratio_mean, ratio_max
  static constexpr int kMaxCol = 6;
  T ratio_lo, ratio_hi, dual_clip;

  RLHF_HD T accumulate(T logprob, T old_logprob, T advantage, T* acc) const {
    const PolicyToken<T> p =
        policy_token(logprob, old_logprob, advantage, ratio_lo, ratio_hi, dual_clip);
    acc[0] += p.loss;
    acc[1] += T(1);
    acc[2] += p.clipped ? T(1) : T(0);
    acc[3] += p.clipped_lower ? T(1) : T(0);
    acc[4] += p.neg_log_ratio;
    acc[5] += p.ratio;
    acc[6] = max_value(acc[6], p.ratio);  // ratios are > 0, so 0 is the identity
    return p.grad;
  }
};

template <typename T>
struct ValueFamily {
  static constexpr int kInputs = 3;
  static constexpr int kCols = 3;  // loss, count, clipfrac
  static constexpr int kMaxCol = -1;
  T clip_eps;

  RLHF_HD T accumulate(T value, T old_value, T ret, T* acc) const {
    const ValueToken<T> v = value_token(value, old_value, ret, clip_eps);
    acc[0] += v.loss;
    acc[1] += T(1);
    acc[2] += v.clipped ? T(1) : T(0);
    return v.grad;
  }
};

template <typename T>
struct KLFamily {
  static constexpr int kInputs = 2;
  static constexpr int kCols = 2;  // loss, count
  static constexpr int kMaxCol = -1;
  KLKind kind;
  bool straight_through;

  RLHF_HD T accumulate(T logprob, T ref_logprob, T /*unused*/, T* acc) const {
    acc[0] += kl_value(kind, logprob, ref_logprob);
    acc[1] += T(1);
    return kl_grad(kind, straight_through, logprob, ref_logprob);
  }
};

// Level 2. `loss_sum`: sum of all row loss sums; `mean_sum`: sum over non-empty
// rows of (row loss sum / row count); `tokens`: valid tokens; `rows`: non-empty
// rows; `norm`: the "-norm" divisor. An all-masked batch gives 0, never NaN.
template <typename T>
RLHF_HD T agg_loss(LossAgg agg, T loss_sum, T mean_sum, T tokens, T rows, T norm) {
  if (!(tokens > T(0))) return T(0);
  switch (agg) {
    case LossAgg::kTokenMean:
      return loss_sum / tokens;
    case LossAgg::kSeqMeanTokenSum:
      return loss_sum / rows;
    case LossAgg::kSeqMeanTokenMean:
      return mean_sum / rows;
    case LossAgg::kSeqMeanTokenSumNorm:
    default:
      return loss_sum / norm;
  }
}

// d loss / d (token loss) for every valid token of a row with `row_tokens`
// valid tokens; 0 for an empty row.
template <typename T>
RLHF_HD T agg_row_weight(LossAgg agg, T row_tokens, T tokens, T rows, T norm) {
  if (!(row_tokens > T(0))) return T(0);
  switch (agg) {
    case LossAgg::kTokenMean:
      return T(1) / tokens;
    case LossAgg::kSeqMeanTokenSum:
      return T(1) / rows;
    case LossAgg::kSeqMeanTokenMean:
      return T(1) / (rows * row_tokens);
    case LossAgg::kSeqMeanTokenSumNorm:
    default:
      return T(1) / norm;
  }
}

}  // namespace rlhf_ext
