// Argument handling of token_logprobs, shared by the CPU and CUDA entry points.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "rlhf_ext/checks.h"
#include "rlhf_ext/logit_transform.h"
#include "rlhf_ext/row_layout.h"

namespace rlhf_ext {

constexpr const char* kLogprobsOp = "rlhf_ext.token_logprobs";

// The leading dimensions of `t` (all but the last) as a RowLayout, when they
// reduce to at most two (size, stride) pairs; size-1 dimensions are dropped
// and neighbours that are contiguous with each other merged.
inline std::optional<RowLayout> leading_layout(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (size, stride), outermost first
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) == 1) continue;
    if (!dims.empty() && dims.back().second == t.size(d) * t.stride(d)) {
      dims.back() = {dims.back().first * t.size(d), t.stride(d)};
    } else {
      dims.emplace_back(t.size(d), t.stride(d));
    }
  }
  RowLayout layout;
  if (dims.size() > 2) return std::nullopt;
  if (dims.size() >= 1) {
    layout.inner = dims.back().first;
    layout.inner_stride = dims.back().second;
  }
  if (dims.size() == 2) layout.outer_stride = dims.front().second;
  if (layout.inner < 1) layout.inner = 1;  // an empty tensor: no row is ever addressed
  return layout;
}

// The logit transform's settings (logit_transform.h) on the host, in double.
struct TransformSettings {
  double inv_temp = 1.0;   // numerator / temperature: the multiplier of y
  at::Tensor temps;        // per-row temperatures, acc_dtype [rows], or undefined
  double numerator = 1.0;  // logit_scale without a softcap, 1 with one
  double softcap = 0.0;    // 0: none
  double logit_scale = 1.0;
};

// The settings, checked (the scalars the Python layer checks too: they are reachable
// through torch.ops), with the per-token temperatures of `lead_shape` as contiguous
// acc_dtype [rows] on `like`'s device.
inline TransformSettings transform_settings(const char* op, double temperature,
                                            const std::optional<at::Tensor>& temperatures,
                                            double logit_scale, double softcap,
                                            const at::Tensor& like, at::IntArrayRef lead_shape,
                                            at::ScalarType acc_dtype) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op,
                    ": `temperature` must be a finite float > 0, got ", temperature);
  TORCH_CHECK_VALUE(std::isfinite(logit_scale) && logit_scale > 0, op,
                    ": `logit_scale` must be a finite float > 0, got ", logit_scale);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, op,
                    ": `softcap` must be a finite float >= 0 (0: no softcap), got ", softcap);
  TransformSettings s;
  s.logit_scale = logit_scale;
  s.softcap = softcap;
  s.numerator = softcap > 0 ? 1.0 : logit_scale;
  s.inv_temp = s.numerator / temperature;
  if (temperatures.has_value() && temperatures->defined()) {
    const at::Tensor& t = *temperatures;
    check_same_device(op, "temperatures", t, like);
    check_floating(op, "temperatures", t);
    TORCH_CHECK_VALUE(t.sizes() == lead_shape, op, ": `temperatures` must have shape ",
                      lead_shape, " (one temperature per token), got ", shape_str(t));
    s.temps = t.to(acc_dtype).contiguous().reshape({-1});
  }
  return s;
}

// The same settings with the per-row temperatures of other rows (a tile's: undefined
// when the op has none).
inline TransformSettings with_temps(TransformSettings s, const at::Tensor& temps) {
  s.temps = s.temps.defined() ? temps : at::Tensor();
  return s;
}

struct LogprobsProblem {
  at::Tensor logits;  // the caller's tensor, or a contiguous copy if its layout needs one
  at::Tensor target;  // int64, contiguous, [rows]
  RowLayout layout;
  int64_t rows = 0;
  int64_t vocab = 0;
  TransformSettings transform;
  int64_t ignore_index = -100;
  at::ScalarType acc_dtype = at::kFloat;
  std::vector<int64_t> lead_shape;  // logits.shape[:-1]: the shape of every per-token tensor
};

// The transform as the kernels read it.
template <typename acc_t>
LogitTransform<acc_t> logit_transform(const LogprobsProblem& p) {
  const TransformSettings& s = p.transform;
  LogitTransform<acc_t> t;
  t.inv_temp = static_cast<acc_t>(s.inv_temp);
  t.temps = s.temps.defined() ? s.temps.data_ptr<acc_t>() : nullptr;
  t.numerator = static_cast<acc_t>(s.numerator);
  t.cap = static_cast<acc_t>(s.softcap);
  t.cap_in = s.softcap > 0 ? static_cast<acc_t>(s.logit_scale / s.softcap) : acc_t(0);
  t.cap_scale = static_cast<acc_t>(s.logit_scale);
  return t;
}

