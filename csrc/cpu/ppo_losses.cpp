// ppo_policy_loss, value_loss, kl_loss, kl_penalty and loss_backward on the
// CPU. Level 1 (ppo_math.h) runs one row per task in parallel, summing the
// row's tokens left to right in the accumulation dtype; level 2 sums the rows'
// partials in row order in float64. Both orders are fixed, so the results do
// not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "rlhf_ext/loss_host.h"

namespace rlhf_ext {
namespace {

// Rows per parallel task: about 32k tokens.
int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(cols, 1));
}

// Tokens t of a row go to lane t % kLanes: independent accumulators (a fixed
// assignment, so the order of each sum never changes), laid out [column][lane]
// so that the compiler vectorises the lanes; the per-token math is branch-free.
constexpr int kLanes = 8;

template <typename Family, typename scalar_t, typename acc_t, bool kHasMask>
inline void loss_token(const Family& family, const scalar_t* a, const scalar_t* b,
                       const scalar_t* c, const bool* mask, int64_t i, int l, acc_t* grad,
                       acc_t (&acc)[Family::kCols][kLanes]) {
  constexpr int K = Family::kCols;
  // Masked tokens are computed too and then dropped by selects, so a NaN or inf
  // there never reaches the sums or the gradient.
  const bool valid = kHasMask ? mask[i] : true;
  const acc_t z = Family::kInputs == 3 ? static_cast<acc_t>(c[i]) : acc_t(0);
  acc_t v[K];
  const acc_t g = family.token(static_cast<acc_t>(a[i]), static_cast<acc_t>(b[i]), z, v);
  grad[i] = select_value(valid, g, acc_t(0));
  for (int k = 0; k < K; ++k) {
    const acc_t x = select_value(valid, v[k], acc_t(0));
    acc[k][l] = k == Family::kMaxCol ? max_value(acc[k][l], x) : acc[k][l] + x;
  }
}

template <typename Family, typename scalar_t, typename acc_t, bool kHasMask>
void loss_rows_cpu_impl(const Family& family, const LossProblem& p, acc_t* grad,
                        acc_t* partials) {
  constexpr int K = Family::kCols;
  const scalar_t* a = p.a.data_ptr<scalar_t>();
  const scalar_t* b = p.b.data_ptr<scalar_t>();
  const scalar_t* c = Family::kInputs == 3 ? p.c.data_ptr<scalar_t>() : nullptr;
  const bool* mask = kHasMask ? p.mask.data_ptr<bool>() : nullptr;
  at::parallel_for(0, p.rows, row_grain(p.cols), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      acc_t acc[K][kLanes] = {};
      const int64_t base = row * p.cols;
      int64_t t0 = 0;
      for (; t0 + kLanes <= p.cols; t0 += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          loss_token<Family, scalar_t, acc_t, kHasMask>(family, a, b, c, mask, base + t0 + l,
                                                        l, grad, acc);
        }
      }
      for (int l = 0; t0 + l < p.cols; ++l) {
        loss_token<Family, scalar_t, acc_t, kHasMask>(family, a, b, c, mask, base + t0 + l, l,
                                                      grad, acc);
      }
      for (int k = 0; k < K; ++k) {
        acc_t total = acc[k][0];
        for (int l = 1; l < kLanes; ++l) {
          total = k == Family::kMaxCol ? max_value(total, acc[k][l]) : total + acc[k][l];
        }
        partials[row * K + k] = total;
      }
    }
  });
}

template <typename Family, typename scalar_t, typename acc_t>
void loss_rows_cpu(const Family& family, const LossProblem& p, acc_t* grad, acc_t* partials) {
  if (p.mask.defined()) {
    loss_rows_cpu_impl<Family, scalar_t, acc_t, true>(family, p, grad, partials);
  } else {
    loss_rows_cpu_impl<Family, scalar_t, acc_t, false>(family, p, grad, partials);
  }
}

