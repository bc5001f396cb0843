// linear_token_logprobs on the CPU: the chunk loops of linear_logprobs_host.h
// with torch's CPU GEMM and the CPU row loops of token_logprobs.
#include <torch/library.h>

#include "rlhf_ext/linear_logprobs_host.h"

namespace rlhf_ext {
namespace {

constexpr RowKernels kCpuRows{&logprobs_forward_rows_cpu, &logprobs_backward_rows_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CPU, m) {
  m.impl("linear_token_logprobs_fwd", &linear_token_logprobs_fwd<kCpuRows>);
  m.impl("linear_token_logprobs_bwd", &linear_token_logprobs_bwd<kCpuRows>);
}

}  // namespace rlhf_ext
