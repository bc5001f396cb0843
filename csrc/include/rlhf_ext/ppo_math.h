// The loss machinery (docs/design.md §3.3): the per-token math of the value loss
// and the KL loss, the level-1 families of every loss op (the policy-loss kinds'
// math is in policy_math.h), and the aggregation modes that turn per-row partial
// sums into one loss. Math only: no ATen, so the CPU kernels, the CUDA kernels and the
// C++ unit tests share one definition.
//
// Every loss op works in two levels. Level 1 visits each valid token once and
// yields its loss, its derivative w.r.t. the differentiable input (before
// aggregation) and its statistics, summed per row into kCols partials:
//   column 0: loss sum, column 1: valid-token count, columns 2..: statistics
//   (sums, except Family::kMaxCol, which is a max).
// Level 2 reduces the rows in a fixed order and gives the loss, each
// statistic's mean over valid tokens, and a per-row weight such that
// d loss / d input[b, t] = grad[b, t] * row_weight[b]. Before it sums a row, a
// family's finish_row() may turn the row's partials into its loss (the row-level
// policy kinds), and row_factor() is the row weight's factor beyond the aggregation.
#pragma once

#include "rlhf_ext/kl.h"
#include "rlhf_ext/macros.h"
#include "rlhf_ext/policy_math.h"

namespace rlhf_ext {

enum class LossAgg : int {
  kTokenMean = 0,            // sum over valid tokens / valid-token count
  kSeqMeanTokenSum = 1,      // mean over non-empty rows of the row's sum
  kSeqMeanTokenMean = 2,     // mean over non-empty rows of the row's mean
  kSeqMeanTokenSumNorm = 3,  // sum over tokens / a fixed factor (default T)
};

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
  const T clipped_err = clamp_value(value, old_value - clip_eps, old_value + clip_eps) - ret;
  const T clipped_loss = clipped_err * clipped_err;
  // No early return for clip_eps <= 0: branch-free code vectorises on the CPU.
  const bool clip_on = clip_eps > T(0);
  const bool clipped = clip_on & (clipped_loss > loss);
  // A NaN old value gives a NaN loss and gradient, as torch.clamp / torch.maximum do
  // (clamp_value's comparisons would drop the NaN bound and keep the loss finite).
  const bool nan_band = clip_on & (old_value != old_value);
  const T nan = old_value;
  // The clipped branch only wins when v is outside the band, where it is constant in v.
  const T token_loss = select_value(nan_band, nan, select_value(clipped, clipped_loss, loss));
  const T grad = select_value(nan_band, nan, select_value(clipped, T(0), err));
  return ValueToken<T>{T(0.5) * token_loss, grad, clipped};
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
      return indicator<T>(diff > T(0)) - indicator<T>(diff < T(0));
    case KLKind::kK2:
      return diff;
    case KLKind::kK3:
    default: {
      const T d = -diff;
      const T clamped = clamp_value(d, T(-kKLLogRatioClamp), T(kKLLogRatioClamp));
      const T k3 = k3_from_exp(clamped, exp_small(clamped));
      // The value clamp at 10 is the only one that can bind (k3 >= 0).
      const bool live = (clamped == d) & !(k3 > T(kKLValueClamp));
      return select_value(live, -(k3 + clamped), T(0));  // 1 - exp(d) = -expm1(d)
    }
  }
}

// kl_value and kl_grad together, with one exp for k3 (the CPU's hot loop).
template <typename T>
RLHF_HD T kl_value_and_grad(KLKind kind, bool straight_through, T logprob, T ref_logprob,
                            T* grad) {
  if (kind != KLKind::kK3) {
    *grad = kl_grad(kind, straight_through, logprob, ref_logprob);
    return kl_value(kind, logprob, ref_logprob);
  }
  const T diff = logprob - ref_logprob;
  const T d = clamp_value(-diff, T(-kKLLogRatioClamp), T(kKLLogRatioClamp));
  const T raw_value = k3_from_exp(d, exp_small(d));
  const bool live = (d == -diff) & !(raw_value > T(kKLValueClamp));
  *grad = straight_through ? diff : select_value(live, -(raw_value + d), T(0));
  return clamp_value(raw_value, T(-kKLValueClamp), T(kKLValueClamp));
}

