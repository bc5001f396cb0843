// token_logprobs on CUDA: one block per row, the row read once.
//
// Forward: each thread owns the 16-byte vectors v = tid, tid + blockDim, ...
// of its row. It loads kUnroll of them (to keep enough bytes in flight), finds
// their max, rebases its running softmax state when the max moved, and adds
// the exponentials (softmax_math.h). The block then merges the thread states
// in a fixed order (warp butterfly, then warps in index order), so the result
// depends only on the row and V: batch-invariant and deterministic.
// Rows that are not 16-byte aligned (odd V, a sliced view) take the same
// element order with scalar loads, so alignment never changes the bits.
//
// Backward: the same traversal, writing d loss / d logits per element from
// the saved log-sum-exp and entropy; one read, one write.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "rlhf_ext/cuda_scan.cuh"
#include "rlhf_ext/logit_transform.h"
#include "rlhf_ext/logprobs_host.h"
#include "rlhf_ext/softmax_math.h"

namespace rlhf_ext {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kUnroll = 4;
constexpr int kVecBytes = 16;

// Threads per row: a function of V alone (batch invariance), sized so that
// each thread has about 8 vectors to read and large vocabularies fill 512.
int threads_for(int64_t vocab, int64_t vec) {
  const int64_t vectors = (vocab + vec - 1) / vec;
  int threads = 64;
  while (threads < kMaxThreads && threads * 8 < vectors) threads *= 2;
  return threads;
}

template <typename scalar_t>
struct alignas(kVecBytes) Vec {
  static constexpr int kSize = kVecBytes / sizeof(scalar_t);
  scalar_t v[kSize];
};

// Vector `index` of the row (kSize elements from index * kSize), as acc_t;
// positions past V read as `fill`.
template <typename scalar_t, typename acc_t, bool kAligned>
__device__ __forceinline__ void load_vec(const scalar_t* row, int64_t index, int64_t vocab,
                                         acc_t fill, acc_t (&out)[Vec<scalar_t>::kSize]) {
  constexpr int kSize = Vec<scalar_t>::kSize;
  const int64_t first = index * kSize;
  if (kAligned && first + kSize <= vocab) {
    const Vec<scalar_t> v = *reinterpret_cast<const Vec<scalar_t>*>(row + first);
#pragma unroll
    for (int j = 0; j < kSize; ++j) out[j] = static_cast<acc_t>(v.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kSize; ++j) {
      out[j] = first + j < vocab ? static_cast<acc_t>(row[first + j]) : fill;
    }
  }
}

template <typename acc_t, bool kEntropy>
__device__ __forceinline__ SoftmaxState<acc_t> shfl_xor_state(const SoftmaxState<acc_t>& s,
                                                              int mask) {
  return {__shfl_xor_sync(kFullWarp, s.max, mask), __shfl_xor_sync(kFullWarp, s.sum_exp, mask),
          kEntropy ? __shfl_xor_sync(kFullWarp, s.sum_shift, mask) : acc_t(0)};
}

// The block's merged state, valid in thread 0.
template <typename acc_t, bool kEntropy>
__device__ __forceinline__ SoftmaxState<acc_t> block_merge(SoftmaxState<acc_t> s,
                                                           acc_t scale_log2) {
  __shared__ SoftmaxState<acc_t> warp_states[kMaxThreads / kWarpSize];
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) {
    s = softmax_merge(s, shfl_xor_state<acc_t, kEntropy>(s, mask), scale_log2);
  }
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) warp_states[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    s = warp_states[0];
    for (int w = 1; w < int(blockDim.x / kWarpSize); ++w) {
      s = softmax_merge(s, warp_states[w], scale_log2);
    }
  }
  return s;
}

