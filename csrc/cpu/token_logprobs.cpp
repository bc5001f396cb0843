// token_logprobs on the CPU: rows in parallel (at::parallel_for); each row is
// read once, in chunks of kChunk elements converted to acc_t in an L1-resident
// buffer. A chunk's max is found first, then its exp-sums relative to it, and
// the chunk merged into the row's running state (softmax_math.h). The order
// of every sum depends only on V, so a row gives the same bits in any batch.
//
// The row loops are compiled for the baseline x86-64, AVX2 and AVX-512 and
// picked at run time (cpu_isa.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cpu_isa.h"
#include "cpu_parallel.h"
#include "rlhf_ext/logit_transform.h"
#include "rlhf_ext/logprobs_host.h"
#include "rlhf_ext/softmax_math.h"

namespace rlhf_ext {
namespace {

constexpr int64_t kChunk = 2048;  // floats: 8 KiB, stays in L1 with the row's input
constexpr int64_t kLanes = 16;    // independent accumulators, a multiple of any SIMD width

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

RLHF_INLINE int64_t round_up_lanes(int64_t n) {
  return (n + kLanes - 1) / kLanes * kLanes;
}

// Converts n elements into buf and pads it to a whole number of lane groups
// with -inf, which every sum below treats as "no element".
template <typename scalar_t, typename acc_t>
RLHF_INLINE void load_chunk(const scalar_t* src, int64_t n, acc_t* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
  for (int64_t i = n; i < round_up_lanes(n); ++i) buf[i] = kNegInf<acc_t>;
}

// Max over the chunk. NaN-blind: a NaN logit still reaches the results
// through its exponential.
template <typename acc_t>
RLHF_INLINE acc_t chunk_max(const acc_t* buf, int64_t padded) {
  acc_t lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = kNegInf<acc_t>;
  for (int64_t i = 0; i < padded; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = buf[i + l] > lanes[l] ? buf[i + l] : lanes[l];
  }
  acc_t m = lanes[0];
  for (int64_t l = 1; l < kLanes; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

// Lane sums added pairwise, in a fixed tree.
template <typename acc_t>
RLHF_INLINE acc_t sum_lanes(acc_t* lanes) {
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

// The softcap over the chunk's n real elements (the -inf padding after them stays); with
// `slope`, also dy/dx of each. Branch-free loops over tanh_with_slope: they vectorise.
template <typename acc_t>
RLHF_INLINE void squash_chunk(const LogitTransform<acc_t>& tf, acc_t* buf, int64_t n,
                              acc_t* slope = nullptr) {
  const acc_t cap = tf.cap, cap_in = tf.cap_in, cap_scale = tf.cap_scale;
  if (slope == nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      acc_t unused;
      buf[i] = cap * tanh_with_slope(buf[i] * cap_in, unused);
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    acc_t dtanh;
    buf[i] = cap * tanh_with_slope(buf[i] * cap_in, dtanh);
    slope[i] = cap_scale * dtanh;
  }
}

// chunk_state and, in `sum_sq`, the sum of the squares of its exponentials (relative to the
// same max): the softmax at twice the multiplier, without a second exponential per element.
template <typename acc_t>
RLHF_INLINE SoftmaxState<acc_t> chunk_state_and_squares(const acc_t* buf, int64_t padded,
                                                        acc_t scale_log2, acc_t& sum_sq) {
  const acc_t m = chunk_max(buf, padded);
  const acc_t base = m == kNegInf<acc_t> ? acc_t(0) : m;
  acc_t sum_exp[kLanes] = {}, sum_shift[kLanes] = {}, squares[kLanes] = {};
  for (int64_t i = 0; i < padded; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      softmax_add_with_square(buf[i + l], base, scale_log2, sum_exp[l], sum_shift[l],
                              squares[l]);
    }
  }
  sum_sq = sum_lanes(squares);
  return {m, sum_lanes(sum_exp), sum_lanes(sum_shift)};
}

template <typename acc_t>
RLHF_INLINE SoftmaxState<acc_t> chunk_state(const acc_t* buf, int64_t padded, acc_t scale_log2) {
  const acc_t m = chunk_max(buf, padded);
  // An all -inf chunk sums to 0 relative to any base (NaN if it holds a NaN),
  // and a state with no positive sum adds nothing when merged.
  const acc_t base = m == kNegInf<acc_t> ? acc_t(0) : m;
  acc_t sum_exp[kLanes] = {}, sum_shift[kLanes] = {};
  for (int64_t i = 0; i < padded; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      softmax_add(buf[i + l], base, scale_log2, sum_exp[l], sum_shift[l]);
    }
  }
  return {m, sum_lanes(sum_exp), sum_lanes(sum_shift)};
}

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  const scalar_t* logits;
  RowLayout layout;
  int64_t vocab;
  const int64_t* target;
  int64_t ignore_index;
  LogitTransform<acc_t> transform;
  acc_t* logprobs;
  acc_t* entropy;  // nullptr: not asked for (so the three below)
  acc_t* lse;
  acc_t* log_sum_sq;
  acc_t* mean_logits;
  bool* is_top1;
};

// The sum of a chunk's n real elements (the padding after them is overwritten), in lanes
// and a fixed tree.
template <typename acc_t>
RLHF_INLINE acc_t chunk_sum(acc_t* buf, int64_t n) {
  const int64_t padded = round_up_lanes(n);
  for (int64_t i = n; i < padded; ++i) buf[i] = acc_t(0);
  acc_t lanes[kLanes] = {};
  for (int64_t i = 0; i < padded; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += buf[i + l];
  }
  return sum_lanes(lanes);
}

// The extra outputs' running values over a row (token_logprobs' `outputs=`): the softmax
// at twice the multiplier (its log-sum-exp is log sum exp(2 z): log sum p^2 = that - 2 lse),
// the sum of y, and the largest y before the target (is_top1: ties go to the first index,
// as argmax).
template <typename acc_t>
struct RowExtras {
  SoftmaxState<acc_t> doubled = softmax_empty<acc_t>();
  acc_t sum = acc_t(0);
  acc_t max_before = kNegInf<acc_t>;
};

template <typename scalar_t, typename acc_t>
RLHF_INLINE void process_rows(const ForwardArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  alignas(64) acc_t buf[kChunk];
  const LogitTransform<acc_t>& tf = a.transform;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t tgt = a.target[row];
    if (tgt == a.ignore_index) {  // no work, and exact zeros
      a.logprobs[row] = 0;
      if (a.entropy) a.entropy[row] = 0;
      a.lse[row] = 0;
      if (a.log_sum_sq) a.log_sum_sq[row] = 0;
      if (a.mean_logits) a.mean_logits[row] = 0;
      if (a.is_top1) a.is_top1[row] = false;
      continue;
    }
    const scalar_t* x = a.logits + a.layout.offset(row);
    const acc_t mult = tf.row_mult(row);
    const acc_t scale_log2 = mult * acc_t(kLog2e);
    SoftmaxState<acc_t> state = softmax_empty<acc_t>();
    RowExtras<acc_t> extra;
    for (int64_t start = 0; start < a.vocab; start += kChunk) {
      const int64_t n = std::min(kChunk, a.vocab - start);
      load_chunk(x + start, n, buf);
      if (tf.capped()) squash_chunk(tf, buf, n);
      acc_t sum_sq = 0;
      const SoftmaxState<acc_t> chunk =
          a.log_sum_sq ? chunk_state_and_squares(buf, round_up_lanes(n), scale_log2, sum_sq)
                       : chunk_state(buf, round_up_lanes(n), scale_log2);
      state = softmax_merge(state, chunk, scale_log2);
      if (a.log_sum_sq) {  // exp2(2 s) = exp2(s)^2: the same max, its merge at 2 scale
        const SoftmaxState<acc_t> squares{chunk.max, sum_sq, acc_t(0)};
        extra.doubled = softmax_merge(extra.doubled, squares, 2 * scale_log2);
      }
      if (a.is_top1 && start < tgt) {
        if (start + n <= tgt) {
          extra.max_before = chunk.max > extra.max_before ? chunk.max : extra.max_before;
        } else {
          for (int64_t i = 0; i < tgt - start; ++i) {
            extra.max_before = buf[i] > extra.max_before ? buf[i] : extra.max_before;
          }
        }
      }
      if (a.mean_logits) extra.sum += chunk_sum(buf, n);  // last: it overwrites the padding
    }
    const acc_t lse = softmax_lse(state, mult);
    const bool in_vocab = tgt >= 0 && tgt < a.vocab;
    const acc_t y_target = in_vocab ? tf.squash(static_cast<acc_t>(x[tgt])) : acc_t(0);
    const acc_t logprob =
        in_vocab ? y_target * mult - lse : std::numeric_limits<acc_t>::quiet_NaN();
    a.logprobs[row] = logprob;
    if (a.entropy) a.entropy[row] = softmax_entropy(state, mult);
    a.lse[row] = lse_output(state, lse);
    if (a.log_sum_sq) a.log_sum_sq[row] = softmax_lse(extra.doubled, 2 * mult) - 2 * lse;
    if (a.mean_logits) a.mean_logits[row] = extra.sum * mult / static_cast<acc_t>(a.vocab);
    if (a.is_top1) {  // a row without a distribution (NaN log-prob) has no top token
      a.is_top1[row] = logprob == logprob && y_target >= state.max && y_target > extra.max_before;
    }
  }
}

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t* logits;
  RowLayout layout;
  scalar_t* grad;  // may alias logits (inplace_backward), with grad_layout == layout
  RowLayout grad_layout;
  int64_t vocab;
  VocabSlice slice;  // where these columns sit in the vocabulary
  const int64_t* target;
  int64_t ignore_index;
  LogitTransform<acc_t> transform;
  const acc_t* lse;
  const acc_t* entropy;        // nullptr when no entropy gradient flows
  const acc_t* grad_logprobs;  // nullptr: zero
  const acc_t* grad_entropy;   // nullptr: zero
  const acc_t* log_sum_sq;     // nullptr unless grad_log_sum_sq
  const acc_t* grad_lse;       // nullptr: zero (so the two below)
  const acc_t* grad_log_sum_sq;
  const acc_t* grad_mean;
};