// The policy family's partial columns per row: loss, count, the five statistics
// (clipfrac, clipfrac_lower, approx_kl, ratio_mean, ratio_max) and the row column
// (gspo: sum of d loss_t / d row; geo_mean: sum of A). One home for the indices.
namespace policy_col {
constexpr int kLoss = 0;
constexpr int kCount = 1;
constexpr int kClipfrac = 2;
constexpr int kClipfracLower = 3;
constexpr int kApproxKL = 4;
constexpr int kRatioSum = 5;
constexpr int kRatioMax = 6;
constexpr int kRow = 7;
constexpr int kCols = 8;
}  // namespace policy_col

// geo_mean's level 2 on one row's partials (float64, kCols of them): from the sums
// S = sum d~ (the loss column), Q = sum A (the row-gradient column) and n (count),
// the row's loss -(Q / (n + eps)) exp(S / (n + eps)) into the loss column and its ratio
// exp(S / (n + eps)) into the ratio columns (n times it into the ratio sum, so the
// ratio_mean statistic stays a mean over tokens). An empty row's loss and ratio are 0.
RLHF_HD void finish_geo_mean_row(double* row) {
  const double n = row[policy_col::kCount];
  const double denom = n + kGeoMeanEps;
  const double ratio = n > 0 ? exp_any(row[policy_col::kLoss] / denom) : 0.0;
  row[policy_col::kLoss] = n > 0 ? -(row[policy_col::kRow] / denom) * ratio : 0.0;
  row[policy_col::kRatioSum] = n * ratio;
  row[policy_col::kRatioMax] = ratio;
}

// finish_row of the policy kinds: geo_mean's row loss; a no-op for the others.
RLHF_HD void finish_policy_row(PolicyKind kind, double* row) {
  if (row_level(kind)) finish_geo_mean_row(row);
}

// row_factor of the policy kinds (after finish_policy_row): gspo's coupled row term
// (1 / n) * sum_t d loss_t / d s; geo_mean's d L / d (sum d~) = L / (n + eps); else 1.
RLHF_HD double policy_row_factor(PolicyKind kind, const double* row) {
  const double n = row[policy_col::kCount];
  if (row_coupled(kind)) return n > 0 ? row[policy_col::kRow] / n : 0.0;
  if (row_level(kind)) return n > 0 ? row[policy_col::kLoss] / (n + kGeoMeanEps) : 0.0;
  return 1.0;
}

// Level-1 families: `kCols` partial columns per row, the first 2 + kStats of them
// loss, count and the statistics. token() writes one valid token's contribution
// to each column into `v` and returns its un-aggregated derivative; callers add
// the contributions of valid tokens (max for kMaxCol) with combine(). `row` is
// the row's mean of a - b over its valid tokens when needs_row_mean(), else 0.
// For the row-coupled policy kind, column kRowGradCol holds the row's sum of
// d loss_t / d row, which level 2 folds into the row weight (policy_row_factor).

// Writes a policy token's columns: loss, count, clipfrac, clipfrac_lower,
// approx_kl, ratio_mean, ratio_max (kMaxCol) and the row gradient.
template <typename T>
RLHF_HD T write_policy_token(const PolicyToken<T>& p, T* v) {
  v[policy_col::kLoss] = p.loss;
  v[policy_col::kCount] = T(1);
  v[policy_col::kClipfrac] = indicator<T>(p.clipped);
  v[policy_col::kClipfracLower] = indicator<T>(p.clipped_lower);
  v[policy_col::kApproxKL] = p.neg_log_ratio;
  v[policy_col::kRatioSum] = p.ratio;
  v[policy_col::kRatioMax] = p.ratio;  // ratios are > 0, so 0 is the identity of the max
  v[policy_col::kRow] = p.row_grad;
  return p.grad;
}

// The policy-loss family with the kind chosen at run time (CUDA: a warp-uniform
// switch per token).
template <typename T>
struct PolicyFamily {
  static constexpr int kInputs = 3;
  static constexpr int kCols = policy_col::kCols;
  static constexpr int kStats = 5;
  static constexpr int kMaxCol = policy_col::kRatioMax;
  static constexpr int kRowGradCol = policy_col::kRow;
  PolicyKind kind;
  PolicyParams<T> params;

  RLHF_HD bool needs_row_mean() const { return uses_row_mean(kind); }
  RLHF_HD void finish_row(double* row) const { finish_policy_row(kind, row); }
  RLHF_HD double row_factor(const double* row) const { return policy_row_factor(kind, row); }
  RLHF_HD T token(T logprob, T old_logprob, T advantage, T row, T* v) const {
    return write_policy_token(policy_kind_token(kind, logprob, old_logprob, advantage, row, params),
                              v);
  }
};

