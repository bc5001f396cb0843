// masked_mean and masked_whiten on the CPU: per-chunk Welford moments in
// parallel, merged per row in chunk order (Chan), so the result does not depend
// on the thread count or on the other rows.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu_parallel.h"
#include "rlhf_ext/moments.h"
#include "rlhf_ext/stats_host.h"

namespace rlhf_ext {
namespace {

// Per-row moments of p.x (masked), merged in double.
template <typename scalar_t>
std::vector<Moments<double>> row_moments_cpu(const RowsProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t chunks = moments_chunks(p.cols);
  std::vector<Moments<acc_t>> partial(p.rows * chunks, moments_empty<acc_t>());
  const scalar_t* x = p.x.data_ptr<scalar_t>();
  const bool* mask = p.mask.defined() ? p.mask.data_ptr<bool>() : nullptr;
  const int64_t chunk_elements = std::min(p.cols, kMomentsChunk);
  parallel_over(p.rows * chunks, chunk_elements, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / chunks;
      const int64_t lo = (task % chunks) * kMomentsChunk;
      const int64_t hi = std::min(lo + kMomentsChunk, p.cols);
      Moments<acc_t> m = moments_empty<acc_t>();
      for (int64_t c = lo; c < hi; ++c) {
        const int64_t i = row * p.cols + c;
        if (!mask || mask[i]) moments_push(m, static_cast<acc_t>(x[i]));
      }
      partial[task] = m;
    }
  });
  std::vector<Moments<double>> rows(p.rows, moments_empty<double>());
  for (int64_t row = 0; row < p.rows; ++row) {
    for (int64_t c = 0; c < chunks; ++c) {
      const Moments<acc_t>& m = partial[row * chunks + c];
      rows[row] = moments_merge(rows[row], Moments<double>{m.count, m.mean, m.m2});
    }
  }
  return rows;
}

std::tuple<at::Tensor, at::Tensor> masked_mean_cpu(const at::Tensor& x,
                                                   const std::optional<at::Tensor>& mask,
                                                   std::optional<int64_t> dim) {
  const RowsProblem p = prepare_rows("rlhf_ext.masked_mean", x, mask, dim);
  const auto options = x.options().dtype(p.acc_dtype);
  at::Tensor mean = at::empty({p.rows}, options);
  at::Tensor count = at::empty({p.rows}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "rlhf_ext.masked_mean", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto rows = row_moments_cpu<scalar_t>(p);
    acc_t* mean_out = mean.data_ptr<acc_t>();
    acc_t* count_out = count.data_ptr<acc_t>();
    for (int64_t r = 0; r < p.rows; ++r) {
      mean_out[r] = static_cast<acc_t>(rows[r].mean);
      count_out[r] = static_cast<acc_t>(rows[r].count);
    }
  });
  const auto shape = reduced_shape(x, dim);
  return {mean.reshape(shape), count.reshape(shape)};
}

std::tuple<at::Tensor, at::Tensor> masked_whiten_cpu(const at::Tensor& x,
                                                     const std::optional<at::Tensor>& mask,
                                                     bool shift_mean, bool unbiased, double eps) {
  const RowsProblem p = prepare_rows("rlhf_ext.masked_whiten", x, mask, std::nullopt);
  const auto options = x.options().dtype(p.acc_dtype);
  at::Tensor out = at::empty(x.sizes(), options);
  at::Tensor count = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "rlhf_ext.masked_whiten", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Moments<double> m = row_moments_cpu<scalar_t>(p)[0];
    const acc_t mean = static_cast<acc_t>(m.mean);
    const acc_t var = static_cast<acc_t>(moments_variance(m, unbiased));
    const acc_t inv_std = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
    const scalar_t* in = p.x.data_ptr<scalar_t>();
    acc_t* dst = out.data_ptr<acc_t>();
    parallel_over(p.cols, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        dst[i] = whiten_value(static_cast<acc_t>(in[i]), mean, inv_std, shift_mean);
      }
    });
    count.fill_(m.count);
  });
  return {out, count};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CPU, m) {
  m.impl("masked_mean", &masked_mean_cpu);
  m.impl("masked_whiten", &masked_whiten_cpu);
}

}  // namespace rlhf_ext
