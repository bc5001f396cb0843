// GAE on CUDA: one thread block per row, the row cut into chunks processed
// right to left. Inside a chunk each thread owns kItems consecutive positions
// (staged through shared memory so that global accesses are coalesced);
// the next-valid-value recurrence and then the advantage recurrence are each a
// reversed scan of affine maps (gae_math.h): sequential within a thread,
// warp shuffles within a warp, shared memory across warps, and a carried state
// across chunks. One launch for the whole batch, padded or packed.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rlhf_ext/cuda_scan.cuh"
#include "rlhf_ext/gae_host.h"
#include "rlhf_ext/gae_math.h"

namespace rlhf_ext {
namespace {

template <typename scalar_t, typename acc_t>
struct GaeArgs {
  const scalar_t* __restrict__ rewards;
  const scalar_t* __restrict__ values;
  const bool* __restrict__ mask;           // null: all valid
  const int64_t* __restrict__ cu_seqlens;  // null: padded rows of row_len
  const acc_t* __restrict__ last_value;    // null: 0
  const acc_t* __restrict__ gamma_rows;    // null: gamma
  const acc_t* __restrict__ lam_rows;      // null: lam
  acc_t* __restrict__ advantages;
  acc_t* __restrict__ returns;
  int64_t row_len;
  int64_t total;
  acc_t gamma;
  acc_t lam;
};

// A row's [start, start + len) span. A malformed cu_seqlens is clamped into
// [0, total] so that no input can make the kernel read out of bounds.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void row_span(const GaeArgs<scalar_t, acc_t>& args, int64_t row,
                                         int64_t* start, int64_t* len) {
  if (args.cu_seqlens == nullptr) {
    *start = row * args.row_len;
    *len = args.row_len;
    return;
  }
  const int64_t lo = min(max(args.cu_seqlens[row], int64_t(0)), args.total);
  const int64_t hi = min(max(args.cu_seqlens[row + 1], lo), args.total);
  *start = lo;
  *len = hi - lo;
}

// Chunks move between global memory and registers through a shared-memory
// tile: global accesses stay coalesced (lane i touches element i of each warp
// row) while each thread still owns kItems consecutive positions for the scan.
// One padding word per 32 keeps the blocked reads free of bank conflicts.
template <int kThreads, int kItems>
struct Tile {
  static constexpr int kChunk = kThreads * kItems;
  static constexpr int kSize = kChunk + kChunk / kWarpSize;
  __device__ static __forceinline__ int padded(int i) { return i + i / kWarpSize; }

  // Element i of the chunk is loaded by thread i % kThreads (coalesced).
  // Positions at or past `len` read 0.
  template <typename T, typename acc_t>
  __device__ static __forceinline__ void load_striped(const T* __restrict__ src,
                                                      int64_t chunk_first, int64_t len,
                                                      acc_t (&striped)[kItems]) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t pos = chunk_first + k * kThreads + threadIdx.x;
      striped[k] = pos < len ? static_cast<acc_t>(src[pos]) : acc_t(0);
    }
  }

  // Striped registers to the thread's kItems consecutive elements.
  template <typename acc_t>
  __device__ static __forceinline__ void to_blocked(const acc_t (&striped)[kItems], acc_t* tile,
                                                    acc_t (&blocked)[kItems]) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) tile[padded(k * kThreads + threadIdx.x)] = striped[k];
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kItems; ++k) blocked[k] = tile[padded(threadIdx.x * kItems + k)];
    __syncthreads();
  }

  template <typename acc_t>
  __device__ static __forceinline__ void store(const acc_t (&in)[kItems], int64_t chunk_first,
                                               int64_t len, acc_t* tile, acc_t* __restrict__ dst) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) tile[padded(threadIdx.x * kItems + k)] = in[k];
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t pos = chunk_first + k * kThreads + threadIdx.x;
      if (pos < len) dst[pos] = tile[padded(k * kThreads + threadIdx.x)];
    }
    __syncthreads();
  }
};

