// Host-side parsing of KL kind names ("k1", "kl", "abs", "k2", "mse", "k3",
// "low_var_kl"; a trailing "+" selects the straight-through gradient variant).
// kKLKindNames is the C++ side of rlhf_ext/ops/_vocab.py's KL_KIND_CODES:
// rlhf_ext._C.build_info() exports it and a test checks both tables agree.
#pragma once
#include <string>

#include "rlhf_ext/kl.h"

namespace rlhf_ext {

struct KLSpec {
  KLKind kind;
  bool straight_through;  // "+" suffix: value of `kind`, gradient of k2
};

struct KLKindName {
  const char* name;
  KLKind kind;
};

inline constexpr KLKindName kKLKindNames[] = {
    {"k1", KLKind::kK1}, {"kl", KLKind::kK1},  {"abs", KLKind::kAbs},        {"k2", KLKind::kK2},
    {"mse", KLKind::kK2}, {"k3", KLKind::kK3}, {"low_var_kl", KLKind::kK3},
};

// Returns false for an unknown name; callers raise an error naming their op.
inline bool parse_kl_kind(std::string name, KLSpec* out) {
  out->straight_through = false;
  if (!name.empty() && name.back() == '+') {
    out->straight_through = true;
    name.pop_back();
  }
  for (const KLKindName& entry : kKLKindNames) {
    if (name == entry.name) {
      out->kind = entry.kind;
      return true;
    }
  }
  return false;
}

}  // namespace rlhf_ext