inline LogprobsProblem prepare_logprobs(const at::Tensor& logits, const at::Tensor& target,
                                        double temperature,
                                        const std::optional<at::Tensor>& temperatures,
                                        double logit_scale, double softcap,
                                        int64_t ignore_index) {
  const char* op = kLogprobsOp;
  check_floating(op, "logits", logits);
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.size(-1) >= 1, op,
                    ": `logits` must have shape [..., V] with V >= 1, got ", shape_str(logits));
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
                   ": `target` must be int64 or int32, got ", target.scalar_type());
  check_same_device(op, "target", target, logits);
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK_VALUE(target.sizes() == lead, op, ": `target` must have shape ", lead,
                    " (the shape of `logits` without its last dimension), got ",
                    shape_str(target));
  LogprobsProblem p;
  p.vocab = logits.size(-1);
  p.rows = target.numel();
  p.ignore_index = ignore_index;
  p.acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.lead_shape = lead.vec();
  p.target = target.to(at::kLong).contiguous().reshape({p.rows});
  const bool unit_stride = p.vocab == 1 || logits.stride(-1) == 1;
  std::optional<RowLayout> layout = unit_stride ? leading_layout(logits) : std::nullopt;
  p.logits = layout ? logits : logits.contiguous();
  p.layout = layout ? *layout : *leading_layout(p.logits);
  p.transform = transform_settings(op, temperature, temperatures, logit_scale, softcap, logits,
                                   lead, p.acc_dtype);
  return p;
}

// A per-token tensor of the backward (lse, entropy, upstream gradients) as
// contiguous acc_dtype [rows], or undefined when absent.
inline at::Tensor per_token(const LogprobsProblem& p, const char* name,
                            const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_same_device(kLogprobsOp, name, *t, p.logits);
  check_floating(kLogprobsOp, name, *t);
  TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(p.lead_shape), kLogprobsOp, ": `", name,
                    "` must have shape ", at::IntArrayRef(p.lead_shape), ", got ", shape_str(*t));
  return t->to(p.acc_dtype).contiguous().reshape({p.rows});
}

// The backward's per-row inputs, converted once for either device.
struct LogprobsGradInputs {
  at::Tensor lse;
  at::Tensor entropy;  // defined only when grad_entropy is
  at::Tensor grad_logprobs;
  at::Tensor grad_entropy;
  // the extra outputs' upstream gradients (undefined: zero); log_sum_sq is defined
  // whenever grad_log_sum_sq is
  at::Tensor log_sum_sq;
  at::Tensor grad_lse;
  at::Tensor grad_log_sum_sq;
  at::Tensor grad_mean;
};

inline LogprobsGradInputs prepare_grad_inputs(
    const LogprobsProblem& p, const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
    const std::optional<at::Tensor>& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
    const std::optional<at::Tensor>& log_sum_sq = std::nullopt,
    const std::optional<at::Tensor>& grad_lse = std::nullopt,
    const std::optional<at::Tensor>& grad_log_sum_sq = std::nullopt,
    const std::optional<at::Tensor>& grad_mean = std::nullopt) {
  LogprobsGradInputs in;
  in.lse = per_token(p, "lse", lse);
  in.grad_logprobs = per_token(p, "grad_logprobs", grad_logprobs);
  in.grad_entropy = per_token(p, "grad_entropy", grad_entropy);
  if (in.grad_entropy.defined()) {
    in.entropy = per_token(p, "entropy", entropy);
    TORCH_CHECK_VALUE(in.entropy.defined(), kLogprobsOp,
                      ": `entropy` is needed with `grad_entropy`");
  }
  in.grad_lse = per_token(p, "grad_lse", grad_lse);
  in.grad_log_sum_sq = per_token(p, "grad_log_sum_sq", grad_log_sum_sq);
  in.grad_mean = per_token(p, "grad_mean_logits", grad_mean);
  if (in.grad_log_sum_sq.defined()) {
    in.log_sum_sq = per_token(p, "log_sum_sq", log_sum_sq);
    TORCH_CHECK_VALUE(in.log_sum_sq.defined(), kLogprobsOp,
                      ": `log_sum_sq` is needed with `grad_log_sum_sq`");
  }
  return in;
}

