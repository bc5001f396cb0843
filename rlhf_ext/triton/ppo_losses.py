"""ppo_policy_loss, value_loss, kl_loss, kl_penalty and loss_backward in Triton.

The Triton twin of csrc/cuda/ppo_losses.cu (same math as
csrc/include/rlhf_ext/ppo_math.h): level 1 is one program per row that sums
its tokens in BLOCK-wide lanes (then one tl.sum) and writes the per-token
derivatives and the row's partials; level 2 is one program that reduces the
rows in float64, in a fixed order, and writes the loss, the statistics and the
per-row weights. No atomics, no host synchronisation.

The per-token math is one @triton.jit function per family, as in the header:
policy_token (PolicyToken), value_token (ValueToken) and, for the KL family,
kl_value / kl_grad (rlhf_ext/triton/_kl.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from rlhf_ext.ops._vocab import (
    AGG_CODES,
    AGG_SEQ_MEAN_TOKEN_MEAN,
    AGG_SEQ_MEAN_TOKEN_SUM,
    AGG_TOKEN_MEAN,
    kl_kind_code,
    kl_straight_through,
)
from rlhf_ext.triton._common import (
    acc_tl_dtype,
    acc_torch_dtype,
    as_mask,
    clamp_nan,
    max_nan,
    maximum_nan,
    next_power_of_2,
)
from rlhf_ext.triton._kl import kl_grad, kl_value

MAX_BLOCK = 1024
FINISH_BLOCK = 128
APPLY_BLOCK = 1024
# The level-1 families (ppo_math.h PolicyFamily, ValueFamily, KLFamily): the FAMILY
# code of _loss_rows_kernel.
POLICY, VALUE, KL = 0, 1, 2
# Constexpr globals from here on: a global read inside a @triton.jit must be one.
POLICY_FAMILY = tl.constexpr(POLICY)
VALUE_FAMILY = tl.constexpr(VALUE)
# Aggregation codes (ppo_math.h LossAgg).
TOKEN_MEAN = tl.constexpr(AGG_TOKEN_MEAN)
SEQ_MEAN_TOKEN_SUM = tl.constexpr(AGG_SEQ_MEAN_TOKEN_SUM)
SEQ_MEAN_TOKEN_MEAN = tl.constexpr(AGG_SEQ_MEAN_TOKEN_MEAN)
# The float64 `params` tensor that both kernels read, one layout for every family
# (_run_loss fills it); a family reads only its own slots.
PARAM_RATIO_LO = tl.constexpr(0)  # policy: 1 - clip_eps
PARAM_CLIP_EPS = tl.constexpr(0)  # value: clip_eps (the policy's ratio_lo slot)
PARAM_RATIO_HI = tl.constexpr(1)  # policy: 1 + clip_eps_high
PARAM_DUAL_CLIP = tl.constexpr(2)  # policy: dual_clip (read with HAS_DUAL only)
PARAM_NORM = tl.constexpr(3)  # level 2: the "-norm" divisor (1 when T = 0: never used)
# Partial columns, one row of `partials` per batch row (ppo_math.h's kCols): column 0
# the loss sum, 1 the valid-token count, 2.. the statistics, sums except ratio_max
# (the policy's kMaxCol). Statistic k (rlhf_ext.ops._vocab.POLICY_STATS / VALUE_STATS
# order) is column FIRST_STAT_COL + k, and its mean over valid tokens is stats[k].
COL_LOSS = tl.constexpr(0)
COL_COUNT = tl.constexpr(1)
COL_CLIPFRAC = tl.constexpr(2)  # policy and value: clipped tokens
COL_CLIPFRAC_LOWER = tl.constexpr(3)  # policy: dual-clipped tokens
COL_APPROX_KL = tl.constexpr(4)  # policy: sum of -log_ratio (old - new, clamped)
COL_RATIO_MEAN = tl.constexpr(5)  # policy: sum of the ratios
COL_RATIO_MAX = tl.constexpr(6)  # policy: max of the ratios (0 for no valid token)
FIRST_STAT_COL = COL_CLIPFRAC
COLS = {POLICY: COL_RATIO_MAX.value + 1, VALUE: COL_CLIPFRAC.value + 1, KL: COL_COUNT.value + 1}


@triton.jit
def policy_token(
    logprob, old_logprob, advantage, ratio_lo, ratio_hi, dual_clip, HAS_DUAL: tl.constexpr
):
    """ppo_math.h: policy_token. Returns PolicyToken's fields in its order: (loss,
    grad, ratio, neg_log_ratio, clipped, clipped_lower). The dual clip is on with
    HAS_DUAL (the header's dual_clip > 0); clipped_lower is all False without it."""
    raw = logprob - old_logprob
    log_ratio = clamp_nan(raw, -20.0, 20.0)  # kKLLogRatioClamp
    ratio = tl.exp(log_ratio)
    unclipped = -advantage * ratio
    clipped_loss = -advantage * clamp_nan(ratio, ratio_lo, ratio_hi)
    clipped = clipped_loss > unclipped
    loss = tl.where(clipped, clipped_loss, unclipped)
    in_clamp = (raw >= -20.0) & (raw <= 20.0)
    grad = tl.where(clipped | (~in_clamp), 0.0, unclipped)
    clipped_lower = tl.zeros(loss.shape, dtype=tl.int1)
    if HAS_DUAL:
        floor_loss = -advantage * dual_clip
        clipped_lower = (advantage < 0) & (loss > floor_loss)
        loss = tl.where(clipped_lower, floor_loss, loss)
        grad = tl.where(clipped_lower, 0.0, grad)
    return loss, grad, ratio, -log_ratio, clipped, clipped_lower


@triton.jit
def value_token(value, old_value, ret, clip_eps, HAS_CLIP: tl.constexpr):
    """ppo_math.h: value_token, 0.5 included. Returns ValueToken's fields in its
    order: (loss, grad, clipped). Clipping is on with HAS_CLIP (the header's
    clip_eps > 0); clipped is all False without it."""
    err = value - ret
    loss = err * err
    grad = err
    clipped = tl.zeros(loss.shape, dtype=tl.int1)
    if HAS_CLIP:
        clipped_err = clamp_nan(value, old_value - clip_eps, old_value + clip_eps) - ret
        clipped_loss = clipped_err * clipped_err
        clipped = clipped_loss > loss
        # The header's nan_band: a NaN old value makes the loss and the gradient NaN.
        nan_band = old_value != old_value
        loss = tl.where(nan_band, old_value, tl.where(clipped, clipped_loss, loss))
        grad = tl.where(nan_band, old_value, tl.where(clipped, 0.0, err))
    return 0.5 * loss, grad, clipped


@triton.jit
def _loss_rows_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    mask_ptr,
    params_ptr,
    grad_ptr,
    partials_ptr,
    cols,
    FAMILY: tl.constexpr,
    NCOLS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    KIND: tl.constexpr,
    STRAIGHT_THROUGH: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Level 1, one program per row. Inputs (a, b, c): policy (logprobs,
    old_logprobs, advantages), value (values, old_values, returns), KL (logprobs,
    ref_logprobs, unread). Writes grad[row] (0 where not valid) and the row's
    NCOLS partial columns."""
    row = tl.program_id(0).to(tl.int64)
    base = row * cols
    lanes = tl.arange(0, BLOCK)
    if FAMILY == POLICY_FAMILY:
        ratio_lo = tl.load(params_ptr + PARAM_RATIO_LO).to(ACC)
        ratio_hi = tl.load(params_ptr + PARAM_RATIO_HI).to(ACC)
        dual_clip = tl.load(params_ptr + PARAM_DUAL_CLIP).to(ACC)
    elif FAMILY == VALUE_FAMILY:
        clip_eps = tl.load(params_ptr + PARAM_CLIP_EPS).to(ACC)
    # Per-lane sums of the partial columns (COL_*); ratio_max is a max.
    loss_sum = tl.zeros((BLOCK,), ACC)
    token_count = tl.zeros((BLOCK,), ACC)
    clipped_count = tl.zeros((BLOCK,), ACC)  # policy and value
    lower_count = tl.zeros((BLOCK,), ACC)  # policy only from here on
    neg_log_ratio_sum = tl.zeros((BLOCK,), ACC)
    ratio_sum = tl.zeros((BLOCK,), ACC)
    ratio_max = tl.zeros((BLOCK,), ACC)  # ratios are > 0: 0 is the max's identity
    for start in range(0, cols, BLOCK):
        pos = start + lanes
        inside = pos < cols
        valid = inside
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + base + pos, mask=inside, other=0) != 0)
        a = tl.load(a_ptr + base + pos, mask=inside, other=0.0).to(ACC)
        b = tl.load(b_ptr + base + pos, mask=inside, other=0.0).to(ACC)
        if FAMILY == POLICY_FAMILY:
            advantage = tl.load(c_ptr + base + pos, mask=inside, other=0.0).to(ACC)
            loss, grad, ratio, neg_log_ratio, clipped, clipped_lower = policy_token(
                a, b, advantage, ratio_lo, ratio_hi, dual_clip, HAS_DUAL
            )
            clipped_count += tl.where(valid & clipped, 1.0, 0.0)
            lower_count += tl.where(valid & clipped_lower, 1.0, 0.0)
            neg_log_ratio_sum += tl.where(valid, neg_log_ratio, 0.0)
            ratio_sum += tl.where(valid, ratio, 0.0)
            ratio_max = maximum_nan(ratio_max, tl.where(valid, ratio, 0.0))
        elif FAMILY == VALUE_FAMILY:
            ret = tl.load(c_ptr + base + pos, mask=inside, other=0.0).to(ACC)
            loss, grad, clipped = value_token(a, b, ret, clip_eps, HAS_CLIP)
            if HAS_CLIP:
                clipped_count += tl.where(valid & clipped, 1.0, 0.0)
        else:
            loss = kl_value(a, b, KIND)
            grad = kl_grad(a, b, KIND, STRAIGHT_THROUGH)
        loss_sum += tl.where(valid, loss, 0.0)
        token_count += tl.where(valid, 1.0, 0.0)
        tl.store(grad_ptr + base + pos, tl.where(valid, grad, 0.0), mask=inside)
    out = partials_ptr + row * NCOLS
    tl.store(out + COL_LOSS, tl.sum(loss_sum, axis=0))
    tl.store(out + COL_COUNT, tl.sum(token_count, axis=0))
    if NCOLS > COL_CLIPFRAC:
        tl.store(out + COL_CLIPFRAC, tl.sum(clipped_count, axis=0))
    if NCOLS > COL_CLIPFRAC_LOWER:
        tl.store(out + COL_CLIPFRAC_LOWER, tl.sum(lower_count, axis=0))
        tl.store(out + COL_APPROX_KL, tl.sum(neg_log_ratio_sum, axis=0))
        tl.store(out + COL_RATIO_MEAN, tl.sum(ratio_sum, axis=0))
        tl.store(out + COL_RATIO_MAX, max_nan(ratio_max, 0))


@triton.jit
def _agg_loss(agg: tl.constexpr, loss_sum, mean_sum, tokens, rows, norm):
    """ppo_math.h: agg_loss (float64); 0 for a batch without a valid token."""
    if agg == TOKEN_MEAN:
        loss = loss_sum / tl.maximum(tokens, 1.0)
    elif agg == SEQ_MEAN_TOKEN_SUM:
        loss = loss_sum / tl.maximum(rows, 1.0)
    elif agg == SEQ_MEAN_TOKEN_MEAN:
        loss = mean_sum / tl.maximum(rows, 1.0)
    else:
        loss = loss_sum / norm
    return tl.where(tokens > 0, loss, 0.0)


@triton.jit
def _agg_weight(agg: tl.constexpr, row_tokens, tokens, rows, norm):
    """ppo_math.h: agg_row_weight (float64)."""
    if agg == TOKEN_MEAN:
        w = 1.0 / tl.maximum(tokens, 1.0) + row_tokens * 0.0
    elif agg == SEQ_MEAN_TOKEN_SUM:
        w = 1.0 / tl.maximum(rows, 1.0) + row_tokens * 0.0
    elif agg == SEQ_MEAN_TOKEN_MEAN:
        w = 1.0 / (tl.maximum(rows, 1.0) * tl.maximum(row_tokens, 1.0))
    else:
        w = 1.0 / norm + row_tokens * 0.0
    return tl.where(row_tokens > 0, w, 0.0)


@triton.jit
def _stat_mean(stats_ptr, COL: tl.constexpr, total, per_token):
    """stats[COL - FIRST_STAT_COL] = total / valid tokens, as float32."""
    tl.store(stats_ptr + (COL - FIRST_STAT_COL), (total * per_token).to(tl.float32))


@triton.jit
def _loss_finish_kernel(
    partials_ptr,
    params_ptr,
    loss_ptr,
    stats_ptr,
    row_weight_ptr,
    rows,
    NCOLS: tl.constexpr,
    AGG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Level 2, one program: reduces the rows' partials in float64 and writes the
    loss, the statistics (stats[k]: column FIRST_STAT_COL + k) and row_weight."""
    lanes = tl.arange(0, BLOCK)
    norm = tl.load(params_ptr + PARAM_NORM).to(tl.float64)
    # Per-lane float64 sums over the rows: the partial columns (ratio_max a max),
    # and the header's mean_sum (of row loss sum / row count) and non-empty rows.
    loss_sum = tl.zeros((BLOCK,), tl.float64)
    token_count = tl.zeros((BLOCK,), tl.float64)
    mean_sum = tl.zeros((BLOCK,), tl.float64)
    nonempty_rows = tl.zeros((BLOCK,), tl.float64)
    clipped_count = tl.zeros((BLOCK,), tl.float64)
    lower_count = tl.zeros((BLOCK,), tl.float64)
    neg_log_ratio_sum = tl.zeros((BLOCK,), tl.float64)
    ratio_sum = tl.zeros((BLOCK,), tl.float64)
    ratio_max = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, rows, BLOCK):
        r = start + lanes
        inside = r < rows
        part = partials_ptr + r.to(tl.int64) * NCOLS
        row_loss = tl.load(part + COL_LOSS, mask=inside, other=0.0).to(tl.float64)
        row_count = tl.load(part + COL_COUNT, mask=inside, other=0.0).to(tl.float64)
        loss_sum += row_loss
        token_count += row_count
        mean_sum += tl.where(row_count > 0, row_loss / tl.maximum(row_count, 1.0), 0.0)
        nonempty_rows += tl.where(row_count > 0, 1.0, 0.0)
        if NCOLS > COL_CLIPFRAC:
            clipped_count += tl.load(part + COL_CLIPFRAC, mask=inside, other=0.0).to(tl.float64)
        if NCOLS > COL_CLIPFRAC_LOWER:
            lower_count += tl.load(part + COL_CLIPFRAC_LOWER, mask=inside, other=0.0).to(tl.float64)
            neg_log_ratio_sum += tl.load(part + COL_APPROX_KL, mask=inside, other=0.0).to(
                tl.float64
            )
            ratio_sum += tl.load(part + COL_RATIO_MEAN, mask=inside, other=0.0).to(tl.float64)
            row_ratio_max = tl.load(part + COL_RATIO_MAX, mask=inside, other=0.0).to(tl.float64)
            ratio_max = maximum_nan(ratio_max, row_ratio_max)
    total = tl.sum(loss_sum, axis=0)
    tokens = tl.sum(token_count, axis=0)
    nonempty = tl.sum(nonempty_rows, axis=0)
    loss = _agg_loss(AGG, total, tl.sum(mean_sum, axis=0), tokens, nonempty, norm)
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
    per_token = 1.0 / tl.maximum(tokens, 1.0)
    if NCOLS > COL_CLIPFRAC:
        _stat_mean(stats_ptr, COL_CLIPFRAC, tl.sum(clipped_count, axis=0), per_token)
    if NCOLS > COL_CLIPFRAC_LOWER:
        _stat_mean(stats_ptr, COL_CLIPFRAC_LOWER, tl.sum(lower_count, axis=0), per_token)
        _stat_mean(stats_ptr, COL_APPROX_KL, tl.sum(neg_log_ratio_sum, axis=0), per_token)
        _stat_mean(stats_ptr, COL_RATIO_MEAN, tl.sum(ratio_sum, axis=0), per_token)
        tl.store(stats_ptr + (COL_RATIO_MAX - FIRST_STAT_COL), max_nan(ratio_max, 0).to(tl.float32))
    for start in range(0, rows, BLOCK):
        r = start + lanes
        inside = r < rows
        row_count = tl.load(
            partials_ptr + r.to(tl.int64) * NCOLS + COL_COUNT, mask=inside, other=0.0
        )
        w = _agg_weight(AGG, row_count.to(tl.float64), tokens, nonempty, norm)
        tl.store(row_weight_ptr + r, w.to(row_weight_ptr.dtype.element_ty), mask=inside)


