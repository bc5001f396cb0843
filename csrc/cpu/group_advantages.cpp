// group_advantages on the CPU: each component's sorted rows are cut into groups
// (segments of equal id), and the groups run in parallel, each in sorted order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_parallel.h"
#include "rlhf_ext/group_host.h"
#include "rlhf_ext/group_math.h"

namespace rlhf_ext {
namespace {

template <typename scalar_t>
void group_component_cpu(const GroupProblem& p, int64_t k, scalar_t* out) {
  const int64_t rows = p.rows;
  const scalar_t* scores = p.scores.data_ptr<scalar_t>() + k * rows;
  const int64_t* order = p.order.data_ptr<int64_t>() + k * rows;
  const int64_t* groups = p.groups.data_ptr<int64_t>();
  const int64_t* batch_order =
      p.batch_order.defined() ? p.batch_order.data_ptr<int64_t>() + k * rows : nullptr;
  const BatchStats batch = batch_stats(scores, batch_order, rows, p.options);
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < rows; ++i) {
    if (starts_group(groups, order, i)) starts.push_back(i);
  }
  starts.push_back(rows);
  const int64_t segments = static_cast<int64_t>(starts.size()) - 1;
  // a segment (group) costs about its rows: batches of fewer rows than a task's minimum
  // (any batch short of 2^18 rows) run on this thread
  parallel_over(segments, rows / std::max<int64_t>(segments, 1), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      group_segment(scores, data_or_null<scalar_t>(p.lengths), data_or_null<scalar_t>(p.baselines),
                    order, starts[g], starts[g + 1], batch, p.options, out + k * rows);
    }
  });
}

at::Tensor group_advantages_cpu(const at::Tensor& scores, const at::Tensor& groups,
                                const at::Tensor& order,
                                const std::optional<at::Tensor>& batch_order,
                                const std::optional<at::Tensor>& lengths,
                                const std::optional<at::Tensor>& baselines,
                                c10::string_view baseline, c10::string_view scale, bool unbiased,
                                double eps, bool clamp_eps, bool singleton_raw, bool ignore_nan,
                                bool nonzero_rescale) {
  const GroupProblem p = prepare_group_advantages(
      scores, groups, order, batch_order, lengths, baselines, std::string(baseline),
      std::string(scale), unbiased, eps, clamp_eps, singleton_raw, ignore_nan, nonzero_rescale);
  at::Tensor out = at::empty(p.scores.sizes(), p.scores.options());
  AT_DISPATCH_FLOATING_TYPES(p.scores.scalar_type(), "rlhf_ext.group_advantages", [&] {
    for (int64_t k = 0; k < p.components; ++k) {
      group_component_cpu<scalar_t>(p, k, out.data_ptr<scalar_t>());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CPU, m) {
  m.impl("group_advantages", &group_advantages_cpu);
}

}  // namespace rlhf_ext
