// policy_loss, value_loss, kl_loss, kl_penalty and loss_backward on CUDA.
//
// Level 1 (ppo_math.h): one block per row; the sequence kinds first reduce the
// row's log-ratios (the row prologue, same fixed order); each thread sums a fixed strided
// subset of the row's tokens and writes their un-aggregated derivatives, then
// the block combines the threads' partials in a fixed tree order and writes the
// row's [kCols] partials. Level 2: one block reduces the [B, kCols] partials in
// float64, again in a fixed order, and writes the loss, the statistics and the
// per-row weights. No atomics, no host synchronisation: the same inputs give
// the same bits, and a row's partials do not depend on the rest of the batch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rlhf_ext/cuda_scan.cuh"
#include "rlhf_ext/loss_host.h"

namespace rlhf_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

// Block-wide reduction of K values per thread (sum, or max for column
// kMaxCol), in a tree order fixed by the thread index. Every thread receives
// the result. `smem` holds kWarps * K values.
template <typename T, int K, int kMaxCol>
__device__ __forceinline__ void block_reduce(T (&v)[K], T* smem) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
      const T other = __shfl_xor_sync(kFullWarp, v[k], offset);
      v[k] = k == kMaxCol ? max_value(v[k], other) : v[k] + other;
    }
    if (lane == 0) smem[warp * K + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    T total = smem[k];
    for (int w = 1; w < kWarps; ++w) {
      total = k == kMaxCol ? max_value(total, smem[w * K + k]) : total + smem[w * K + k];
    }
    v[k] = total;
  }
  __syncthreads();  // smem may be reused
}

// The row prologue: the mean of a - b over the row's valid tokens (0 for none).
template <typename scalar_t, typename acc_t>
__device__ acc_t row_mean_difference(const scalar_t* __restrict__ a,
                                     const scalar_t* __restrict__ b,
                                     const bool* __restrict__ mask, int64_t base, int64_t cols,
                                     acc_t* smem) {
  acc_t acc[2] = {acc_t(0), acc_t(0)};
  for (int64_t t = threadIdx.x; t < cols; t += kThreads) {
    const int64_t i = base + t;
    if (mask == nullptr || mask[i]) {
      acc[0] += static_cast<acc_t>(a[i]) - static_cast<acc_t>(b[i]);
      acc[1] += acc_t(1);
    }
  }
  block_reduce<acc_t, 2, -1>(acc, smem);
  return acc[0] / (acc[1] > acc_t(1) ? acc[1] : acc_t(1));
}

template <typename Family, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    loss_rows_kernel(Family family, const scalar_t* __restrict__ a,
                     const scalar_t* __restrict__ b, const scalar_t* __restrict__ c,
                     bool c_per_row, const bool* __restrict__ mask, int64_t cols,
                     acc_t* __restrict__ grad, acc_t* __restrict__ partials) {
  constexpr int K = Family::kCols;
  __shared__ acc_t smem[kWarps * K];
  acc_t acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = acc_t(0);
  const int64_t row = blockIdx.x;
  const int64_t base = row * cols;
  const acc_t row_mean = family.needs_row_mean()
                             ? row_mean_difference<scalar_t, acc_t>(a, b, mask, base, cols, smem)
                             : acc_t(0);
  for (int64_t t = threadIdx.x; t < cols; t += kThreads) {
    const int64_t i = base + t;
    const bool valid = mask == nullptr || mask[i];
    acc_t g = acc_t(0);
    if (valid) {
      acc_t z = acc_t(0);
      if (Family::kInputs == 3) z = static_cast<acc_t>(c[c_per_row ? row : i]);
      acc_t v[K];
      g = family.token(static_cast<acc_t>(a[i]), static_cast<acc_t>(b[i]), z, row_mean, v);
      combine<Family>(acc, v, true);
    }
    grad[i] = g;
  }
  block_reduce<acc_t, K, Family::kMaxCol>(acc, smem);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) partials[int64_t(blockIdx.x) * K + k] = acc[k];
  }
}

// Row r's partials in float64, after the family's finish_row.
template <typename Family, typename acc_t>
__device__ __forceinline__ void load_row(const Family& family, const acc_t* __restrict__ partials,
                                         int64_t r, double (&row)[Family::kCols]) {
#pragma unroll
  for (int k = 0; k < Family::kCols; ++k) row[k] = double(partials[r * Family::kCols + k]);
  family.finish_row(row);
}

