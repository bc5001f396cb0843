// Masked count / mean / sum of squared deviations (Welford's update and Chan's
// pairwise merge). Merging in a fixed tree order makes every reduction in
// rlhf_ext deterministic and independent of how many rows share a launch.
#pragma once
#include "rlhf_ext/macros.h"

namespace rlhf_ext {

template <typename T>
struct Moments {
  T count;
  T mean;
  T m2;  // sum of squared deviations from the mean
};

template <typename T>
RLHF_HD Moments<T> moments_empty() {
  return Moments<T>{T(0), T(0), T(0)};
}

// Finite without <cmath> (device code too): inf - inf and NaN - NaN are NaN.
template <typename T>
RLHF_HD bool is_finite_value(T x) {
  return x - x == T(0);
}

// Welford's update. An infinite element makes the difference from the running mean
// infinite, and Welford's step then turns an infinite mean into NaN (inf - inf);
// the weighted mean keeps it infinite (the mean of [inf, 1] is inf, as torch and
// TRL give it; of [inf, -inf], NaN). Finite inputs take Welford's step unchanged.
template <typename T>
RLHF_HD void moments_push(Moments<T>& m, T x) {
  m.count += T(1);
  const T d = x - m.mean;
  if (is_finite_value(d)) {
    m.mean += d / m.count;
  } else {
    m.mean = (m.mean * (m.count - T(1)) + x) / m.count;
  }
  m.m2 += d * (x - m.mean);
}

// Chan's merge; the weighted mean where the means' difference is not finite (as above).
template <typename T>
RLHF_HD Moments<T> moments_merge(const Moments<T>& l, const Moments<T>& r) {
  const T n = l.count + r.count;
  if (n == T(0)) return moments_empty<T>();
  const T d = r.mean - l.mean;
  const T wr = r.count / n;
  const T mean = is_finite_value(d) ? l.mean + d * wr : l.mean * (l.count / n) + r.mean * wr;
  return Moments<T>{n, mean, l.m2 + r.m2 + d * d * l.count * wr};
}

// Variance with Bessel's correction when `unbiased`; 0 where it is undefined
// (fewer than 2 elements, or none), never NaN. Callers that must reject those
// cases check the count first.
template <typename T>
RLHF_HD T moments_variance(const Moments<T>& m, bool unbiased) {
  const T denom = unbiased ? m.count - T(1) : m.count;
  return denom > T(0) ? m.m2 / denom : T(0);
}

// TRL / verl whitening of one element: (x - mean) / sqrt(var + eps), with the
// mean added back when shift_mean is false.
template <typename T>
RLHF_HD T whiten_value(T x, T mean, T inv_std, bool shift_mean) {
  const T w = (x - mean) * inv_std;
  return shift_mean ? w : w + mean;
}

}  // namespace rlhf_ext
