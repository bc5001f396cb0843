// group_advantages (docs/design.md §3.2): a row's outcome score against its group.
//
//   a_i = alpha * (s_i - b_g(i)) / scale_g
//
// b: the group's mean, the mean of its other rows (leave-one-out), the length-weighted
// mean, a given per-row baseline, or none; pass@k gives only the group's best row
// r_max - r_2nd. scale: std + eps or sqrt(max(var, eps)), of the group or of the whole
// batch, or 1. alpha = B / #nonzero scores (GPG) or 1.
//
// The kernels see each group as a segment of `order`, the rows sorted by (group id,
// score, length): a group's sums run in that order, so the same rows give the same bits in any
// batch order (a permutation of the rows permutes the output, bit for bit). Sums are in
// double for every input dtype: a group or a batch is at most a few thousand scores,
// and double makes the result independent of the summation order to ~1e-16.
#pragma once
#include <cstdint>

#include "rlhf_ext/macros.h"

namespace rlhf_ext {

enum class GroupBaseline : int {
  kMean = 0,
  kLeaveOneOut = 1,
  kLengthWeighted = 2,
  kPassAtK = 3,
  kGiven = 4,
  kNone = 5,
};
enum class GroupScale : int { kGroup = 0, kBatch = 1, kNone = 2 };

struct GroupOptions {
  GroupBaseline baseline = GroupBaseline::kMean;
  GroupScale scale = GroupScale::kGroup;
  bool unbiased = true;         // Bessel's correction in the variances
  bool clamp_eps = false;       // sqrt(max(var, eps)) instead of std + eps
  bool singleton_raw = false;   // one usable row: baseline 0, std 1 (else s - s)
  bool ignore_nan = false;      // NaN scores: out of every statistic, advantage 0
  bool nonzero_rescale = false; // GPG's alpha = B / #nonzero
  double eps = 1e-6;
};

// The batch-wide statistics one component's rows share.
struct BatchStats {
  double var = 0;    // variance of the usable scores (sorted order: batch_order)
  double alpha = 1;  // B / max(#nonzero, 1) with nonzero_rescale, else 1
};
static_assert(sizeof(BatchStats) == 2 * sizeof(double), "the CUDA kernel's [K, 2] buffer");

template <typename T>
RLHF_HD bool is_nan_value(T x) {
  return x != x;
}

template <typename T>
RLHF_HD bool usable_score(T x, const GroupOptions& o) {
  return !(o.ignore_nan && is_nan_value(x));
}

// sqrt without <cmath> on the device side: CUDA's sqrt is a builtin overload there.
RLHF_HD double group_sqrt(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return __builtin_sqrt(x);
#endif
}

RLHF_HD double scaled_difference(double diff, double var, const GroupOptions& o) {
  // A NaN variance stays NaN (torch's clamp_min keeps it; a bare comparison would not).
  if (o.clamp_eps) return diff / group_sqrt(var > o.eps || is_nan_value(var) ? var : o.eps);
  return diff / (group_sqrt(var) + o.eps);
}

// Mean and sum of squared deviations (two passes) of the usable scores at
// order[begin, end); the variance divides by n - 1 (unbiased) or n.
struct SegmentMoments {
  int64_t n = 0;
  double sum = 0;
  double mean = 0;
  double var = 0;
};

template <typename S, typename I>
RLHF_HD SegmentMoments segment_moments(const S* scores, const I* order, int64_t begin,
                                       int64_t end, const GroupOptions& o) {
  SegmentMoments m;
  for (int64_t i = begin; i < end; ++i) {
    const double x = static_cast<double>(scores[order[i]]);
    if (!usable_score(x, o)) continue;
    m.n += 1;
    m.sum += x;
  }
  m.mean = m.sum / static_cast<double>(m.n);
  double m2 = 0;
  for (int64_t i = begin; i < end; ++i) {
    const double x = static_cast<double>(scores[order[i]]);
    if (!usable_score(x, o)) continue;
    m2 += (x - m.mean) * (x - m.mean);
  }
  m.var = m2 / static_cast<double>(o.unbiased ? m.n - 1 : m.n);
  return m;
}

// The batch statistics of one component: its variance in the order of batch_order
// (the rows sorted by score; nullptr when the scale is not the batch's) and GPG's alpha.
template <typename S, typename I>
RLHF_HD BatchStats batch_stats(const S* scores, const I* batch_order, int64_t rows,
                               const GroupOptions& o) {
  BatchStats b;
  if (batch_order != nullptr) b.var = segment_moments(scores, batch_order, 0, rows, o).var;
  if (o.nonzero_rescale) {
    int64_t nonzero = 0;
    for (int64_t i = 0; i < rows; ++i) nonzero += scores[i] != S(0);  // NaN counts, as verl's
    b.alpha = static_cast<double>(rows) / static_cast<double>(nonzero > 0 ? nonzero : 1);
  }
  return b;
}

// a ranks above b as torch.topk ranks them: a NaN above any number.
RLHF_HD bool ranks_above(double a, double b) {
  return (is_nan_value(a) && !is_nan_value(b)) || a > b;
}

// The sorted position in [begin, end), other than `skip`, of the highest-ranked usable
// score (the first of equal ones); -1 when there is none.
template <typename S, typename I>
RLHF_HD int64_t best_position(const S* scores, const I* order, int64_t begin, int64_t end,
                              int64_t skip, const GroupOptions& o) {
  int64_t best = -1;
  double best_score = 0;
  for (int64_t i = begin; i < end; ++i) {
    const double x = static_cast<double>(scores[order[i]]);
    if (i == skip || !usable_score(x, o)) continue;
    if (best < 0 || ranks_above(x, best_score)) {
      best = i;
      best_score = x;
    }
  }
  return best;
}

// One group: the segment order[begin, end) of rows sharing a group id. Writes the
// advantage of each of its rows to out[row]: 0 for an unusable (NaN, ignore_nan) row.
template <typename S, typename I, typename O>
RLHF_HD void group_segment(const S* scores, const S* lengths, const S* baselines,
                           const I* order, int64_t begin, int64_t end, const BatchStats& batch,
                           const GroupOptions& o, O* out) {
  const SegmentMoments m = segment_moments(scores, order, begin, end, o);
  double length_sum = 0, weighted_sum = 0;  // OPO's baseline
  if (o.baseline == GroupBaseline::kLengthWeighted) {
    for (int64_t i = begin; i < end; ++i) {
      const double x = static_cast<double>(scores[order[i]]);
      if (!usable_score(x, o)) continue;
      const double length = static_cast<double>(lengths[order[i]]);
      length_sum += length;
      weighted_sum += length * x;
    }
  }
  // Pass@k: the best usable row (the first of equal maxima) and the runner-up.
  int64_t best = -1, second = -1;
  if (o.baseline == GroupBaseline::kPassAtK) {
    best = best_position(scores, order, begin, end, int64_t(-1), o);
    second = best_position(scores, order, begin, end, best, o);
  }
  const double top = best >= 0 ? static_cast<double>(scores[order[best]]) : 0.0;
  const double runner_up = second >= 0 ? static_cast<double>(scores[order[second]]) : 0.0;
  const double var = o.scale == GroupScale::kBatch ? batch.var : m.var;
  for (int64_t i = begin; i < end; ++i) {
    const I row = order[i];
    const double x = static_cast<double>(scores[row]);
    double a = 0;
    if (!usable_score(x, o)) {
      a = 0;
    } else if (m.n == 1 && !o.singleton_raw) {
      a = x - x;
    } else {
      double diff = x;  // singleton_raw with one row: baseline 0
      double scale_var = m.n == 1 ? 1.0 : var;
      if (m.n == 1 && o.scale == GroupScale::kBatch) scale_var = batch.var;
      if (m.n > 1) {
        switch (o.baseline) {
          case GroupBaseline::kMean: diff = x - m.mean; break;
          case GroupBaseline::kLeaveOneOut:
            diff = x - (m.sum - x) / static_cast<double>(m.n - 1);
            break;
          case GroupBaseline::kLengthWeighted: diff = x - weighted_sum / length_sum; break;
          case GroupBaseline::kPassAtK: diff = i == best ? top - runner_up : 0.0; break;
          case GroupBaseline::kGiven: diff = x - static_cast<double>(baselines[row]); break;
          case GroupBaseline::kNone: break;
        }
      }
      if (o.scale != GroupScale::kNone) diff = scaled_difference(diff, scale_var, o);
      a = diff * batch.alpha;
    }
    out[row] = static_cast<O>(a);
  }
}

// True where sorted position i starts a group (its id differs from the previous one's).
template <typename I>
RLHF_HD bool starts_group(const I* groups, const I* order, int64_t i) {
  return i == 0 || groups[order[i]] != groups[order[i - 1]];
}

}  // namespace rlhf_ext
