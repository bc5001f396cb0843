// The logit transform of the log-prob ops (logit_transform.h): tanh_with_slope against
// long double tanh over the whole range in float and double, its special values, and the
// squash / row multiplier the kernels apply.
#include "rlhf_ext/logit_transform.h"  // first: the header must compile on its own

#include <cmath>
#include <limits>

#include "check.h"

using rlhf_ext::LogitTransform;
using rlhf_ext::tanh_with_slope;

namespace {

// The error of tanh_with_slope<acc_t> in ulps of acc_t: at most max_ulps for the value,
// max_ulps + 3|u| for the slope, over |u| in [1e-30, 20] (log-spaced) and a dense grid
// around the series / exp switch.
template <typename acc_t>
void check_ulps(double max_ulps) {
  const double eps = std::numeric_limits<acc_t>::epsilon();
  auto check_at = [&](double x) {
    for (const double u : {x, -x}) {
      const acc_t v = static_cast<acc_t>(u);
      acc_t slope;
      const acc_t t = tanh_with_slope(v, slope);
      const long double exact = std::tanh(static_cast<long double>(v));
      const long double exact_slope = 1.0L / (std::cosh(static_cast<long double>(v)) *
                                              std::cosh(static_cast<long double>(v)));
      TRACE("u = ", static_cast<double>(v));
      CHECK(std::fabs(static_cast<double>((t - exact) / exact)) <= max_ulps * eps);
      // The slope's own condition number is 2|u| tanh(u): exp(-2|u|) of a rounded
      // argument is off by ~2|u| ulps, and so would be any slope of a float input.
      if (exact_slope > 1e-30L) {
        CHECK(std::fabs(static_cast<double>((slope - exact_slope) / exact_slope)) <=
              (max_ulps + 3 * std::fabs(u)) * eps);
      }
    }
  };
  for (double x = 1e-30; x < 20.0; x *= 1.01) check_at(x);
  for (double x = 0.0; x < 0.6; x += 1e-4) {
    if (x > 0) check_at(x);
  }
}

void test_tanh_accuracy() {
  check_ulps<float>(4.0);
  check_ulps<double>(4.0);
}

template <typename acc_t>
void check_special_values() {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  acc_t slope;
  CHECK_EQ(tanh_with_slope(inf, slope), acc_t(1));
  CHECK_EQ(slope, acc_t(0));
  CHECK_EQ(tanh_with_slope(-inf, slope), acc_t(-1));
  CHECK_EQ(slope, acc_t(0));
  CHECK_EQ(tanh_with_slope(acc_t(0), slope), acc_t(0));
  CHECK_EQ(slope, acc_t(1));
  const acc_t t = tanh_with_slope(std::numeric_limits<acc_t>::quiet_NaN(), slope);
  CHECK(std::isnan(t) && std::isnan(slope));
  // Odd, and bounded by 1, far out too.
  for (const acc_t u : {acc_t(0.3), acc_t(2.5), acc_t(40), acc_t(1e30)}) {
    acc_t s1, s2;
    CHECK_SAME_BITS(tanh_with_slope(-u, s1), -tanh_with_slope(u, s2));
    CHECK(tanh_with_slope(u, s1) <= acc_t(1));
  }
}

void test_special_values() {
  check_special_values<float>();
  check_special_values<double>();
}

// squash = cap * tanh(x * scale / cap), its slope scale * (1 - tanh^2); the row multiplier
// numerator / T, NaN for a temperature that is not finite and > 0.
void test_squash_and_row_mult() {
  LogitTransform<double> tf;
  tf.cap = 30.0;
  tf.cap_in = 0.5 / 30.0;
  tf.cap_scale = 0.5;
  for (const double x : {-100.0, -3.0, 0.0, 1e-3, 7.0, 250.0}) {
    TRACE("x = ", x);
    double slope;
    const double y = tf.squash_with_slope(x, slope);
    CHECK_NEAR(y, 30.0 * std::tanh(x * 0.5 / 30.0), 1e-13);
    CHECK_NEAR(y, tf.squash(x), 0.0);
    const double t = std::tanh(x * 0.5 / 30.0);
    CHECK_NEAR(slope, 0.5 * (1 - t * t), 1e-15);
  }
  CHECK_EQ(tf.squash(-std::numeric_limits<double>::infinity()), -30.0);
  LogitTransform<float> plain;
  float slope;
  CHECK_EQ(plain.squash_with_slope(3.5f, slope), 3.5f);
  CHECK_EQ(slope, 1.0f);
  const float temps[] = {0.5f, 0.0f, -1.0f, std::numeric_limits<float>::infinity(),
                         std::numeric_limits<float>::quiet_NaN(), 1e-39f};
  plain.temps = temps;
  plain.numerator = 2.0f;
  CHECK_EQ(plain.row_mult(0), 4.0f);
  for (int row = 1; row < 6; ++row) {
    TRACE("row ", row);
    CHECK(std::isnan(plain.row_mult(row)));
  }
}

}  // namespace

int main() {
  RUN(test_tanh_accuracy);
  RUN(test_special_values);
  RUN(test_squash_and_row_mult);
  return rlhf_test::finish();
}