// Level 2: row order, float64.
template <typename Family, typename acc_t>
void loss_finish_cpu(const acc_t* partials, int64_t rows, LossAgg agg, double norm, acc_t* loss,
                     float* stats, acc_t* row_weight) {
  constexpr int K = Family::kCols;
  double total[K] = {};
  double mean_sum = 0, nonempty = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* part = partials + r * K;
    for (int k = 0; k < K; ++k) {
      total[k] = k == Family::kMaxCol ? std::max(total[k], double(part[k])) : total[k] + part[k];
    }
    if (part[1] > 0) {
      mean_sum += double(part[0]) / double(part[1]);
      nonempty += 1;
    }
  }
  const double tokens = total[1];
  *loss = static_cast<acc_t>(agg_loss(agg, total[0], mean_sum, tokens, nonempty, norm));
  for (int k = 2; k < K; ++k) {
    const double value = k == Family::kMaxCol ? total[k] : (tokens > 0 ? total[k] / tokens : 0.0);
    stats[k - 2] = static_cast<float>(value);
  }
  for (int64_t r = 0; r < rows; ++r) {
    row_weight[r] = static_cast<acc_t>(
        agg_row_weight(agg, double(partials[r * K + 1]), tokens, nonempty, norm));
  }
}

// make(acc_t(0)) builds the level-1 family for the accumulation type.
template <typename Make>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_loss_cpu(const LossProblem& p,
                                                                         LossAgg agg,
                                                                         double norm,
                                                                         const Make& make) {
  LossOutputs out = allocate_loss_outputs(p, decltype(make(0.f))::kCols);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.a.scalar_type(), "rlhf_ext.loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto family = make(acc_t(0));
    using F = std::decay_t<decltype(family)>;
    loss_rows_cpu<F, scalar_t, acc_t>(family, p, out.grad.data_ptr<acc_t>(),
                                      out.partials.data_ptr<acc_t>());
    loss_finish_cpu<F, acc_t>(out.partials.data_ptr<acc_t>(), p.rows, agg, norm,
                              out.loss.data_ptr<acc_t>(), out.stats.data_ptr<float>(),
                              out.row_weight.data_ptr<acc_t>());
  });
  return {out.loss, out.stats, out.grad, out.row_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const std::optional<at::Tensor>& mask, double clip_eps, double clip_eps_high,
    double dual_clip, c10::string_view agg, double loss_scale_factor) {
  constexpr const char* op = "rlhf_ext.ppo_policy_loss";
  const LossAgg mode = parse_agg_or_throw(op, std::string(agg));
  const LossProblem p = prepare_loss(op, logprobs, "logprobs", old_logprobs, "old_logprobs",
                                     &advantages, "advantages", mask);
  return run_loss_cpu(p, mode, norm_factor(loss_scale_factor, p.cols), [&](auto zero) {
                                      using T = decltype(zero);
                                      return PolicyFamily<T>{T(1.0 - clip_eps),
                                                             T(1.0 + clip_eps_high), T(dual_clip)};
                                    });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> value_loss_cpu(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
    const std::optional<at::Tensor>& mask, double clip_eps, c10::string_view agg) {
  constexpr const char* op = "rlhf_ext.value_loss";
  const LossAgg mode = parse_agg_or_throw(op, std::string(agg));
  const LossProblem p =
      prepare_loss(op, values, "values", old_values, "old_values", &returns, "returns", mask);
  return run_loss_cpu(p, mode, norm_factor(0, p.cols), [&](auto zero) {
    using T = decltype(zero);
    return ValueFamily<T>{T(clip_eps)};
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_loss_cpu(
    const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
    const std::optional<at::Tensor>& mask, c10::string_view kind, c10::string_view agg) {
  constexpr const char* op = "rlhf_ext.kl_loss";
  const KLSpec spec = parse_kind_or_throw(op, std::string(kind));
  const LossAgg mode = parse_agg_or_throw(op, std::string(agg));
  const LossProblem p = prepare_loss(op, logprobs, "logprobs", ref_logprobs, "ref_logprobs",
                                     nullptr, "", mask);
  const double norm = norm_factor(0, p.cols);
  // One instantiation per kind: the per-token switch folds away.
  auto run = [&](auto kind, auto straight_through) {
    return run_loss_cpu(p, mode, norm, [&](auto zero) {
      return KLFixedFamily<decltype(zero), decltype(kind)::value, decltype(straight_through)::value>{};
    });
  };
  auto with_kind = [&](auto straight_through) {
    switch (spec.kind) {
      case KLKind::kK1:
        return run(std::integral_constant<KLKind, KLKind::kK1>{}, straight_through);
      case KLKind::kAbs:
        return run(std::integral_constant<KLKind, KLKind::kAbs>{}, straight_through);
      case KLKind::kK2:
        return run(std::integral_constant<KLKind, KLKind::kK2>{}, straight_through);
      case KLKind::kK3:
      default:
        return run(std::integral_constant<KLKind, KLKind::kK3>{}, straight_through);
    }
  };
  return spec.straight_through ? with_kind(std::true_type{}) : with_kind(std::false_type{});
}

std::tuple<at::Tensor, at::Tensor> kl_penalty_cpu(const at::Tensor& logprobs,
                                                  const at::Tensor& ref_logprobs,
                                                  c10::string_view kind) {
  constexpr const char* op = "rlhf_ext.kl_penalty";
  const KLSpec spec = parse_kind_or_throw(op, std::string(kind));
  check_floating(op, "logprobs", logprobs);
  check_floating(op, "ref_logprobs", ref_logprobs);
  check_same_device(op, "ref_logprobs", ref_logprobs, logprobs);
  check_same_shape(op, "ref_logprobs", ref_logprobs, logprobs, "logprobs");
  TORCH_CHECK_TYPE(ref_logprobs.scalar_type() == logprobs.scalar_type(), op,
                   ": `ref_logprobs` must have the dtype of `logprobs` (", logprobs.scalar_type(),
                   "), got ", ref_logprobs.scalar_type());
  const at::Tensor lp = logprobs.contiguous();
  const at::Tensor ref = ref_logprobs.contiguous();
  const auto acc = logprobs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor value = at::empty(logprobs.sizes(), logprobs.options().dtype(acc));
  at::Tensor grad = at::empty(logprobs.sizes(), logprobs.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lp.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = lp.data_ptr<scalar_t>();
    const scalar_t* y = ref.data_ptr<scalar_t>();
    acc_t* v = value.data_ptr<acc_t>();
    acc_t* g = grad.data_ptr<acc_t>();
    at::parallel_for(0, lp.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t l = static_cast<acc_t>(x[i]);
        const acc_t r = static_cast<acc_t>(y[i]);
        acc_t grad_i;
        v[i] = kl_value_and_grad(spec.kind, spec.straight_through, l, r, &grad_i);
        g[i] = grad_i;
      }
    });
  });
  return {value, grad};
}

at::Tensor loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& grad,
                             const at::Tensor& row_weight, at::ScalarType dtype) {
  check_loss_backward(grad_loss, grad, row_weight);
  const at::Tensor g = grad.contiguous();
  const at::Tensor w = row_weight.to(g.scalar_type()).contiguous();
  at::Tensor out = at::empty(g.sizes(), g.options().dtype(dtype));
  const int64_t rows = g.size(0), cols = g.size(1);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "rlhf_ext.loss_backward", [&] {
    using acc_t = scalar_t;
    const acc_t up = grad_loss.to(g.scalar_type()).item<acc_t>();  // CPU: no device sync
    const acc_t* gp = g.data_ptr<acc_t>();
    const acc_t* wp = w.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rlhf_ext.loss_backward",
                                    [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const acc_t scale = up * wp[r];
          for (int64_t t = 0; t < cols; ++t) {
            o[r * cols + t] = static_cast<scalar_t>(gp[r * cols + t] * scale);
          }
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CPU, m) {
  m.impl("ppo_policy_loss", &ppo_policy_loss_cpu);
  m.impl("value_loss", &value_loss_cpu);
  m.impl("kl_loss", &kl_loss_cpu);
  m.impl("kl_penalty", &kl_penalty_cpu);
  m.impl("loss_backward", &loss_backward_cpu);
}

}  // namespace rlhf_ext
