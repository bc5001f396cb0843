// Argument handling for the gae op, shared by its CPU and CUDA entry points so
// both accept and reject exactly the same inputs.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "rlhf_ext/checks.h"

namespace rlhf_ext {

// Rows are (start, length) spans of flat rewards/values: row b of a padded
// [B, T] batch starts at b * T; row b of a packed batch spans
// [cu_seqlens[b], cu_seqlens[b + 1]).
struct GaeProblem {
  at::Tensor rewards;     // contiguous, flat
  at::Tensor values;      // contiguous, flat, dtype of rewards
  at::Tensor mask;        // contiguous bool, or undefined (all valid)
  at::Tensor cu_seqlens;  // contiguous int64 [B + 1] (packed form), or undefined
  at::Tensor last_value;  // accumulation dtype [B], or undefined (0)
  at::Tensor gamma_rows;  // accumulation dtype [B], or undefined (scalar gamma)
  at::Tensor lam_rows;    // accumulation dtype [B], or undefined (scalar lam)
  int64_t rows = 0;
  int64_t row_len = 0;  // T of the padded form; 0 for the packed form
  int64_t total = 0;    // number of elements
  double gamma = 1.0;
  double lam = 1.0;
  at::ScalarType acc_dtype = at::kFloat;  // float64 inputs compute in float64
};

inline GaeProblem prepare_gae(const at::Tensor& rewards, const at::Tensor& values,
                              const std::optional<at::Tensor>& mask,
                              const std::optional<at::Tensor>& cu_seqlens,
                              const std::optional<at::Tensor>& last_value,
                              const std::optional<at::Tensor>& gamma_rows,
                              const std::optional<at::Tensor>& lam_rows, double gamma,
                              double lam) {
  constexpr const char* op = "rlhf_ext.gae";
  check_floating(op, "rewards", rewards);
  check_floating(op, "values", values);
  TORCH_CHECK_TYPE(values.scalar_type() == rewards.scalar_type(), op,
                   ": `values` must have the dtype of `rewards` (", rewards.scalar_type(), "), got ",
                   values.scalar_type());
  check_same_device(op, "values", values, rewards);
  check_same_shape(op, "values", values, rewards, "rewards");

  GaeProblem p;
  p.acc_dtype = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.gamma = gamma;
  p.lam = lam;
  const bool packed = cu_seqlens.has_value() && cu_seqlens->defined();
  if (packed) {
    check_dim(op, "rewards", rewards, 1);
    const at::Tensor& cu = *cu_seqlens;
    check_same_device(op, "cu_seqlens", cu, rewards);
    TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, op,
                     ": `cu_seqlens` must be int32 or int64, got ", cu.scalar_type());
    TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, op,
                      ": `cu_seqlens` must have shape [B + 1], got ", shape_str(cu));
    p.cu_seqlens = cu.to(at::kLong).contiguous();
    p.rows = cu.size(0) - 1;
  } else {
    check_dim(op, "rewards", rewards, 2);
    p.rows = rewards.size(0);
    p.row_len = rewards.size(1);
  }
  p.total = rewards.numel();
  p.mask = bool_mask(op, mask, rewards, "rewards");
  p.rewards = rewards.contiguous();
  p.values = values.contiguous();
  p.last_value = row_vector(op, "last_value", last_value, p.rows, rewards, p.acc_dtype);
  p.gamma_rows = row_vector(op, "gamma", gamma_rows, p.rows, rewards, p.acc_dtype);
  p.lam_rows = row_vector(op, "lam", lam_rows, p.rows, rewards, p.acc_dtype);
  return p;
}

// Advantages and returns in the accumulation dtype, with the input's shape.
inline std::tuple<at::Tensor, at::Tensor> gae_outputs(const GaeProblem& p,
                                                       const at::Tensor& rewards) {
  const auto options = rewards.options().dtype(p.acc_dtype);
  return {at::empty(rewards.sizes(), options), at::empty(rewards.sizes(), options)};
}

}  // namespace rlhf_ext
