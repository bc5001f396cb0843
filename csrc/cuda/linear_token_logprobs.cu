// linear_token_logprobs on CUDA: the chunk loops of linear_logprobs_host.h
// with cuBLAS GEMMs (at::mm on the current stream) and the CUDA row kernels
// of token_logprobs. One host sync per call: the count of valid rows.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "rlhf_ext/linear_logprobs_host.h"

namespace rlhf_ext {
namespace {

constexpr RowKernels kCudaRows{&logprobs_forward_rows_cuda, &logprobs_backward_rows_cuda};

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_fwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, double temperature, const std::optional<at::Tensor>& temperatures,
    double logit_scale, double softcap, int64_t ignore_index, bool return_entropy,
    int64_t chunk_size) {
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  const LinearProblem p = prepare_linear(hidden, weight, bias, target, temperature, temperatures,
                                         logit_scale, softcap, ignore_index, chunk_size);
  return linear_forward(p, return_entropy, kCudaRows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
    const std::optional<at::Tensor>& grad_logprobs,
    const std::optional<at::Tensor>& grad_entropy, double temperature,
    const std::optional<at::Tensor>& temperatures, double logit_scale, double softcap,
    int64_t ignore_index, int64_t chunk_size, bool need_grad_hidden, bool need_grad_weight) {
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  const LinearProblem p = prepare_linear(hidden, weight, bias, target, temperature, temperatures,
                                         logit_scale, softcap, ignore_index, chunk_size);
  return linear_backward(p, lse, entropy, grad_logprobs, grad_entropy, need_grad_hidden,
                         need_grad_weight, kCudaRows);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CUDA, m) {
  m.impl("linear_token_logprobs_fwd", &linear_token_logprobs_fwd_cuda);
  m.impl("linear_token_logprobs_bwd", &linear_token_logprobs_bwd_cuda);
}

}  // namespace rlhf_ext
