// group_advantages: argument checks and option parsing shared by the CPU and CUDA
// entry points. The public function (rlhf_ext/ops/group_advantages.py) sorts the
// rows and passes their order; these checks guard the dispatcher op itself.
// kGroupBaselineNames / kGroupScaleNames are the C++ side of rlhf_ext/ops/_vocab.py's
// GROUP_BASELINE_CODES / GROUP_SCALE_CODES (build_info() exports them; a test pins them).
#pragma once
#include <ATen/ATen.h>

#include <string>

#include "rlhf_ext/checks.h"
#include "rlhf_ext/group_math.h"

namespace rlhf_ext {

struct GroupBaselineName {
  const char* name;
  GroupBaseline baseline;
};
struct GroupScaleName {
  const char* name;
  GroupScale scale;
};

inline constexpr GroupBaselineName kGroupBaselineNames[] = {
    {"mean", GroupBaseline::kMean},           {"leave_one_out", GroupBaseline::kLeaveOneOut},
    {"length_weighted", GroupBaseline::kLengthWeighted},
    {"pass_at_k", GroupBaseline::kPassAtK},   {"given", GroupBaseline::kGiven},
    {"none", GroupBaseline::kNone},
};
inline constexpr GroupScaleName kGroupScaleNames[] = {
    {"group", GroupScale::kGroup}, {"batch", GroupScale::kBatch}, {"none", GroupScale::kNone}};

struct GroupProblem {
  at::Tensor scores;       // [K, B] float32 / float64, contiguous
  at::Tensor groups;       // [B] int64
  at::Tensor order;        // [K, B] int64: each component's rows sorted by (group, score)
  at::Tensor batch_order;  // [K, B] int64: rows sorted by score (scale "batch"), or undefined
  at::Tensor lengths;      // [B] in the scores' dtype, or undefined
  at::Tensor baselines;    // [B] in the scores' dtype, or undefined
  int64_t components = 0;
  int64_t rows = 0;
  GroupOptions options;
};

inline at::Tensor index_tensor(const char* op, const char* name, const at::Tensor& t,
                               const at::Tensor& like, at::IntArrayRef shape) {
  check_same_device(op, name, t, like);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": `", name, "` must be int64, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": `", name, "` must have shape ", shape, ", got ",
                    shape_str(t));
  return t.contiguous();
}

inline GroupProblem prepare_group_advantages(
    const at::Tensor& scores, const at::Tensor& groups, const at::Tensor& order,
    const std::optional<at::Tensor>& batch_order, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& baselines, const std::string& baseline,
    const std::string& scale, bool unbiased, double eps, bool clamp_eps, bool singleton_raw,
    bool ignore_nan, bool nonzero_rescale) {
  constexpr const char* op = "rlhf_ext.group_advantages";
  check_floating(op, "scores", scores);
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble, op,
                   ": `scores` must be float32 or float64 here (the public function converts), got ",
                   scores.scalar_type());
  check_dim(op, "scores", scores, 2);
  GroupProblem p;
  p.components = scores.size(0);
  p.rows = scores.size(1);
  p.scores = scores.contiguous();
  p.groups = index_tensor(op, "groups", groups, scores, {p.rows});
  p.order = index_tensor(op, "order", order, scores, scores.sizes());
  if (batch_order.has_value() && batch_order->defined()) {
    p.batch_order = index_tensor(op, "batch_order", *batch_order, scores, scores.sizes());
  }
  p.lengths = row_vector(op, "lengths", lengths, p.rows, scores, scores.scalar_type());
  p.baselines = row_vector(op, "baselines", baselines, p.rows, scores, scores.scalar_type());
  GroupOptions& o = p.options;
  bool known = false;
  for (const GroupBaselineName& entry : kGroupBaselineNames) {
    if (baseline == entry.name) o.baseline = entry.baseline, known = true;
  }
  TORCH_CHECK_VALUE(known, op, ": `baseline` must be one of ", quoted_names(kGroupBaselineNames),
                    ", got '", baseline, "'");
  known = false;
  for (const GroupScaleName& entry : kGroupScaleNames) {
    if (scale == entry.name) o.scale = entry.scale, known = true;
  }
  TORCH_CHECK_VALUE(known, op, ": `scale` must be one of ", quoted_names(kGroupScaleNames),
                    ", got '", scale, "'");
  TORCH_CHECK_VALUE(o.baseline != GroupBaseline::kLengthWeighted || p.lengths.defined(), op,
                    ": baseline 'length_weighted' needs `lengths`");
  TORCH_CHECK_VALUE(o.baseline != GroupBaseline::kGiven || p.baselines.defined(), op,
                    ": baseline 'given' needs `baselines`");
  TORCH_CHECK_VALUE(o.scale != GroupScale::kBatch || p.batch_order.defined(), op,
                    ": scale 'batch' needs `batch_order`");
  TORCH_CHECK_VALUE(eps >= 0 && eps - eps == 0, op, ": `eps` must be a finite float >= 0, got ",
                    eps);
  o.unbiased = unbiased;
  o.eps = eps;
  o.clamp_eps = clamp_eps;
  o.singleton_raw = singleton_raw;
  o.ignore_nan = ignore_nan;
  o.nonzero_rescale = nonzero_rescale;
  return p;
}

}  // namespace rlhf_ext
