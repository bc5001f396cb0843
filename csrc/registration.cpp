// The one place that declares rlhf_ext's operator schemas and the pybind11
// module rlhf_ext._C. Kernels register their CPU / CUDA implementations in
// csrc/cpu and csrc/cuda; fake (meta) kernels and autograd are registered from
// Python (rlhf_ext/ops). torch/extension.h and pybind11 stay in this file only:
// they triple the compile time of every translation unit that includes them.
#include <torch/extension.h>
#include <torch/library.h>

#include "rlhf_ext/group_host.h"
#include "rlhf_ext/kl_parse.h"
#include "rlhf_ext/linear_logprobs_host.h"
#include "rlhf_ext/loss_host.h"

#ifndef RLHF_EXT_VERSION
#define RLHF_EXT_VERSION "unknown"
#endif
#ifndef RLHF_EXT_TORCH_VERSION
#define RLHF_EXT_TORCH_VERSION ""
#endif
#ifndef RLHF_EXT_CUDA_ARCHS
#define RLHF_EXT_CUDA_ARCHS ""
#endif
#ifndef RLHF_EXT_CUDA_VERSION
#define RLHF_EXT_CUDA_VERSION ""
#endif

TORCH_LIBRARY(rlhf_ext, m) {
  // GAE over a padded [B, T] batch, or a packed [total] batch when cu_seqlens
  // ([B + 1]) is given. gamma_rows / lam_rows ([B]) override the scalars.
  m.def(
      "gae(Tensor rewards, Tensor values, Tensor? mask, Tensor? cu_seqlens, Tensor? last_value, "
      "Tensor? gamma_rows, Tensor? lam_rows, float gamma, float lam) -> (Tensor, Tensor)");
  // Mean of x over `dim` (all elements when None) and the number of valid
  // elements it averaged.
  m.def("masked_mean(Tensor x, Tensor? mask, int? dim) -> (Tensor, Tensor)");
  // TRL / verl whitening over all valid elements, and the valid count.
  m.def(
      "masked_whiten(Tensor x, Tensor? mask, bool shift_mean, bool unbiased, float eps) "
      "-> (Tensor, Tensor)");
  // Per-token -kl_coef * KL plus each row's score at its last valid token.
  m.def(
      "kl_shaped_rewards(Tensor scores, Tensor logprobs, Tensor ref_logprobs, Tensor? mask, "
      "float kl_coef, str kl) -> Tensor");
  // log_softmax(z) at `target` over the last dim, with z the transformed logits
  // (csrc/include/rlhf_ext/logit_transform.h: z = softcap * tanh(x * logit_scale / softcap)
  // / T, or x * logit_scale / T when softcap == 0; T = temperatures[row] when given, else
  // temperature), the entropy (an empty tensor unless return_entropy) and the per-row
  // log-sum-exp that the backward reuses instead of a second reduction.
  // inplace_backward is not read by the kernels: it tells the registered
  // backward (rlhf_ext/ops/token_logprobs.py) to write into the logits buffer.
  // `extras` (bits of logprobs_host.h kExtra*) asks for the outputs beyond them:
  // log sum_v p_v^2, the mean of z over the vocabulary and whether the target is the
  // argmax (bool), each an empty tensor when not asked for.
  m.def(
      "token_logprobs_fwd(Tensor logits, Tensor target, float temperature, Tensor? temperatures, "
      "float logit_scale, float softcap, int ignore_index, bool return_entropy, "
      "bool inplace_backward=False, int extras=0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradient w.r.t. logits of sum(grad_logprobs * logprobs + grad_entropy * entropy +
  // grad_lse * lse + grad_log_sum_sq * log_sum_sq + grad_mean_logits * mean_logits), into a
  // fresh tensor, or (the trailing underscore) into the logits buffer.
  m.def(
      "token_logprobs_bwd(Tensor logits, Tensor target, Tensor lse, Tensor? entropy, "
      "Tensor? grad_logprobs, Tensor? grad_entropy, Tensor? log_sum_sq, Tensor? grad_lse, "
      "Tensor? grad_log_sum_sq, Tensor? grad_mean_logits, float temperature, "
      "Tensor? temperatures, float logit_scale, float softcap, int ignore_index) -> Tensor");
  m.def(
      "token_logprobs_bwd_(Tensor(a!) logits, Tensor target, Tensor lse, Tensor? entropy, "
      "Tensor? grad_logprobs, Tensor? grad_entropy, Tensor? log_sum_sq, Tensor? grad_lse, "
      "Tensor? grad_log_sum_sq, Tensor? grad_mean_logits, float temperature, "
      "Tensor? temperatures, float logit_scale, float softcap, int ignore_index) -> ()");
  // The loss ops return (loss, stats, grad, row_weight): the aggregated loss
  // (0-d), the statistics ([k] float32), the per-token derivative before
  // aggregation ([B, T], 0 at masked tokens) and the per-row aggregation weight
  // ([B]); d loss / d input[b, t] = grad[b, t] * row_weight[b] (loss_backward).
  // Policy loss of one kind (policy_math.h): advantages [B, T] or [B]; lo / hi
  // the ratio band (ratio kinds) or the divergence thresholds (dppo kinds);
  // dual_clip <= 0 disables the dual clip; loss_scale_factor <= 0 means T. A
  // kind ignores the parameters it does not use. stats: clipfrac,
  // clipfrac_lower, approx_kl, ratio_mean, ratio_max.
  m.def(
      "policy_loss(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor? mask, "
      "str kind, float lo, float hi, float dual_clip, float ratio_cap, float tau_pos, "
      "float tau_neg, float beta, str agg, float loss_scale_factor) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // (Clipped) value loss; clip_eps <= 0 disables the clipping. stats: clipfrac.
  m.def(
      "value_loss(Tensor values, Tensor old_values, Tensor returns, Tensor? mask, "
      "float clip_eps, str agg) -> (Tensor, Tensor, Tensor, Tensor)");
  // Aggregated KL estimator; stats is empty.
  m.def(
      "kl_loss(Tensor logprobs, Tensor ref_logprobs, Tensor? mask, str kind, str agg) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Per-token KL estimator and its derivative w.r.t. logprobs.
  m.def("kl_penalty(Tensor logprobs, Tensor ref_logprobs, str kind) -> (Tensor, Tensor)");
  // Backward of the loss ops: grad_loss * grad[b, t] * row_weight[b], in `dtype`.
  m.def(
      "loss_backward(Tensor grad_loss, Tensor grad, Tensor row_weight, ScalarType dtype) "
      "-> Tensor");
  // Per-row advantages of [K, B] outcome scores against their groups: `order` holds
  // each component's rows sorted by (group id, score), `batch_order` by score alone
  // (needed for scale "batch"). Options as rlhf_ext.group_advantages; no gradient.
  m.def(
      "group_advantages(Tensor scores, Tensor groups, Tensor order, Tensor? batch_order, "
      "Tensor? lengths, Tensor? baselines, str baseline, str scale, bool unbiased, float eps, "
      "bool clamp_eps, bool singleton_raw, bool ignore_nan, bool nonzero_rescale) -> Tensor");
  // token_logprobs of hidden @ weight.T + bias without holding the logits, with the same
  // logit transform and outputs (`extras` as token_logprobs_fwd): chunks of chunk_size
  // valid rows.
  m.def(
      "linear_token_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
      "float temperature, Tensor? temperatures, float logit_scale, float softcap, "
      "int ignore_index, bool return_entropy, int chunk_size, int extras=0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Its gradients (grad_hidden, grad_weight, grad_bias) from the upstream gradients of
  // the outputs, as token_logprobs_bwd, logits recomputed tile by tile; a gradient not
  // asked for (or no bias) is an empty tensor.
  m.def(
      "linear_token_logprobs_bwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
      "Tensor lse, Tensor? entropy, Tensor? grad_logprobs, Tensor? grad_entropy, "
      "Tensor? log_sum_sq, Tensor? grad_lse, Tensor? grad_log_sum_sq, "
      "Tensor? grad_mean_logits, float temperature, Tensor? temperatures, float logit_scale, float softcap, "
      "int ignore_index, int chunk_size, bool need_grad_hidden, bool need_grad_weight) "
      "-> (Tensor, Tensor, Tensor)");
}

namespace {

// The torch this file was compiled against, as a marker Python can find in the .so's
// bytes when the module does not even load (a torch with another C++ ABI leaves
// undefined symbols): rlhf_ext/_backend.py reads it to say which torch to install.
[[gnu::used]] constexpr char kBuiltAgainstTorch[] = "rlhf_ext-built-against-torch=" RLHF_EXT_TORCH_VERSION ";";

// "2.14.1+cu130" -> "2.14.1": the part a pip requirement pins (setup.py torch_requirement).
std::string public_version(const std::string& version) { return version.substr(0, version.find('+')); }

// torch's C++ API has no stable ABI across releases: a build loaded under another torch
// may load and then crash or compute garbage, so refuse it with a message that says what
// to do. Only the public version is compared; the variant (+cpu, +cu130) of a torch that
// loads shares its ABI.
void check_torch_version() {
  const std::string running = pybind11::str(pybind11::module_::import("torch").attr("__version__"));
  const std::string built = RLHF_EXT_TORCH_VERSION;
  if (built.empty() || public_version(running) == public_version(built)) return;
  throw pybind11::import_error(
      "rlhf_ext._C was compiled against torch " + built + " but this is torch " + running +
      ": install torch==" + public_version(built) +
      ", or rebuild rlhf_ext against this torch (pip install --no-build-isolation --no-deps "
      "--force-reinstall <rlhf_ext source>)");
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = RLHF_EXT_VERSION;
  info["torch_version"] = RLHF_EXT_TORCH_VERSION;
#ifdef RLHF_EXT_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
  info["cuda_version"] = RLHF_EXT_CUDA_VERSION;
  info["cuda_archs"] = RLHF_EXT_CUDA_ARCHS;
  info["parallel"] = at::get_parallel_info();
  // The C++ vocabularies and constants that Python mirrors (rlhf_ext/ops/_vocab.py,
  // the Triton chunk loop); python_tests/test_op_contract.py checks they agree.
  pybind11::dict kl_kinds;
  for (const auto& entry : rlhf_ext::kKLKindNames) kl_kinds[entry.name] = static_cast<int>(entry.kind);
  info["kl_kinds"] = kl_kinds;
  pybind11::dict loss_aggs;
  for (const auto& entry : rlhf_ext::kLossAggNames) loss_aggs[entry.name] = static_cast<int>(entry.agg);
  info["loss_aggs"] = loss_aggs;
  pybind11::dict policy_kinds;
  for (const auto& entry : rlhf_ext::kPolicyKindNames) {
    policy_kinds[entry.name] = static_cast<int>(entry.kind);
  }
  info["policy_kinds"] = policy_kinds;
  pybind11::dict group_baselines;
  for (const auto& entry : rlhf_ext::kGroupBaselineNames) {
    group_baselines[entry.name] = static_cast<int>(entry.baseline);
  }
  info["group_baselines"] = group_baselines;
  pybind11::dict group_scales;
  for (const auto& entry : rlhf_ext::kGroupScaleNames) group_scales[entry.name] = static_cast<int>(entry.scale);
  info["group_scales"] = group_scales;
  pybind11::dict linear;
  linear["row_quantum"] = rlhf_ext::kRowQuantum;
  linear["min_tile_vocab"] = rlhf_ext::kMinTileVocab;
  linear["vocab_quantum"] = rlhf_ext::kVocabQuantum;
  linear["accumulate_rows"] = rlhf_ext::kAccumulateRows;
  info["linear_token_logprobs"] = linear;
  pybind11::dict logprob_extras;
  logprob_extras["log_sum_sq_probs"] = rlhf_ext::kExtraLogSumSq;
  logprob_extras["mean_logits"] = rlhf_ext::kExtraMeanLogits;
  logprob_extras["is_top1"] = rlhf_ext::kExtraIsTop1;
  info["logprob_extras"] = logprob_extras;
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  check_torch_version();
  module.doc() = "rlhf_ext compiled kernels: importing this module registers the ops.";
  module.def("build_info", &build_info,
             "Versions and options this extension was compiled with (dict).");
  module.def(
      "linear_tile_geometry",
      [](int64_t valid_rows, int64_t vocab, int64_t chunk_rows) {
        const rlhf_ext::TileGeometry tile = rlhf_ext::tile_geometry(valid_rows, vocab, chunk_rows);
        return pybind11::make_tuple(tile.rows, tile.vocab);
      },
      "linear_token_logprobs' backward tile (rows, vocab) for valid_rows rows, V = vocab "
      "and chunk_rows rows per chunk: the C++ tile_geometry, for the Triton parity test.");
}