def _run_loss(family, a, b, c, mask, params, agg, *, kind="k1", dual=False, clip=False):
    """Launch level 1 and 2; returns (loss, stats, grad, row_weight). `params`: the
    PARAM_* slots, [ratio_lo or clip_eps, ratio_hi, dual_clip, norm]; `dual` / `clip`
    switch the policy's dual clip and the value clipping on."""
    rows, cols = a.shape
    acc = acc_torch_dtype(a)
    ncols = COLS[family]
    device = a.device
    loss = torch.empty((), dtype=acc, device=device)
    stats = torch.empty((ncols - FIRST_STAT_COL.value,), dtype=torch.float32, device=device)
    grad = torch.empty((rows, cols), dtype=acc, device=device)
    row_weight = torch.empty((rows,), dtype=acc, device=device)
    partials = torch.empty((rows, ncols), dtype=acc, device=device)
    # float64 parameters in a tensor: a Python float argument would be rounded to fp32.
    # The "-norm" divisor of an empty (T = 0) batch is never used; 1 keeps 0/0 out.
    params = params[:3] + [params[3] if params[3] > 0 else 1.0]
    params = torch.tensor(params, dtype=torch.float64, device=device)
    if rows > 0:
        wrap_triton(_loss_rows_kernel)[(rows,)](
            a.contiguous(),
            b.contiguous(),
            (c if c is not None else a).contiguous(),
            as_mask(mask, a),
            params,
            grad,
            partials,
            cols,
            FAMILY=family,
            NCOLS=ncols,
            HAS_MASK=mask is not None,
            HAS_DUAL=dual,
            HAS_CLIP=clip,
            KIND=kl_kind_code(kind),
            STRAIGHT_THROUGH=kl_straight_through(kind),
            ACC=acc_tl_dtype(a),
            BLOCK=min(next_power_of_2(cols), MAX_BLOCK),
        )
    wrap_triton(_loss_finish_kernel)[(1,)](
        partials,
        params,
        loss,
        stats,
        row_weight,
        rows,
        NCOLS=ncols,
        AGG=AGG_CODES[agg],
        BLOCK=FINISH_BLOCK,
    )
    return loss, stats, grad, row_weight