// PolicyFamily with the kind fixed at compile time: the CPU kernels instantiate
// one per kind so that the token loop is straight-line code that vectorises.
template <typename T, PolicyKind K>
struct PolicyFixedFamily {
  static constexpr int kInputs = 3;
  static constexpr int kCols = policy_col::kCols;
  static constexpr int kStats = 5;
  static constexpr int kMaxCol = policy_col::kRatioMax;
  static constexpr int kRowGradCol = policy_col::kRow;
  PolicyParams<T> params;

  RLHF_HD bool needs_row_mean() const { return uses_row_mean(K); }
  RLHF_HD void finish_row(double* row) const { finish_policy_row(K, row); }
  RLHF_HD double row_factor(const double* row) const { return policy_row_factor(K, row); }
  RLHF_HD T token(T logprob, T old_logprob, T advantage, T row, T* v) const {
    return write_policy_token(policy_kind_token<K>(logprob, old_logprob, advantage, row, params),
                              v);
  }
};

// loss_backward's value at one token: grad * (grad_loss * row_weight), except that a
// zero derivative (a masked, clipped or ignored token) gives grad * grad_loss whatever the
// row weight is: a non-finite weight (gspo's row factor of a NaN row) stays out of the
// tokens that do not depend on it, as in torch's where-based reference.
template <typename T>
RLHF_HD T backward_value(T grad, T grad_loss, T scale) {
  return select_value(grad != T(0), grad * scale, grad * grad_loss);
}

template <typename T>
struct ValueFamily {
  static constexpr int kInputs = 3;
  static constexpr int kCols = 3;  // loss, count, clipfrac
  static constexpr int kStats = 1;
  static constexpr int kMaxCol = -1;
  static constexpr int kRowGradCol = -1;
  T clip_eps;

  RLHF_HD bool needs_row_mean() const { return false; }
  RLHF_HD void finish_row(double* /*row*/) const {}
  RLHF_HD double row_factor(const double* /*row*/) const { return 1.0; }
  RLHF_HD T token(T value, T old_value, T ret, T /*row*/, T* v) const {
    const ValueToken<T> t = value_token(value, old_value, ret, clip_eps);
    v[0] = t.loss;
    v[1] = T(1);
    v[2] = indicator<T>(t.clipped);
    return t.grad;
  }
};

template <typename T>
struct KLFamily {
  static constexpr int kInputs = 2;
  static constexpr int kCols = 2;  // loss, count
  static constexpr int kStats = 0;
  static constexpr int kMaxCol = -1;
  static constexpr int kRowGradCol = -1;
  KLKind kind;
  bool straight_through;

  RLHF_HD bool needs_row_mean() const { return false; }
  RLHF_HD void finish_row(double* /*row*/) const {}
  RLHF_HD double row_factor(const double* /*row*/) const { return 1.0; }
  RLHF_HD T token(T logprob, T ref_logprob, T /*unused*/, T /*row*/, T* v) const {
    T grad;
    v[0] = kl_value_and_grad(kind, straight_through, logprob, ref_logprob, &grad);
    v[1] = T(1);
    return grad;
  }
};

// KLFamily with the kind fixed at compile time: the CPU kernels instantiate one
// per kind so that the per-token switch folds away and the loop vectorises.
template <typename T, KLKind kKind, bool kStraightThrough>
struct KLFixedFamily {
  static constexpr int kInputs = 2;
  static constexpr int kCols = 2;
  static constexpr int kStats = 0;
  static constexpr int kMaxCol = -1;
  static constexpr int kRowGradCol = -1;

  RLHF_HD bool needs_row_mean() const { return false; }
  RLHF_HD void finish_row(double* /*row*/) const {}
  RLHF_HD double row_factor(const double* /*row*/) const { return 1.0; }
  RLHF_HD T token(T logprob, T ref_logprob, T /*unused*/, T /*row*/, T* v) const {
    T grad;
    v[0] = kl_value_and_grad(kKind, kStraightThrough, logprob, ref_logprob, &grad);
    v[1] = T(1);
    return grad;
  }
};

// acc += v for a valid token (max for column kMaxCol); an invalid token adds 0.
template <typename Family, typename T>
RLHF_HD void combine(T* acc, const T* v, bool valid) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < Family::kCols; ++k) {
    const T x = select_value(valid, v[k], T(0));
    acc[k] = k == Family::kMaxCol ? max_value(acc[k], x) : acc[k] + x;
  }
}

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
