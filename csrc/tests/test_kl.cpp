// Per-token KL estimators (kl.h) and the parsing of their names (kl_parse.h).
// Each kind is checked against its closed form; k3 also against its clamps,
// which are what keep rewards finite when a token's log-ratio explodes.
#include "rlhf_ext/kl.h"  // first: the headers must compile on their own
#include "rlhf_ext/kl_parse.h"
#include "rlhf_ext/ppo_math.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "check.h"
#include "rng.h"

using rlhf_ext::kl_value;
using rlhf_ext::KLKind;
using rlhf_ext::KLSpec;
using rlhf_ext::parse_kl_kind;
using rlhf_test::Rng;

namespace {

constexpr KLKind kAllKinds[] = {KLKind::kK1, KLKind::kAbs, KLKind::kK2, KLKind::kK3};

// The formulas of docs/design.md §3.3 in double, written independently of kl.h.
double closed_form(KLKind kind, double logprob, double ref_logprob) {
  const double diff = logprob - ref_logprob;
  switch (kind) {
    case KLKind::kK1:
      return diff;
    case KLKind::kAbs:
      return std::fabs(diff);
    case KLKind::kK2:
      return 0.5 * diff * diff;
    case KLKind::kK3:
      break;
  }
  const double d = std::min(20.0, std::max(-20.0, -diff));
  return std::min(10.0, std::max(-10.0, std::exp(d) - d - 1.0));
}

// Log-ratios within the clamps, where every estimator is its plain formula.
void each_kind_matches_closed_form() {
  Rng rng(30);
  for (KLKind kind : kAllKinds) {
    for (int i = 0; i < 2000; ++i) {
      const double ref = rng.uniform(-12.0, 0.0);
      const double lp = ref + rng.uniform(-2.0, 2.0);
      const double want = closed_form(kind, lp, ref);
      TRACE("kind=", int(kind), " logprob=", lp, " ref=", ref);
      CHECK_NEAR(kl_value(kind, lp, ref), want, 1e-14 * (1.0 + std::fabs(want)));
      CHECK_NEAR(kl_value(kind, float(lp), float(ref)), want, 1e-5 * (1.0 + std::fabs(want)));
    }
  }
}

// Values where exp(d) - d - 1 is easy to check by hand.
void k3_known_values() {
  CHECK_EQ(kl_value(KLKind::kK3, -1.0, -1.0), 0.0);                       // equal: no divergence
  CHECK_NEAR(kl_value(KLKind::kK3, -3.0, -1.0), std::exp(2.0) - 3.0, 1e-14);  // d = 2
  CHECK_NEAR(kl_value(KLKind::kK3, 0.0, -5.0), std::exp(-5.0) + 4.0, 1e-14);  // d = -5
}

// k3 is a non-negative estimator (exp(d) >= 1 + d) and agrees with k2 to
// second order near zero: both are d^2 / 2 + O(d^3). Non-negative only up to
// rounding: for |d| below ~1e-2, exp(d) - d - 1 in float can come out as -6e-8
// (the header does not clamp at 0, and docs/design.md §3.3 does not promise it), so the
// bound allows two ulps of 1.
template <typename T>
void k3_is_nonnegative_and_close_to_k2_near_zero() {
  Rng rng(31);
  const T rounding = T(2) * std::numeric_limits<T>::epsilon();
  for (int i = 0; i < 2000; ++i) {
    const T ref = T(rng.uniform(-10.0, 0.0));
    // Half the draws near zero, where the cancellation in exp(d) - d - 1 bites.
    const T lp = ref + T(i % 2 ? rng.uniform(-30.0, 30.0) : rng.uniform(-1e-3, 1e-3));
    TRACE("logprob=", lp, " ref=", ref);
    CHECK(kl_value(KLKind::kK3, lp, ref) >= -rounding);
  }
  const double small = 1e-3;
  CHECK_NEAR(kl_value(KLKind::kK3, small, 0.0), kl_value(KLKind::kK2, small, 0.0),
             small * small * small);
}

// Near d = 0, exp(d) - d - 1 cancels (float: 100% relative error below |d| ~ 3e-4);
// k3_from_exp keeps float's relative accuracy at every d, as expm1(d) - d does.
void k3_keeps_relative_accuracy_near_zero() {
  for (double magnitude = 1e-6; magnitude < 2.5; magnitude *= 1.7) {  // below the clamp at 10
    for (double d : {magnitude, -magnitude}) {
      const float df = static_cast<float>(d);  // exact d: lp = 0, ref = d
      const double exact = std::expm1(double(df)) - double(df);
      const float value = kl_value(KLKind::kK3, 0.f, df);
      TRACE("d=", df, " value=", value, " exact=", exact);
      CHECK_NEAR(double(value), exact, 3e-7 * exact);
      const double exact_grad = -std::expm1(double(df));  // d k3 / d lp
      const float grad = rlhf_ext::kl_grad(KLKind::kK3, false, 0.f, df);
      CHECK_NEAR(double(grad), exact_grad, 3e-7 * std::abs(exact_grad));
      float fused_grad = 0.f;
      const float fused = rlhf_ext::kl_value_and_grad(KLKind::kK3, false, 0.f, df, &fused_grad);
      CHECK_EQ(fused, value);
      CHECK_EQ(fused_grad, grad);
    }
  }
}

// |log-ratio| = 50 overflows nothing: d is clamped to +-20 first, then the
// value to 10. The other estimators are not clamped.
template <typename T>
void large_log_ratios_are_clamped_for_k3_only() {
  for (T diff : {T(50), T(-50)}) {
    const T lp = T(-1) + diff, ref = T(-1);
    TRACE("diff=", diff);
    const T k3 = kl_value(KLKind::kK3, lp, ref);
    CHECK(std::isfinite(k3));
    CHECK_EQ(k3, T(10));
    CHECK_EQ(kl_value(KLKind::kK1, lp, ref), diff);
    CHECK_EQ(kl_value(KLKind::kAbs, lp, ref), T(50));
    CHECK_EQ(kl_value(KLKind::kK2, lp, ref), T(1250));
  }
  // Just inside the value clamp on the d < 0 side (e^-8 + 7 < 10) and just
  // beyond it on the d > 0 side (e^3 - 4 > 10).
  CHECK_NEAR(kl_value(KLKind::kK3, T(8), T(0)), std::exp(-8.0) + 7.0, 1e-5);
  CHECK_EQ(kl_value(KLKind::kK3, T(-3), T(0)), T(10));
}

// A token the policy gives zero probability (log-prob -inf) still yields a
// finite k3, so one such token cannot poison a whole batch's rewards.
template <typename T>
void infinite_log_ratio_gives_finite_k3() {
  const T inf = std::numeric_limits<T>::infinity();
  CHECK_EQ(kl_value(KLKind::kK3, -inf, T(-2)), T(10));
  CHECK_EQ(kl_value(KLKind::kK3, T(-2), -inf), T(10));
}

void check_parses(const std::string& name, KLKind kind, bool straight_through) {
  // Start from the opposite flag: parse must set it, not leave it.
  KLSpec spec{KLKind::kK3, !straight_through};
  TRACE("name='", name, "'");
  CHECK(parse_kl_kind(name, &spec));
  CHECK(spec.kind == kind);
  CHECK_EQ(spec.straight_through, straight_through);
}

void parse_every_name_alias_and_suffix() {
  const struct {
    const char* name;
    KLKind kind;
  } names[] = {
      {"k1", KLKind::kK1}, {"kl", KLKind::kK1},         {"abs", KLKind::kAbs}, {"k2", KLKind::kK2},
      {"mse", KLKind::kK2}, {"k3", KLKind::kK3}, {"low_var_kl", KLKind::kK3},
  };
  for (const auto& entry : names) {
    check_parses(entry.name, entry.kind, false);
    check_parses(std::string(entry.name) + "+", entry.kind, true);
  }
}

// Unknown names are reported, never mapped to a default kind: a typo in a
// config must not silently train with a different estimator.
void parse_rejects_unknown_names() {
  for (const char* name : {"", "+", "k4", "K1", "KL", "k3 ", " k3", "k1++", "+k1", "low-var-kl",
                           "full", "kl+k3"}) {
    KLSpec spec{KLKind::kK1, false};
    TRACE("name='", name, "'");
    CHECK(!parse_kl_kind(name, &spec));
  }
}

}  // namespace

int main() {
  RUN(each_kind_matches_closed_form);
  RUN(k3_known_values);
  RUN(k3_is_nonnegative_and_close_to_k2_near_zero<float>);
  RUN(k3_is_nonnegative_and_close_to_k2_near_zero<double>);
  RUN(k3_keeps_relative_accuracy_near_zero);
  RUN(large_log_ratios_are_clamped_for_k3_only<float>);
  RUN(large_log_ratios_are_clamped_for_k3_only<double>);
  RUN(infinite_log_ratio_gives_finite_k3<float>);
  RUN(infinite_log_ratio_gives_finite_k3<double>);
  RUN(parse_every_name_alias_and_suffix);
  RUN(parse_rejects_unknown_names);
  return rlhf_test::finish();
}
