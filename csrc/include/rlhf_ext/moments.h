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

template <typename T>
RLHF_HD void moments_push(Moments<T>& m, T x) {
  m.count += T(1);
  const T d = x - m.mean;
  m.mean += d / m.count;
  m.m2 += d * (x - m.mean);
}

template <typename T>
RLHF_HD Moments<T> moments_merge(const Moments<T>& l, const Moments<T>& r) {
  const T n = l.count + r.count;
  if (n == T(0)) return moments_empty<T>();
  const T d = r.mean - l.mean;
  const T wr = r.count / n;
  return Moments<T>{n, l.mean + d * wr, l.m2 + r.m2 + d * d * l.count * wr};
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
