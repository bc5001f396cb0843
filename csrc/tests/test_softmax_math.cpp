// The online softmax of token_logprobs (softmax_math.h): the vectorisable
// exp2, the rebase / merge algebra against a two-pass double computation,
// -inf logits, and the closed-form gradient against finite differences.
#include "rlhf_ext/softmax_math.h"  // first: the header must compile on its own

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "check.h"
#include "rng.h"

using rlhf_ext::kLog2e;
using rlhf_ext::SoftmaxState;
using rlhf_test::Rng;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Exact {
  double lse;
  double entropy;
};

// Two passes in double: the textbook definition.
Exact exact(const std::vector<double>& x, double temperature) {
  double m = -kInf;
  for (double v : x) m = std::max(m, v / temperature);
  double sum = 0.0;
  for (double v : x) sum += std::exp(v / temperature - m);
  const double lse = m + std::log(sum);
  double entropy = 0.0;
  for (double v : x) {
    const double logp = v / temperature - lse;
    if (std::isfinite(logp)) entropy -= std::exp(logp) * logp;
  }
  return {lse, entropy};
}

// The kernels' scheme: chunks of `chunk`, each rebased on the running max.
template <typename acc_t>
SoftmaxState<acc_t> online(const std::vector<double>& x, acc_t inv_temp, size_t chunk) {
  const acc_t scale = inv_temp * acc_t(kLog2e);
  SoftmaxState<acc_t> state = rlhf_ext::softmax_empty<acc_t>();
  for (size_t start = 0; start < x.size(); start += chunk) {
    SoftmaxState<acc_t> part = rlhf_ext::softmax_empty<acc_t>();
    const size_t end = std::min(x.size(), start + chunk);
    for (size_t i = start; i < end; ++i) part.max = std::max(part.max, acc_t(x[i]));
    if (part.max == -std::numeric_limits<acc_t>::infinity()) continue;
    for (size_t i = start; i < end; ++i) {
      rlhf_ext::softmax_add(acc_t(x[i]), part.max, scale, part.sum_exp, part.sum_shift);
    }
    state = rlhf_ext::softmax_merge(state, part, scale);
  }
  return state;
}

void test_exp2_accuracy() {
  for (int i = 0; i <= 200000; ++i) {
    const float x = -126.0f * float(i) / 200000.0f;
    const double want = std::exp2(double(x));
    const float got = rlhf_ext::exp2_nonpositive(x);
    TRACE("x = ", x);
    if (x < -125.0f) {
      CHECK_EQ(got, 0.0f);
    } else {
      CHECK_NEAR(got / want, 1.0, 4e-7);
    }
  }
  for (float x : {0.0f, 0.25f, 0.5f, -0.5f, -1.0f, -20.0f}) {
    TRACE("x = ", x);
    CHECK_NEAR(rlhf_ext::exp2_nonpositive(x) / std::exp2(double(x)), 1.0, 4e-7);
  }
  CHECK_EQ(rlhf_ext::exp2_nonpositive(-std::numeric_limits<float>::infinity()), 0.0f);
  CHECK(std::isnan(rlhf_ext::exp2_nonpositive(std::nanf(""))));
  CHECK_EQ(rlhf_ext::exp2_nonpositive(0.0f), 1.0f);
}

// exp_small serves the loss math (clamped log-ratios, |x| <= 20) and promises |x| <= 80.
void test_exp_small_accuracy() {
  for (int i = -400000; i <= 400000; ++i) {
    const float x = 80.0f * float(i) / 400000.0f;
    TRACE("x = ", x);
    CHECK_NEAR(rlhf_ext::exp_small(x) / std::exp(double(x)), 1.0, 4e-7);
  }
  CHECK_EQ(rlhf_ext::exp_small(0.0f), 1.0f);
  CHECK(std::isnan(rlhf_ext::exp_small(std::nanf(""))));
  CHECK_EQ(rlhf_ext::exp_small(20.0), std::exp(20.0));  // double: the library's exp
}

void test_online_matches_two_pass() {
  Rng rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    const size_t n = size_t(rng.integer(1, 3000));
    const double temperature = rng.uniform(0.3, 2.5);
    const double spread = rng.uniform(0.1, 30.0);
    std::vector<double> x(n);
    for (double& v : x) v = rng.uniform(-spread, spread);
    // Rising values force the max to move in every chunk (the rebase path).
    if (trial % 3 == 0) std::sort(x.begin(), x.end());
    const Exact want = exact(x, temperature);
    const size_t chunk = size_t(rng.integer(1, 700));
    TRACE("trial ", trial, " n ", n, " chunk ", chunk, " T ", temperature);
    const SoftmaxState<double> d = online<double>(x, 1.0 / temperature, chunk);
    CHECK_NEAR(rlhf_ext::softmax_lse(d, 1.0 / temperature), want.lse, 1e-11 * (1 + std::abs(want.lse)));
    CHECK_NEAR(rlhf_ext::softmax_entropy(d, 1.0 / temperature), want.entropy, 1e-10);
    const SoftmaxState<float> f = online<float>(x, float(1.0 / temperature), chunk);
    CHECK_NEAR(rlhf_ext::softmax_lse(f, float(1.0 / temperature)), want.lse,
               2e-6 * (1 + std::abs(want.lse)));
    CHECK_NEAR(rlhf_ext::softmax_entropy(f, float(1.0 / temperature)), want.entropy,
               2e-5 * (1 + want.entropy));
  }
}

