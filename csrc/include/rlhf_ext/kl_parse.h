// Host-side parsing of KL kind names ("k1", "kl", "abs", "k2", "mse", "k3",
// "low_var_kl"; a trailing "+" selects the straight-through gradient variant).
#pragma once
#include <string>

#include "rlhf_ext/kl.h"

namespace rlhf_ext {

struct KLSpec {
  KLKind kind;
  bool straight_through;  // "+" suffix: value of `kind`, gradient of k2
};

// Returns false for an unknown name; callers raise an error naming their op.
inline bool parse_kl_kind(std::string name, KLSpec* out) {
  out->straight_through = false;
  if (!name.empty() && name.back() == '+') {
    out->straight_through = true;
    name.pop_back();
  }
  if (name == "k1" || name == "kl") {
    out->kind = KLKind::kK1;
  } else if (name == "abs") {
    out->kind = KLKind::kAbs;
  } else if (name == "k2" || name == "mse") {
    out->kind = KLKind::kK2;
  } else if (name == "k3" || name == "low_var_kl") {
    out->kind = KLKind::kK3;
  } else {
    return false;
  }
  return true;
}

}  // namespace rlhf_ext