// Level 2 in one block: float64 sums over rows (thread i takes rows i,
// i + kThreads, ...), then the fixed-order block reduction.
template <typename Family, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    loss_finish_kernel(Family family, const acc_t* __restrict__ partials, int64_t rows,
                       LossAgg agg, double norm,
                       acc_t* __restrict__ loss, float* __restrict__ stats,
                       acc_t* __restrict__ row_weight) {
  constexpr int K = Family::kCols;
  constexpr int kMean = K;        // sum of the non-empty rows' means
  constexpr int kNonEmpty = K + 1;  // number of non-empty rows
  __shared__ double smem[kWarps * (K + 2)];
  double acc[K + 2];
#pragma unroll
  for (int k = 0; k < K + 2; ++k) acc[k] = 0.0;
  for (int64_t r = threadIdx.x; r < rows; r += kThreads) {
    double part[K];
    load_row(family, partials, r, part);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      acc[k] = k == Family::kMaxCol ? max_value(acc[k], double(part[k])) : acc[k] + part[k];
    }
    if (part[1] > 0.0) {
      acc[kMean] += part[0] / part[1];
      acc[kNonEmpty] += 1.0;
    }
  }
  block_reduce<double, K + 2, Family::kMaxCol>(acc, smem);
  const double tokens = acc[1];
  if (threadIdx.x == 0) {
    *loss = static_cast<acc_t>(agg_loss(agg, acc[0], acc[kMean], tokens, acc[kNonEmpty], norm));
#pragma unroll
    for (int k = 2; k < 2 + Family::kStats; ++k) {
      const double value =
          k == Family::kMaxCol ? acc[k] : (tokens > 0.0 ? acc[k] / tokens : 0.0);
      stats[k - 2] = static_cast<float>(value);
    }
  }
  for (int64_t r = threadIdx.x; r < rows; r += kThreads) {
    double part[K];
    load_row(family, partials, r, part);
    const double w =
        agg_row_weight(agg, part[1], tokens, acc[kNonEmpty], norm) * family.row_factor(part);
    row_weight[r] = static_cast<acc_t>(w);
  }
}

