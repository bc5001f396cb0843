// kl_shaped_rewards on the CPU: -kl_coef * kl_t at every valid token, plus the
// sequence score at each row's last valid token; 0 at masked positions.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_parallel.h"
#include "rlhf_ext/kl.h"
#include "rlhf_ext/stats_host.h"

namespace rlhf_ext {
namespace {

template <typename scalar_t, typename acc_t>
void shaped_rewards_rows_cpu(const ShapedRewardsProblem& p, acc_t kl_coef, acc_t* out) {
  const scalar_t* lp = p.logprobs.data_ptr<scalar_t>();
  const scalar_t* ref = p.ref_logprobs.data_ptr<scalar_t>();
  const acc_t* scores = p.scores.data_ptr<acc_t>();
  const bool* mask = p.mask.defined() ? p.mask.data_ptr<bool>() : nullptr;
  parallel_over(p.rows, p.cols, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * p.cols;
      int64_t last = -1;
      for (int64_t t = 0; t < p.cols; ++t) {
        const bool valid = !mask || mask[base + t];
        if (valid) last = t;
        out[base + t] = valid ? -kl_coef * kl_value<acc_t>(p.kind, static_cast<acc_t>(lp[base + t]),
                                                           static_cast<acc_t>(ref[base + t]))
                              : acc_t(0);
      }
      if (last >= 0) out[base + last] += scores[row];
    }
  });
}

at::Tensor kl_shaped_rewards_cpu(const at::Tensor& scores, const at::Tensor& logprobs,
                                 const at::Tensor& ref_logprobs,
                                 const std::optional<at::Tensor>& mask, double kl_coef,
                                 c10::string_view kl) {
  const ShapedRewardsProblem p =
      prepare_shaped_rewards(scores, logprobs, ref_logprobs, mask, std::string(kl));
  at::Tensor out = at::empty(logprobs.sizes(), logprobs.options().dtype(p.acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logprobs.scalar_type(),
                                  "rlhf_ext.kl_shaped_rewards", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    shaped_rewards_rows_cpu<scalar_t, acc_t>(p, static_cast<acc_t>(kl_coef),
                                             out.data_ptr<acc_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CPU, m) {
  m.impl("kl_shaped_rewards", &kl_shaped_rewards_cpu);
}

}  // namespace rlhf_ext
