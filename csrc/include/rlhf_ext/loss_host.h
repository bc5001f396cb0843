// Argument handling of the loss ops (policy_loss, value_loss, kl_loss,
// kl_penalty, loss_backward), shared by the CPU and CUDA entry points.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "rlhf_ext/checks.h"
#include "rlhf_ext/kl_parse.h"
#include "rlhf_ext/ppo_math.h"
#include "rlhf_ext/stats_host.h"

namespace rlhf_ext {

// The C++ side of rlhf_ext/ops/_vocab.py's AGG_CODES (exported by
// rlhf_ext._C.build_info(); a test checks both tables agree).
struct LossAggName {
  const char* name;
  LossAgg agg;
};

inline constexpr LossAggName kLossAggNames[] = {
    {"token-mean", LossAgg::kTokenMean},
    {"seq-mean-token-sum", LossAgg::kSeqMeanTokenSum},
    {"seq-mean-token-mean", LossAgg::kSeqMeanTokenMean},
    {"seq-mean-token-sum-norm", LossAgg::kSeqMeanTokenSumNorm},
};

inline LossAgg parse_agg_or_throw(const char* op, const std::string& agg) {
  for (const LossAggName& entry : kLossAggNames) {
    if (agg == entry.name) return entry.agg;
  }
  TORCH_CHECK_VALUE(false, op, ": `agg` must be one of ", quoted_names(kLossAggNames), ", got '",
                    agg, "'");
  return LossAgg::kTokenMean;
}

// The C++ side of rlhf_ext/ops/_vocab.py's POLICY_KIND_CODES (exported by build_info).
struct PolicyKindName {
  const char* name;
  PolicyKind kind;
};

inline constexpr PolicyKindName kPolicyKindNames[] = {
    {"ppo", PolicyKind::kPPO},         {"reinforce", PolicyKind::kReinforce},
    {"cispo", PolicyKind::kCISPO},     {"sapo", PolicyKind::kSAPO},
    {"dppo_tv", PolicyKind::kDPPOTV},  {"dppo_kl", PolicyKind::kDPPOKL},
    {"dro", PolicyKind::kDRO},         {"gspo", PolicyKind::kGSPO},
    {"gspo_token", PolicyKind::kGSPOToken}, {"geo_mean", PolicyKind::kGeoMean},
};

inline PolicyKind parse_policy_kind_or_throw(const char* op, const std::string& kind) {
  for (const PolicyKindName& entry : kPolicyKindNames) {
    if (kind == entry.name) return entry.kind;
  }
  TORCH_CHECK_VALUE(false, op, ": `kind` must be one of ", quoted_names(kPolicyKindNames),
                    ", got '", kind, "'");
  return PolicyKind::kPPO;
}

// Level-1 inputs of one loss op: two or three [B, T] tensors of one floating
// dtype (c undefined for two), contiguous, and the optional mask. c may be [B]
// where the op allows it (the policy loss's per-row advantages): c_per_row.
struct LossProblem {
  at::Tensor a, b, c;  // contiguous [B, T] (c: or [B])
  at::Tensor mask;     // contiguous bool [B, T], or undefined
  int64_t rows = 0;
  int64_t cols = 0;
  bool c_per_row = false;
  at::ScalarType acc_dtype = at::kFloat;
};

// c_may_be_per_row: c may also be a [B] tensor, one value per row.
inline LossProblem prepare_loss(const char* op, const at::Tensor& a, const char* a_name,
                                const at::Tensor& b, const char* b_name, const at::Tensor* c,
                                const char* c_name, const std::optional<at::Tensor>& mask,
                                bool c_may_be_per_row = false) {
  check_floating(op, a_name, a);
  check_dim(op, a_name, a, 2);
  const at::Tensor* others[2] = {&b, c};
  const char* names[2] = {b_name, c_name};
  const bool c_per_row = c != nullptr && c_may_be_per_row && c->dim() == 1;
  for (int k = 0; k < 2; ++k) {
    if (others[k] == nullptr) continue;
    const at::Tensor& t = *others[k];
    check_floating(op, names[k], t);
    check_same_device(op, names[k], t, a);
    if (k == 1 && c_per_row) {
      TORCH_CHECK_VALUE(t.size(0) == a.size(0), op, ": `", names[k], "` must have shape [",
                        a.size(0), "] (one per row of `", a_name, "`) or ", shape_str(a),
                        ", got ", shape_str(t));
    } else {
      check_same_shape(op, names[k], t, a, a_name);
    }
    TORCH_CHECK_TYPE(t.scalar_type() == a.scalar_type(), op, ": `", names[k],
                     "` must have the dtype of `", a_name, "` (", a.scalar_type(), "), got ",
                     t.scalar_type());
  }
  LossProblem p;
  p.rows = a.size(0);
  p.cols = a.size(1);
  p.c_per_row = c_per_row;
  p.acc_dtype = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.a = a.contiguous();
  p.b = b.contiguous();
  if (c != nullptr) p.c = c->contiguous();
  p.mask = bool_mask(op, mask, a, a_name);
  return p;
}

// Outputs of a loss op: loss (0-d, acc dtype), stats ([kCols - 2] float32),
// grad ([B, T] acc dtype, the un-aggregated derivative, 0 at masked tokens),
// row_weight ([B] acc dtype), and the [B, kCols] level-1 partials (internal).
struct LossOutputs {
  at::Tensor loss, stats, grad, row_weight, partials;
};

inline LossOutputs allocate_loss_outputs(const LossProblem& p, int cols, int n_stats) {
  const auto options = p.a.options().dtype(p.acc_dtype);
  LossOutputs out;
  out.loss = at::empty({}, options);
  out.stats = at::empty({n_stats}, options.dtype(at::kFloat));
  out.grad = at::empty({p.rows, p.cols}, options);
  out.row_weight = at::empty({p.rows}, options);
  out.partials = at::empty({p.rows, cols}, options);
  return out;
}

// The "-norm" divisor: loss_scale_factor when > 0, else T.
inline double norm_factor(double loss_scale_factor, int64_t cols) {
  return loss_scale_factor > 0 ? loss_scale_factor : static_cast<double>(cols);
}

// Checks of loss_backward(grad_loss, grad, row_weight, dtype).
inline void check_loss_backward(const at::Tensor& grad_loss, const at::Tensor& grad,
                                const at::Tensor& row_weight) {
  constexpr const char* op = "rlhf_ext.loss_backward";
  check_floating(op, "grad", grad);
  check_dim(op, "grad", grad, 2);
  check_same_device(op, "grad_loss", grad_loss, grad);
  check_same_device(op, "row_weight", row_weight, grad);
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, op, ": `grad_loss` must have one element, got shape ",
                    shape_str(grad_loss));
  TORCH_CHECK_VALUE(row_weight.dim() == 1 && row_weight.size(0) == grad.size(0), op,
                    ": `row_weight` must have shape [", grad.size(0), "], got ",
                    shape_str(row_weight));
}

}  // namespace rlhf_ext
