// policy_loss, value_loss, kl_loss, kl_penalty and loss_backward on the
// CPU. Level 1 (ppo_math.h) runs rows in parallel; the sequence kinds first sum
// the row's log-ratios in one pass (the row prologue); a row's tokens go through
// in blocks: inputs converted into L1 buffers, every token's contributions
// computed by one branch-free loop that vectorises (exp_math.h), then summed
// into kLanes accumulators per column (token t into lane t % kLanes) and the
// lanes added in a fixed tree. Level 2 sums the rows' partials in row order in
// float64. Every order depends on T alone, so the results do not depend on
// the thread count or on a row's batch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "cpu_isa.h"
#include "cpu_parallel.h"
#include "rlhf_ext/loss_host.h"

namespace rlhf_ext {
namespace {

constexpr int64_t kBlock = 512;  // tokens per block: the buffers stay in L1
constexpr int64_t kLanes = 16;   // accumulators per column, a multiple of any SIMD width

RLHF_INLINE int64_t round_up_lanes(int64_t n) {
  return (n + kLanes - 1) / kLanes * kLanes;
}

template <typename Family, typename scalar_t, typename acc_t>
struct LossRowsArgs {
  Family family;
  const scalar_t* a;
  const scalar_t* b;
  const scalar_t* c;  // nullptr for two-input families
  const uint8_t* mask;  // bool bytes; nullptr: every token valid
  int64_t cols;
  bool c_per_row;  // c is [B]: one value for every token of a row
  acc_t* grad;
  acc_t* partials;  // [rows, kCols]
};

// Converts n inputs into buf and pads it to whole lane groups with 0 (a finite
// value: the padding is computed like a token, then dropped as invalid).
template <typename scalar_t, typename acc_t>
RLHF_INLINE void load_block(const scalar_t* src, int64_t n, acc_t* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
  for (int64_t i = n; i < round_up_lanes(n); ++i) buf[i] = acc_t(0);
}

// valid[i] = 1 or 0 in acc_t: GCC vectorises selects on a float compare, not on
// a bool array. The mask is read as bytes for the same reason.
template <typename acc_t>
RLHF_INLINE void load_valid(const uint8_t* mask, int64_t n, acc_t* valid) {
  if (mask == nullptr) {
    for (int64_t i = 0; i < n; ++i) valid[i] = acc_t(1);
  } else {
    for (int64_t i = 0; i < n; ++i) valid[i] = static_cast<acc_t>(mask[i]);
  }
  for (int64_t i = n; i < round_up_lanes(n); ++i) valid[i] = acc_t(0);
}

// Token i of a block goes to lane i % kLanes. One loop per kind of column, so
// that each is a plain vector loop.
// buf[0, round_up_lanes(n)) = value (a per-row input broadcast over the block).
template <typename scalar_t, typename acc_t>
RLHF_INLINE void fill_block(scalar_t value, int64_t n, acc_t* buf) {
  const acc_t v = static_cast<acc_t>(value);
  for (int64_t i = 0; i < round_up_lanes(n); ++i) buf[i] = v;
}

template <typename acc_t>
RLHF_INLINE void add_into_lanes(const acc_t* contrib, int64_t padded, acc_t* lanes) {
  for (int64_t i = 0; i < padded; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += contrib[i + l];
  }
}

template <typename acc_t>
RLHF_INLINE void max_into_lanes(const acc_t* contrib, int64_t padded, acc_t* lanes) {
  for (int64_t i = 0; i < padded; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = max_value(lanes[l], contrib[i + l]);
  }
}

// Adds the lanes of each column in a fixed tree (max for column kMaxCol);
// lanes[k][0] holds the result.
template <int kMaxCol, int K, typename acc_t>
RLHF_INLINE void reduce_lanes(acc_t (&lanes)[K][kLanes]) {
  for (int k = 0; k < K; ++k) {
    for (int64_t width = kLanes / 2; width > 0; width /= 2) {
      for (int64_t l = 0; l < width; ++l) {
        lanes[k][l] = k == kMaxCol ? max_value(lanes[k][l], lanes[k][l + width])
                                           : lanes[k][l] + lanes[k][l + width];
      }
    }
  }
}

// The row prologue: the mean of a - b over the row's valid tokens (0 for none),
// summed in lanes and a fixed tree like the row's partials.
template <typename Family, typename scalar_t, typename acc_t>
RLHF_INLINE acc_t row_mean_difference(const LossRowsArgs<Family, scalar_t, acc_t>& args,
                                      int64_t row, acc_t* a, acc_t* b, acc_t* valid) {
  acc_t lanes[2][kLanes] = {};
  for (int64_t start = 0; start < args.cols; start += kBlock) {
    const int64_t at = row * args.cols + start;
    const int64_t n = std::min(kBlock, args.cols - start);
    load_block(args.a + at, n, a);
    load_block(args.b + at, n, b);
    load_valid(args.mask ? args.mask + at : nullptr, n, valid);
    for (int64_t i = 0; i < round_up_lanes(n); i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const bool is_valid = valid[i + l] != acc_t(0);
        lanes[0][l] += select_value(is_valid, a[i + l] - b[i + l], acc_t(0));
        lanes[1][l] += valid[i + l];
      }
    }
  }
  reduce_lanes<-1, 2>(lanes);
  return lanes[0][0] / std::max(lanes[1][0], acc_t(1));
}

template <typename Family, typename scalar_t, typename acc_t>
RLHF_INLINE void process_rows(const LossRowsArgs<Family, scalar_t, acc_t>& args, int64_t begin,
                              int64_t end) {
  constexpr int K = Family::kCols;
  alignas(64) acc_t in[3][kBlock];
  alignas(64) acc_t valid[kBlock];
  alignas(64) acc_t grad[kBlock];
  alignas(64) acc_t contrib[K][kBlock];
  for (int64_t row = begin; row < end; ++row) {
    // 0 is also the identity of the max column (ratios are > 0).
    acc_t lanes[K][kLanes] = {};
    const acc_t row_mean =
        args.family.needs_row_mean() ? row_mean_difference(args, row, in[0], in[1], valid)
                                     : acc_t(0);
    for (int64_t start = 0; start < args.cols; start += kBlock) {
      const int64_t at = row * args.cols + start;
      const int64_t n = std::min(kBlock, args.cols - start);
      const int64_t padded = round_up_lanes(n);
      load_block(args.a + at, n, in[0]);
      load_block(args.b + at, n, in[1]);
      if (Family::kInputs == 3) {
        if (args.c_per_row) {
          fill_block(args.c[row], n, in[2]);
        } else {
          load_block(args.c + at, n, in[2]);
        }
      }
      load_valid(args.mask ? args.mask + at : nullptr, n, valid);
      // Masked tokens are computed too and then dropped by selects, so a NaN or
      // inf there never reaches the sums or the gradient.
      for (int64_t i = 0; i < padded; ++i) {
        acc_t v[K];
        const acc_t z = Family::kInputs == 3 ? in[2][i] : acc_t(0);
        const acc_t g = args.family.token(in[0][i], in[1][i], z, row_mean, v);
        const bool is_valid = valid[i] != acc_t(0);
        grad[i] = select_value(is_valid, g, acc_t(0));
        for (int k = 0; k < K; ++k) contrib[k][i] = select_value(is_valid, v[k], acc_t(0));
      }
      for (int k = 0; k < K; ++k) {
        if (k == Family::kMaxCol) {
          max_into_lanes(contrib[k], padded, lanes[k]);
        } else {
          add_into_lanes(contrib[k], padded, lanes[k]);
        }
      }
      std::copy(grad, grad + n, args.grad + at);
    }
    reduce_lanes<Family::kMaxCol, K>(lanes);
    for (int k = 0; k < K; ++k) args.partials[row * K + k] = lanes[k][0];
  }
}

RLHF_EXT_ISA_CLONES(process_rows)

template <typename Family, typename scalar_t, typename acc_t>
void loss_rows_cpu(const Family& family, const LossProblem& p, acc_t* grad, acc_t* partials) {
  using Args = LossRowsArgs<Family, scalar_t, acc_t>;
  const Args args{family,
                  p.a.data_ptr<scalar_t>(),
                  p.b.data_ptr<scalar_t>(),
                  Family::kInputs == 3 ? p.c.data_ptr<scalar_t>() : nullptr,
                  p.mask.defined() ? reinterpret_cast<const uint8_t*>(p.mask.data_ptr<bool>()) : nullptr,
                  p.cols,
                  p.c_per_row,
                  grad,
                  partials};
  const RangeLoop<Args> loop =
      best_loop<Args>(&process_rows, &process_rows_avx2<Args>, &process_rows_avx512<Args>);
  parallel_over(p.rows, p.cols, [&](int64_t begin, int64_t end) { loop(args, begin, end); });
}

// Row r's partials in float64, after the family's finish_row.
template <typename Family, typename acc_t>
RLHF_INLINE void load_row(const Family& family, const acc_t* partials, int64_t r,
                          double (&row)[Family::kCols]) {
  for (int k = 0; k < Family::kCols; ++k) row[k] = double(partials[r * Family::kCols + k]);
  family.finish_row(row);
}

// Level 2: row order, float64.
template <typename Family, typename acc_t>
void loss_finish_cpu(const Family& family, const acc_t* partials, int64_t rows, LossAgg agg,
                     double norm, acc_t* loss, float* stats, acc_t* row_weight) {
  constexpr int K = Family::kCols;
  double total[K] = {};
  double mean_sum = 0, nonempty = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double part[K];
    load_row(family, partials, r, part);
    for (int k = 0; k < K; ++k) {
      total[k] = k == Family::kMaxCol ? max_value(total[k], double(part[k])) : total[k] + part[k];
    }
    if (part[1] > 0) {
      mean_sum += double(part[0]) / double(part[1]);
      nonempty += 1;
    }
  }
  const double tokens = total[1];
  *loss = static_cast<acc_t>(agg_loss(agg, total[0], mean_sum, tokens, nonempty, norm));
  for (int k = 2; k < 2 + Family::kStats; ++k) {
    const double value = k == Family::kMaxCol ? total[k] : (tokens > 0 ? total[k] / tokens : 0.0);
    stats[k - 2] = static_cast<float>(value);
  }
  for (int64_t r = 0; r < rows; ++r) {
    double part[K];
    load_row(family, partials, r, part);
    const double w = agg_row_weight(agg, part[1], tokens, nonempty, norm) * family.row_factor(part);
    row_weight[r] = static_cast<acc_t>(w);
  }
}

