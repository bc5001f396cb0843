// Per-position GAE math, shared by the CPU kernel, the CUDA kernel and the
// C++ unit tests.
//
// Semantics (docs/design.md §3.2): right to left over valid positions only. A masked
// position is skipped: the running next-value and running advantage pass
// through it unchanged, and its outputs are 0.
//   delta_t = r_t + gamma * V_next - V_t
//   A_t     = delta_t + gamma * lam * A_next
//   R_t     = A_t + V_t
// Both running quantities are first-order recurrences, so each position is an
// affine map of the state to its right (see affine.h):
//   next-value:  W_t = valid ? V_t : W_{t+1}           (a = !valid, b = valid * V_t)
//   advantage:   A_t = valid ? delta_t + g*l*A_{t+1}   (a = g*l,    b = delta_t)
//                      : A_{t+1}                        (a = 1,      b = 0)
// with W_T = last_value and A_T = 0. V_next at position t is W_{t+1}.
#pragma once
#include "rlhf_ext/affine.h"
#include "rlhf_ext/macros.h"

namespace rlhf_ext {

template <typename T>
RLHF_HD Affine<T> gae_next_value_map(bool valid, T value) {
  return valid ? Affine<T>{T(0), value} : affine_identity<T>();
}

template <typename T>
RLHF_HD T gae_delta(T reward, T value, T next_value, T gamma) {
  return reward + gamma * next_value - value;
}

template <typename T>
RLHF_HD Affine<T> gae_advantage_map(bool valid, T delta, T gamma, T lam) {
  return valid ? Affine<T>{gamma * lam, delta} : affine_identity<T>();
}

// One step of the sequential right-to-left loop (the CPU kernel and the
// reference use it); the scans compute the same recurrence in parallel.
template <typename T>
struct GaeCarry {
  T next_value;  // W_{t+1}
  T advantage;   // A_{t+1}
};

template <typename T>
RLHF_HD void gae_step(GaeCarry<T>& carry, bool valid, T reward, T value,
                      T gamma, T lam, T* advantage_out, T* return_out) {
  if (!valid) {
    *advantage_out = T(0);
    *return_out = T(0);
    return;
  }
  const T delta = gae_delta(reward, value, carry.next_value, gamma);
  const T advantage = delta + gamma * lam * carry.advantage;
  carry.advantage = advantage;
  carry.next_value = value;
  *advantage_out = advantage;
  *return_out = advantage + value;
}

}  // namespace rlhf_ext
