"""masked_mean and masked_whiten in Triton: per-chunk moments (count, mean,
sum of squared deviations) of fixed 4096-element chunks, merged per row in
float64 with the exact pairwise formula, then whitening applied elementwise.
The chunk size matches the compiled kernels (csrc/include/rlhf_ext/stats_host.h)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from rlhf_ext.triton._common import acc_tl_dtype, acc_torch_dtype, as_mask

CHUNK = 4096
MERGE_BLOCK = 1024
APPLY_BLOCK = 1024


@triton.jit
def _moments_partial_kernel(
    x_ptr,
    mask_ptr,
    partial_ptr,
    cols,
    chunks,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
):
    task = tl.program_id(0).to(tl.int64)
    row = task // chunks
    lo = (task % chunks) * CHUNK
    offs = lo + tl.arange(0, CHUNK)
    inside = offs < cols
    x = tl.load(x_ptr + row * cols + offs, mask=inside, other=0.0).to(ACC)
    valid = inside
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + row * cols + offs, mask=inside, other=0) != 0)
    # where(), not x * weight: a masked-out inf or NaN must not reach the sums.
    x = tl.where(valid, x, 0.0)
    count = tl.sum(tl.where(valid, 1.0, 0.0).to(ACC), axis=0)
    mean = tl.sum(x, axis=0) / tl.maximum(count, 1.0)
    centered = tl.where(valid, x - mean, 0.0)
    m2 = tl.sum(centered * centered, axis=0)
    tl.store(partial_ptr + task * 3 + 0, count)
    tl.store(partial_ptr + task * 3 + 1, mean)
    tl.store(partial_ptr + task * 3 + 2, m2)


@triton.jit
def _moments_merge_kernel(
    partial_ptr,
    stats_ptr,
    chunks,
    unbiased,
    BLOCK: tl.constexpr,
):
    """Row statistics from its chunks: n = sum n_i, mean = sum n_i mean_i / n,
    m2 = sum m2_i + sum n_i (mean_i - mean)^2, all in float64."""
    row = tl.program_id(0).to(tl.int64)
    base = partial_ptr + row * chunks * 3
    count_acc = tl.zeros((BLOCK,), dtype=tl.float64)
    sum_acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, chunks, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        inside = idx < chunks
        n = tl.load(base + idx * 3, mask=inside, other=0.0).to(tl.float64)
        mu = tl.load(base + idx * 3 + 1, mask=inside, other=0.0).to(tl.float64)
        count_acc += n
        sum_acc += n * mu
    count = tl.sum(count_acc, axis=0)
    mean = tl.sum(sum_acc, axis=0) / tl.maximum(count, 1.0)
    m2_acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, chunks, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        inside = idx < chunks
        n = tl.load(base + idx * 3, mask=inside, other=0.0).to(tl.float64)
        mu = tl.load(base + idx * 3 + 1, mask=inside, other=0.0).to(tl.float64)
        m2 = tl.load(base + idx * 3 + 2, mask=inside, other=0.0).to(tl.float64)
        m2_acc += m2 + n * (mu - mean) * (mu - mean)
    m2_total = tl.sum(m2_acc, axis=0)
    denom = tl.where(unbiased != 0, count - 1.0, count)
    var = tl.where(denom > 0, m2_total / tl.maximum(denom, 1.0), 0.0)
    tl.store(stats_ptr + row * 3 + 0, mean.to(stats_ptr.dtype.element_ty))
    tl.store(stats_ptr + row * 3 + 1, var.to(stats_ptr.dtype.element_ty))
    tl.store(stats_ptr + row * 3 + 2, count.to(stats_ptr.dtype.element_ty))


@triton.jit
def _whiten_apply_kernel(
    x_ptr,
    stats_ptr,
    out_ptr,
    n,
    eps,
    SHIFT_MEAN: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    mean = tl.load(stats_ptr).to(ACC)
    var = tl.load(stats_ptr + 1).to(ACC)
    inv_std = 1.0 / tl.sqrt(var + eps)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(ACC)
    out = (x - mean) * inv_std
    if not SHIFT_MEAN:
        out = out + mean
    tl.store(out_ptr + offs, out, mask=inside)


def _as_rows(x: torch.Tensor, mask: torch.Tensor | None, dim: int | None):
    """x (and mask) as contiguous [rows, cols] with the reduced dim last."""
    if dim is None:
        return x.reshape(1, -1).contiguous(), None if mask is None else mask.reshape(1, -1)
    moved = x.movedim(dim, -1)
    cols = moved.shape[-1]
    rows = moved.numel() // cols if cols else int(torch.Size(moved.shape[:-1]).numel())
    x2 = moved.contiguous().reshape(rows, cols)
    m2 = None if mask is None else mask.movedim(dim, -1).contiguous().reshape(rows, cols)
    return x2, m2


def _row_stats(x2: torch.Tensor, m2: torch.Tensor | None, unbiased: bool) -> torch.Tensor:
    """[rows, 3] (mean, variance, count) in the accumulation dtype."""
    rows, cols = x2.shape
    acc = acc_torch_dtype(x2)
    stats = torch.empty((rows, 3), dtype=acc, device=x2.device)
    if rows == 0:
        return stats
    chunks = max(triton.cdiv(cols, CHUNK), 1)
    partial = torch.empty((rows * chunks, 3), dtype=acc, device=x2.device)
    wrap_triton(_moments_partial_kernel)[(rows * chunks,)](
        x2,
        as_mask(m2, x2),
        partial,
        cols,
        chunks,
        HAS_MASK=m2 is not None,
        ACC=acc_tl_dtype(x2),
        CHUNK=CHUNK,
        num_warps=8,
    )
    wrap_triton(_moments_merge_kernel)[(rows,)](
        partial,
        stats,
        chunks,
        int(unbiased),
        BLOCK=MERGE_BLOCK,
        num_warps=4,
    )
    return stats


@triton_op("rlhf_ext::masked_mean_triton", mutates_args=())
def masked_mean_triton(
    x: torch.Tensor, mask: torch.Tensor | None, dim: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton masked mean with the signature of torch.ops.rlhf_ext.masked_mean."""
    if dim is not None:
        dim = dim % x.dim()
    x2, m2 = _as_rows(x, mask, dim)
    stats = _row_stats(x2, m2, unbiased=False)
    shape = () if dim is None else x.shape[:dim] + x.shape[dim + 1 :]
    return stats[:, 0].reshape(shape).clone(), stats[:, 2].reshape(shape).clone()


@triton_op("rlhf_ext::masked_whiten_triton", mutates_args=())
def masked_whiten_triton(
    x: torch.Tensor, mask: torch.Tensor | None, shift_mean: bool, unbiased: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton whitening with the signature of torch.ops.rlhf_ext.masked_whiten."""
    x2, m2 = _as_rows(x, mask, None)
    stats = _row_stats(x2, m2, unbiased)
    out = torch.empty(x.shape, dtype=acc_torch_dtype(x), device=x.device)
    n = x2.numel()
    if n:
        wrap_triton(_whiten_apply_kernel)[(triton.cdiv(n, APPLY_BLOCK),)](
            x2,
            stats,
            out,
            n,
            eps,
            SHIFT_MEAN=shift_mean,
            ACC=acc_tl_dtype(x),
            BLOCK=APPLY_BLOCK,
            num_warps=4,
        )
    return out, stats[0, 2].clone()