// Bits of the forward's `extras` argument: the outputs beyond logprobs, entropy and lse
// (rlhf_ext/ops/_vocab.py LOGPROB_EXTRA_CODES; a test checks both agree).
constexpr int64_t kExtraLogSumSq = 1;
constexpr int64_t kExtraMeanLogits = 2;
constexpr int64_t kExtraIsTop1 = 4;
constexpr int64_t kExtraAll = kExtraLogSumSq | kExtraMeanLogits | kExtraIsTop1;

// The forward's outputs, each [...] (acc_dtype; is_top1 bool), an empty tensor when not
// asked for (lse always is).
struct ForwardOutputs {
  at::Tensor logprobs, entropy, lse, log_sum_sq, mean_logits, is_top1;
};

inline void check_extras(const char* op, int64_t extras) {
  TORCH_CHECK_VALUE(extras >= 0 && (extras & ~kExtraAll) == 0, op,
                    ": `extras` must be a combination of the bits ", kExtraAll, ", got ", extras);
}

inline ForwardOutputs forward_outputs(const LogprobsProblem& p, bool return_entropy,
                                      int64_t extras = 0) {
  check_extras(kLogprobsOp, extras);
  const auto options = p.logits.options().dtype(p.acc_dtype);
  auto maybe = [&](bool wanted, at::TensorOptions o) {
    return wanted ? at::empty(p.lead_shape, o) : at::empty({0}, o);
  };
  return {at::empty(p.lead_shape, options),
          maybe(return_entropy, options),
          at::empty(p.lead_shape, options),
          maybe(extras & kExtraLogSumSq, options),
          maybe(extras & kExtraMeanLogits, options),
          maybe(extras & kExtraIsTop1, options.dtype(at::kBool))};
}

// The forward op's return value: (logprobs, entropy, lse, log_sum_sq, mean_logits, is_top1).
using LogprobsOutputsTuple =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline LogprobsOutputsTuple as_tuple(const ForwardOutputs& o) {
  return {o.logprobs, o.entropy, o.lse, o.log_sum_sq, o.mean_logits, o.is_top1};
}

