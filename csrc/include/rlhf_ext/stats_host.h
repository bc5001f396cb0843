// Argument handling for the masked statistics ops (masked_mean,
// masked_whiten) and kl_shaped_rewards, shared by CPU and CUDA.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "rlhf_ext/checks.h"
#include "rlhf_ext/kl_parse.h"

namespace rlhf_ext {

// Reductions run over fixed-size chunks of a row whatever the device, the
// batch or the row's position, so every reduction is batch-invariant and the
// CPU and CUDA kernels share one partition.
constexpr int64_t kMomentsChunk = 4096;

inline int64_t moments_chunks(int64_t cols) {
  return cols == 0 ? 1 : (cols + kMomentsChunk - 1) / kMomentsChunk;
}

// x (and mask) viewed as [rows, cols] with the reduced dimension last.
struct RowsProblem {
  at::Tensor x;     // contiguous [rows, cols]
  at::Tensor mask;  // contiguous bool [rows, cols], or undefined
  int64_t rows = 1;
  int64_t cols = 0;
  at::ScalarType acc_dtype = at::kFloat;
};

inline RowsProblem prepare_rows(const char* op, const at::Tensor& x,
                                const std::optional<at::Tensor>& mask,
                                std::optional<int64_t> dim) {
  check_floating(op, "x", x);
  at::Tensor m = bool_mask(op, mask, x, "x");
  RowsProblem p;
  p.acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (!dim.has_value()) {
    p.x = x.reshape({1, x.numel()}).contiguous();
    if (m.defined()) p.mask = m.reshape({1, x.numel()});
    p.rows = 1;
    p.cols = x.numel();
    return p;
  }
  TORCH_CHECK_VALUE(x.dim() > 0, op, ": `dim` must be None for a 0-d `x`, got ", *dim);
  TORCH_CHECK_VALUE(*dim >= -x.dim() && *dim < x.dim(), op, ": `dim` must be in [", -x.dim(),
                    ", ", x.dim() - 1, "] for `x` of shape ", shape_str(x), ", got ", *dim);
  const int64_t d = *dim < 0 ? *dim + x.dim() : *dim;
  p.cols = x.size(d);
  p.rows = 1;
  for (int64_t i = 0; i < x.dim(); ++i) {
    if (i != d) p.rows *= x.size(i);
  }
  p.x = x.movedim(d, -1).contiguous().reshape({p.rows, p.cols});
  if (m.defined()) p.mask = m.movedim(d, -1).contiguous().reshape({p.rows, p.cols});
  return p;
}

// Output shape of a reduction over `dim` (or of all elements).
inline std::vector<int64_t> reduced_shape(const at::Tensor& x, std::optional<int64_t> dim) {
  std::vector<int64_t> shape;
  if (!dim.has_value()) return shape;
  const int64_t d = *dim < 0 ? *dim + x.dim() : *dim;
  for (int64_t i = 0; i < x.dim(); ++i) {
    if (i != d) shape.push_back(x.size(i));
  }
  return shape;
}

// The KL kind of argument `arg` of op `op`, or a ValueError listing kKLKindNames.
inline KLSpec parse_kl_or_throw(const char* op, const char* arg, const std::string& kind) {
  KLSpec spec;
  if (parse_kl_kind(kind, &spec)) return spec;
  TORCH_CHECK_VALUE(false, op, ": `", arg, "` must be one of ", quoted_names(kKLKindNames),
                    " (optionally with a '+' suffix), got '", kind, "'");
  return spec;
}

struct ShapedRewardsProblem {
  at::Tensor scores;        // accumulation dtype [B]
  at::Tensor logprobs;      // contiguous [B, T]
  at::Tensor ref_logprobs;  // contiguous [B, T], dtype of logprobs
  at::Tensor mask;          // contiguous bool [B, T], or undefined
  int64_t rows = 0;
  int64_t cols = 0;
  KLKind kind = KLKind::kK1;
  at::ScalarType acc_dtype = at::kFloat;
};

inline ShapedRewardsProblem prepare_shaped_rewards(const at::Tensor& scores,
                                                   const at::Tensor& logprobs,
                                                   const at::Tensor& ref_logprobs,
                                                   const std::optional<at::Tensor>& mask,
                                                   const std::string& kl) {
  constexpr const char* op = "rlhf_ext.kl_shaped_rewards";
  check_floating(op, "logprobs", logprobs);
  check_floating(op, "ref_logprobs", ref_logprobs);
  check_dim(op, "logprobs", logprobs, 2);
  check_same_device(op, "ref_logprobs", ref_logprobs, logprobs);
  check_same_shape(op, "ref_logprobs", ref_logprobs, logprobs, "logprobs");
  TORCH_CHECK_TYPE(ref_logprobs.scalar_type() == logprobs.scalar_type(), op,
                   ": `ref_logprobs` must have the dtype of `logprobs` (", logprobs.scalar_type(),
                   "), got ", ref_logprobs.scalar_type());
  ShapedRewardsProblem p;
  p.rows = logprobs.size(0);
  p.cols = logprobs.size(1);
  p.acc_dtype = logprobs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.kind = parse_kl_or_throw(op, "kl", kl).kind;
  check_same_device(op, "scores", scores, logprobs);
  check_floating(op, "scores", scores);
  TORCH_CHECK_VALUE(scores.dim() == 1 && scores.size(0) == p.rows, op,
                    ": `scores` must have shape [", p.rows, "], got ", shape_str(scores));
  p.scores = scores.to(p.acc_dtype).contiguous();
  p.logprobs = logprobs.contiguous();
  p.ref_logprobs = ref_logprobs.contiguous();
  p.mask = bool_mask(op, mask, logprobs, "logprobs");
  return p;
}

}  // namespace rlhf_ext