// The block's sum and max of one value per thread, valid in thread 0: a warp butterfly
// (every lane the same bits: a + b == b + a), then the warps in order.
template <typename acc_t>
__device__ __forceinline__ void block_sum_and_max(acc_t& sum, acc_t& max) {
  __shared__ acc_t warp_sum[kMaxThreads / kWarpSize];
  __shared__ acc_t warp_max[kMaxThreads / kWarpSize];
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) {
    sum += __shfl_xor_sync(kFullWarp, sum, mask);
    const acc_t other = __shfl_xor_sync(kFullWarp, max, mask);
    max = other > max ? other : max;
  }
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) {
    warp_sum[warp] = sum;
    warp_max[warp] = max;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    sum = warp_sum[0];
    max = warp_max[0];
    for (int w = 1; w < int(blockDim.x / kWarpSize); ++w) {
      sum += warp_sum[w];
      max = warp_max[w] > max ? warp_max[w] : max;
    }
  }
}

// The extra outputs' running values of one thread (the CPU's RowExtras): the softmax at
// twice the multiplier, the sum of y over real elements, the largest y before the target.
template <typename acc_t>
struct ThreadExtras {
  SoftmaxState<acc_t> doubled;
  acc_t sum;
  acc_t max_before;
};

// This thread's softmax state over its vectors of the row (and with kExtras its
// ThreadExtras, for target column `target`).
template <typename scalar_t, typename acc_t, bool kEntropy, bool kExtras, bool kAligned>
__device__ __forceinline__ SoftmaxState<acc_t> thread_state(const scalar_t* row, int64_t vocab,
                                                            const LogitTransform<acc_t>& tf,
                                                            acc_t scale_log2, int64_t target,
                                                            ThreadExtras<acc_t>& extra) {
  constexpr int kSize = Vec<scalar_t>::kSize;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t vectors = (vocab + kSize - 1) / kSize;
  SoftmaxState<acc_t> state = softmax_empty<acc_t>();
  for (int64_t base = threadIdx.x; base < vectors; base += int64_t(blockDim.x) * kUnroll) {
    acc_t x[kUnroll][kSize];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t index = base + int64_t(u) * blockDim.x;
      if (index < vectors) {
        load_vec<scalar_t, acc_t, kAligned>(row, index, vocab, neg_inf, x[u]);
        if (tf.capped()) {  // real elements only: the -inf padding stays
#pragma unroll
          for (int j = 0; j < kSize; ++j) {
            if (index * kSize + j < vocab) x[u][j] = tf.squash(x[u][j]);
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < kSize; ++j) x[u][j] = neg_inf;
      }
    }
    acc_t m = neg_inf;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < kSize; ++j) m = (x[u][j] > m || x[u][j] != x[u][j]) ? x[u][j] : m;
    }
    if (kExtras) {  // before the all-masked skip: a real -inf still counts in the sum
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t first = (base + int64_t(u) * blockDim.x) * kSize;
#pragma unroll
        for (int j = 0; j < kSize; ++j) {
          if (first + j < vocab) extra.sum += x[u][j];
          if (first + j < target && x[u][j] > extra.max_before) extra.max_before = x[u][j];
        }
      }
    }
    if (m == neg_inf) continue;  // nothing but masked entries
    if (!(m <= state.max)) {  // also when NaN
      state = softmax_rebase(state, m, scale_log2);
      // the doubled softmax keeps state's max: its terms are the squares of state's
      if (kExtras) extra.doubled = softmax_rebase(extra.doubled, m, 2 * scale_log2);
    }
    acc_t shift = state.sum_shift;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < kSize; ++j) {
        if (kExtras) {
          softmax_add_with_square(x[u][j], state.max, scale_log2, state.sum_exp, shift,
                                  extra.doubled.sum_exp);
        } else {
          softmax_add(x[u][j], state.max, scale_log2, state.sum_exp, shift);
        }
      }
    }
    if (kEntropy) state.sum_shift = shift;
  }
  return state;
}

// The extra outputs a forward launch writes (nullptr: not asked for).
template <typename acc_t>
struct ExtraOutputPtrs {
  acc_t* log_sum_sq;
  acc_t* mean_logits;
  bool* is_top1;
};