// The row's ExtraGrad (softmax_math.h) from the extra outputs' upstream gradients.
template <typename scalar_t, typename acc_t>
RLHF_INLINE ExtraGrad<acc_t> row_extra_grad(const BackwardArgs<scalar_t, acc_t>& a, int64_t row) {
  ExtraGrad<acc_t> e;
  if (a.grad_lse) e.g_lse = a.grad_lse[row];
  if (a.grad_log_sum_sq) {
    e.g_sq2 = 2 * a.grad_log_sum_sq[row];
    e.inv_s2 = std::exp(-a.log_sum_sq[row]);
  }
  if (a.grad_mean) e.g_mean_v = a.grad_mean[row] / static_cast<acc_t>(a.slice.full_vocab);
  e.softmax_terms = a.grad_logprobs || a.grad_entropy || a.grad_lse || a.grad_log_sum_sq;
  return e;
}

template <typename scalar_t, typename acc_t>
RLHF_INLINE void process_rows(const BackwardArgs<scalar_t, acc_t>& a, int64_t begin,
                              int64_t end) {
  alignas(64) acc_t buf[kChunk];
  alignas(64) acc_t slope[kChunk];  // dy/dx of the softcap, read only with one
  const LogitTransform<acc_t>& tf = a.transform;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t tgt = a.target[row];
    const scalar_t* x = a.logits + a.layout.offset(row);
    scalar_t* g = a.grad + a.grad_layout.offset(row);
    if (tgt == a.ignore_index) {
      std::fill(g, g + a.vocab, scalar_t(0));
      continue;
    }
    const acc_t g_lp = a.grad_logprobs ? a.grad_logprobs[row] : acc_t(0);
    const acc_t g_ent = a.grad_entropy ? a.grad_entropy[row] : acc_t(0);
    const acc_t entropy = a.entropy ? a.entropy[row] : acc_t(0);
    // A target outside the vocabulary (validate=False) has no gradient: NaN, like its logprob.
    const bool in_vocab = tgt >= 0 && tgt < a.slice.full_vocab;
    const acc_t lse = in_vocab ? lse_input(a.lse[row]) : std::numeric_limits<acc_t>::quiet_NaN();
    const int64_t local_target = tgt - a.slice.offset;  // outside [0, vocab): not in this tile
    const acc_t mult = tf.row_mult(row);
    const ExtraGrad<acc_t> extra = row_extra_grad(a, row);
    for (int64_t start = 0; start < a.vocab; start += kChunk) {
      const int64_t n = std::min(kChunk, a.vocab - start);
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(x[start + i]);
      if (tf.capped()) squash_chunk(tf, buf, n, slope);
      for (int64_t i = 0; i < n; ++i) {
        buf[i] = logits_grad(buf[i], mult, lse, entropy, g_lp, g_ent, extra);
      }
      if (local_target >= start && local_target < start + n) {
        buf[local_target - start] += target_grad(g_lp, mult);
      }
      if (tf.capped()) {  // d/dx = d/dy * dy/dx
        for (int64_t i = 0; i < n; ++i) buf[i] *= slope[i];
      }
      for (int64_t i = 0; i < n; ++i) g[start + i] = static_cast<scalar_t>(buf[i]);
    }
  }
}

