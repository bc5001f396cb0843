// Masked moments (moments.h): Welford's push, Chan's merge, variance and
// whitening. The kernels reduce a row as a tree of merges of per-thread
// Welford states, so merge must agree with pushing everything in one pass.
#include "rlhf_ext/moments.h"  // first: the header must compile on its own

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "check.h"
#include "rng.h"

using rlhf_ext::Moments;
using rlhf_ext::moments_empty;
using rlhf_ext::moments_merge;
using rlhf_ext::moments_push;
using rlhf_ext::moments_variance;
using rlhf_ext::whiten_value;
using rlhf_test::Rng;

namespace {

// A large offset relative to the spread is where a naive sum-of-squares
// variance cancels catastrophically; Welford must not.
std::vector<double> random_data(Rng& rng, int n, double offset) {
  std::vector<double> x;
  for (int i = 0; i < n; ++i) x.push_back(offset + rng.uniform(-2.0, 3.0));
  return x;
}

Moments<double> push_all(const std::vector<double>& x, size_t lo, size_t hi) {
  Moments<double> m = moments_empty<double>();
  for (size_t i = lo; i < hi; ++i) moments_push(m, x[i]);
  return m;
}

struct TwoPass {
  double mean, m2;
};

TwoPass two_pass(const std::vector<double>& x) {
  double sum = 0.0;
  for (double v : x) sum += v;
  const double mean = sum / double(x.size());
  double m2 = 0.0;
  for (double v : x) m2 += (v - mean) * (v - mean);
  return {mean, m2};
}

void check_moments_near(const Moments<double>& got, const Moments<double>& want) {
  CHECK_EQ(got.count, want.count);
  CHECK_NEAR(got.mean, want.mean, 1e-12 * (1.0 + std::fabs(want.mean)));
  CHECK_NEAR(got.m2, want.m2, 1e-10 * (1.0 + want.m2));
}

void check_moments_equal(const Moments<double>& got, const Moments<double>& want) {
  CHECK_EQ(got.count, want.count);
  CHECK_EQ(got.mean, want.mean);
  CHECK_EQ(got.m2, want.m2);
}

void push_matches_two_pass() {
  Rng rng(20);
  for (int n : {1, 2, 3, 10, 1000, 100000}) {
    for (double offset : {0.0, 1e6}) {
      const std::vector<double> x = random_data(rng, n, offset);
      const Moments<double> m = push_all(x, 0, x.size());
      const TwoPass want = two_pass(x);
      TRACE("n=", n, " offset=", offset);
      check_moments_near(m, Moments<double>{double(n), want.mean, want.m2});
    }
  }
}

// The kernels accumulate in float32: Welford keeps that accurate even when
// the mean is large relative to the spread.
void float_push_stays_accurate() {
  Rng rng(25);
  const std::vector<double> x = random_data(rng, 10000, 1000.0);
  Moments<float> m = moments_empty<float>();
  for (double v : x) moments_push(m, float(v));
  const TwoPass want = two_pass(x);
  const double want_var = want.m2 / double(x.size() - 1);
  CHECK_EQ(m.count, 10000.0f);
  CHECK_NEAR(m.mean, want.mean, 1e-5 * std::fabs(want.mean));
  CHECK_NEAR(moments_variance(m, true), want_var, 1e-3 * want_var);
}

void known_small_example() {
  const Moments<double> m = push_all({1.0, 2.0, 3.0, 4.0}, 0, 4);
  CHECK_EQ(m.count, 4.0);
  CHECK_EQ(m.mean, 2.5);
  CHECK_EQ(m.m2, 5.0);
  CHECK_NEAR(moments_variance(m, true), 5.0 / 3.0, 1e-15);
  CHECK_EQ(moments_variance(m, false), 1.25);
}

// Every split point, including the ones that leave a side empty.
void merge_of_halves_matches_push_all() {
  Rng rng(21);
  const std::vector<double> x = random_data(rng, 257, 100.0);
  const Moments<double> all = push_all(x, 0, x.size());
  for (size_t split = 0; split <= x.size(); ++split) {
    TRACE("split=", split);
    check_moments_near(moments_merge(push_all(x, 0, split), push_all(x, split, x.size())), all);
  }
}

Moments<double> tree_merge(const std::vector<Moments<double>>& parts, size_t lo, size_t hi) {
  if (hi - lo == 1) return parts[lo];
  const size_t mid = lo + (hi - lo) / 2;
  return moments_merge(tree_merge(parts, lo, mid), tree_merge(parts, mid, hi));
}

// The kernels' shape: many small per-thread states (some empty, for threads
// that saw only masked elements) merged pairwise in a fixed tree.
void tree_of_chunks_matches_push_all() {
  Rng rng(22);
  const std::vector<double> x = random_data(rng, 5000, -3.0);
  std::vector<Moments<double>> parts;
  size_t start = 0;
  while (start < x.size()) {
    const size_t end = std::min(x.size(), start + size_t(rng.integer(0, 40)));
    parts.push_back(push_all(x, start, end));
    start = end;
  }
  check_moments_near(tree_merge(parts, 0, parts.size()), push_all(x, 0, x.size()));
}

// Exact, not near: an empty state must not perturb the result at all.
void merge_with_empty_is_identity() {
  Rng rng(23);
  const Moments<double> empty = moments_empty<double>();
  for (int n : {1, 2, 17}) {
    const Moments<double> m = push_all(random_data(rng, n, 5.0), 0, size_t(n));
    TRACE("n=", n);
    check_moments_equal(moments_merge(empty, m), m);
    check_moments_equal(moments_merge(m, empty), m);
  }
  // Empty with empty stays empty: 0 / 0 must not turn into a NaN mean.
  check_moments_equal(moments_merge(empty, empty), empty);
}

template <typename T>
void variance_is_zero_when_undefined() {
  const Moments<T> empty = moments_empty<T>();
  Moments<T> one = moments_empty<T>();
  moments_push(one, T(42));
  for (bool unbiased : {true, false}) {
    TRACE("unbiased=", unbiased);
    CHECK_SAME_BITS(moments_variance(empty, unbiased), T(0));
    CHECK_SAME_BITS(moments_variance(one, unbiased), T(0));
  }
}

void whiten_value_with_and_without_shift() {
  // (3 - 1) * 0.5 = 1; with shift_mean=false the mean 1 is added back.
  CHECK_EQ(whiten_value(3.0, 1.0, 0.5, true), 1.0);
  CHECK_EQ(whiten_value(3.0, 1.0, 0.5, false), 2.0);
  CHECK_EQ(whiten_value(3.0f, 1.0f, 0.5f, false), 2.0f);
}

// Whitening a whole row with its own moments (eps = 0) gives mean 0 and
// unbiased variance 1; without shift_mean the mean is preserved instead.
void whitened_row_has_unit_variance() {
  Rng rng(24);
  const std::vector<double> x = random_data(rng, 500, 7.0);
  const Moments<double> m = push_all(x, 0, x.size());
  const double inv_std = 1.0 / std::sqrt(moments_variance(m, true));
  for (bool shift_mean : {true, false}) {
    std::vector<double> w;
    for (double v : x) w.push_back(whiten_value(v, m.mean, inv_std, shift_mean));
    const Moments<double> mw = push_all(w, 0, w.size());
    TRACE("shift_mean=", shift_mean);
    CHECK_NEAR(mw.mean, shift_mean ? 0.0 : m.mean, 1e-12);
    CHECK_NEAR(moments_variance(mw, true), 1.0, 1e-12);
  }
}

// An infinite element gives an infinite mean, as torch.mean does (Welford's step
// alone gives NaN: inf - inf); opposite infinities give NaN.
void infinite_elements_give_an_infinite_mean() {
  const double inf = std::numeric_limits<double>::infinity();
  CHECK_EQ(push_all({inf, 1.0}, 0, 2).mean, inf);
  CHECK_EQ(push_all({1.0, inf, 2.0}, 0, 3).mean, inf);
  CHECK_EQ(push_all({-inf, 1.0}, 0, 2).mean, -inf);
  CHECK(std::isnan(push_all({inf, -inf}, 0, 2).mean));
  CHECK_EQ(moments_merge(push_all({inf}, 0, 1), push_all({1.0, 2.0}, 0, 2)).mean, inf);
  CHECK_EQ(moments_merge(push_all({inf}, 0, 1), push_all({inf}, 0, 1)).mean, inf);
  CHECK(std::isnan(moments_merge(push_all({inf}, 0, 1), push_all({-inf}, 0, 1)).mean));
}

}  // namespace

int main() {
  RUN(infinite_elements_give_an_infinite_mean);
  RUN(push_matches_two_pass);
  RUN(float_push_stays_accurate);
  RUN(known_small_example);
  RUN(merge_of_halves_matches_push_all);
  RUN(tree_of_chunks_matches_push_all);
  RUN(merge_with_empty_is_identity);
  RUN(variance_is_zero_when_undefined<float>);
  RUN(variance_is_zero_when_undefined<double>);
  RUN(whiten_value_with_and_without_shift);
  RUN(whitened_row_has_unit_variance);
  return rlhf_test::finish();
}
