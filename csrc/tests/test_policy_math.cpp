// The policy-loss kinds (policy_math.h) against closed forms written here from the
// peers' formulas (verl 0.9.1 core_algos.py, TRL GRPOTrainer), each derivative
// against a central finite difference, and exp_any over the whole float range.
#include "rlhf_ext/policy_math.h"  // first: the header must compile on its own

#include <algorithm>
#include <cmath>
#include <limits>

#include "check.h"
#include "rlhf_ext/ppo_math.h"
#include "rng.h"

using rlhf_ext::exp_any;
using rlhf_ext::policy_kind_token;
using rlhf_ext::PolicyKind;
using rlhf_ext::PolicyParams;
using rlhf_test::Rng;

namespace {

constexpr double kLo = 0.8, kHi = 1.28;   // ratio band
constexpr double kDivLo = 0.03, kDivHi = 0.05;  // dppo thresholds
constexpr double kCap = 1.3, kTauPos = 1.0, kTauNeg = 1.05, kBeta = 0.1;

double clamp(double x, double lo, double hi) { return std::min(hi, std::max(lo, x)); }
double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// The loss of one token as the peer writes it; the detached factors (sg) take the
// values at `lp0` so that d/d lp differentiates only what the peer differentiates.
// `s` is the row's mean log-ratio (the gspo kinds), held fixed.
double closed_form(PolicyKind kind, double lp, double lp0, double old, double adv, double s) {
  const double ratio = std::exp(clamp(lp - old, -20, 20));
  const double ratio0 = std::exp(clamp(lp0 - old, -20, 20));
  switch (kind) {
    case PolicyKind::kReinforce:
      return -adv * lp;
    case PolicyKind::kCISPO:
      return -clamp(ratio0, kLo, kHi) * adv * lp;
    case PolicyKind::kSAPO: {
      const double tau = adv > 0 ? kTauPos : kTauNeg;
      return -sigmoid(tau * (ratio - 1)) * 4 / tau * adv;
    }
    case PolicyKind::kDPPOTV:
    case PolicyKind::kDPPOKL: {
      const double p = std::exp(lp0), q = std::exp(old);
      bool pos, neg;
      if (kind == PolicyKind::kDPPOTV) {
        pos = p - q <= kDivHi;
        neg = p - q >= -kDivLo;
      } else {
        const double bkl = q * (old - lp0) + (1 - q) * std::log((1 - q + 1e-8) / (1 - p + 1e-8));
        pos = bkl <= kDivHi || p <= q;
        neg = bkl <= kDivLo || p >= q;
      }
      const bool valid = adv > 0 ? pos : neg;
      return valid ? -adv * std::min(ratio0, kCap) * lp : 0.0;
    }
    case PolicyKind::kDRO:
      return -(lp * adv - 0.5 * kBeta * (lp - old) * (lp - old));
    case PolicyKind::kGSPOToken: {
      const double log_r = std::min(lp - lp0 + s, 10.0);
      const double r = std::exp(log_r);
      return std::max(-adv * r, -adv * clamp(r, kLo, kHi));
    }
    default:
      return 0.0;
  }
}

PolicyParams<double> params(PolicyKind kind) {
  const bool divergence = kind == PolicyKind::kDPPOTV || kind == PolicyKind::kDPPOKL;
  return PolicyParams<double>{divergence ? kDivLo : kLo, divergence ? kDivHi : kHi, 0.0, kCap,
                              kTauPos, kTauNeg, kBeta};
}

void token_kinds_match_closed_form_and_finite_difference() {
  const PolicyKind kinds[] = {PolicyKind::kReinforce, PolicyKind::kCISPO, PolicyKind::kSAPO,
                              PolicyKind::kDPPOTV,    PolicyKind::kDPPOKL, PolicyKind::kDRO,
                              PolicyKind::kGSPOToken};
  Rng rng(43);
  for (const PolicyKind kind : kinds) {
    for (int i = 0; i < 3000; ++i) {
      const double old = rng.uniform(-4.0, -0.05);
      const double lp = std::min(-1e-3, old + rng.uniform(-0.6, 0.6));
      const double adv = rng.uniform(-3.0, 3.0);
      const double s = rng.uniform(-0.5, 0.5);
      TRACE("kind=", static_cast<int>(kind), " lp=", lp, " old=", old, " adv=", adv, " s=", s);
      const auto t = policy_kind_token(kind, lp, old, adv, s, params(kind));
      const double want = closed_form(kind, lp, lp, old, adv, s);
      CHECK_NEAR(t.loss, want, 1e-12 * (1 + std::fabs(want)));
      CHECK_EQ(t.row_grad, 0.0);
      const double h = 1e-6;
      const double up = closed_form(kind, lp + h, lp, old, adv, s);
      const double down = closed_form(kind, lp - h, lp, old, adv, s);
      const double fd = (up - down) / (2 * h);
      const double left = (want - down) / h, right = (up - want) / h;
      if (std::fabs(left - right) < 1e-4 * (1 + std::fabs(fd))) {  // not at a kink
        CHECK_NEAR(t.grad, fd, 1e-5 * (1 + std::fabs(fd)));
      }
    }
  }
}

// TRL's sequence-level surrogate as a function of the row's mean log-ratio s.
double gspo_closed_form(double s, double adv) {
  const double r = std::exp(s);
  return -std::min(r * adv, clamp(r, kLo, kHi) * adv);
}

void gspo_row_gradient_is_the_derivative_in_the_row_mean() {
  Rng rng(44);
  for (int i = 0; i < 3000; ++i) {
    const double s = rng.uniform(-0.6, 0.6), adv = rng.uniform(-2, 2);
    TRACE("s=", s, " adv=", adv);
    const auto t = policy_kind_token(PolicyKind::kGSPO, -1.0, -1.2, adv, s, params(PolicyKind::kGSPO));
    CHECK_NEAR(t.loss, gspo_closed_form(s, adv), 1e-12);
    CHECK_EQ(t.grad, 1.0);
    CHECK_NEAR(t.ratio, std::exp(s), 1e-12);
    const double h = 1e-6;
    const double up = gspo_closed_form(s + h, adv), down = gspo_closed_form(s - h, adv);
    const double mid = gspo_closed_form(s, adv);
    const double fd = (up - down) / (2 * h);
    if (std::fabs((mid - down) / h - (up - mid) / h) < 1e-4 * (1 + std::fabs(fd))) {
      CHECK_NEAR(t.row_grad, fd, 1e-5 * (1 + std::fabs(fd)));
    }
  }
}

void kind_flags_and_limits() {
  // cispo: a clipped weight is flagged; dppo: a masked token has loss 0 and no gradient.
  auto t = policy_kind_token(PolicyKind::kCISPO, -1.0, -2.0, 1.0, 0.0, params(PolicyKind::kCISPO));
  CHECK(t.clipped);
  CHECK_NEAR(t.grad, -kHi, 1e-15);
  t = policy_kind_token(PolicyKind::kDPPOTV, -0.1, -1.0, 1.0, 0.0, params(PolicyKind::kDPPOTV));
  CHECK(t.clipped);
  CHECK_EQ(t.loss, -0.0);
  CHECK_EQ(t.grad, -0.0);
  // gspo_token above the clamp at 10: ratio e^10, no gradient.
  t = policy_kind_token(PolicyKind::kGSPOToken, -1.0, -1.0, -1.0, 12.0,
                        params(PolicyKind::kGSPOToken));
  CHECK_NEAR(t.ratio, std::exp(10.0), 1e-6);
  CHECK_EQ(t.grad, 0.0);
  // A NaN advantage stays NaN in dppo's product with its mask (verl's arithmetic).
  const double nan = std::numeric_limits<double>::quiet_NaN();
  t = policy_kind_token(PolicyKind::kDPPOTV, -0.1, -1.0, nan, 0.0, params(PolicyKind::kDPPOTV));
  CHECK(std::isnan(t.loss) && std::isnan(t.grad));
  // float: sapo and the sequence ratio stay finite far from 1 (no exp overflow).
  const PolicyParams<float> pf{0.8f, 1.2f, 0.f, 20.f, 1.f, 1.05f, 0.1f};
  const auto f = policy_kind_token(PolicyKind::kSAPO, 0.f, -1e4f, 1.f, 0.f, pf);
  CHECK(std::isfinite(f.loss) && std::isfinite(f.grad));
  const auto g = policy_kind_token(PolicyKind::kGSPO, 0.f, 0.f, 1.f, -200.f, pf);
  CHECK_EQ(g.ratio, 0.f);
  CHECK(std::isfinite(g.loss));
}

// verl's compute_policy_loss_geo_mean for one row, written from core_algos.py.
double geo_mean_closed_form(const double* lp, const double* old, const double* adv, int n,
                            double lo, double hi) {
  double s = 0, q = 0;
  for (int t = 0; t < n; ++t) {
    const double d = lp[t] - old[t];
    const double sign = adv[t] > 0 ? 1.0 : (adv[t] < 0 ? -1.0 : 0.0);
    s += sign * std::min(sign * d, sign * clamp(d, -lo, hi));
    q += adv[t];
  }
  return -(q / (n + 1e-8)) * std::exp(s / (n + 1e-8));
}

// geo_mean through the machinery: the tokens' sums, finish_policy_row's row loss and
// grad_t * policy_row_factor against a finite difference of the closed form.
void geo_mean_row_loss_and_gradient() {
  constexpr int n = 9;
  constexpr double lo = 0.05, hi = 0.08;
  const PolicyParams<double> p{lo, hi, 0.0, 20.0, 1.0, 1.0, 0.0};
  Rng rng(45);
  for (int trial = 0; trial < 500; ++trial) {
    double lp[n], old[n], adv[n], grad[n];
    double row[8] = {};
    for (int t = 0; t < n; ++t) {
      old[t] = rng.uniform(-4.0, -0.05);
      lp[t] = old[t] + rng.uniform(-0.2, 0.2);
      adv[t] = rng.uniform(-2.0, 2.0);
      double v[8];
      grad[t] = rlhf_ext::write_policy_token(
          policy_kind_token(PolicyKind::kGeoMean, lp[t], old[t], adv[t], 0.0, p), v);
      for (int k = 0; k < 8; ++k) row[k] += v[k];
    }
    rlhf_ext::finish_policy_row(PolicyKind::kGeoMean, row);
    const double want = geo_mean_closed_form(lp, old, adv, n, lo, hi);
    TRACE("trial=", trial);
    CHECK_NEAR(row[0], want, 1e-12 * (1 + std::fabs(want)));
    CHECK_EQ(row[1], double(n));
    const double factor = rlhf_ext::policy_row_factor(PolicyKind::kGeoMean, row);
    for (int t = 0; t < n; ++t) {
      const double h = 1e-7, keep = lp[t];
      lp[t] = keep + h;
      const double up = geo_mean_closed_form(lp, old, adv, n, lo, hi);
      lp[t] = keep - h;
      const double down = geo_mean_closed_form(lp, old, adv, n, lo, hi);
      lp[t] = keep;
      const double fd = (up - down) / (2 * h);
      const double left = (want - down) / h, right = (up - want) / h;
      if (std::fabs(left - right) < 1e-4 * (1 + std::fabs(fd))) {  // not at a clip kink
        CHECK_NEAR(grad[t] * factor, fd, 1e-6 * (1 + std::fabs(fd)));
      }
    }
  }
  // An empty row: loss and ratio 0, row factor 0.
  double empty[8] = {};
  rlhf_ext::finish_policy_row(PolicyKind::kGeoMean, empty);
  CHECK_EQ(empty[0], 0.0);
  CHECK_EQ(empty[6], 0.0);
  CHECK_EQ(rlhf_ext::policy_row_factor(PolicyKind::kGeoMean, empty), 0.0);
  // A = 0 gives d~ = 0 and no gradient; an infinite d with A = 0 gives NaN (0 * inf).
  auto t = policy_kind_token(PolicyKind::kGeoMean, -1.0, -1.5, 0.0, 0.0, p);
  CHECK_EQ(t.loss, 0.0);
  CHECK_EQ(t.grad, 0.0);
  t = policy_kind_token(PolicyKind::kGeoMean, 0.0, -std::numeric_limits<double>::infinity(), 0.0,
                        0.0, p);
  CHECK(std::isnan(t.loss));
  // A > 0 caps d at hi only; A < 0 floors it at -lo only.
  t = policy_kind_token(PolicyKind::kGeoMean, -1.0, -1.5, 1.0, 0.0, p);
  CHECK_EQ(t.loss, hi);
  CHECK(t.clipped && !t.clipped_lower && t.grad == 0.0);
  t = policy_kind_token(PolicyKind::kGeoMean, -1.5, -1.0, 1.0, 0.0, p);
  CHECK_NEAR(t.loss, -0.5, 1e-15);
  CHECK(t.clipped && t.grad == 1.0);
  t = policy_kind_token(PolicyKind::kGeoMean, -1.5, -1.0, -1.0, 0.0, p);
  CHECK_EQ(t.loss, -lo);
  CHECK(t.clipped_lower && t.grad == 0.0);
}

void exp_any_covers_the_float_range() {
  for (float x = -110.f; x <= 90.f; x += 0.37f) {
    TRACE("x=", x);
    const double want = std::exp(double(x));
    const float got = exp_any(x);
    if (want > std::numeric_limits<float>::max()) {
      CHECK(std::isinf(got));
    } else if (want < 1e-37) {  // the subnormal range: absolute error only
      CHECK_NEAR(got, want, 1e-38);
    } else {
      CHECK_NEAR(got, want, 1e-6 * want);
    }
  }
  CHECK(std::isnan(exp_any(std::numeric_limits<float>::quiet_NaN())));
  CHECK(std::isinf(exp_any(std::numeric_limits<float>::infinity())));
  CHECK_EQ(exp_any(-std::numeric_limits<float>::infinity()), 0.f);
}

}  // namespace

int main() {
  RUN(token_kinds_match_closed_form_and_finite_difference);
  RUN(gspo_row_gradient_is_the_derivative_in_the_row_mean);
  RUN(kind_flags_and_limits);
  RUN(geo_mean_row_loss_and_gradient);
  RUN(exp_any_covers_the_float_range);
  return rlhf_test::finish();
}