@triton_op("rlhf_ext::ppo_policy_loss_triton", mutates_args=())
def ppo_policy_loss_triton(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    clip_eps: float,
    clip_eps_high: float,
    dual_clip: float,
    agg: str,
    loss_scale_factor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton policy loss with the signature of torch.ops.rlhf_ext.ppo_policy_loss."""
    norm = loss_scale_factor if loss_scale_factor > 0 else float(logprobs.shape[1])
    params = [1.0 - clip_eps, 1.0 + clip_eps_high, dual_clip, norm]
    return _run_loss(
        POLICY, logprobs, old_logprobs, advantages, mask, params, agg, dual=dual_clip > 0
    )


@triton_op("rlhf_ext::value_loss_triton", mutates_args=())
def value_loss_triton(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None,
    clip_eps: float,
    agg: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton value loss with the signature of torch.ops.rlhf_ext.value_loss."""
    params = [clip_eps, 0.0, 0.0, float(values.shape[1])]
    return _run_loss(VALUE, values, old_values, returns, mask, params, agg, clip=clip_eps > 0)


@triton_op("rlhf_ext::kl_loss_triton", mutates_args=())
def kl_loss_triton(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    kind: str,
    agg: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton KL loss with the signature of torch.ops.rlhf_ext.kl_loss."""
    params = [0.0, 0.0, 0.0, float(logprobs.shape[1])]
    return _run_loss(KL, logprobs, ref_logprobs, None, mask, params, agg, kind=kind)


@triton.jit
def _kl_penalty_kernel(
    lp_ptr,
    ref_ptr,
    value_ptr,
    grad_ptr,
    n,
    KIND: tl.constexpr,
    STRAIGHT_THROUGH: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    lp = tl.load(lp_ptr + offs, mask=inside, other=0.0).to(ACC)
    ref = tl.load(ref_ptr + offs, mask=inside, other=0.0).to(ACC)
    tl.store(value_ptr + offs, kl_value(lp, ref, KIND), mask=inside)
    tl.store(grad_ptr + offs, kl_grad(lp, ref, KIND, STRAIGHT_THROUGH), mask=inside)


@triton_op("rlhf_ext::kl_penalty_triton", mutates_args=())
def kl_penalty_triton(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton per-token KL with the signature of torch.ops.rlhf_ext.kl_penalty."""
    acc = acc_torch_dtype(logprobs)
    value = torch.empty(logprobs.shape, dtype=acc, device=logprobs.device)
    grad = torch.empty(logprobs.shape, dtype=acc, device=logprobs.device)
    n = logprobs.numel()
    if n:
        wrap_triton(_kl_penalty_kernel)[(triton.cdiv(n, APPLY_BLOCK),)](
            logprobs.contiguous(),
            ref_logprobs.contiguous(),
            value,
            grad,
            n,
            KIND=kl_kind_code(kind),
            STRAIGHT_THROUGH=kl_straight_through(kind),
            ACC=acc_tl_dtype(logprobs),
            BLOCK=APPLY_BLOCK,
        )
    return value, grad


@triton.jit
def _loss_backward_kernel(up_ptr, grad_ptr, row_weight_ptr, out_ptr, n, cols, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    up = tl.load(up_ptr)
    g = tl.load(grad_ptr + offs, mask=inside, other=0.0)
    w = tl.load(row_weight_ptr + offs // cols, mask=inside, other=0.0)
    tl.store(out_ptr + offs, (g * (up * w)).to(out_ptr.dtype.element_ty), mask=inside)


@triton_op("rlhf_ext::loss_backward_triton", mutates_args=())
def loss_backward_triton(
    grad_loss: torch.Tensor, grad: torch.Tensor, row_weight: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Triton twin of torch.ops.rlhf_ext.loss_backward."""
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    n = grad.numel()
    if n:
        wrap_triton(_loss_backward_kernel)[(triton.cdiv(n, APPLY_BLOCK),)](
            grad_loss.to(grad.dtype).reshape(1).contiguous(),
            grad.contiguous(),
            row_weight.to(grad.dtype).contiguous(),
            out,
            n,
            grad.shape[1],
            BLOCK=APPLY_BLOCK,
        )
    return out