template <template <typename> class Family, typename Make>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_loss_cuda(const char* op,
                                                                          const LossProblem& p,
                                                                          LossAgg agg,
                                                                          double norm,
                                                                          const Make& make) {
  LossOutputs out = allocate_loss_outputs(p, Family<float>::kCols, Family<float>::kStats);
  TORCH_CHECK_VALUE(p.rows < (int64_t(1) << 31), op, ": at most 2^31 - 1 rows, got ", p.rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.a.scalar_type(), "rlhf_ext.loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using F = Family<acc_t>;
    const F family = make(acc_t(0));
    if (p.rows > 0) {
      loss_rows_kernel<F, scalar_t, acc_t><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(
          family, p.a.data_ptr<scalar_t>(), p.b.data_ptr<scalar_t>(),
          F::kInputs == 3 ? p.c.data_ptr<scalar_t>() : nullptr, p.c_per_row,
          p.mask.defined() ? p.mask.data_ptr<bool>() : nullptr, p.cols,
          out.grad.data_ptr<acc_t>(), out.partials.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // Always launched: it also writes the loss and stats of an empty batch.
    loss_finish_kernel<F, acc_t><<<1, kThreads, 0, stream>>>(
        family, out.partials.data_ptr<acc_t>(), p.rows, agg, norm, out.loss.data_ptr<acc_t>(),
        out.stats.data_ptr<float>(), out.row_weight.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.loss, out.stats, out.grad, out.row_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_cuda(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const std::optional<at::Tensor>& mask, c10::string_view kind, double lo, double hi,
    double dual_clip, double ratio_cap, double tau_pos, double tau_neg, double beta,
    c10::string_view agg, double loss_scale_factor) {
  constexpr const char* op = "rlhf_ext.policy_loss";
  const c10::cuda::CUDAGuard device_guard(logprobs.device());
  const PolicyKind policy_kind = parse_policy_kind_or_throw(op, std::string(kind));
  const LossAgg mode = parse_agg_or_throw(op, std::string(agg));
  const LossProblem p = prepare_loss(op, logprobs, "logprobs", old_logprobs, "old_logprobs",
                                     &advantages, "advantages", mask, /*c_may_be_per_row=*/true);
  return run_loss_cuda<PolicyFamily>(op, p, mode, norm_factor(loss_scale_factor, p.cols),
                                     [&](auto zero) {
                                       using T = decltype(zero);
                                       const PolicyParams<T> params{
                                           T(lo),      T(hi),      T(dual_clip), T(ratio_cap),
                                           T(tau_pos), T(tau_neg), T(beta)};
                                       return PolicyFamily<T>{policy_kind, params};
                                     });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> value_loss_cuda(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
    const std::optional<at::Tensor>& mask, double clip_eps, c10::string_view agg) {
  constexpr const char* op = "rlhf_ext.value_loss";
  const c10::cuda::CUDAGuard device_guard(values.device());
  const LossAgg mode = parse_agg_or_throw(op, std::string(agg));
  const LossProblem p =
      prepare_loss(op, values, "values", old_values, "old_values", &returns, "returns", mask);
  return run_loss_cuda<ValueFamily>(op, p, mode, norm_factor(0, p.cols), [&](auto zero) {
    using T = decltype(zero);
    return ValueFamily<T>{T(clip_eps)};
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_loss_cuda(
    const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
    const std::optional<at::Tensor>& mask, c10::string_view kind, c10::string_view agg) {
  constexpr const char* op = "rlhf_ext.kl_loss";
  const c10::cuda::CUDAGuard device_guard(logprobs.device());
  const KLSpec spec = parse_kl_or_throw(op, "kind", std::string(kind));
  const LossAgg mode = parse_agg_or_throw(op, std::string(agg));
  const LossProblem p = prepare_loss(op, logprobs, "logprobs", ref_logprobs, "ref_logprobs",
                                     nullptr, "", mask);
  return run_loss_cuda<KLFamily>(op, p, mode, norm_factor(0, p.cols), [&](auto zero) {
    using T = decltype(zero);
    return KLFamily<T>{spec.kind, spec.straight_through};
  });
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    kl_penalty_kernel(const scalar_t* __restrict__ lp, const scalar_t* __restrict__ ref,
                      int64_t n, KLKind kind, bool straight_through, acc_t* __restrict__ value,
                      acc_t* __restrict__ grad) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    const acc_t l = static_cast<acc_t>(lp[i]);
    const acc_t r = static_cast<acc_t>(ref[i]);
    value[i] = kl_value(kind, l, r);
    grad[i] = kl_grad(kind, straight_through, l, r);
  }
}

// Enough blocks to fill the GPU; grid-stride loops cover the rest.
unsigned elementwise_blocks(int64_t n) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(wanted, 1), 65536));
}

std::tuple<at::Tensor, at::Tensor> kl_penalty_cuda(const at::Tensor& logprobs,
                                                   const at::Tensor& ref_logprobs,
                                                   c10::string_view kind) {
  constexpr const char* op = "rlhf_ext.kl_penalty";
  const c10::cuda::CUDAGuard device_guard(logprobs.device());
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
  const int64_t n = lp.numel();
  if (n == 0) return {value, grad};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lp.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kl_penalty_kernel<scalar_t, acc_t><<<elementwise_blocks(n), kThreads, 0, stream>>>(
        lp.data_ptr<scalar_t>(), ref.data_ptr<scalar_t>(), n, spec.kind, spec.straight_through,
        value.data_ptr<acc_t>(), grad.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {value, grad};
}

// grad_loss is read on the device: no host synchronisation.
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    loss_backward_kernel(const acc_t* __restrict__ grad_loss, const acc_t* __restrict__ grad,
                         const acc_t* __restrict__ row_weight, int64_t n, int64_t cols,
                         out_t* __restrict__ out) {
  const acc_t up = *grad_loss;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    out[i] = static_cast<out_t>(backward_value(grad[i], up, up * row_weight[i / cols]));
  }
}

at::Tensor loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& grad,
                              const at::Tensor& row_weight, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard device_guard(grad.device());
  check_loss_backward(grad_loss, grad, row_weight);
  const at::Tensor g = grad.contiguous();
  const at::Tensor w = row_weight.to(g.scalar_type()).contiguous();
  const at::Tensor up = grad_loss.to(g.scalar_type()).reshape({1}).contiguous();
  at::Tensor out = at::empty(g.sizes(), g.options().dtype(dtype));
  const int64_t n = g.numel();
  if (n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "rlhf_ext.loss_backward", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rlhf_ext.loss_backward",
                                    [&] {
      loss_backward_kernel<acc_t, scalar_t><<<elementwise_blocks(n), kThreads, 0, stream>>>(
          up.data_ptr<acc_t>(), g.data_ptr<acc_t>(), w.data_ptr<acc_t>(), n, g.size(1),
          out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CUDA, m) {
  m.impl("policy_loss", &policy_loss_cuda);
  m.impl("value_loss", &value_loss_cuda);
  m.impl("kl_loss", &kl_loss_cuda);
  m.impl("kl_penalty", &kl_penalty_cuda);
  m.impl("loss_backward", &loss_backward_cuda);
}

}  // namespace rlhf_ext