template <typename scalar_t, typename acc_t, bool kEntropy, bool kExtras>
__global__ void __launch_bounds__(kMaxThreads)
    token_logprobs_fwd_kernel(const scalar_t* __restrict__ logits, RowLayout layout,
                              int64_t vocab, const int64_t* __restrict__ target,
                              int64_t ignore_index, LogitTransform<acc_t> tf,
                              acc_t* __restrict__ logprobs, acc_t* __restrict__ entropy,
                              acc_t* __restrict__ lse_out, ExtraOutputPtrs<acc_t> extras) {
  const int64_t row = blockIdx.x;
  const int64_t tgt = target[row];
  if (tgt == ignore_index) {  // no work, and exact zeros
    if (threadIdx.x == 0) {
      logprobs[row] = 0;
      if (kEntropy && entropy) entropy[row] = 0;
      lse_out[row] = 0;
      if (extras.log_sum_sq) extras.log_sum_sq[row] = 0;
      if (extras.mean_logits) extras.mean_logits[row] = 0;
      if (extras.is_top1) extras.is_top1[row] = false;
    }
    return;
  }
  const scalar_t* x = logits + layout.offset(row);
  const acc_t mult = tf.row_mult(row);
  const acc_t scale_log2 = mult * acc_t(kLog2e);
  const bool aligned = reinterpret_cast<uintptr_t>(x) % kVecBytes == 0;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  ThreadExtras<acc_t> extra{softmax_empty<acc_t>(), acc_t(0), neg_inf};
  SoftmaxState<acc_t> state =
      aligned ? thread_state<scalar_t, acc_t, kEntropy, kExtras, true>(x, vocab, tf, scale_log2,
                                                                       tgt, extra)
              : thread_state<scalar_t, acc_t, kEntropy, kExtras, false>(x, vocab, tf,
                                                                        scale_log2, tgt, extra);
  state = block_merge<acc_t, kEntropy>(state, scale_log2);
  if (kExtras) {
    __syncthreads();  // block_merge's shared states are read by thread 0 above
    extra.doubled = block_merge<acc_t, false>(extra.doubled, 2 * scale_log2);
    block_sum_and_max(extra.sum, extra.max_before);
  }
  if (threadIdx.x == 0) {
    const acc_t lse = softmax_lse(state, mult);
    const bool in_vocab = tgt >= 0 && tgt < vocab;
    const acc_t y_target = in_vocab ? tf.squash(static_cast<acc_t>(x[tgt])) : acc_t(0);
    const acc_t logprob =
        in_vocab ? y_target * mult - lse : std::numeric_limits<acc_t>::quiet_NaN();
    logprobs[row] = logprob;
    if (kEntropy && entropy) entropy[row] = softmax_entropy(state, mult);
    lse_out[row] = lse_output(state, lse);
    if (kExtras) {
      if (extras.log_sum_sq) {
        extras.log_sum_sq[row] = softmax_lse(extra.doubled, 2 * mult) - 2 * lse;
      }
      if (extras.mean_logits) {
        extras.mean_logits[row] = extra.sum * mult / static_cast<acc_t>(vocab);
      }
      if (extras.is_top1) {  // a row without a distribution (NaN log-prob) has no top token
        extras.is_top1[row] =
            logprob == logprob && y_target >= state.max && y_target > extra.max_before;
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
struct BackwardRow {
  const scalar_t* x;
  scalar_t* g;
  int64_t vocab;
  int64_t target;  // column in this tile; outside [0, vocab) when the tile lacks it
  LogitTransform<acc_t> tf;
  acc_t mult, lse, entropy, g_lp, g_ent;
  ExtraGrad<acc_t> extra;
};

template <typename scalar_t, typename acc_t, bool kAligned>
__device__ __forceinline__ void backward_row(const BackwardRow<scalar_t, acc_t>& r) {
  constexpr int kSize = Vec<scalar_t>::kSize;
  const int64_t vectors = (r.vocab + kSize - 1) / kSize;
  for (int64_t index = threadIdx.x; index < vectors; index += blockDim.x) {
    acc_t x[kSize];
    load_vec<scalar_t, acc_t, kAligned>(r.x, index, r.vocab, acc_t(0), x);
    Vec<scalar_t> out;
#pragma unroll
    for (int j = 0; j < kSize; ++j) {
      acc_t slope;  // dy/dx: exactly 1 without a softcap
      const acc_t y = r.tf.squash_with_slope(x[j], slope);
      acc_t g = logits_grad(y, r.mult, r.lse, r.entropy, r.g_lp, r.g_ent, r.extra);
      if (index * kSize + j == r.target) g += target_grad(r.g_lp, r.mult);
      out.v[j] = static_cast<scalar_t>(g * slope);
    }
    const int64_t first = index * kSize;
    if (kAligned && first + kSize <= r.vocab) {
      *reinterpret_cast<Vec<scalar_t>*>(r.g + first) = out;
    } else {
      for (int j = 0; j < kSize && first + j < r.vocab; ++j) r.g[first + j] = out.v[j];
    }
  }
}

template <typename scalar_t, bool kAligned>
__device__ __forceinline__ void zero_row(scalar_t* g, int64_t vocab) {
  constexpr int kSize = Vec<scalar_t>::kSize;
  const int64_t vectors = (vocab + kSize - 1) / kSize;
  Vec<scalar_t> zero;
#pragma unroll
  for (int j = 0; j < kSize; ++j) zero.v[j] = scalar_t(0);
  for (int64_t index = threadIdx.x; index < vectors; index += blockDim.x) {
    const int64_t first = index * kSize;
    if (kAligned && first + kSize <= vocab) {
      *reinterpret_cast<Vec<scalar_t>*>(g + first) = zero;
    } else {
      for (int j = 0; j < kSize && first + j < vocab; ++j) g[first + j] = scalar_t(0);
    }
  }
}

// The extra outputs' backward inputs (nullptr: zero gradient).
template <typename acc_t>
struct ExtraGradPtrs {
  const acc_t* log_sum_sq;
  const acc_t* grad_lse;
  const acc_t* grad_log_sum_sq;
  const acc_t* grad_mean;
};

// `grad` may alias `logits` (inplace_backward, then grad_layout == layout):
// each element is read before it is written, by the same thread.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    token_logprobs_bwd_kernel(const scalar_t* logits, RowLayout layout, scalar_t* grad,
                              RowLayout grad_layout, int64_t vocab, VocabSlice slice,
                              const int64_t* __restrict__ target, int64_t ignore_index,
                              LogitTransform<acc_t> tf, const acc_t* __restrict__ lse,
                              const acc_t* __restrict__ entropy,
                              const acc_t* __restrict__ grad_logprobs,
                              const acc_t* __restrict__ grad_entropy,
                              ExtraGradPtrs<acc_t> extras) {
  const int64_t row = blockIdx.x;
  const int64_t tgt = target[row];
  scalar_t* g = grad + grad_layout.offset(row);
  const bool g_aligned = reinterpret_cast<uintptr_t>(g) % kVecBytes == 0;
  if (tgt == ignore_index) {
    g_aligned ? zero_row<scalar_t, true>(g, vocab) : zero_row<scalar_t, false>(g, vocab);
    return;
  }
  const bool in_vocab = tgt >= 0 && tgt < slice.full_vocab;
  BackwardRow<scalar_t, acc_t> r;
  r.x = logits + layout.offset(row);
  r.g = g;
  r.vocab = vocab;
  r.target = tgt - slice.offset;  // outside [0, vocab): the target is not in this tile
  r.tf = tf;
  r.mult = tf.row_mult(row);
  // A target outside the vocabulary (validate=False) has no gradient: NaN, like its logprob.
  r.lse = in_vocab ? lse_input(lse[row]) : std::numeric_limits<acc_t>::quiet_NaN();
  r.entropy = entropy ? entropy[row] : acc_t(0);
  r.g_lp = grad_logprobs ? grad_logprobs[row] : acc_t(0);
  r.g_ent = grad_entropy ? grad_entropy[row] : acc_t(0);
  if (extras.grad_lse) r.extra.g_lse = extras.grad_lse[row];
  if (extras.grad_log_sum_sq) {
    r.extra.g_sq2 = 2 * extras.grad_log_sum_sq[row];
    r.extra.inv_s2 = std::exp(-extras.log_sum_sq[row]);
  }
  if (extras.grad_mean) r.extra.g_mean_v = extras.grad_mean[row] / acc_t(slice.full_vocab);
  r.extra.softmax_terms =
      grad_logprobs || grad_entropy || extras.grad_lse || extras.grad_log_sum_sq;
  const bool aligned = g_aligned && reinterpret_cast<uintptr_t>(r.x) % kVecBytes == 0;
  aligned ? backward_row<scalar_t, acc_t, true>(r) : backward_row<scalar_t, acc_t, false>(r);
}

void check_rows(const LogprobsProblem& p) {
  TORCH_CHECK_VALUE(p.rows < (int64_t(1) << 31), kLogprobsOp,
                    ": at most 2^31 - 1 rows on CUDA, got ", p.rows);
}

}  // namespace

void logprobs_forward_rows_cuda(const LogprobsProblem& p, const ForwardOutputs& out) {
  if (p.rows == 0) return;
  check_rows(p);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(),
                                  "rlhf_ext.token_logprobs", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int threads = threads_for(p.vocab, Vec<scalar_t>::kSize);
    acc_t* entropy = asked<acc_t>(out.entropy);
    const ExtraOutputPtrs<acc_t> extras{asked<acc_t>(out.log_sum_sq),
                                        asked<acc_t>(out.mean_logits), asked<bool>(out.is_top1)};
    const bool any_extra = extras.log_sum_sq || extras.mean_logits || extras.is_top1;
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(p.rows), threads, 0, stream>>>(
          p.logits.data_ptr<scalar_t>(), p.layout, p.vocab, p.target.data_ptr<int64_t>(),
          p.ignore_index, logit_transform<acc_t>(p), out.logprobs.data_ptr<acc_t>(), entropy,
          out.lse.data_ptr<acc_t>(), extras);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (any_extra) {  // one variant with the extras (entropy or not), the plain two apart
      launch(token_logprobs_fwd_kernel<scalar_t, acc_t, true, true>);
    } else if (entropy) {
      launch(token_logprobs_fwd_kernel<scalar_t, acc_t, true, false>);
    } else {
      launch(token_logprobs_fwd_kernel<scalar_t, acc_t, false, false>);
    }
  });
}