// make(acc_t(0)) builds the level-1 family for the accumulation type.
template <typename Make>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_loss_cpu(const LossProblem& p,
                                                                         LossAgg agg,
                                                                         double norm,
                                                                         const Make& make) {
  using FloatFamily = decltype(make(0.f));
  LossOutputs out = allocate_loss_outputs(p, FloatFamily::kCols, FloatFamily::kStats);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.a.scalar_type(), "rlhf_ext.loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto family = make(acc_t(0));
    using F = std::decay_t<decltype(family)>;
    loss_rows_cpu<F, scalar_t, acc_t>(family, p, out.grad.data_ptr<acc_t>(),
                                      out.partials.data_ptr<acc_t>());
    loss_finish_cpu<F, acc_t>(family, out.partials.data_ptr<acc_t>(), p.rows, agg, norm,
                              out.loss.data_ptr<acc_t>(), out.stats.data_ptr<float>(),
                              out.row_weight.data_ptr<acc_t>());
  });
  return {out.loss, out.stats, out.grad, out.row_weight};
}

// run(kind) with the kind as a compile-time constant: one instantiation per kind,
// so that the token loop is straight-line code that vectorises.
template <typename Run>
auto with_fixed_policy_kind(PolicyKind kind, const Run& run) {
#define RLHF_EXT_KIND(K) std::integral_constant<PolicyKind, PolicyKind::K>{}
  switch (kind) {
    case PolicyKind::kReinforce:
      return run(RLHF_EXT_KIND(kReinforce));
    case PolicyKind::kCISPO:
      return run(RLHF_EXT_KIND(kCISPO));
    case PolicyKind::kSAPO:
      return run(RLHF_EXT_KIND(kSAPO));
    case PolicyKind::kDPPOTV:
      return run(RLHF_EXT_KIND(kDPPOTV));
    case PolicyKind::kDPPOKL:
      return run(RLHF_EXT_KIND(kDPPOKL));
    case PolicyKind::kDRO:
      return run(RLHF_EXT_KIND(kDRO));
    case PolicyKind::kGSPO:
      return run(RLHF_EXT_KIND(kGSPO));
    case PolicyKind::kGSPOToken:
      return run(RLHF_EXT_KIND(kGSPOToken));
    case PolicyKind::kGeoMean:
      return run(RLHF_EXT_KIND(kGeoMean));
    case PolicyKind::kPPO:
    default:
      return run(RLHF_EXT_KIND(kPPO));
  }
#undef RLHF_EXT_KIND
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const std::optional<at::Tensor>& mask, c10::string_view kind, double lo, double hi,
    double dual_clip, double ratio_cap, double tau_pos, double tau_neg, double beta,
    c10::string_view agg, double loss_scale_factor) {
  constexpr const char* op = "rlhf_ext.policy_loss";
  const PolicyKind policy_kind = parse_policy_kind_or_throw(op, std::string(kind));
  const LossAgg mode = parse_agg_or_throw(op, std::string(agg));
  const LossProblem p = prepare_loss(op, logprobs, "logprobs", old_logprobs, "old_logprobs",
                                     &advantages, "advantages", mask, /*c_may_be_per_row=*/true);
  const double norm = norm_factor(loss_scale_factor, p.cols);
  return with_fixed_policy_kind(policy_kind, [&](auto fixed) {
    return run_loss_cpu(p, mode, norm, [&](auto zero) {
      using T = decltype(zero);
      const PolicyParams<T> params{T(lo),      T(hi),      T(dual_clip), T(ratio_cap),
                                   T(tau_pos), T(tau_neg), T(beta)};
      return PolicyFixedFamily<T, decltype(fixed)::value>{params};
    });
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

// run(kind, straight_through) with both as compile-time constants: one
// instantiation per kind, so that the per-token switch folds away and the
// token loops vectorise.
template <typename Run>
auto with_fixed_kind(const KLSpec& spec, const Run& run) {
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_loss_cpu(
    const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
    const std::optional<at::Tensor>& mask, c10::string_view kind, c10::string_view agg) {
  constexpr const char* op = "rlhf_ext.kl_loss";
  const KLSpec spec = parse_kl_or_throw(op, "kind", std::string(kind));
  const LossAgg mode = parse_agg_or_throw(op, std::string(agg));
  const LossProblem p = prepare_loss(op, logprobs, "logprobs", ref_logprobs, "ref_logprobs",
                                     nullptr, "", mask);
  const double norm = norm_factor(0, p.cols);
  return with_fixed_kind(spec, [&](auto kind, auto straight_through) {
    return run_loss_cpu(p, mode, norm, [&](auto zero) {
      return KLFixedFamily<decltype(zero), decltype(kind)::value, decltype(straight_through)::value>{};
    });
  });
}

template <typename Family, typename scalar_t, typename acc_t>
struct KLPenaltyArgs {
  const scalar_t* logprobs;
  const scalar_t* ref;
  acc_t* value;
  acc_t* grad;
};

template <typename Family, typename scalar_t, typename acc_t>
RLHF_INLINE void kl_penalty_range(const KLPenaltyArgs<Family, scalar_t, acc_t>& args,
                                  int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    acc_t v[Family::kCols];
    args.grad[i] = Family{}.token(static_cast<acc_t>(args.logprobs[i]),
                                  static_cast<acc_t>(args.ref[i]), acc_t(0), acc_t(0), v);
    args.value[i] = v[0];
  }
}

RLHF_EXT_ISA_CLONES(kl_penalty_range)

std::tuple<at::Tensor, at::Tensor> kl_penalty_cpu(const at::Tensor& logprobs,
                                                  const at::Tensor& ref_logprobs,
                                                  c10::string_view kind) {
  constexpr const char* op = "rlhf_ext.kl_penalty";
  const KLSpec spec = parse_kl_or_throw(op, "kind", std::string(kind));
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
    with_fixed_kind(spec, [&](auto kind, auto straight_through) {
      using Family =
          KLFixedFamily<acc_t, decltype(kind)::value, decltype(straight_through)::value>;
      using Args = KLPenaltyArgs<Family, scalar_t, acc_t>;
      const Args args{lp.data_ptr<scalar_t>(), ref.data_ptr<scalar_t>(), value.data_ptr<acc_t>(),
                      grad.data_ptr<acc_t>()};
      const RangeLoop<Args> loop = best_loop<Args>(
          &kl_penalty_range, &kl_penalty_range_avx2<Args>, &kl_penalty_range_avx512<Args>);
      parallel_over(lp.numel(), 1, [&](int64_t begin, int64_t end) { loop(args, begin, end); });
      return 0;
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
      parallel_over(rows, cols, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const acc_t scale = up * wp[r];
          for (int64_t t = 0; t < cols; ++t) {
            const acc_t g = gp[r * cols + t];
            o[r * cols + t] = static_cast<scalar_t>(backward_value(g, up, scale));
          }
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CPU, m) {
  m.impl("policy_loss", &policy_loss_cpu);
  m.impl("value_loss", &value_loss_cpu);
  m.impl("kl_loss", &kl_loss_cpu);
  m.impl("kl_penalty", &kl_penalty_cpu);
  m.impl("loss_backward", &loss_backward_cpu);
}

}  // namespace rlhf_ext
