// Where row r of a [..., V] tensor starts, for leading dimensions that do not
// collapse into one stride: `logits[:, :-1]` of a [B, T, V] tensor has row
// strides (T * V, V), and reading it in place saves a copy of the logits.
#pragma once
#include <cstdint>

#include "rlhf_ext/macros.h"

namespace rlhf_ext {

// Rows are numbered in row-major order of the leading shape, which has been
// reduced to at most two dimensions: [outer, inner].
struct RowLayout {
  int64_t inner = 1;         // size of the inner leading dimension
  int64_t outer_stride = 0;  // elements between consecutive outer indices
  int64_t inner_stride = 0;  // elements between consecutive inner indices

  RLHF_HD int64_t offset(int64_t row) const {
    return (row / inner) * outer_stride + (row % inner) * inner_stride;
  }
};

}  // namespace rlhf_ext
