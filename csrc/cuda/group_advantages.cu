// group_advantages on CUDA: one thread per sorted position; the thread at the
// start of a group walks the group's segment (sorted order, double sums) and
// writes its rows. The batch statistics (scale "batch", GPG's alpha) come first,
// one thread per component. No atomics, no host sync: the segment boundaries are
// found on the device.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rlhf_ext/group_host.h"
#include "rlhf_ext/group_math.h"

namespace rlhf_ext {
namespace {

constexpr int kThreads = 128;

template <typename scalar_t>
__global__ void group_batch_stats_kernel(const scalar_t* __restrict__ scores,
                                         const int64_t* __restrict__ batch_order, int64_t rows,
                                         GroupOptions options, BatchStats* __restrict__ out) {
  const int64_t k = blockIdx.x;
  out[k] = batch_stats(scores + k * rows, batch_order ? batch_order + k * rows : nullptr, rows,
                       options);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    group_segments_kernel(const scalar_t* __restrict__ scores, const int64_t* __restrict__ groups,
                          const int64_t* __restrict__ order, const scalar_t* __restrict__ lengths,
                          const scalar_t* __restrict__ baselines,
                          const BatchStats* __restrict__ batch, int64_t rows,
                          int64_t components, GroupOptions options, scalar_t* __restrict__ out) {
  const int64_t index = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (index >= rows * components) return;
  const int64_t k = index / rows, i = index % rows;
  const int64_t* component_order = order + k * rows;
  if (!starts_group(groups, component_order, i)) return;
  int64_t end = i + 1;
  while (end < rows && !starts_group(groups, component_order, end)) ++end;
  const BatchStats stats = batch != nullptr ? batch[k] : BatchStats{};
  group_segment(scores + k * rows, lengths, baselines, component_order, i, end, stats, options,
                out + k * rows);
}

at::Tensor group_advantages_cuda(const at::Tensor& scores, const at::Tensor& groups,
                                 const at::Tensor& order,
                                 const std::optional<at::Tensor>& batch_order,
                                 const std::optional<at::Tensor>& lengths,
                                 const std::optional<at::Tensor>& baselines,
                                 c10::string_view baseline, c10::string_view scale, bool unbiased,
                                 double eps, bool clamp_eps, bool singleton_raw, bool ignore_nan,
                                 bool nonzero_rescale) {
  const c10::cuda::CUDAGuard device_guard(scores.device());
  const GroupProblem p = prepare_group_advantages(
      scores, groups, order, batch_order, lengths, baselines, std::string(baseline),
      std::string(scale), unbiased, eps, clamp_eps, singleton_raw, ignore_nan, nonzero_rescale);
  at::Tensor out = at::empty(p.scores.sizes(), p.scores.options());
  const int64_t total = p.rows * p.components;
  if (total == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool need_batch = p.batch_order.defined() || p.options.nonzero_rescale;
  // BatchStats is two doubles: a [K, 2] float64 buffer holds one per component.
  at::Tensor batch = need_batch ? at::empty({p.components, 2}, p.scores.options().dtype(at::kDouble))
                                : at::Tensor();
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  TORCH_CHECK_VALUE(blocks < (int64_t(1) << 31), "rlhf_ext.group_advantages: too many rows, got ",
                    total);
  AT_DISPATCH_FLOATING_TYPES(p.scores.scalar_type(), "rlhf_ext.group_advantages", [&] {
    BatchStats* batch_ptr =
        need_batch ? reinterpret_cast<BatchStats*>(batch.data_ptr<double>()) : nullptr;
    if (need_batch) {
      group_batch_stats_kernel<scalar_t><<<static_cast<unsigned>(p.components), 1, 0, stream>>>(
          p.scores.data_ptr<scalar_t>(), data_or_null<int64_t>(p.batch_order), p.rows, p.options,
          batch_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    group_segments_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p.scores.data_ptr<scalar_t>(), p.groups.data_ptr<int64_t>(), p.order.data_ptr<int64_t>(),
        data_or_null<scalar_t>(p.lengths), data_or_null<scalar_t>(p.baselines), batch_ptr, p.rows,
        p.components, p.options, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CUDA, m) {
  m.impl("group_advantages", &group_advantages_cuda);
}

}  // namespace rlhf_ext
