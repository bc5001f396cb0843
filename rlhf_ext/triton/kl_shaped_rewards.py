"""kl_shaped_rewards in Triton: one program per row; a first sweep finds the
last valid token, a second writes -kl_coef * KL plus the score there."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from rlhf_ext.ops._vocab import kl_kind_code
from rlhf_ext.triton._common import acc_tl_dtype, acc_torch_dtype, as_mask, next_power_of_2
from rlhf_ext.triton._kl import kl_value

MAX_BLOCK = 1024


@triton.jit
def _kl_shaped_rewards_fwd_kernel(
    scores_ptr,
    lp_ptr,
    ref_ptr,
    mask_ptr,
    out_ptr,
    cols,
    kl_coef_ptr,
    HAS_MASK: tl.constexpr,
    KIND: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * cols
    lanes = tl.arange(0, BLOCK)
    last = cols - 1
    if HAS_MASK:
        last_seen = tl.full((BLOCK,), -1, dtype=tl.int64)
        for start in range(0, cols, BLOCK):
            pos = start + lanes
            valid = (pos < cols) & (tl.load(mask_ptr + base + pos, mask=pos < cols, other=0) != 0)
            last_seen = tl.maximum(last_seen, tl.where(valid, pos, -1))
        last = tl.max(last_seen, axis=0)
    score = tl.load(scores_ptr + row).to(ACC)
    kl_coef = tl.load(kl_coef_ptr).to(ACC)
    for start in range(0, cols, BLOCK):
        pos = start + lanes
        inside = pos < cols
        valid = inside
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + base + pos, mask=inside, other=0) != 0)
        lp = tl.load(lp_ptr + base + pos, mask=inside, other=0.0).to(ACC)
        ref = tl.load(ref_ptr + base + pos, mask=inside, other=0.0).to(ACC)
        reward = tl.where(valid, -kl_coef * kl_value(lp, ref, KIND), 0.0)
        reward = tl.where(pos == last, reward + score, reward)
        tl.store(out_ptr + base + pos, reward, mask=inside)


@triton_op("rlhf_ext::kl_shaped_rewards_triton", mutates_args=())
def kl_shaped_rewards_triton(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    kl_coef: float,
    kl: str,
) -> torch.Tensor:
    """Triton reward shaping with the signature of torch.ops.rlhf_ext.kl_shaped_rewards."""
    rows, cols = logprobs.shape
    acc = acc_torch_dtype(logprobs)
    out = torch.empty((rows, cols), dtype=acc, device=logprobs.device)
    if rows == 0 or cols == 0:
        return out
    block = min(next_power_of_2(cols), MAX_BLOCK)
    wrap_triton(_kl_shaped_rewards_fwd_kernel)[(rows,)](
        scores.to(acc).contiguous(),
        logprobs.contiguous(),
        ref_logprobs.contiguous(),
        # A tensor, not a Python float: Triton would round the coefficient to fp32.
        as_mask(mask, logprobs),
        out,
        cols,
        logprobs.new_full((1,), kl_coef, dtype=acc),
        HAS_MASK=mask is not None,
        KIND=kl_kind_code(kl),
        ACC=acc_tl_dtype(logprobs),
        BLOCK=block,
    )
    return out
