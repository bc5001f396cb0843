"""GAE in Triton: one program per row, chunks right to left, each chunk two
reversed associative scans of affine maps (see csrc/include/rlhf_ext/gae_math.h
for the recurrence), carried state between chunks."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from rlhf_ext.triton._common import (
    acc_tl_dtype,
    acc_torch_dtype,
    affine_combine_reversed,
    as_mask,
    next_power_of_2,
    optional,
)

# The chunk (block) size fixes the order of the scan's rounding: it depends on
# the padded row length only (or is fixed for packed rows), so a row gives the
# same bits in any batch.
MAX_BLOCK = 1024


@triton.jit
def _gae_fwd_kernel(
    rewards_ptr,
    values_ptr,
    mask_ptr,
    cu_ptr,
    last_value_ptr,
    gamma_ptr,
    lam_ptr,
    advantages_ptr,
    returns_ptr,
    row_len,
    total,
    gamma_scalar,
    lam_scalar,
    HAS_MASK: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_LAST_VALUE: tl.constexpr,
    HAS_GAMMA_ROWS: tl.constexpr,
    HAS_LAM_ROWS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if PACKED:
        # Clamped so that a malformed cu_seqlens can never index out of bounds.
        start = tl.minimum(tl.maximum(tl.load(cu_ptr + row).to(tl.int64), 0), total)
        stop = tl.minimum(tl.maximum(tl.load(cu_ptr + row + 1).to(tl.int64), start), total)
        length = stop - start
    else:
        start = row * row_len
        length = row_len
    gamma = tl.zeros((), dtype=ACC) + gamma_scalar
    lam = tl.zeros((), dtype=ACC) + lam_scalar
    if HAS_GAMMA_ROWS:
        gamma = tl.load(gamma_ptr + row).to(ACC)
    if HAS_LAM_ROWS:
        lam = tl.load(lam_ptr + row).to(ACC)
    carry_value = tl.zeros((), dtype=ACC)
    if HAS_LAST_VALUE:
        carry_value = tl.load(last_value_ptr + row).to(ACC)
    carry_advantage = tl.zeros((), dtype=ACC)

    lanes = tl.arange(0, BLOCK)
    num_chunks = tl.cdiv(length, BLOCK)
    for step in range(0, num_chunks):
        pos = (num_chunks - 1 - step) * BLOCK + lanes
        inside = pos < length
        reward = tl.load(rewards_ptr + start + pos, mask=inside, other=0.0).to(ACC)
        value = tl.load(values_ptr + start + pos, mask=inside, other=0.0).to(ACC)
        valid = inside
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + start + pos, mask=inside, other=0) != 0)

        # Next valid value seen from each position: scan the maps of positions
        # pos + 1, with the last lane's replaced by the identity because the
        # carry already holds everything right of the chunk.
        nxt = pos + 1
        nxt_inside = (nxt < length) & (lanes < BLOCK - 1)
        value_next = tl.load(values_ptr + start + nxt, mask=nxt_inside, other=0.0).to(ACC)
        valid_next = nxt_inside
        if HAS_MASK:
            valid_next = valid_next & (
                tl.load(mask_ptr + start + nxt, mask=nxt_inside, other=0) != 0
            )
        a_w = tl.where(valid_next, 0.0, 1.0).to(ACC)
        b_w = tl.where(valid_next, value_next, 0.0).to(ACC)
        a_w, b_w = tl.associative_scan((a_w, b_w), 0, affine_combine_reversed, reverse=True)
        next_value = a_w * carry_value + b_w

        delta = reward + gamma * next_value - value
        a_adv = tl.where(valid, gamma * lam, 1.0).to(ACC)
        b_adv = tl.where(valid, delta, 0.0).to(ACC)
        a_adv, b_adv = tl.associative_scan((a_adv, b_adv), 0, affine_combine_reversed, reverse=True)
        advantage = a_adv * carry_advantage + b_adv

        tl.store(advantages_ptr + start + pos, tl.where(valid, advantage, 0.0), mask=inside)
        tl.store(returns_ptr + start + pos, tl.where(valid, advantage + value, 0.0), mask=inside)

        first = lanes == 0
        carry_value = tl.sum(tl.where(first, tl.where(valid, value, next_value), 0.0), axis=0)
        carry_advantage = tl.sum(tl.where(first, advantage, 0.0), axis=0)


@triton_op("rlhf_ext::gae_triton", mutates_args=())
def gae_triton(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    last_value: torch.Tensor | None,
    gamma_rows: torch.Tensor | None,
    lam_rows: torch.Tensor | None,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton GAE with the signature of torch.ops.rlhf_ext.gae (checked by rlhf_ext.gae)."""
    acc = acc_torch_dtype(rewards)
    advantages = torch.empty(rewards.shape, dtype=acc, device=rewards.device)
    returns = torch.empty(rewards.shape, dtype=acc, device=rewards.device)
    packed = cu_seqlens is not None
    rows = cu_seqlens.numel() - 1 if packed else rewards.shape[0]
    row_len = 0 if packed else rewards.shape[1]
    if rows == 0 or rewards.numel() == 0:
        return advantages, returns
    block = MAX_BLOCK if packed else min(next_power_of_2(row_len), MAX_BLOCK)
    if acc == torch.float64:
        # Triton types Python floats as fp32: float64 discounts go in as per-row tensors.
        gamma_rows = (
            gamma_rows if gamma_rows is not None else rewards.new_full((rows,), gamma, dtype=acc)
        )
        lam_rows = lam_rows if lam_rows is not None else rewards.new_full((rows,), lam, dtype=acc)
    dummy_cu = rewards.new_empty((2,), dtype=torch.int64)
    wrap_triton(_gae_fwd_kernel)[(rows,)](
        rewards.contiguous(),
        values.contiguous(),
        as_mask(mask, rewards),
        cu_seqlens.contiguous() if packed else dummy_cu,
        optional(last_value, rewards, acc),
        optional(gamma_rows, rewards, acc),
        optional(lam_rows, rewards, acc),
        advantages,
        returns,
        row_len,
        rewards.numel(),
        gamma,
        lam,
        HAS_MASK=mask is not None,
        PACKED=packed,
        HAS_LAST_VALUE=last_value is not None,
        HAS_GAMMA_ROWS=gamma_rows is not None,
        HAS_LAM_ROWS=lam_rows is not None,
        ACC=acc_tl_dtype(rewards),
        BLOCK=block,
        num_warps=4 if block <= 512 else 8,
    )
    return advantages, returns
