"""policy_loss, value_loss, kl_loss, kl_penalty and loss_backward in Triton.

The Triton twin of csrc/cuda/ppo_losses.cu (same math as
csrc/include/rlhf_ext/ppo_math.h and policy_math.h): level 1 is one program per
row that sums its tokens in BLOCK-wide lanes (then one tl.sum) and writes the
per-token derivatives and the row's partials; the row-mean policy kinds (gspo,
gspo_token) first take the row's mean log-ratio in one more pass over the row
(the row prologue, summed the same way). Level 2 is one program that reduces the
rows in float64, in a fixed order, and writes the loss, the statistics and the
per-row weights, into which it folds the row-coupled kind's (gspo's) row
gradient; for the row-level kind (geo_mean) it first turns each row's sums into
the row's loss and ratio. No atomics, no host synchronisation.

The per-token math is one @triton.jit function per family, as in the headers:
policy_kind_token (policy_math.h's, the kind a POLICY_KIND constexpr, with its
helpers policy_token, sequence_surrogate and dppo_term), value_token
(ValueToken) and, for the KL family, kl_value / kl_grad (rlhf_ext/triton/_kl.py).
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
    KL_LOSS_STATS,
    POLICY_KIND_CODES,
    POLICY_KIND_PARAMS,
    POLICY_ROW_COUPLED_KINDS,
    POLICY_ROW_LEVEL_KINDS,
    POLICY_ROW_MEAN_KINDS,
    POLICY_STATS,
    VALUE_STATS,
    kl_kind_code,
    kl_straight_through,
)
from rlhf_ext.ops._vocab import DPPO_KL_EPS as _DPPO_KL_EPS
from rlhf_ext.ops._vocab import GEO_MEAN_EPS as _GEO_MEAN_EPS
from rlhf_ext.ops._vocab import GSPO_TOKEN_LOG_RATIO_MAX as _GSPO_TOKEN_LOG_RATIO_MAX
from rlhf_ext.triton._common import (
    acc_tl_dtype,
    acc_torch_dtype,
    as_mask,
    clamp_nan,
    max_nan,
    maximum_nan,
    minimum_nan,
    next_power_of_2,
)
from rlhf_ext.triton._kl import kl_grad, kl_value

MAX_BLOCK = 1024
# The policy family's float64 rows kernel runs 8 warps on a block of 512 lanes or more
# (2 or 4 lanes a thread, two registers each): with Triton's default 4 warps it spills
# on sm_80 / sm_90 (dppo_kl's float64 exp and log the most).
POLICY_FLOAT64_WIDE_BLOCK = 512
POLICY_FLOAT64_WIDE_WARPS = 8
ROWS_WARPS = 4  # Triton's default
FINISH_BLOCK = 128
APPLY_BLOCK = 1024
# The level-1 families (ppo_math.h PolicyFamily, ValueFamily, KLFamily): the FAMILY
# code of _loss_rows_kernel.
POLICY, VALUE, KL = 0, 1, 2
# Constexpr globals from here on: a global read inside a @triton.jit must be one.
POLICY_FAMILY = tl.constexpr(POLICY)
VALUE_FAMILY = tl.constexpr(VALUE)
# Policy-loss kind codes (policy_math.h PolicyKind): the POLICY_KIND of the kernels.
KIND_PPO = tl.constexpr(POLICY_KIND_CODES["ppo"])
KIND_REINFORCE = tl.constexpr(POLICY_KIND_CODES["reinforce"])
KIND_CISPO = tl.constexpr(POLICY_KIND_CODES["cispo"])
KIND_SAPO = tl.constexpr(POLICY_KIND_CODES["sapo"])
KIND_DPPO_TV = tl.constexpr(POLICY_KIND_CODES["dppo_tv"])
KIND_DPPO_KL = tl.constexpr(POLICY_KIND_CODES["dppo_kl"])
KIND_DRO = tl.constexpr(POLICY_KIND_CODES["dro"])
KIND_GSPO = tl.constexpr(POLICY_KIND_CODES["gspo"])
KIND_GSPO_TOKEN = tl.constexpr(POLICY_KIND_CODES["gspo_token"])
KIND_GEO_MEAN = tl.constexpr(POLICY_KIND_CODES["geo_mean"])
GEO_MEAN_EPS = tl.constexpr(_GEO_MEAN_EPS)  # level 2 (float64)
LOG_RATIO_CLAMP = tl.constexpr(20.0)  # kl.h kKLLogRatioClamp
GSPO_TOKEN_LOG_RATIO_MAX = tl.constexpr(_GSPO_TOKEN_LOG_RATIO_MAX)
# policy_math.h's kDPPOKLEps is a float: T(kDPPOKLEps) is the float32-rounded 1e-8 in
# float64 too. (A Python float in a Triton expression takes the other operand's dtype.)
DPPO_KL_EPS = tl.constexpr(float(torch.tensor(_DPPO_KL_EPS, dtype=torch.float32)))
# Aggregation codes (ppo_math.h LossAgg).
TOKEN_MEAN = tl.constexpr(AGG_TOKEN_MEAN)
SEQ_MEAN_TOKEN_SUM = tl.constexpr(AGG_SEQ_MEAN_TOKEN_SUM)
SEQ_MEAN_TOKEN_MEAN = tl.constexpr(AGG_SEQ_MEAN_TOKEN_MEAN)
# The float64 `params` tensor that both kernels read, one layout for every family
# (_run_loss fills it); a family reads only its own slots. Slots 0..6 are
# policy_math.h's PolicyParams in its order; the value family reuses slot 0.
PARAM_LO = tl.constexpr(0)  # policy: the ratio band's low end, or dppo's low threshold
PARAM_CLIP_EPS = tl.constexpr(0)  # value: clip_eps (the policy's lo slot)
PARAM_HI = tl.constexpr(1)  # policy: the ratio band's high end, or dppo's high threshold
PARAM_DUAL_CLIP = tl.constexpr(2)  # ppo: dual_clip (read with HAS_DUAL only)
PARAM_RATIO_CAP = tl.constexpr(3)  # dppo: the detached ratio's cap; ppo: TRL's delta (inf: none)
PARAM_TAU_POS = tl.constexpr(4)  # sapo: the gate temperature for A > 0
PARAM_TAU_NEG = tl.constexpr(5)  # sapo: the gate temperature for A <= 0
PARAM_BETA = tl.constexpr(6)  # dro: the weight of the quadratic log-ratio penalty
PARAM_NORM = tl.constexpr(7)  # level 2: the "-norm" divisor (1 when T = 0: never used)
FAMILY_PARAMS = PARAM_NORM.value  # the slots before the norm
# Partial columns, one row of `partials` per batch row (ppo_math.h's kCols): column 0
# the loss sum, 1 the valid-token count, 2.. the statistics, sums except ratio_max
# (the policy's kMaxCol), then the policy's row gradient (kRowGradCol). Statistic k
# (rlhf_ext.ops._vocab.POLICY_STATS / VALUE_STATS order) is column FIRST_STAT_COL + k,
# and its mean over valid tokens is stats[k] (ratio_max: the max itself).
COL_LOSS = tl.constexpr(0)
COL_COUNT = tl.constexpr(1)
COL_CLIPFRAC = tl.constexpr(2)  # policy and value: clipped tokens (see PolicyToken.clipped)
COL_CLIPFRAC_LOWER = tl.constexpr(3)  # policy: PolicyToken.clipped_lower tokens
COL_APPROX_KL = tl.constexpr(4)  # policy: sum of neg_log_ratio (old - new)
COL_RATIO_MEAN = tl.constexpr(5)  # policy: sum of the ratios
COL_RATIO_MAX = tl.constexpr(6)  # policy: max of the ratios (0 for no valid token)
COL_ROW_GRAD = tl.constexpr(7)  # policy: sum of d loss_t / d (row mean log-ratio)
FIRST_STAT_COL = COL_CLIPFRAC
COLS = {POLICY: COL_ROW_GRAD.value + 1, VALUE: COL_CLIPFRAC.value + 1, KL: COL_COUNT.value + 1}
STATS = {POLICY: len(POLICY_STATS), VALUE: len(VALUE_STATS), KL: len(KL_LOSS_STATS)}


@triton.jit
def policy_token(
    logprob, old_logprob, advantage, ratio_lo, ratio_hi, dual_clip, ratio_cap,
    HAS_DUAL: tl.constexpr,
):  # fmt: skip
    """policy_math.h: policy_token (kind "ppo"): max(-A min(r, ratio_cap), -A clamp(r,
    lo, hi)), ratio_cap TRL's two-sided delta (+inf for none). Returns (loss, grad,
    ratio, neg_log_ratio, clipped, clipped_lower), PolicyToken's fields in its order
    less row_grad (0). The dual clip is on with HAS_DUAL (the header's dual_clip > 0);
    clipped_lower is all False without it."""
    raw = logprob - old_logprob
    log_ratio = clamp_nan(raw, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = tl.exp(log_ratio)
    capped = ratio > ratio_cap
    slope = -advantage * ratio  # d (-A r) / d lp
    unclipped = tl.where(capped, -advantage * ratio_cap, slope)
    clipped_loss = -advantage * clamp_nan(ratio, ratio_lo, ratio_hi)
    clipped = clipped_loss > unclipped
    loss = maximum_nan(clipped_loss, unclipped)
    in_clamp = raw == log_ratio
    clipped_lower = tl.zeros(loss.shape, dtype=tl.int1)
    if HAS_DUAL:
        floor_loss = -advantage * dual_clip
        clipped_lower = (advantage < 0) & (loss > floor_loss)
        loss = tl.where(clipped_lower, floor_loss, loss)  # exact, unlike a blend
    # The winning branch's derivative: the clipped one passes it inside the band (a cap
    # below hi can make it win there), the unclipped one unless capped.
    in_band = (ratio >= ratio_lo) & (ratio <= ratio_hi)
    live = tl.where(clipped, in_band, ~capped)
    grad = tl.where(live & in_clamp & (~clipped_lower), slope, 0.0)
    return loss, grad, ratio, -log_ratio, clipped, clipped_lower


@triton.jit
def sequence_surrogate(log_ratio, live, advantage, lo, hi):
    """policy_math.h: sequence_surrogate, the clipped surrogate on the sequence ratio
    exp(log_ratio) (the gspo kinds). `live`: the log-ratio's gradient passes. Returns
    (loss, d loss / d log_ratio, ratio, clipped)."""
    ratio = tl.exp(log_ratio)
    unclipped = -advantage * ratio
    clipped_loss = -advantage * clamp_nan(ratio, lo, hi)
    clipped = clipped_loss > unclipped
    loss = maximum_nan(clipped_loss, unclipped)
    # (d loss / d ratio) * ratio, in that order: 0 * inf = NaN as in torch's chain rule;
    # a binding clamp (not live) zeroes it afterwards, NaN included (torch.clamp's backward).
    grad = tl.where(live, tl.where(~clipped, -advantage, 0.0) * ratio, 0.0)
    return loss, grad, ratio, clipped


@triton.jit
def dppo_term(logprob, ratio, advantage, valid, cap):
    """policy_math.h: dppo_term, DPPO's detached-ratio REINFORCE term on the tokens
    inside the trust region (`valid`). Returns (loss, grad, clipped, clipped_lower)."""
    truncated = tl.where(ratio > cap, cap, ratio)  # NaN passes, as torch.clamp
    # A product with the 0/1 mask, not a select: a NaN advantage or ratio stays NaN (verl's).
    weight = (-advantage * truncated) * valid.to(logprob.dtype)
    return weight * logprob, weight, ~valid, (ratio > cap) & valid


@triton.jit
def policy_kind_token(
    logprob,
    old_logprob,
    advantage,
    row_log_ratio,
    lo,
    hi,
    dual_clip,
    ratio_cap,
    tau_pos,
    tau_neg,
    beta,
    POLICY_KIND: tl.constexpr,
    HAS_DUAL: tl.constexpr,
):
    """policy_math.h: policy_kind_token for the kind POLICY_KIND (a POLICY_KIND_CODES
    code). `advantage` is per token or one per row; `row_log_ratio`: the row's mean of
    lp - old over its valid tokens (read by the row-mean kinds only). (lo, hi, ...,
    beta): PolicyParams. Returns PolicyToken's fields in its order: (loss, grad,
    ratio, neg_log_ratio, row_grad, clipped, clipped_lower)."""
    if POLICY_KIND == KIND_PPO:
        loss, grad, ratio, neg_log_ratio, clipped, clipped_lower = policy_token(
            logprob, old_logprob, advantage, lo, hi, dual_clip, ratio_cap, HAS_DUAL
        )
        row_grad = tl.zeros(logprob.shape, logprob.dtype)
    else:
        raw = logprob - old_logprob
        log_ratio = clamp_nan(raw, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        in_clamp = raw == log_ratio
        ratio = tl.exp(log_ratio)
        neg_log_ratio = -log_ratio
        row_grad = tl.zeros(logprob.shape, logprob.dtype)
        clipped = tl.zeros(logprob.shape, dtype=tl.int1)
        clipped_lower = tl.zeros(logprob.shape, dtype=tl.int1)
        if POLICY_KIND == KIND_REINFORCE:
            loss = -advantage * logprob
            grad = -advantage
            neg_log_ratio = -raw  # unclamped, as verl's compute_policy_loss_reinforce metric
        elif POLICY_KIND == KIND_CISPO:
            weight = clamp_nan(ratio, lo, hi)
            loss = -weight * advantage * logprob
            grad = -weight * advantage
            clipped = ratio != weight
        elif POLICY_KIND == KIND_SAPO:
            tau = tl.where(advantage > 0, tau_pos, tau_neg)
            gate = 1.0 / (1.0 + tl.exp(-(tau * (ratio - 1.0))))
            loss = -(gate * (4.0 / tau)) * advantage
            # d/d lp of sigmoid(tau (r - 1)) 4 / tau = 4 sigmoid (1 - sigmoid) r.
            slope = 4.0 * gate * (1.0 - gate) * ratio
            grad = tl.where(in_clamp, -advantage * slope, 0.0)
        elif (POLICY_KIND == KIND_DPPO_TV) or (POLICY_KIND == KIND_DPPO_KL):
            prob = tl.exp(logprob)
            old_prob = tl.exp(old_logprob)
            if POLICY_KIND == KIND_DPPO_TV:
                valid_pos = prob - old_prob <= hi
                valid_neg = prob - old_prob >= -lo
            else:
                binary_kl = old_prob * (old_logprob - logprob) + (1.0 - old_prob) * tl.log(
                    (1.0 - old_prob + DPPO_KL_EPS) / (1.0 - prob + DPPO_KL_EPS)
                )
                valid_pos = (binary_kl <= hi) | (prob <= old_prob)
                valid_neg = (binary_kl <= lo) | (prob >= old_prob)
            positive = advantage > 0
            valid = (positive & valid_pos) | ((~positive) & valid_neg)
            loss, grad, clipped, clipped_lower = dppo_term(
                logprob, ratio, advantage, valid, ratio_cap
            )
        elif POLICY_KIND == KIND_DRO:
            loss = -(logprob * advantage - 0.5 * beta * (raw * raw))
            grad = -(advantage - beta * raw)
            neg_log_ratio = -raw  # unclamped, as verl's DRO metric
        elif POLICY_KIND == KIND_GSPO:
            # The gradient flows through the row mean: the token's grad is 1 and its
            # d loss / d row_log_ratio goes to row_grad (level 2 folds the row's sum in).
            loss, row_grad, ratio, clipped = sequence_surrogate(
                row_log_ratio, True, advantage, lo, hi
            )
            grad = tl.full(logprob.shape, 1.0, logprob.dtype)
            neg_log_ratio = -raw
        elif POLICY_KIND == KIND_GEO_MEAN:
            # verl's sign(A) * min(sign(A) d, sign(A) clamp(d, -lo, hi)) on the unclamped d;
            # the token's d~ and A go to the row's sums (loss and row_grad columns), from
            # which level 2 computes the row's loss and ratio.
            sign = tl.where(advantage > 0, 1.0, tl.where(advantage < 0, -1.0, advantage * 0.0))
            band = clamp_nan(raw, -lo, hi)
            loss = sign * minimum_nan(sign * raw, sign * band)
            row_grad = advantage
            ratio = tl.zeros(logprob.shape, logprob.dtype)
            neg_log_ratio = -raw
            outside = raw != band
            clipped = outside & (advantage > 0)
            clipped_lower = outside & (advantage < 0)
            # a NaN d is live (torch's minimum passes the gradient to a NaN input)
            live = ((advantage > 0) & ~(raw >= hi)) | ((advantage < 0) & ~(raw <= -lo))
            grad = tl.where(live, 1.0, 0.0).to(logprob.dtype)
        else:
            tl.static_assert(POLICY_KIND == KIND_GSPO_TOKEN, "a policy kind without its math")
            # verl's lp - sg(lp) + sg(s): s, and NaN for an infinite (or NaN) log-prob.
            log_ratio_t = (logprob - logprob) + row_log_ratio
            capped = tl.where(
                log_ratio_t > GSPO_TOKEN_LOG_RATIO_MAX, GSPO_TOKEN_LOG_RATIO_MAX, log_ratio_t
            )
            # torch.clamp's gradient passes where x <= max: not above the cap, nor for a NaN.
            live = log_ratio_t <= GSPO_TOKEN_LOG_RATIO_MAX
            loss, grad, ratio, clipped = sequence_surrogate(capped, live, advantage, lo, hi)
            neg_log_ratio = -raw
    return loss, grad, ratio, neg_log_ratio, row_grad, clipped, clipped_lower


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
def _valid_tokens(mask_ptr, offsets, inside, HAS_MASK: tl.constexpr):
    """The tokens at `offsets` that are inside the row and, with HAS_MASK, unmasked."""
    valid = inside
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + offsets, mask=inside, other=0) != 0)
    return valid


@triton.jit
def _row_mean_difference(
    a_ptr, b_ptr, mask_ptr, base, cols, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """The row prologue (ppo_losses.cu: row_mean_difference): the mean of a - b over
    the row's valid tokens (0 for none), summed in BLOCK lanes and then one tl.sum."""
    lanes = tl.arange(0, BLOCK)
    difference_sum = tl.zeros((BLOCK,), ACC)
    token_count = tl.zeros((BLOCK,), ACC)
    for start in range(0, cols, BLOCK):
        pos = start + lanes
        inside = pos < cols
        valid = _valid_tokens(mask_ptr, base + pos, inside, HAS_MASK)
        a = tl.load(a_ptr + base + pos, mask=inside, other=0.0).to(ACC)
        b = tl.load(b_ptr + base + pos, mask=inside, other=0.0).to(ACC)
        difference_sum += tl.where(valid, a - b, 0.0)
        token_count += tl.where(valid, 1.0, 0.0)
    return tl.sum(difference_sum, axis=0) / tl.maximum(tl.sum(token_count, axis=0), 1.0)


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
    C_PER_ROW: tl.constexpr,
    POLICY_KIND: tl.constexpr,
    ROW_MEAN: tl.constexpr,
    ROW_SUMS: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    KL_KIND: tl.constexpr,
    STRAIGHT_THROUGH: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Level 1, one program per row. Inputs (a, b, c): policy (logprobs,
    old_logprobs, advantages; with C_PER_ROW the advantages are [B], one per row),
    value (values, old_values, returns), KL (logprobs, ref_logprobs, unread).
    Policy: POLICY_KIND the kind; ROW_MEAN (its tokens read the row's mean log-ratio:
    the row prologue) and ROW_SUMS (its row_grad is summed into COL_ROW_GRAD: the
    row-coupled and row-level kinds) follow from it. Writes grad[row] (0 where not
    valid) and the row's NCOLS partial columns."""
    row = tl.program_id(0).to(tl.int64)
    base = row * cols
    lanes = tl.arange(0, BLOCK)
    if FAMILY == POLICY_FAMILY:
        lo = tl.load(params_ptr + PARAM_LO).to(ACC)
        hi = tl.load(params_ptr + PARAM_HI).to(ACC)
        dual_clip = tl.load(params_ptr + PARAM_DUAL_CLIP).to(ACC)
        ratio_cap = tl.load(params_ptr + PARAM_RATIO_CAP).to(ACC)
        tau_pos = tl.load(params_ptr + PARAM_TAU_POS).to(ACC)
        tau_neg = tl.load(params_ptr + PARAM_TAU_NEG).to(ACC)
        beta = tl.load(params_ptr + PARAM_BETA).to(ACC)
        # The per-row values, broadcast over the lanes in registers (the interpreter
        # cannot combine a scalar boolean with a block one).
        if C_PER_ROW:
            row_advantage = tl.broadcast_to(tl.load(c_ptr + row).to(ACC), (BLOCK,))
        if ROW_MEAN:
            row_log_ratio = tl.broadcast_to(
                _row_mean_difference(a_ptr, b_ptr, mask_ptr, base, cols, HAS_MASK, ACC, BLOCK),
                (BLOCK,),
            )
        else:
            row_log_ratio = tl.zeros((BLOCK,), ACC)  # unread
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
    row_grad_sum = tl.zeros((BLOCK,), ACC)  # ROW_SUMS only
    for start in range(0, cols, BLOCK):
        pos = start + lanes
        inside = pos < cols
        valid = _valid_tokens(mask_ptr, base + pos, inside, HAS_MASK)
        a = tl.load(a_ptr + base + pos, mask=inside, other=0.0).to(ACC)
        b = tl.load(b_ptr + base + pos, mask=inside, other=0.0).to(ACC)
        if FAMILY == POLICY_FAMILY:
            if C_PER_ROW:
                advantage = row_advantage
            else:
                advantage = tl.load(c_ptr + base + pos, mask=inside, other=0.0).to(ACC)
            loss, grad, ratio, neg_log_ratio, row_grad, clipped, clipped_lower = (
                policy_kind_token(
                    a, b, advantage, row_log_ratio, lo, hi, dual_clip, ratio_cap, tau_pos,
                    tau_neg, beta, POLICY_KIND, HAS_DUAL,
                )
            )  # fmt: skip
            clipped_count += tl.where(valid & clipped, 1.0, 0.0)
            lower_count += tl.where(valid & clipped_lower, 1.0, 0.0)
            neg_log_ratio_sum += tl.where(valid, neg_log_ratio, 0.0)
            ratio_sum += tl.where(valid, ratio, 0.0)
            ratio_max = maximum_nan(ratio_max, tl.where(valid, ratio, 0.0))
            if ROW_SUMS:
                row_grad_sum += tl.where(valid, row_grad, 0.0)
        elif FAMILY == VALUE_FAMILY:
            ret = tl.load(c_ptr + base + pos, mask=inside, other=0.0).to(ACC)
            loss, grad, clipped = value_token(a, b, ret, clip_eps, HAS_CLIP)
            if HAS_CLIP:
                clipped_count += tl.where(valid & clipped, 1.0, 0.0)
        else:
            loss = kl_value(a, b, KL_KIND)
            grad = kl_grad(a, b, KL_KIND, STRAIGHT_THROUGH)
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
        # 0 for the kinds whose row_grad is 0 (all but the row-coupled and row-level ones).
        tl.store(out + COL_ROW_GRAD, tl.sum(row_grad_sum, axis=0))


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
def _coupled_row_factor(row_grad_sum, row_tokens):
    """ppo_math.h: policy_row_factor of the row-coupled kind (float64): d loss / d a[b, t]
    is the same for the row's valid tokens, (1 / n) * the row's row_grad sum."""
    return tl.where(row_tokens > 0, row_grad_sum / tl.maximum(row_tokens, 1.0), 0.0)


