// linear_token_logprobs on CUDA: the chunk loops of linear_logprobs_host.h
// with cuBLAS GEMMs (at::mm on the current stream) and the CUDA row kernels
// of token_logprobs. One host sync per call: the count of valid rows.
#include <torch/library.h>

#include "rlhf_ext/linear_logprobs_host.h"

namespace rlhf_ext {
namespace {

constexpr RowKernels kCudaRows{&logprobs_forward_rows_cuda, &logprobs_backward_rows_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CUDA, m) {
  m.impl("linear_token_logprobs_fwd", &linear_token_logprobs_fwd<kCudaRows>);
  m.impl("linear_token_logprobs_bwd", &linear_token_logprobs_bwd<kCudaRows>);
}

}  // namespace rlhf_ext
