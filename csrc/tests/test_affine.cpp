// Affine maps and affine_then (affine.h): the algebra every reversed scan in
// rlhf_ext relies on. A scan may regroup compositions freely only because
// affine_then is associative, and it may pad with the identity only because the
// identity changes nothing, bit for bit.
#include "rlhf_ext/affine.h"  // first: the header must compile on its own

#include <cmath>
#include <vector>

#include "check.h"
#include "rng.h"

using rlhf_ext::Affine;
using rlhf_ext::affine_apply;
using rlhf_ext::affine_identity;
using rlhf_ext::affine_then;
using rlhf_test::Rng;

namespace {

// Multipliers around 1 in magnitude (like gamma * lam, or 0/1 from a mask)
// keep long compositions in range; offsets are never 0 so that the bitwise
// identity checks are not confused by the sign of zero (tested separately).
template <typename T>
Affine<T> random_map(Rng& rng) {
  T b = T(rng.uniform(-10.0, 10.0));
  if (b == T(0)) b = T(1);
  return Affine<T>{T(rng.uniform(-1.5, 1.5)), b};
}

template <typename T>
double tolerance(double expected);

template <>
double tolerance<double>(double expected) {
  return 1e-12 * (1.0 + std::fabs(expected));
}

template <>
double tolerance<float>(double expected) {
  return 1e-5 * (1.0 + std::fabs(expected));
}

template <typename T>
void check_maps_near(const Affine<T>& got, const Affine<T>& want) {
  CHECK_NEAR(got.a, want.a, tolerance<T>(want.a));
  CHECK_NEAR(got.b, want.b, tolerance<T>(want.b));
}

template <typename T>
void check_maps_same_bits(const Affine<T>& got, const Affine<T>& want) {
  CHECK_SAME_BITS(got.a, want.a);
  CHECK_SAME_BITS(got.b, want.b);
}

template <typename T>
void identity_is_exact_on_both_sides() {
  Rng rng(1);
  const Affine<T> id = affine_identity<T>();
  for (int i = 0; i < 1000; ++i) {
    const Affine<T> m = random_map<T>(rng);
    TRACE("map ", i, ": a=", m.a, " b=", m.b);
    check_maps_same_bits(affine_then(id, m), m);
    check_maps_same_bits(affine_then(m, id), m);
  }
  // The maps a mask produces: a = 0 ("take this value") and a = 1 ("skip").
  for (const Affine<T>& m : {Affine<T>{T(0), T(3)}, Affine<T>{T(1), T(-2)}}) {
    check_maps_same_bits(affine_then(id, m), m);
    check_maps_same_bits(affine_then(m, id), m);
  }
  check_maps_same_bits(affine_then(id, id), id);
}

// A -0 offset comes back as +0 (1 * -0 + 0 == +0): equal in value, so no
// result of a scan changes, but callers must not rely on the sign of zero.
template <typename T>
void identity_keeps_value_of_negative_zero() {
  const Affine<T> id = affine_identity<T>();
  const Affine<T> m{T(2), T(-0.0)};
  CHECK_EQ(affine_then(id, m).b, T(0));
  CHECK_EQ(affine_then(m, id).b, T(0));
}

template <typename T>
void composition_is_associative() {
  Rng rng(2);
  for (int i = 0; i < 1000; ++i) {
    const Affine<T> x = random_map<T>(rng);
    const Affine<T> y = random_map<T>(rng);
    const Affine<T> z = random_map<T>(rng);
    TRACE("triple ", i);
    check_maps_near(affine_then(affine_then(x, y), z), affine_then(x, affine_then(y, z)));
  }
}

// `left` covers earlier positions, so composing means applying `right` first.
template <typename T>
void composition_applies_right_first() {
  Rng rng(3);
  for (int i = 0; i < 1000; ++i) {
    const Affine<T> left = random_map<T>(rng);
    const Affine<T> right = random_map<T>(rng);
    const T x = T(rng.uniform(-5.0, 5.0));
    TRACE("pair ", i, " x=", x);
    const T want = affine_apply(left, affine_apply(right, x));
    CHECK_NEAR(affine_apply(affine_then(left, right), x), want, tolerance<T>(want));
  }
}

void composition_is_not_commutative() {
  const Affine<double> l{2.0, 1.0};
  const Affine<double> r{3.0, 5.0};
  CHECK_EQ(affine_then(l, r).b, 11.0);  // 2 * (3x + 5) + 1
  CHECK_EQ(affine_then(r, l).b, 8.0);   // 3 * (2x + 1) + 5
}

template <typename T>
Affine<T> tree_compose(const std::vector<Affine<T>>& maps, size_t lo, size_t hi) {
  if (hi - lo == 1) return maps[lo];
  const size_t mid = lo + (hi - lo) / 2;
  return affine_then(tree_compose(maps, lo, mid), tree_compose(maps, mid, hi));
}

// What a block scan does at scale: any bracketing of a long chain gives the
// same map as the sequential fold (up to rounding).
template <typename T>
void long_chain_any_bracketing() {
  Rng rng(4);
  for (size_t n : {1u, 2u, 3u, 7u, 64u, 1000u}) {
    std::vector<Affine<T>> maps;
    for (size_t i = 0; i < n; ++i) {
      Affine<T> m = random_map<T>(rng);
      m.a = T(rng.uniform(0.5, 1.0));  // a decaying chain, like gamma * lam
      maps.push_back(m);
    }
    Affine<T> left_fold = affine_identity<T>();
    for (const Affine<T>& m : maps) left_fold = affine_then(left_fold, m);
    Affine<T> right_fold = affine_identity<T>();
    for (size_t i = n; i-- > 0;) right_fold = affine_then(maps[i], right_fold);
    TRACE("n=", n);
    check_maps_near(tree_compose(maps, 0, n), left_fold);
    check_maps_near(right_fold, left_fold);
  }
}

}  // namespace

int main() {
  RUN(identity_is_exact_on_both_sides<float>);
  RUN(identity_is_exact_on_both_sides<double>);
  RUN(identity_keeps_value_of_negative_zero<float>);
  RUN(identity_keeps_value_of_negative_zero<double>);
  RUN(composition_is_associative<float>);
  RUN(composition_is_associative<double>);
  RUN(composition_applies_right_first<float>);
  RUN(composition_applies_right_first<double>);
  RUN(composition_is_not_commutative);
  RUN(long_chain_any_bracketing<float>);
  RUN(long_chain_any_bracketing<double>);
  return rlhf_test::finish();
}