// The ISA-specific copies of the row loops (see cpu_isa.h).
RLHF_EXT_ISA_CLONES(process_rows)

// All rows in parallel, through the copy of the row loop this CPU can run best.
template <typename Args>
void parallel_rows(const Args& args, int64_t rows, int64_t vocab) {
  const RangeLoop<Args> loop =
      best_loop<Args>(&process_rows, &process_rows_avx2<Args>, &process_rows_avx512<Args>);
  parallel_over(rows, vocab, [&](int64_t begin, int64_t end) { loop(args, begin, end); });
}

}  // namespace

void logprobs_forward_rows_cpu(const LogprobsProblem& p, const ForwardOutputs& out) {
  if (p.rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(),
                                  "rlhf_ext.token_logprobs", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardArgs<scalar_t, acc_t> args{p.logits.data_ptr<scalar_t>(),
                                            p.layout,
                                            p.vocab,
                                            p.target.data_ptr<int64_t>(),
                                            p.ignore_index,
                                            logit_transform<acc_t>(p),
                                            out.logprobs.data_ptr<acc_t>(),
                                            asked<acc_t>(out.entropy),
                                            out.lse.data_ptr<acc_t>(),
                                            asked<acc_t>(out.log_sum_sq),
                                            asked<acc_t>(out.mean_logits),
                                            asked<bool>(out.is_top1)};
    parallel_rows(args, p.rows, p.vocab);
  });
}