@triton.jit
def _geo_mean_row(log_ratio_sum, advantage_sum, row_tokens):
    """ppo_math.h: finish_geo_mean_row (float64): the row's loss -(Q / (n + eps)) *
    exp(S / (n + eps)) and its ratio exp(S / (n + eps)) (0 and 0 for an empty row)."""
    denom = row_tokens + GEO_MEAN_EPS
    nonempty = row_tokens > 0
    ratio = tl.where(nonempty, tl.exp(tl.where(nonempty, log_ratio_sum, 0.0) / denom), 0.0)
    row_loss = tl.where(nonempty, -(advantage_sum / denom) * ratio, 0.0)
    return row_loss, ratio


@triton.jit
def _load_row_loss(part, inside, row_count, ROW_LEVEL: tl.constexpr):
    """A row's loss sum and ratio (ratio only for ROW_LEVEL, else 0): its loss column,
    or, for the row-level kind, the loss finish_geo_mean_row computes from its sums."""
    row_loss = tl.load(part + COL_LOSS, mask=inside, other=0.0).to(tl.float64)
    ratio = tl.zeros(row_loss.shape, tl.float64)
    if ROW_LEVEL:
        advantage_sum = tl.load(part + COL_ROW_GRAD, mask=inside, other=0.0).to(tl.float64)
        row_loss, ratio = _geo_mean_row(row_loss, advantage_sum, row_count)
    return row_loss, ratio


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
    ROW_COUPLED: tl.constexpr,
    ROW_LEVEL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Level 2, one program: reduces the rows' partials in float64 and writes the
    loss, the statistics (stats[k]: column FIRST_STAT_COL + k, up to COL_RATIO_MAX)
    and row_weight; with ROW_COUPLED (the policy's row-coupled kind) each row's
    weight is multiplied by its coupled_row_factor; with ROW_LEVEL (geo_mean) each
    row's loss and ratio come from its sums first (finish_geo_mean_row) and its weight
    is multiplied by row loss / (n + eps)."""
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
        row_count = tl.load(part + COL_COUNT, mask=inside, other=0.0).to(tl.float64)
        row_loss, row_ratio = _load_row_loss(part, inside, row_count, ROW_LEVEL)
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
            if ROW_LEVEL:  # the row's ratio for each of its tokens
                ratio_sum += row_count * row_ratio
                row_ratio_max = row_ratio
            else:
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
        part = partials_ptr + r.to(tl.int64) * NCOLS
        row_count = tl.load(part + COL_COUNT, mask=inside, other=0.0).to(tl.float64)
        w = _agg_weight(AGG, row_count, tokens, nonempty, norm)
        if ROW_COUPLED:
            row_grad_sum = tl.load(part + COL_ROW_GRAD, mask=inside, other=0.0).to(tl.float64)
            w *= _coupled_row_factor(row_grad_sum, row_count)
        if ROW_LEVEL:
            row_loss, _ = _load_row_loss(part, inside, row_count, ROW_LEVEL)
            w *= tl.where(row_count > 0, row_loss / (row_count + GEO_MEAN_EPS), 0.0)
        tl.store(row_weight_ptr + r, w.to(row_weight_ptr.dtype.element_ty), mask=inside)


def _run_loss(family, a, b, c, mask, agg, norm, params=(), *, policy_kind="ppo", kl_kind="k1",
              dual=False, clip=False):  # fmt: skip
    """Launch level 1 and 2; returns (loss, stats, grad, row_weight). `params`: the
    family's PARAM_* slots from slot 0 on (policy: PolicyParams' 7; value: clip_eps),
    `norm` the "-norm" divisor. `c` may be [B] (one value per row; the policy's
    advantages). `policy_kind` / `kl_kind`: the policy and KL families' kind names;
    `dual` / `clip` switch ppo's dual clip and the value clipping on."""
    rows, cols = a.shape
    acc = acc_torch_dtype(a)
    ncols = COLS[family]
    device = a.device
    loss = torch.empty((), dtype=acc, device=device)
    stats = torch.empty((STATS[family],), dtype=torch.float32, device=device)
    grad = torch.empty((rows, cols), dtype=acc, device=device)
    row_weight = torch.empty((rows,), dtype=acc, device=device)
    partials = torch.empty((rows, ncols), dtype=acc, device=device)
    # float64 parameters in a tensor: a Python float argument would be rounded to fp32.
    # The "-norm" divisor of an empty (T = 0) batch is never used; 1 keeps 0/0 out.
    slots = list(params) + [0.0] * (FAMILY_PARAMS - len(params)) + [norm if norm > 0 else 1.0]
    params = torch.tensor(slots, dtype=torch.float64, device=device)
    policy = family == POLICY
    row_coupled = policy and policy_kind in POLICY_ROW_COUPLED_KINDS
    row_level = policy and policy_kind in POLICY_ROW_LEVEL_KINDS
    block = min(next_power_of_2(cols), MAX_BLOCK)
    wide = policy and acc == torch.float64 and block >= POLICY_FLOAT64_WIDE_BLOCK
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
            C_PER_ROW=c is not None and c.dim() == 1,
            POLICY_KIND=POLICY_KIND_CODES[policy_kind],
            ROW_MEAN=policy and policy_kind in POLICY_ROW_MEAN_KINDS,
            ROW_SUMS=row_coupled or row_level,
            HAS_DUAL=dual,
            HAS_CLIP=clip,
            KL_KIND=kl_kind_code(kl_kind),
            STRAIGHT_THROUGH=kl_straight_through(kl_kind),
            ACC=acc_tl_dtype(a),
            BLOCK=block,
            num_warps=POLICY_FLOAT64_WIDE_WARPS if wide else ROWS_WARPS,
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
        ROW_COUPLED=row_coupled,
        ROW_LEVEL=row_level,
        BLOCK=FINISH_BLOCK,
    )
    return loss, stats, grad, row_weight