void logprobs_backward_rows_cuda(const LogprobsProblem& p, const GradTarget& out,
                                 const LogprobsGradInputs& in, VocabSlice slice) {
  if (p.rows == 0) return;
  check_rows(p);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(),
                                  "rlhf_ext.token_logprobs_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int threads = threads_for(p.vocab, Vec<scalar_t>::kSize);
    token_logprobs_bwd_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(p.rows), threads, 0, stream>>>(
            p.logits.data_ptr<scalar_t>(), p.layout, out.grad.data_ptr<scalar_t>(), out.layout,
            p.vocab, slice, p.target.data_ptr<int64_t>(), p.ignore_index,
            logit_transform<acc_t>(p), in.lse.data_ptr<acc_t>(),
            data_or_null<acc_t>(in.entropy), data_or_null<acc_t>(in.grad_logprobs),
            data_or_null<acc_t>(in.grad_entropy),
            ExtraGradPtrs<acc_t>{data_or_null<acc_t>(in.log_sum_sq),
                                 data_or_null<acc_t>(in.grad_lse),
                                 data_or_null<acc_t>(in.grad_log_sum_sq),
                                 data_or_null<acc_t>(in.grad_mean)});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

namespace {
constexpr RowKernels kCudaRows{&logprobs_forward_rows_cuda, &logprobs_backward_rows_cuda};
}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CUDA, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd<kCudaRows>);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd<kCudaRows>);
  m.impl("token_logprobs_bwd_", &token_logprobs_bwd_<kCudaRows>);
}

}  // namespace rlhf_ext