// An output's data, or nullptr when it was not asked for (an empty tensor).
template <typename T>
T* asked(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

// Where the backward writes, and the layout of its rows.
struct GradTarget {
  at::Tensor grad;
  RowLayout layout;
};

// A fresh contiguous [..., V] tensor in logits' dtype.
inline GradTarget fresh_grad(const LogprobsProblem& p) {
  std::vector<int64_t> shape = p.lead_shape;
  shape.push_back(p.vocab);
  GradTarget target{at::empty(shape, p.logits.options()), RowLayout{}};
  target.layout.inner = p.rows > 0 ? p.rows : 1;
  target.layout.inner_stride = p.vocab;
  return target;
}

// The logits themselves (inplace_backward), or the contiguous copy
// prepare_logprobs made of them; the caller copies a copy back.
inline GradTarget logits_as_grad(const LogprobsProblem& p) {
  return {p.logits, p.layout};
}

// A problem over logits that an op built itself: a contiguous [rows, V]
// tile and its int64 [rows] targets, already checked by that op.
// `transform` holds the tile rows' temperatures (with_temps), if any.
inline LogprobsProblem tile_problem(const at::Tensor& logits, const at::Tensor& target,
                                    const TransformSettings& transform, int64_t ignore_index) {
  LogprobsProblem p;
  p.logits = logits;
  p.target = target;
  p.rows = logits.size(0);
  p.vocab = logits.size(1);
  p.transform = transform;
  p.ignore_index = ignore_index;
  p.acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.lead_shape = {p.rows};
  p.layout.inner = p.rows > 0 ? p.rows : 1;
  p.layout.inner_stride = p.vocab;
  return p;
}

// Where a tile's columns sit in the vocabulary: the backward of a tile that
// holds columns [offset, offset + V) of a `full_vocab` row. A target is valid
// when it is in [0, full_vocab); it gets its extra term only in the tile that
// holds it.
struct VocabSlice {
  int64_t offset = 0;
  int64_t full_vocab = 0;
};

inline VocabSlice whole_vocab(const LogprobsProblem& p) {
  return {0, p.vocab};
}

// The row loops of token_logprobs on a prepared problem, callable from other
// ops' C++ without the dispatcher (linear_token_logprobs runs them on chunks
// of logits it computes). An output undefined or empty: not computed. Defined in
// csrc/cpu/token_logprobs.cpp and csrc/cuda/token_logprobs.cu.
void logprobs_forward_rows_cpu(const LogprobsProblem& p, const ForwardOutputs& out);
void logprobs_backward_rows_cpu(const LogprobsProblem& p, const GradTarget& out,
                                const LogprobsGradInputs& in, VocabSlice slice);
void logprobs_forward_rows_cuda(const LogprobsProblem& p, const ForwardOutputs& out);
void logprobs_backward_rows_cuda(const LogprobsProblem& p, const GradTarget& out,
                                 const LogprobsGradInputs& in, VocabSlice slice);

// The device's row loops of token_logprobs (the declarations above), for code shared by
// the CPU and CUDA entry points of token_logprobs and linear_token_logprobs.
struct RowKernels {
  void (*forward)(const LogprobsProblem&, const ForwardOutputs&);
  void (*backward)(const LogprobsProblem&, const GradTarget&, const LogprobsGradInputs&,
                   VocabSlice);
};

// The dispatcher ops of token_logprobs, on the device whose row loops `kernels` are
// (csrc/cpu and csrc/cuda register an instance each). The device guard makes the inputs'
// device current (CUDA).
template <const RowKernels& kernels>
LogprobsOutputsTuple token_logprobs_fwd(const at::Tensor& logits, const at::Tensor& target,
                                        double temperature,
                                        const std::optional<at::Tensor>& temperatures,
                                        double logit_scale, double softcap, int64_t ignore_index,
                                        bool return_entropy,
                                        bool /*inplace_backward: read by the autograd*/,
                                        int64_t extras) {
  const c10::DeviceGuard device_guard(logits.device());
  const LogprobsProblem p = prepare_logprobs(logits, target, temperature, temperatures,
                                             logit_scale, softcap, ignore_index);
  const ForwardOutputs out = forward_outputs(p, return_entropy, extras);
  kernels.forward(p, out);
  return as_tuple(out);
}

// The backward into `out` (a fresh tensor, or the logits themselves), the whole vocabulary.
template <const RowKernels& kernels>
void token_logprobs_backward_into(
    const LogprobsProblem& p, const GradTarget& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& grad_logprobs,
    const std::optional<at::Tensor>& grad_entropy, const std::optional<at::Tensor>& log_sum_sq,
    const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& grad_log_sum_sq,
    const std::optional<at::Tensor>& grad_mean_logits) {
  if (p.rows == 0) return;
  kernels.backward(p, out,
                   prepare_grad_inputs(p, lse, entropy, grad_logprobs, grad_entropy, log_sum_sq,
                                       grad_lse, grad_log_sum_sq, grad_mean_logits),
                   whole_vocab(p));
}

template <const RowKernels& kernels>
at::Tensor token_logprobs_bwd(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
    const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& grad_logprobs,
    const std::optional<at::Tensor>& grad_entropy, const std::optional<at::Tensor>& log_sum_sq,
    const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& grad_log_sum_sq,
    const std::optional<at::Tensor>& grad_mean_logits, double temperature,
    const std::optional<at::Tensor>& temperatures, double logit_scale, double softcap,
    int64_t ignore_index) {
  const c10::DeviceGuard device_guard(logits.device());
  const LogprobsProblem p = prepare_logprobs(logits, target, temperature, temperatures,
                                             logit_scale, softcap, ignore_index);
  const GradTarget out = fresh_grad(p);
  token_logprobs_backward_into<kernels>(p, out, lse, entropy, grad_logprobs, grad_entropy,
                                        log_sum_sq, grad_lse, grad_log_sum_sq, grad_mean_logits);
  return out.grad;
}

// The backward written into the logits buffer (inplace_backward); a contiguous copy that
// prepare_logprobs made of them is copied back.
template <const RowKernels& kernels>
void token_logprobs_bwd_(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
    const std::optional<at::Tensor>& entropy, const std::optional<at::Tensor>& grad_logprobs,
    const std::optional<at::Tensor>& grad_entropy, const std::optional<at::Tensor>& log_sum_sq,
    const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& grad_log_sum_sq,
    const std::optional<at::Tensor>& grad_mean_logits, double temperature,
    const std::optional<at::Tensor>& temperatures, double logit_scale, double softcap,
    int64_t ignore_index) {
  const c10::DeviceGuard device_guard(logits.device());
  const LogprobsProblem p = prepare_logprobs(logits, target, temperature, temperatures,
                                             logit_scale, softcap, ignore_index);
  token_logprobs_backward_into<kernels>(p, logits_as_grad(p), lse, entropy, grad_logprobs,
                                        grad_entropy, log_sum_sq, grad_lse, grad_log_sum_sq,
                                        grad_mean_logits);
  if (!p.logits.is_same(logits)) logits.copy_(p.logits);
}

}  // namespace rlhf_ext
