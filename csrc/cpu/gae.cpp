// GAE on the CPU: the sequential right-to-left loop of gae_math.h, rows in
// parallel (cpu_parallel.h: OpenMP through at::parallel_for, above a minimum task size).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_parallel.h"
#include "rlhf_ext/gae_host.h"
#include "rlhf_ext/gae_math.h"

namespace rlhf_ext {
namespace {

template <typename scalar_t, typename acc_t>
void gae_rows_cpu(const GaeProblem& p, acc_t* advantages, acc_t* returns) {
  const scalar_t* rewards = p.rewards.data_ptr<scalar_t>();
  const scalar_t* values = p.values.data_ptr<scalar_t>();
  const bool* mask = data_or_null<bool>(p.mask);
  const int64_t* cu = data_or_null<int64_t>(p.cu_seqlens);
  const acc_t* last_value = data_or_null<acc_t>(p.last_value);
  const acc_t* gamma_rows = data_or_null<acc_t>(p.gamma_rows);
  const acc_t* lam_rows = data_or_null<acc_t>(p.lam_rows);
  // packed rows: chunks of rows by their mean length
  const int64_t row_elements = cu ? p.total / std::max<int64_t>(p.rows, 1) : p.row_len;
  parallel_over(p.rows, row_elements, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t start = cu ? cu[row] : row * p.row_len;
      const int64_t stop = cu ? cu[row + 1] : start + p.row_len;
      const acc_t gamma = gamma_rows ? gamma_rows[row] : static_cast<acc_t>(p.gamma);
      const acc_t lam = lam_rows ? lam_rows[row] : static_cast<acc_t>(p.lam);
      GaeCarry<acc_t> carry{last_value ? last_value[row] : acc_t(0), acc_t(0)};
      for (int64_t i = stop - 1; i >= start; --i) {
        gae_step<acc_t>(carry, mask ? mask[i] : true, static_cast<acc_t>(rewards[i]),
                        static_cast<acc_t>(values[i]), gamma, lam, advantages + i, returns + i);
      }
    }
  });
}

// cu_seqlens are checked here (cheaply, on the host) so that a bad one can
// never index outside the inputs.
void check_cu_seqlens_cpu(const GaeProblem& p) {
  if (!p.cu_seqlens.defined()) return;
  const int64_t* cu = p.cu_seqlens.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(cu[0] == 0, "rlhf_ext.gae: `cu_seqlens` must start at 0, got ", cu[0]);
  for (int64_t b = 0; b < p.rows; ++b) {
    TORCH_CHECK_VALUE(cu[b + 1] >= cu[b], "rlhf_ext.gae: `cu_seqlens` must be non-decreasing, got ",
                      cu[b + 1], " after ", cu[b], " at index ", b + 1);
  }
  TORCH_CHECK_VALUE(cu[p.rows] == p.total, "rlhf_ext.gae: `cu_seqlens` must end at the number of "
                    "tokens ", p.total, ", got ", cu[p.rows]);
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const std::optional<at::Tensor>& mask,
                                           const std::optional<at::Tensor>& cu_seqlens,
                                           const std::optional<at::Tensor>& last_value,
                                           const std::optional<at::Tensor>& gamma_rows,
                                           const std::optional<at::Tensor>& lam_rows,
                                           double gamma, double lam) {
  const GaeProblem p =
      prepare_gae(rewards, values, mask, cu_seqlens, last_value, gamma_rows, lam_rows, gamma, lam);
  check_cu_seqlens_cpu(p);
  auto [advantages, returns] = gae_outputs(p, rewards);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.rewards.scalar_type(),
                                  "rlhf_ext.gae", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gae_rows_cpu<scalar_t, acc_t>(p, advantages.data_ptr<acc_t>(), returns.data_ptr<acc_t>());
  });
  return {advantages, returns};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CPU, m) {
  m.impl("gae", &gae_cpu);
}

}  // namespace rlhf_ext
