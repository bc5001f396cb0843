// kl_shaped_rewards on CUDA: one block per row. A first sweep over the mask
// finds the row's last valid token (a max, exact in any order), a second
// writes -kl_coef * KL at valid tokens plus the score at the last one.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rlhf_ext/cuda_scan.cuh"
#include "rlhf_ext/kl.h"
#include "rlhf_ext/stats_host.h"

namespace rlhf_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

__device__ __forceinline__ int64_t block_max(int64_t v, int64_t* smem) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v = max(v, __shfl_xor_sync(kFullWarp, v, offset));
  }
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = smem[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) v = max(v, smem[w]);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    kl_shaped_rewards_kernel(const acc_t* __restrict__ scores, const scalar_t* __restrict__ lp,
                             const scalar_t* __restrict__ ref, const bool* __restrict__ mask,
                             int64_t cols, KLKind kind, acc_t kl_coef, acc_t* __restrict__ out) {
  __shared__ int64_t smem[kWarps];
  const int64_t base = int64_t(blockIdx.x) * cols;
  int64_t last = cols - 1;
  if (mask != nullptr) {
    int64_t mine = -1;
    for (int64_t t = threadIdx.x; t < cols; t += kThreads) {
      if (mask[base + t]) mine = t;
    }
    last = block_max(mine, smem);
  }
  const acc_t score = scores[blockIdx.x];
  for (int64_t t = threadIdx.x; t < cols; t += kThreads) {
    const int64_t i = base + t;
    const bool valid = mask == nullptr || mask[i];
    acc_t r = valid ? -kl_coef * kl_value<acc_t>(kind, static_cast<acc_t>(lp[i]),
                                                 static_cast<acc_t>(ref[i]))
                    : acc_t(0);
    if (t == last) r += score;
    out[i] = r;
  }
}

at::Tensor kl_shaped_rewards_cuda(const at::Tensor& scores, const at::Tensor& logprobs,
                                  const at::Tensor& ref_logprobs,
                                  const std::optional<at::Tensor>& mask, double kl_coef,
                                  c10::string_view kl) {
  const c10::cuda::CUDAGuard device_guard(logprobs.device());
  const ShapedRewardsProblem p =
      prepare_shaped_rewards(scores, logprobs, ref_logprobs, mask, std::string(kl));
  at::Tensor out = at::empty(logprobs.sizes(), logprobs.options().dtype(p.acc_dtype));
  if (p.rows == 0 || p.cols == 0) return out;
  TORCH_CHECK_VALUE(p.rows < (int64_t(1) << 31),
                    "rlhf_ext.kl_shaped_rewards: at most 2^31 - 1 rows, got ", p.rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logprobs.scalar_type(),
                                  "rlhf_ext.kl_shaped_rewards", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kl_shaped_rewards_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(
            p.scores.data_ptr<acc_t>(), p.logprobs.data_ptr<scalar_t>(),
            p.ref_logprobs.data_ptr<scalar_t>(),
            p.mask.defined() ? p.mask.data_ptr<bool>() : nullptr, p.cols, p.kind,
            static_cast<acc_t>(kl_coef), out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CUDA, m) {
  m.impl("kl_shaped_rewards", &kl_shaped_rewards_cuda);
}

}  // namespace rlhf_ext