void test_merge_is_symmetric() {
  Rng rng(11);
  const float scale = float(kLog2e);
  for (int trial = 0; trial < 1000; ++trial) {
    SoftmaxState<float> a{float(rng.uniform(-5, 5)), float(rng.uniform(0.5, 9)),
                          float(rng.uniform(-9, 0))};
    SoftmaxState<float> b{float(rng.uniform(-5, 5)), float(rng.uniform(0.5, 9)),
                          float(rng.uniform(-9, 0))};
    const SoftmaxState<float> ab = rlhf_ext::softmax_merge(a, b, scale);
    const SoftmaxState<float> ba = rlhf_ext::softmax_merge(b, a, scale);
    TRACE("trial ", trial);
    CHECK_SAME_BITS(ab.max, ba.max);
    CHECK_SAME_BITS(ab.sum_exp, ba.sum_exp);
    CHECK_SAME_BITS(ab.sum_shift, ba.sum_shift);
  }
}

void test_masked_vocabulary() {
  // -inf entries add nothing; an all -inf row gives a NaN entropy, -inf lse.
  std::vector<double> x = {1.0, -kInf, 2.0, -kInf, 0.5};
  std::vector<double> finite = {1.0, 2.0, 0.5};
  for (size_t chunk : {1, 2, 5}) {
    TRACE("chunk ", chunk);
    const SoftmaxState<float> s = online<float>(x, 1.0f, chunk);
    const Exact want = exact(finite, 1.0);
    CHECK_NEAR(rlhf_ext::softmax_lse(s, 1.0f), want.lse, 1e-6);
    CHECK_NEAR(rlhf_ext::softmax_entropy(s, 1.0f), want.entropy, 1e-6);
    // Leading -inf chunks must not poison the state.
    std::vector<double> lead = {-kInf, -kInf, -kInf, 3.0, 1.0};
    const SoftmaxState<float> l = online<float>(lead, 1.0f, chunk);
    CHECK_NEAR(rlhf_ext::softmax_lse(l, 1.0f), exact({3.0, 1.0}, 1.0).lse, 1e-6);
  }
  const SoftmaxState<float> none = online<float>({-kInf, -kInf}, 1.0f, 1);
  CHECK_EQ(none.sum_exp, 0.0f);
  CHECK(std::isinf(rlhf_ext::softmax_lse(none, 1.0f)));
  CHECK(std::isnan(rlhf_ext::softmax_entropy(none, 1.0f)));
  // The gradient at a -inf logit is exactly 0, not NaN.
  CHECK_EQ(rlhf_ext::logits_grad<float>(-std::numeric_limits<float>::infinity(), 1.0f, 2.0f,
                                        0.5f, 1.0f, 1.0f),
           0.0f);
}

// loss = g_lp * logprob[target] + g_ent * entropy, differentiated numerically.
void test_gradient_matches_finite_differences() {
  Rng rng(3);
  for (int trial = 0; trial < 40; ++trial) {
    const size_t n = size_t(rng.integer(1, 40));
    const double temperature = rng.uniform(0.5, 2.0);
    const size_t target = size_t(rng.integer(0, int(n) - 1));
    const double g_lp = rng.uniform(-2, 2), g_ent = rng.uniform(-2, 2);
    std::vector<double> x(n);
    for (double& v : x) v = rng.uniform(-4, 4);
    auto loss = [&](const std::vector<double>& v) {
      const Exact e = exact(v, temperature);
      return g_lp * (v[target] / temperature - e.lse) + g_ent * e.entropy;
    };
    const Exact e = exact(x, temperature);
    TRACE("trial ", trial, " n ", n);
    for (size_t k = 0; k < n; ++k) {
      std::vector<double> hi = x, lo = x;
      hi[k] += 1e-6;
      lo[k] -= 1e-6;
      const double numeric = (loss(hi) - loss(lo)) / 2e-6;
      double analytic =
          rlhf_ext::logits_grad<double>(x[k], 1.0 / temperature, e.lse, e.entropy, g_lp, g_ent);
      if (k == target) analytic += rlhf_ext::target_grad<double>(g_lp, 1.0 / temperature);
      CHECK_NEAR(analytic, numeric, 1e-6);
    }
  }
}

}  // namespace

int main() {
  RUN(test_exp2_accuracy);
  RUN(test_exp_small_accuracy);
  RUN(test_online_matches_two_pass);
  RUN(test_merge_is_symmetric);
  RUN(test_masked_vocabulary);
  RUN(test_gradient_matches_finite_differences);
  return rlhf_test::finish();
}