@triton_op("rlhf_ext::policy_loss_triton", mutates_args=())
def policy_loss_triton(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    kind: str,
    lo: float,
    hi: float,
    dual_clip: float,
    ratio_cap: float,
    tau_pos: float,
    tau_neg: float,
    beta: float,
    agg: str,
    loss_scale_factor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton policy loss with the signature of torch.ops.rlhf_ext.policy_loss: `kind`
    a POLICY_KIND_CODES name, (lo, hi) the ratio band, the dppo kinds' divergence
    thresholds or geo_mean's log-ratio bounds, dual_clip <= 0 for none (ppo), ratio_cap
    the dppo kinds' detached-ratio cap or ppo's TRL delta (inf for none),
    loss_scale_factor <= 0 for T.
    `advantages`: [B, T], or [B], broadcast over each row in the kernel."""
    if kind not in POLICY_KIND_CODES:
        raise ValueError(f"rlhf_ext.policy_loss: unknown `kind` {kind!r}")
    norm = loss_scale_factor if loss_scale_factor > 0 else float(logprobs.shape[1])
    params = [lo, hi, dual_clip, ratio_cap, tau_pos, tau_neg, beta]
    dual = "dual_clip" in POLICY_KIND_PARAMS[kind] and dual_clip > 0
    return _run_loss(POLICY, logprobs, old_logprobs, advantages, mask, agg, norm, params,
                     policy_kind=kind, dual=dual)  # fmt: skip


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
    norm = float(values.shape[1])
    return _run_loss(VALUE, values, old_values, returns, mask, agg, norm, [clip_eps],
                     clip=clip_eps > 0)  # fmt: skip


@triton_op("rlhf_ext::kl_loss_triton", mutates_args=())
def kl_loss_triton(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    kind: str,
    agg: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton KL loss with the signature of torch.ops.rlhf_ext.kl_loss."""
    norm = float(logprobs.shape[1])
    return _run_loss(KL, logprobs, ref_logprobs, None, mask, agg, norm, kl_kind=kind)


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
    # ppo_math.h backward_value: a zero derivative ignores the (maybe non-finite) row weight.
    out = tl.where(g != 0, g * (up * w), g * up)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


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
