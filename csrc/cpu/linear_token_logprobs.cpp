// linear_token_logprobs on the CPU: the chunk loops of linear_logprobs_host.h
// with torch's CPU GEMM and the CPU row loops of token_logprobs.
#include <torch/library.h>

#include "rlhf_ext/linear_logprobs_host.h"

namespace rlhf_ext {
namespace {

constexpr RowKernels kCpuRows{&logprobs_forward_rows_cpu, &logprobs_backward_rows_cpu};

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, double temperature, const std::optional<at::Tensor>& temperatures,
    double logit_scale, double softcap, int64_t ignore_index, bool return_entropy,
    int64_t chunk_size) {
  const LinearProblem p = prepare_linear(hidden, weight, bias, target, temperature, temperatures,
                                         logit_scale, softcap, ignore_index, chunk_size);
  return linear_forward(p, return_entropy, kCpuRows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
    const std::optional<at::Tensor>& grad_logprobs,
    const std::optional<at::Tensor>& grad_entropy, double temperature,
    const std::optional<at::Tensor>& temperatures, double logit_scale, double softcap,
    int64_t ignore_index, int64_t chunk_size, bool need_grad_hidden, bool need_grad_weight) {
  const LinearProblem p = prepare_linear(hidden, weight, bias, target, temperature, temperatures,
                                         logit_scale, softcap, ignore_index, chunk_size);
  return linear_backward(p, lse, entropy, grad_logprobs, grad_entropy, need_grad_hidden,
                         need_grad_weight, kCpuRows);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CPU, m) {
  m.impl("linear_token_logprobs_fwd", &linear_token_logprobs_fwd_cpu);
  m.impl("linear_token_logprobs_bwd", &linear_token_logprobs_bwd_cpu);
}

}  // namespace rlhf_ext
