// GAE per-position math (gae_math.h). The CPU kernel runs the sequential
// gae_step loop; the CUDA kernel runs a parallel scan over the per-position
// affine maps. Both must compute the same recurrence, masked positions
// included, so the main test here builds both from the header and compares.
#include "rlhf_ext/gae_math.h"  // first: the header must compile on its own

#include <cmath>
#include <vector>

#include "check.h"
#include "rng.h"

using rlhf_ext::Affine;
using rlhf_ext::affine_apply;
using rlhf_ext::affine_then;
using rlhf_ext::gae_advantage_map;
using rlhf_ext::gae_delta;
using rlhf_ext::gae_next_value_map;
using rlhf_ext::gae_step;
using rlhf_ext::GaeCarry;
using rlhf_test::Rng;

namespace {

template <typename T>
struct Row {
  std::vector<T> rewards, values;
  std::vector<bool> valid;
  T gamma, lam, last_value;
};

template <typename T>
struct Output {
  std::vector<T> advantages, returns;
};

template <typename T>
Row<T> random_row(Rng& rng, int length, double masked_fraction) {
  Row<T> row;
  for (int t = 0; t < length; ++t) {
    row.rewards.push_back(T(rng.uniform(-1.0, 1.0)));
    row.values.push_back(T(rng.uniform(-1.0, 1.0)));
    row.valid.push_back(!rng.bernoulli(masked_fraction));
  }
  row.gamma = T(rng.uniform(0.8, 1.0));
  row.lam = T(rng.uniform(0.8, 1.0));
  row.last_value = T(rng.uniform(-1.0, 1.0));
  return row;
}

// The CPU kernel's loop.
template <typename T>
Output<T> sequential_gae(const Row<T>& row) {
  const size_t n = row.rewards.size();
  Output<T> out{std::vector<T>(n), std::vector<T>(n)};
  GaeCarry<T> carry{row.last_value, T(0)};
  for (size_t t = n; t-- > 0;) {
    gae_step(carry, static_cast<bool>(row.valid[t]), row.rewards[t], row.values[t], row.gamma,
             row.lam, &out.advantages[t], &out.returns[t]);
  }
  return out;
}

// Reversed inclusive scan in the Hillis-Steele pattern a GPU block uses:
// after round d every position holds the composition of the maps from itself
// to 2d positions to its right, so log2(n) rounds cover the whole suffix.
template <typename T>
std::vector<Affine<T>> suffix_scan(std::vector<Affine<T>> maps) {
  const size_t n = maps.size();
  for (size_t d = 1; d < n; d *= 2) {
    std::vector<Affine<T>> next = maps;
    for (size_t t = 0; t + d < n; ++t) next[t] = affine_then(maps[t], maps[t + d]);
    maps = next;
  }
  return maps;
}

// The CUDA kernel's formulation: two scans, one for the next valid value and
// one for the advantage, each a composition of per-position affine maps.
template <typename T>
Output<T> scan_gae(const Row<T>& row) {
  const size_t n = row.rewards.size();
  std::vector<Affine<T>> value_maps(n);
  for (size_t t = 0; t < n; ++t) {
    value_maps[t] = gae_next_value_map(bool(row.valid[t]), row.values[t]);
  }
  const std::vector<Affine<T>> value_suffix = suffix_scan(value_maps);

  std::vector<Affine<T>> advantage_maps(n);
  for (size_t t = 0; t < n; ++t) {
    // V_next at t is W_{t+1}: the scan of everything to the right of t.
    const T next_value =
        t + 1 < n ? affine_apply(value_suffix[t + 1], row.last_value) : row.last_value;
    const T delta = gae_delta(row.rewards[t], row.values[t], next_value, row.gamma);
    advantage_maps[t] = gae_advantage_map(bool(row.valid[t]), delta, row.gamma, row.lam);
  }
  const std::vector<Affine<T>> advantage_suffix = suffix_scan(advantage_maps);

  Output<T> out{std::vector<T>(n), std::vector<T>(n)};
  for (size_t t = 0; t < n; ++t) {
    if (!row.valid[t]) continue;  // outputs stay 0
    const T advantage = affine_apply(advantage_suffix[t], T(0));
    out.advantages[t] = advantage;
    out.returns[t] = advantage + row.values[t];
  }
  return out;
}

template <typename T>
double tolerance(double expected);

template <>
double tolerance<double>(double expected) {
  return 1e-11 * (1.0 + std::fabs(expected));
}

template <>
double tolerance<float>(double expected) {
  return 2e-5 * (1.0 + std::fabs(expected));
}

template <typename T>
void check_outputs_near(const Output<T>& got, const Output<T>& want) {
  for (size_t t = 0; t < want.advantages.size(); ++t) {
    TRACE("t=", t);
    CHECK_NEAR(got.advantages[t], want.advantages[t], tolerance<T>(want.advantages[t]));
    CHECK_NEAR(got.returns[t], want.returns[t], tolerance<T>(want.returns[t]));
  }
}

template <typename T>
void check_masked_outputs_are_zero(const Row<T>& row, const Output<T>& out) {
  for (size_t t = 0; t < row.valid.size(); ++t) {
    if (row.valid[t]) continue;
    TRACE("masked t=", t);
    CHECK_SAME_BITS(out.advantages[t], T(0));
    CHECK_SAME_BITS(out.returns[t], T(0));
  }
}

template <typename T>
void scan_matches_sequential_loop() {
  Rng rng(10);
  for (int length : {1, 2, 3, 5, 16, 33, 100, 257}) {
    for (double masked_fraction : {0.0, 0.3, 0.8, 1.0}) {
      const Row<T> row = random_row<T>(rng, length, masked_fraction);
      TRACE("length=", length, " masked_fraction=", masked_fraction, " gamma=", row.gamma,
            " lam=", row.lam);
      const Output<T> sequential = sequential_gae(row);
      check_masked_outputs_are_zero(row, sequential);
      check_outputs_near(scan_gae(row), sequential);
    }
  }
}

// A masked position must leave both running quantities exactly as they were.
template <typename T>
void masked_step_passes_carry_through() {
  GaeCarry<T> carry{T(0.75), T(-1.5)};
  T advantage = T(123), ret = T(456);
  gae_step(carry, false, T(9), T(7), T(0.9), T(0.95), &advantage, &ret);
  CHECK_SAME_BITS(carry.next_value, T(0.75));
  CHECK_SAME_BITS(carry.advantage, T(-1.5));
  CHECK_SAME_BITS(advantage, T(0));
  CHECK_SAME_BITS(ret, T(0));
}

// Worked by hand; every intermediate is a dyadic rational, so results are exact.
// The masked middle token is skipped: t=0 bootstraps from V_2 = 20, not V_1.
void hand_worked_example_with_mask() {
  const Row<double> row{{1, 100, 2}, {10, 200, 20}, {true, false, true}, 0.5, 0.5, 4};
  const Output<double> out = sequential_gae(row);
  CHECK_EQ(out.advantages[2], -16.0);  // 2 + 0.5 * 4 - 20
  CHECK_EQ(out.returns[2], 4.0);
  CHECK_EQ(out.advantages[1], 0.0);
  CHECK_EQ(out.returns[1], 0.0);
  CHECK_EQ(out.advantages[0], -3.0);  // (1 + 0.5 * 20 - 10) + 0.25 * -16
  CHECK_EQ(out.returns[0], 7.0);
  const Output<double> scanned = scan_gae(row);
  CHECK_EQ(scanned.advantages[0], -3.0);
  CHECK_EQ(scanned.advantages[2], -16.0);
}

// gamma = lam = 1 without a mask: A_t is the reversed cumulative sum of the
// TD errors, which telescopes to (sum of rewards from t) + last_value - V_t.
void undiscounted_closed_form() {
  Rng rng(11);
  for (int length : {1, 4, 50, 300}) {
    Row<double> row = random_row<double>(rng, length, 0.0);
    row.gamma = 1.0;
    row.lam = 1.0;
    const Output<double> out = sequential_gae(row);
    double delta_sum = 0.0, reward_sum = 0.0;
    for (int t = length - 1; t >= 0; --t) {
      const double next_value = t + 1 < length ? row.values[t + 1] : row.last_value;
      delta_sum += row.rewards[t] + next_value - row.values[t];
      reward_sum += row.rewards[t];
      TRACE("length=", length, " t=", t);
      CHECK_NEAR(out.advantages[t], delta_sum, 1e-11);
      CHECK_NEAR(out.advantages[t], reward_sum + row.last_value - row.values[t], 1e-11);
      CHECK_NEAR(out.returns[t], reward_sum + row.last_value, 1e-11);
    }
  }
}

// lam = 0 is one-step TD: A_t = delta_t, nothing from further right.
void one_step_td_when_lam_is_zero() {
  Rng rng(12);
  Row<double> row = random_row<double>(rng, 20, 0.0);
  row.lam = 0.0;
  const Output<double> out = sequential_gae(row);
  for (int t = 0; t < 20; ++t) {
    const double next_value = t + 1 < 20 ? row.values[t + 1] : row.last_value;
    TRACE("t=", t);
    CHECK_NEAR(out.advantages[t], row.rewards[t] + row.gamma * next_value - row.values[t], 1e-15);
  }
}

// Masked tokens at the end of a row (padding) sit between the last valid
// token and last_value: they must not hide last_value from it.
void trailing_masked_tokens_bootstrap_from_last_value() {
  const Row<double> row{{1, 5, 6}, {2, 7, 8}, {true, false, false}, 0.5, 0.5, 4};
  const Output<double> out = sequential_gae(row);
  CHECK_EQ(out.advantages[0], 1.0 + 0.5 * 4.0 - 2.0);
  CHECK_EQ(scan_gae(row).advantages[0], 1.0 + 0.5 * 4.0 - 2.0);
}

}  // namespace

int main() {
  RUN(scan_matches_sequential_loop<float>);
  RUN(scan_matches_sequential_loop<double>);
  RUN(masked_step_passes_carry_through<float>);
  RUN(masked_step_passes_carry_through<double>);
  RUN(hand_worked_example_with_mask);
  RUN(undiscounted_closed_form);
  RUN(one_step_td_when_lam_is_zero);
  RUN(trailing_masked_tokens_bootstrap_from_last_value);
  return rlhf_test::finish();
}
