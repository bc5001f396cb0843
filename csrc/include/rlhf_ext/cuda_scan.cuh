// Warp- and block-level building blocks of the CUDA kernels: reversed
// (suffix) scans of affine maps and fixed-order reductions of moments. Each
// combines its operands in an order fixed by the lane and warp index alone, so
// results are deterministic and identical for a row wherever it sits in a batch.
#pragma once
#include <cuda_runtime.h>

#include "rlhf_ext/affine.h"
#include "rlhf_ext/moments.h"

namespace rlhf_ext {

constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kWarpSize = 32;

template <typename T>
__device__ __forceinline__ Affine<T> shfl_down_affine(const Affine<T>& m, int offset) {
  return Affine<T>{__shfl_down_sync(kFullWarp, m.a, offset),
                   __shfl_down_sync(kFullWarp, m.b, offset)};
}

// Lane i receives the composition of the maps of lanes i..31.
template <typename T>
__device__ __forceinline__ Affine<T> warp_suffix_scan(Affine<T> m, int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const Affine<T> right = shfl_down_affine(m, offset);
    if (lane + offset < kWarpSize) m = affine_then(m, right);
  }
  return m;
}

// Lane i receives the composition of the maps of lanes i+1..31 (identity for lane 31).
template <typename T>
__device__ __forceinline__ Affine<T> exclusive_from_inclusive(const Affine<T>& inclusive, int lane) {
  const Affine<T> next = shfl_down_affine(inclusive, 1);
  return lane == kWarpSize - 1 ? affine_identity<T>() : next;
}

// Block-wide exclusive suffix scan: thread i receives the composition of the
// maps of threads i+1..n-1, and *total that of all threads. `smem` holds
// kWarps + 1 maps. Ends with a barrier so `smem` can be reused at once.
template <typename T, int kWarps>
__device__ __forceinline__ Affine<T> block_exclusive_suffix_scan(const Affine<T>& m,
                                                                 Affine<T>* smem,
                                                                 Affine<T>* total) {
  static_assert(kWarps >= 1 && kWarps <= kWarpSize, "block of 32..1024 threads");
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const Affine<T> inclusive = warp_suffix_scan(m, lane);
  const Affine<T> in_warp = exclusive_from_inclusive(inclusive, lane);
  if (lane == 0) smem[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const Affine<T> per_warp = lane < kWarps ? smem[lane] : affine_identity<T>();
    const Affine<T> warps_inclusive = warp_suffix_scan(per_warp, lane);
    const Affine<T> warps_exclusive = exclusive_from_inclusive(warps_inclusive, lane);
    __syncwarp();
    if (lane < kWarps) smem[lane] = warps_exclusive;
    if (lane == 0) smem[kWarps] = warps_inclusive;
  }
  __syncthreads();
  const Affine<T> result = affine_then(in_warp, smem[warp]);
  *total = smem[kWarps];
  __syncthreads();
  return result;
}

template <typename T>
__device__ __forceinline__ Moments<T> shfl_down_moments(const Moments<T>& m, int offset) {
  return Moments<T>{__shfl_down_sync(kFullWarp, m.count, offset),
                    __shfl_down_sync(kFullWarp, m.mean, offset),
                    __shfl_down_sync(kFullWarp, m.m2, offset)};
}

// Tree merge within a warp; lane 0 receives the warp's moments.
template <typename T>
__device__ __forceinline__ Moments<T> warp_merge_moments(Moments<T> m) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    m = moments_merge(m, shfl_down_moments(m, offset));
  }
  return m;
}

// Tree merge over the block; thread 0 receives the block's moments. `smem`
// holds kWarps moments.
template <typename T, int kWarps>
__device__ __forceinline__ Moments<T> block_merge_moments(Moments<T> m, Moments<T>* smem) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  m = warp_merge_moments(m);
  if (lane == 0) smem[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarps ? smem[lane] : moments_empty<T>();
    m = warp_merge_moments(m);
  }
  return m;
}

}  // namespace rlhf_ext
