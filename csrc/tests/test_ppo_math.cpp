// Per-token PPO math (ppo_math.h): the policy and value losses against their
// closed forms, each derivative against a central finite difference, the KL
// derivatives, and the aggregation modes against hand-computed values.
#include "rlhf_ext/ppo_math.h"  // first: the header must compile on its own

#include <algorithm>
#include <cmath>

#include "check.h"
#include "rng.h"

using rlhf_ext::agg_loss;
using rlhf_ext::agg_row_weight;
using rlhf_ext::kl_grad;
using rlhf_ext::kl_value;
using rlhf_ext::kl_value_and_grad;
using rlhf_ext::KLKind;
using rlhf_ext::LossAgg;
using rlhf_ext::policy_token;
using rlhf_ext::value_token;
using rlhf_test::Rng;

namespace {

// docs/design.md §3.3's policy loss, written independently of ppo_math.h.
double policy_closed_form(double lp, double old, double adv, double eps_lo, double eps_hi,
                          double dual) {
  const double ratio = std::exp(std::min(20.0, std::max(-20.0, lp - old)));
  const double clipped = std::min(1 + eps_hi, std::max(1 - eps_lo, ratio));
  double loss = std::max(-adv * ratio, -adv * clipped);
  if (dual > 0 && adv < 0) loss = std::min(loss, -adv * dual);
  return loss;
}

void policy_matches_closed_form_and_finite_difference() {
  Rng rng(41);
  for (int i = 0; i < 5000; ++i) {
    const double old = rng.uniform(-6.0, 0.0);
    const double lp = old + rng.uniform(-1.5, 1.5);
    const double adv = rng.uniform(-3.0, 3.0);
    const double dual = rng.bernoulli(0.5) ? 3.0 : 0.0;
    const double lo = 0.2, hi = rng.bernoulli(0.5) ? 0.2 : 0.28;
    TRACE("lp=", lp, " old=", old, " adv=", adv, " dual=", dual, " hi=", hi);
    const auto p = policy_token(lp, old, adv, 1 - lo, 1 + hi, dual);
    const double want = policy_closed_form(lp, old, adv, lo, hi, dual);
    CHECK_NEAR(p.loss, want, 1e-12 * (1 + std::fabs(want)));
    CHECK_NEAR(p.neg_log_ratio, old - lp, 1e-12);
    const double h = 1e-6;
    const double fd = (policy_closed_form(lp + h, old, adv, lo, hi, dual) -
                       policy_closed_form(lp - h, old, adv, lo, hi, dual)) /
                      (2 * h);
    // Skip the measure-zero kinks where the one-sided slopes differ.
    const double left = (want - policy_closed_form(lp - h, old, adv, lo, hi, dual)) / h;
    const double right = (policy_closed_form(lp + h, old, adv, lo, hi, dual) - want) / h;
    if (std::fabs(left - right) < 1e-4 * (1 + std::fabs(fd))) {
      CHECK_NEAR(p.grad, fd, 1e-5 * (1 + std::fabs(fd)));
    }
  }
}

void policy_flags_and_clamps() {
  // A > 0, ratio above 1 + eps: the clipped branch wins, gradient 0.
  auto p = policy_token(0.0, -1.0, 1.0, 0.8, 1.2, 0.0);
  CHECK(p.clipped);
  CHECK_EQ(p.grad, 0.0);
  CHECK_NEAR(p.loss, -1.2, 1e-15);
  // A < 0, ratio far above: the dual clip caps the loss at -A * c.
  p = policy_token(0.0, -5.0, -2.0, 0.8, 1.2, 3.0);
  CHECK(p.clipped_lower);
  CHECK_EQ(p.loss, 6.0);
  CHECK_EQ(p.grad, 0.0);
  // Log-ratio beyond the +-20 clamp: finite ratio e^20 and no gradient.
  p = policy_token(0.0, -30.0, -1.0, 0.8, 1.2, 0.0);
  CHECK_NEAR(p.ratio, std::exp(20.0), 1e-6);
  CHECK_EQ(p.grad, 0.0);
  CHECK_EQ(p.neg_log_ratio, -20.0);
  // float: finite for any log-ratio.
  const auto f = policy_token(0.f, -1e4f, -1.f, 0.8f, 1.2f, 0.f);
  CHECK(std::isfinite(f.loss) && std::isfinite(f.ratio));
}

void value_matches_closed_form() {
  Rng rng(42);
  for (int i = 0; i < 5000; ++i) {
    const double v = rng.uniform(-3, 3), old = v + rng.uniform(-0.5, 0.5);
    const double ret = v + rng.uniform(-1, 1);
    const double eps = rng.bernoulli(0.3) ? 0.0 : 0.2;
    TRACE("v=", v, " old=", old, " ret=", ret, " eps=", eps);
    const auto t = value_token(v, old, ret, eps);
    double want = (v - ret) * (v - ret);
    if (eps > 0) {
      const double vc = std::min(old + eps, std::max(old - eps, v));
      want = std::max(want, (vc - ret) * (vc - ret));
    }
    CHECK_NEAR(t.loss, 0.5 * want, 1e-12);
    const bool clipped_wins = eps > 0 && t.clipped;
    CHECK_NEAR(t.grad, clipped_wins ? 0.0 : v - ret, 1e-12);
  }
}

void value_nan_old_value_poisons_the_token() {
  // torch.clamp(v, old - eps, old + eps) is NaN for a NaN old value, and so is the
  // max of the two losses; without clipping the old value is not read.
  const double nan = std::nan("");
  const auto clipped = value_token(0.5, nan, 0.1, 0.2);
  CHECK(std::isnan(clipped.loss) && std::isnan(clipped.grad));
  const auto unclipped = value_token(0.5, nan, 0.1, 0.0);
  CHECK_NEAR(unclipped.loss, 0.5 * 0.4 * 0.4, 1e-15);
  CHECK_NEAR(unclipped.grad, 0.4, 1e-15);
}

void kl_grad_matches_finite_difference() {
  Rng rng(43);
  const KLKind kinds[] = {KLKind::kK1, KLKind::kAbs, KLKind::kK2, KLKind::kK3};
  for (KLKind kind : kinds) {
    for (int i = 0; i < 2000; ++i) {
      const double ref = rng.uniform(-10, 0), lp = ref + rng.uniform(-3, 3);
      const double h = 1e-6;
      const double fd = (kl_value(kind, lp + h, ref) - kl_value(kind, lp - h, ref)) / (2 * h);
      TRACE("kind=", int(kind), " lp=", lp, " ref=", ref);
      CHECK_NEAR(kl_grad(kind, false, lp, ref), fd, 1e-5 * (1 + std::fabs(fd)));
      CHECK_EQ(kl_grad(kind, true, lp, ref), lp - ref);  // straight-through: k2's gradient
    }
  }
  // The fused form (one exp for k3) agrees with the two separate functions bit for bit.
  for (KLKind kind : kinds) {
    for (int i = 0; i < 2000; ++i) {
      const float ref = float(rng.uniform(-10, 0)), lp = ref + float(rng.uniform(-30, 30));
      for (bool st : {false, true}) {
        TRACE("fused kind=", int(kind), " st=", st, " lp=", lp, " ref=", ref);
        float grad = 0;
        CHECK_SAME_BITS(kl_value_and_grad(kind, st, lp, ref, &grad), kl_value(kind, lp, ref));
        CHECK_SAME_BITS(grad, kl_grad(kind, st, lp, ref));
      }
    }
  }
  // k3 past its clamps: no gradient.
  CHECK_EQ(kl_grad(KLKind::kK3, false, -40.0, 0.0), 0.0);  // d = 40 > 20
  CHECK_EQ(kl_grad(KLKind::kK3, false, -5.0, 0.0), 0.0);   // exp(5) - 6 > 10
}

void aggregation_modes() {
  // Two rows: sums 6 (3 tokens) and 2 (1 token), one empty row; T = 8.
  const double sum = 8, mean_sum = 6.0 / 3 + 2.0 / 1, tokens = 4, rows = 2, norm = 8;
  CHECK_EQ(agg_loss(LossAgg::kTokenMean, sum, mean_sum, tokens, rows, norm), 2.0);
  CHECK_EQ(agg_loss(LossAgg::kSeqMeanTokenSum, sum, mean_sum, tokens, rows, norm), 4.0);
  CHECK_EQ(agg_loss(LossAgg::kSeqMeanTokenMean, sum, mean_sum, tokens, rows, norm), 2.0);
  CHECK_EQ(agg_loss(LossAgg::kSeqMeanTokenSumNorm, sum, mean_sum, tokens, rows, norm), 1.0);
  CHECK_EQ(agg_row_weight(LossAgg::kTokenMean, 3.0, tokens, rows, norm), 0.25);
  CHECK_EQ(agg_row_weight(LossAgg::kSeqMeanTokenSum, 3.0, tokens, rows, norm), 0.5);
  CHECK_EQ(agg_row_weight(LossAgg::kSeqMeanTokenMean, 1.0, tokens, rows, norm), 0.5);
  CHECK_EQ(agg_row_weight(LossAgg::kSeqMeanTokenSumNorm, 3.0, tokens, rows, norm), 0.125);
  const LossAgg modes[] = {LossAgg::kTokenMean, LossAgg::kSeqMeanTokenSum,
                           LossAgg::kSeqMeanTokenMean, LossAgg::kSeqMeanTokenSumNorm};
  for (LossAgg mode : modes) {
    TRACE("agg=", int(mode));
    CHECK_EQ(agg_row_weight(mode, 0.0, tokens, rows, norm), 0.0);  // empty row
    // All masked (T = 0 too): 0, not NaN.
    CHECK_SAME_BITS(agg_loss(mode, 0.0, 0.0, 0.0, 0.0, 0.0), 0.0);
    CHECK_EQ(agg_row_weight(mode, 0.0, 0.0, 0.0, 0.0), 0.0);
  }
}

void max_value_propagates_nan() {
  // ratio_max must be NaN once any valid ratio is, whatever the order (torch.max does so).
  const double nan = std::nan("");
  CHECK_EQ(rlhf_ext::max_value(1.0, 2.0), 2.0);
  CHECK_EQ(rlhf_ext::max_value(3.0, 2.0), 3.0);
  CHECK(std::isnan(rlhf_ext::max_value(1.0, nan)));
  CHECK(std::isnan(rlhf_ext::max_value(nan, 1.0)));
  CHECK(std::isnan(rlhf_ext::max_value(rlhf_ext::max_value(0.0, nan), 5.0)));
}

}  // namespace

int main() {
  RUN(policy_matches_closed_form_and_finite_difference);
  RUN(policy_flags_and_clamps);
  RUN(value_matches_closed_form);
  RUN(value_nan_old_value_poisons_the_token);
  RUN(kl_grad_matches_finite_difference);
  RUN(aggregation_modes);
  RUN(max_value_propagates_nan);
  return rlhf_test::finish();
}