void logprobs_backward_rows_cpu(const LogprobsProblem& p, const GradTarget& out,
                                const LogprobsGradInputs& in, VocabSlice slice) {
  if (p.rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(),
                                  "rlhf_ext.token_logprobs_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardArgs<scalar_t, acc_t> args{p.logits.data_ptr<scalar_t>(),
                                             p.layout,
                                             out.grad.data_ptr<scalar_t>(),
                                             out.layout,
                                             p.vocab,
                                             slice,
                                             p.target.data_ptr<int64_t>(),
                                             p.ignore_index,
                                             logit_transform<acc_t>(p),
                                             in.lse.data_ptr<acc_t>(),
                                             data_or_null<acc_t>(in.entropy),
                                             data_or_null<acc_t>(in.grad_logprobs),
                                             data_or_null<acc_t>(in.grad_entropy),
                                             data_or_null<acc_t>(in.log_sum_sq),
                                             data_or_null<acc_t>(in.grad_lse),
                                             data_or_null<acc_t>(in.grad_log_sum_sq),
                                             data_or_null<acc_t>(in.grad_mean)};
    parallel_rows(args, p.rows, p.vocab);
  });
}

namespace {
constexpr RowKernels kCpuRows{&logprobs_forward_rows_cpu, &logprobs_backward_rows_cpu};
}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CPU, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd<kCpuRows>);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd<kCpuRows>);
  m.impl("token_logprobs_bwd_", &token_logprobs_bwd_<kCpuRows>);
}

}  // namespace rlhf_ext