template <typename scalar_t, typename acc_t, int kThreads, int kItems>
__global__ void __launch_bounds__(kThreads) gae_scan_kernel(const GaeArgs<scalar_t, acc_t> args) {
  using TileT = Tile<kThreads, kItems>;
  constexpr int kWarps = kThreads / kWarpSize;
  constexpr int64_t kChunk = TileT::kChunk;
  __shared__ Affine<acc_t> smem[kWarps + 1];
  __shared__ acc_t tile[TileT::kSize];

  const int64_t row = blockIdx.x;
  int64_t start, len;
  row_span(args, row, &start, &len);
  const acc_t gamma = args.gamma_rows ? args.gamma_rows[row] : args.gamma;
  const acc_t lam = args.lam_rows ? args.lam_rows[row] : args.lam;
  acc_t carry_value = args.last_value ? args.last_value[row] : acc_t(0);  // W right of the chunk
  acc_t carry_advantage = acc_t(0);                                       // A right of the chunk

  for (int64_t chunk = (len + kChunk - 1) / kChunk - 1; chunk >= 0; --chunk) {
    const int64_t chunk_first = chunk * kChunk;
    const int64_t first = chunk_first + int64_t(threadIdx.x) * kItems;
    // All three loads are issued before the first transpose waits on them.
    acc_t reward[kItems], value[kItems], mask[kItems];
    TileT::load_striped(args.rewards + start, chunk_first, len, reward);
    TileT::load_striped(args.values + start, chunk_first, len, value);
    if (args.mask != nullptr) TileT::load_striped(args.mask + start, chunk_first, len, mask);
    TileT::to_blocked(reward, tile, reward);
    TileT::to_blocked(value, tile, value);
    if (args.mask != nullptr) TileT::to_blocked(mask, tile, mask);
    bool valid[kItems];
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      valid[k] = first + k < len && (args.mask == nullptr || mask[k] != acc_t(0));
    }

    // Pass 1: the next valid value seen from each position.
    Affine<acc_t> thread_map = affine_identity<acc_t>();
#pragma unroll
    for (int k = kItems - 1; k >= 0; --k) {
      thread_map = affine_then(gae_next_value_map(valid[k], value[k]), thread_map);
    }
    Affine<acc_t> chunk_map;
    const Affine<acc_t> right_of_thread =
        block_exclusive_suffix_scan<acc_t, kWarps>(thread_map, smem, &chunk_map);
    acc_t next_value = affine_apply(right_of_thread, carry_value);
    carry_value = affine_apply(chunk_map, carry_value);
    acc_t delta[kItems];
#pragma unroll
    for (int k = kItems - 1; k >= 0; --k) {
      delta[k] = gae_delta(reward[k], value[k], next_value, gamma);
      next_value = affine_apply(gae_next_value_map(valid[k], value[k]), next_value);
    }

    // Pass 2: the advantages.
    thread_map = affine_identity<acc_t>();
#pragma unroll
    for (int k = kItems - 1; k >= 0; --k) {
      thread_map = affine_then(gae_advantage_map(valid[k], delta[k], gamma, lam), thread_map);
    }
    const Affine<acc_t> right_adv =
        block_exclusive_suffix_scan<acc_t, kWarps>(thread_map, smem, &chunk_map);
    acc_t advantage = affine_apply(right_adv, carry_advantage);
    carry_advantage = affine_apply(chunk_map, carry_advantage);
    acc_t advantages[kItems], returns[kItems];
#pragma unroll
    for (int k = kItems - 1; k >= 0; --k) {
      advantage = affine_apply(gae_advantage_map(valid[k], delta[k], gamma, lam), advantage);
      advantages[k] = valid[k] ? advantage : acc_t(0);
      returns[k] = valid[k] ? advantage + value[k] : acc_t(0);
    }
    TileT::store(advantages, chunk_first, len, tile, args.advantages + start);
    TileT::store(returns, chunk_first, len, tile, args.returns + start);
  }
}

template <typename scalar_t, typename acc_t, int kThreads, int kItems>
void launch_gae(const GaeArgs<scalar_t, acc_t>& args, int64_t rows, cudaStream_t stream) {
  gae_scan_kernel<scalar_t, acc_t, kThreads, kItems>
      <<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const std::optional<at::Tensor>& mask,
                                            const std::optional<at::Tensor>& cu_seqlens,
                                            const std::optional<at::Tensor>& last_value,
                                            const std::optional<at::Tensor>& gamma_rows,
                                            const std::optional<at::Tensor>& lam_rows,
                                            double gamma, double lam) {
  const c10::cuda::CUDAGuard device_guard(rewards.device());
  const GaeProblem p =
      prepare_gae(rewards, values, mask, cu_seqlens, last_value, gamma_rows, lam_rows, gamma, lam);
  auto [advantages, returns] = gae_outputs(p, rewards);
  if (p.rows == 0 || p.total == 0) return {advantages, returns};
  TORCH_CHECK_VALUE(p.rows < (int64_t(1) << 31), "rlhf_ext.gae: at most 2^31 - 1 rows, got ",
                    p.rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Short padded rows get a small block so that threads are not left idle. The
  // block shape fixes the order of the scan's rounding, so it depends only on
  // the row's own length T (padded) or is fixed (packed): a row gives the same
  // bits in any batch.
  const bool small_rows = !p.cu_seqlens.defined() && p.row_len <= 512;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.rewards.scalar_type(),
                                  "rlhf_ext.gae", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GaeArgs<scalar_t, acc_t> args{
        p.rewards.data_ptr<scalar_t>(),      p.values.data_ptr<scalar_t>(),
        data_or_null<bool>(p.mask),          data_or_null<int64_t>(p.cu_seqlens),
        data_or_null<acc_t>(p.last_value),   data_or_null<acc_t>(p.gamma_rows),
        data_or_null<acc_t>(p.lam_rows),     advantages.data_ptr<acc_t>(),
        returns.data_ptr<acc_t>(),           p.row_len,
        p.total,                             static_cast<acc_t>(p.gamma),
        static_cast<acc_t>(p.lam)};
    if (small_rows) {
      launch_gae<scalar_t, acc_t, 64, 4>(args, p.rows, stream);
    } else {
      launch_gae<scalar_t, acc_t, 256, 8>(args, p.rows, stream);
    }
  });
  return {advantages, returns};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CUDA, m) {
  m.impl("gae", &gae_cuda);
}

}  // namespace rlhf_ext
