// masked_mean and masked_whiten on CUDA. x is viewed as [rows, cols]; each
// block computes the Welford moments of one fixed-size chunk of one row
// (stats_host.h: kMomentsChunk), a second launch merges a row's chunks in
// chunk order in float64, and masked_whiten applies the result elementwise.
// Every merge happens in a fixed tree order: deterministic, batch-invariant,
// no atomics, no host synchronisation.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rlhf_ext/cuda_scan.cuh"
#include "rlhf_ext/moments.h"
#include "rlhf_ext/stats_host.h"

namespace rlhf_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    moments_partial_kernel(const scalar_t* __restrict__ x, const bool* __restrict__ mask,
                           int64_t cols, int64_t chunks, Moments<acc_t>* __restrict__ partial) {
  __shared__ Moments<acc_t> smem[kWarps];
  const int64_t task = blockIdx.x;
  const int64_t row = task / chunks;
  const int64_t lo = (task % chunks) * kMomentsChunk;
  const int64_t hi = min(lo + kMomentsChunk, cols);
  Moments<acc_t> m = moments_empty<acc_t>();
  for (int64_t c = lo + threadIdx.x; c < hi; c += kThreads) {
    const int64_t i = row * cols + c;
    if (mask == nullptr || mask[i]) moments_push(m, static_cast<acc_t>(x[i]));
  }
  m = block_merge_moments<acc_t, kWarps>(m, smem);
  if (threadIdx.x == 0) partial[task] = m;
}

// One block per row: merges the row's chunk moments in float64 and writes the
// row's mean, variance and valid count.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    moments_merge_kernel(const Moments<acc_t>* __restrict__ partial, int64_t chunks,
                         bool unbiased, acc_t* __restrict__ mean, acc_t* __restrict__ var,
                         acc_t* __restrict__ count) {
  __shared__ Moments<double> smem[kWarps];
  const int64_t row = blockIdx.x;
  Moments<double> m = moments_empty<double>();
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
    const Moments<acc_t> part = partial[row * chunks + c];
    m = moments_merge(m, Moments<double>{part.count, part.mean, part.m2});
  }
  m = block_merge_moments<double, kWarps>(m, smem);
  if (threadIdx.x == 0) {
    mean[row] = static_cast<acc_t>(m.mean);
    count[row] = static_cast<acc_t>(m.count);
    if (var != nullptr) var[row] = static_cast<acc_t>(moments_variance(m, unbiased));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void whiten_apply_kernel(const scalar_t* __restrict__ x, int64_t n,
                                    const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                    acc_t eps, bool shift_mean, acc_t* __restrict__ out) {
  const acc_t mu = *mean;
  const acc_t inv_std = acc_t(1) / sqrt(*var + eps);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = whiten_value(static_cast<acc_t>(x[i]), mu, inv_std, shift_mean);
  }
}

// Per-row mean / variance / count of p.x into the given [rows] outputs.
template <typename scalar_t, typename acc_t>
void row_moments_cuda(const RowsProblem& p, bool unbiased, acc_t* mean, acc_t* var, acc_t* count,
                      cudaStream_t stream) {
  const int64_t chunks = moments_chunks(p.cols);
  const int64_t tasks = p.rows * chunks;
  TORCH_CHECK_VALUE(tasks < (int64_t(1) << 31), "rlhf_ext: too many rows for one launch: ",
                    p.rows);
  at::Tensor partial = at::empty({tasks * int64_t(sizeof(Moments<acc_t>))},
                                 p.x.options().dtype(at::kByte));
  auto* partial_ptr = reinterpret_cast<Moments<acc_t>*>(partial.data_ptr());
  moments_partial_kernel<scalar_t, acc_t><<<static_cast<unsigned>(tasks), kThreads, 0, stream>>>(
      p.x.data_ptr<scalar_t>(), p.mask.defined() ? p.mask.data_ptr<bool>() : nullptr, p.cols,
      chunks, partial_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  moments_merge_kernel<acc_t><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(
      partial_ptr, chunks, unbiased, mean, var, count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> masked_mean_cuda(const at::Tensor& x,
                                                    const std::optional<at::Tensor>& mask,
                                                    std::optional<int64_t> dim) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const RowsProblem p = prepare_rows("rlhf_ext.masked_mean", x, mask, dim);
  const auto options = x.options().dtype(p.acc_dtype);
  at::Tensor mean = at::empty({p.rows}, options);
  at::Tensor count = at::empty({p.rows}, options);
  const auto shape = reduced_shape(x, dim);
  if (p.rows == 0) return {mean.reshape(shape), count.reshape(shape)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "rlhf_ext.masked_mean", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    row_moments_cuda<scalar_t, acc_t>(p, false, mean.data_ptr<acc_t>(), nullptr,
                                      count.data_ptr<acc_t>(), stream);
  });
  return {mean.reshape(shape), count.reshape(shape)};
}

std::tuple<at::Tensor, at::Tensor> masked_whiten_cuda(const at::Tensor& x,
                                                      const std::optional<at::Tensor>& mask,
                                                      bool shift_mean, bool unbiased, double eps) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const RowsProblem p = prepare_rows("rlhf_ext.masked_whiten", x, mask, std::nullopt);
  const auto options = x.options().dtype(p.acc_dtype);
  at::Tensor out = at::empty(x.sizes(), options);
  at::Tensor stats = at::empty({2}, options);  // mean, variance
  at::Tensor count = at::empty({}, options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "rlhf_ext.masked_whiten", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* s = stats.data_ptr<acc_t>();
    row_moments_cuda<scalar_t, acc_t>(p, unbiased, s, s + 1, count.data_ptr<acc_t>(), stream);
    if (p.cols == 0) return;
    const int64_t blocks = std::min<int64_t>((p.cols + kThreads - 1) / kThreads, 65536);
    whiten_apply_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p.x.data_ptr<scalar_t>(), p.cols, s, s + 1, static_cast<acc_t>(eps), shift_mean,
        out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, count};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CUDA, m) {
  m.impl("masked_mean", &masked_mean_cuda);
  m.impl("masked_whiten", &masked_whiten_cuda);
}

}  // namespace rlhf_ext
