// Affine maps x -> a * x + b and their composition: the algebra behind every
// reversed scan in rlhf_ext (GAE's advantage recurrence and the "next valid
// value" propagation are both first-order linear recurrences).
#pragma once
#include "rlhf_ext/macros.h"

namespace rlhf_ext {

template <typename T>
struct Affine {
  T a;  // multiplier applied to the state coming from the right
  T b;  // offset added at this position
};

template <typename T>
RLHF_HD Affine<T> affine_identity() {
  return Affine<T>{T(1), T(0)};
}

// A reversed recurrence x_t = a_t * x_{t+1} + b_t. `left` covers positions
// [i, k], `right` covers [k + 1, j]; the result maps x_{j+1} to x_i. The order
// of the arguments matters: composition is associative but not commutative.
template <typename T>
RLHF_HD Affine<T> affine_then(const Affine<T>& left, const Affine<T>& right) {
  return Affine<T>{left.a * right.a, left.a * right.b + left.b};
}

template <typename T>
RLHF_HD T affine_apply(const Affine<T>& map, T x) {
  return map.a * x + map.b;
}

}  // namespace rlhf_ext
