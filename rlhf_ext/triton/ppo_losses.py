"""ppo_policy_loss, value_loss, kl_loss, kl_penalty and loss_backward in Triton.

The Triton twin of csrc/cuda/ppo_losses.cu (same math as
csrc/include/rlhf_ext/ppo_math.h): level 1 is one program per row that sums
its tokens in BLOCK-wide lanes (then one tl.sum) and writes the per-token
derivatives and the row's partials; level 2 is one program that reduces the
rows in float64, in a fixed order, and writes the loss, the statistics and the
per-row weights. No atomics, no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from rlhf_ext.ops.ppo_losses import AGG_CODES, register_kl_penalty_autograd, register_loss_autograd
from rlhf_ext.triton._common import acc_tl_dtype, acc_torch_dtype, as_mask, next_power_of_2
from rlhf_ext.triton._kl import kl_kind_code, kl_value

MAX_BLOCK = 1024
FINISH_BLOCK = 128
APPLY_BLOCK = 1024
POLICY, VALUE, KL = 0, 1, 2
COLS = {POLICY: 7, VALUE: 3, KL: 2}  # partial columns, as ppo_math.h's families


@triton.jit
def kl_grad(lp, ref, KIND: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr):
    """d kl_value / d lp (ppo_math.h: kl_grad); straight-through: the k2 gradient."""
    diff = lp - ref
    if STRAIGHT_THROUGH:
        out = diff
    elif KIND == 0:
        out = tl.full(diff.shape, 1.0, diff.dtype)
    elif KIND == 1:
        out = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)).to(diff.dtype)
    elif KIND == 2:
        out = diff
    else:
        d = -diff
        e = tl.exp(d)
        live = (d >= -20.0) & (d <= 20.0) & (e - d - 1.0 <= 10.0)
        out = tl.where(live, 1.0 - e, 0.0).to(diff.dtype)
    return out


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
    row = tl.program_id(0).to(tl.int64)
    base = row * cols
    lanes = tl.arange(0, BLOCK)
    # params: ratio_lo, ratio_hi, dual_clip, clip_eps (float64; used per family).
    p0 = tl.load(params_ptr + 0).to(ACC)
    p1 = tl.load(params_ptr + 1).to(ACC)
    p2 = tl.load(params_ptr + 2).to(ACC)
    s_loss = tl.zeros((BLOCK,), ACC)
    s_count = tl.zeros((BLOCK,), ACC)
    s_1 = tl.zeros((BLOCK,), ACC)
    s_2 = tl.zeros((BLOCK,), ACC)
    s_3 = tl.zeros((BLOCK,), ACC)
    s_4 = tl.zeros((BLOCK,), ACC)
    m_5 = tl.zeros((BLOCK,), ACC)
    for start in range(0, cols, BLOCK):
        pos = start + lanes
        inside = pos < cols
        valid = inside
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + base + pos, mask=inside, other=0) != 0)
        x = tl.load(a_ptr + base + pos, mask=inside, other=0.0).to(ACC)
        y = tl.load(b_ptr + base + pos, mask=inside, other=0.0).to(ACC)
        if FAMILY == 0:
            adv = tl.load(c_ptr + base + pos, mask=inside, other=0.0).to(ACC)
            raw = x - y
            log_ratio = tl.minimum(tl.maximum(raw, -20.0), 20.0)
            ratio = tl.exp(log_ratio)
            unclipped = -adv * ratio
            clipped = -adv * tl.minimum(tl.maximum(ratio, p0), p1)
            is_clipped = clipped > unclipped
            loss = tl.where(is_clipped, clipped, unclipped)
            in_clamp = (raw >= -20.0) & (raw <= 20.0)
            grad = tl.where(is_clipped | (~in_clamp), 0.0, unclipped)
            lower = tl.zeros((BLOCK,), dtype=tl.int1)
            if HAS_DUAL:
                floor_loss = -adv * p2
                lower = (adv < 0) & (loss > floor_loss)
                loss = tl.where(lower, floor_loss, loss)
                grad = tl.where(lower, 0.0, grad)
            s_1 += tl.where(valid & is_clipped, 1.0, 0.0)
            s_2 += tl.where(valid & lower, 1.0, 0.0)
            s_3 += tl.where(valid, -log_ratio, 0.0)
            s_4 += tl.where(valid, ratio, 0.0)
            m_5 = tl.maximum(m_5, tl.where(valid, ratio, 0.0))
        elif FAMILY == 1:
            ret = tl.load(c_ptr + base + pos, mask=inside, other=0.0).to(ACC)
            err = x - ret
            loss = err * err
            grad = err
            if HAS_CLIP:
                clipped_err = tl.minimum(tl.maximum(x, y - p0), y + p0) - ret
                clipped_loss = clipped_err * clipped_err
                is_clipped = clipped_loss > loss
                loss = tl.where(is_clipped, clipped_loss, loss)
                grad = tl.where(is_clipped, 0.0, err)
                s_1 += tl.where(valid & is_clipped, 1.0, 0.0)
            loss = 0.5 * loss
        else:
            loss = kl_value(x, y, KIND)
            grad = kl_grad(x, y, KIND, STRAIGHT_THROUGH)
        s_loss += tl.where(valid, loss, 0.0)
        s_count += tl.where(valid, 1.0, 0.0)
        tl.store(grad_ptr + base + pos, tl.where(valid, grad, 0.0), mask=inside)
    out = partials_ptr + row * NCOLS
    tl.store(out + 0, tl.sum(s_loss, axis=0))
    tl.store(out + 1, tl.sum(s_count, axis=0))
    if NCOLS > 2:
        tl.store(out + 2, tl.sum(s_1, axis=0))
    if NCOLS > 3:
        tl.store(out + 3, tl.sum(s_2, axis=0))
        tl.store(out + 4, tl.sum(s_3, axis=0))
        tl.store(out + 5, tl.sum(s_4, axis=0))
        tl.store(out + 6, tl.max(m_5, axis=0))


@triton.jit
def _agg_weight(agg: tl.constexpr, row_tokens, tokens, rows, norm):
    """ppo_math.h: agg_row_weight (float64)."""
    if agg == 0:
        w = 1.0 / tl.maximum(tokens, 1.0) + row_tokens * 0.0
    elif agg == 1:
        w = 1.0 / tl.maximum(rows, 1.0) + row_tokens * 0.0
    elif agg == 2:
        w = 1.0 / (tl.maximum(rows, 1.0) * tl.maximum(row_tokens, 1.0))
    else:
        w = 1.0 / norm + row_tokens * 0.0
    return tl.where(row_tokens > 0, w, 0.0)


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
    lanes = tl.arange(0, BLOCK)
    norm = tl.load(params_ptr + 3).to(tl.float64)
    t_loss = tl.zeros((BLOCK,), tl.float64)
    t_count = tl.zeros((BLOCK,), tl.float64)
    t_mean = tl.zeros((BLOCK,), tl.float64)
    t_rows = tl.zeros((BLOCK,), tl.float64)
    t_1 = tl.zeros((BLOCK,), tl.float64)
    t_2 = tl.zeros((BLOCK,), tl.float64)
    t_3 = tl.zeros((BLOCK,), tl.float64)
    t_4 = tl.zeros((BLOCK,), tl.float64)
    t_5 = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, rows, BLOCK):
        r = start + lanes
        inside = r < rows
        part = partials_ptr + r.to(tl.int64) * NCOLS
        loss = tl.load(part + 0, mask=inside, other=0.0).to(tl.float64)
        count = tl.load(part + 1, mask=inside, other=0.0).to(tl.float64)
        t_loss += loss
        t_count += count
        t_mean += tl.where(count > 0, loss / tl.maximum(count, 1.0), 0.0)
        t_rows += tl.where(count > 0, 1.0, 0.0)
        if NCOLS > 2:
            t_1 += tl.load(part + 2, mask=inside, other=0.0).to(tl.float64)
        if NCOLS > 3:
            t_2 += tl.load(part + 3, mask=inside, other=0.0).to(tl.float64)
            t_3 += tl.load(part + 4, mask=inside, other=0.0).to(tl.float64)
            t_4 += tl.load(part + 5, mask=inside, other=0.0).to(tl.float64)
            t_5 = tl.maximum(t_5, tl.load(part + 6, mask=inside, other=0.0).to(tl.float64))
    total = tl.sum(t_loss, axis=0)
    tokens = tl.sum(t_count, axis=0)
    nonempty = tl.sum(t_rows, axis=0)
    if AGG == 0:
        loss = total / tl.maximum(tokens, 1.0)
    elif AGG == 1:
        loss = total / tl.maximum(nonempty, 1.0)
    elif AGG == 2:
        loss = tl.sum(t_mean, axis=0) / tl.maximum(nonempty, 1.0)
    else:
        loss = total / norm
    loss = tl.where(tokens > 0, loss, 0.0)
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
    per_token = 1.0 / tl.maximum(tokens, 1.0)
    if NCOLS > 2:
        tl.store(stats_ptr + 0, (tl.sum(t_1, axis=0) * per_token).to(tl.float32))
    if NCOLS > 3:
        tl.store(stats_ptr + 1, (tl.sum(t_2, axis=0) * per_token).to(tl.float32))
        tl.store(stats_ptr + 2, (tl.sum(t_3, axis=0) * per_token).to(tl.float32))
        tl.store(stats_ptr + 3, (tl.sum(t_4, axis=0) * per_token).to(tl.float32))
        tl.store(stats_ptr + 4, tl.max(t_5, axis=0).to(tl.float32))
    for start in range(0, rows, BLOCK):
        r = start + lanes
        inside = r < rows
        count = tl.load(partials_ptr + r.to(tl.int64) * NCOLS + 1, mask=inside, other=0.0)
        w = _agg_weight(AGG, count.to(tl.float64), tokens, nonempty, norm)
        tl.store(row_weight_ptr + r, w.to(row_weight_ptr.dtype.element_ty), mask=inside)


def _run_loss(family, a, b, c, mask, params, agg, *, kind="k1", dual=False, clip=False):
    """Launch level 1 and 2; returns (loss, stats, grad, row_weight). `params`:
    [ratio_lo or clip_eps, ratio_hi, dual_clip, norm]; `dual` / `clip` switch the
    policy's dual clip and the value clipping on."""
    rows, cols = a.shape
    acc = acc_torch_dtype(a)
    ncols = COLS[family]
    device = a.device
    loss = torch.empty((), dtype=acc, device=device)
    stats = torch.empty((ncols - 2,), dtype=torch.float32, device=device)
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
            STRAIGHT_THROUGH=kind.endswith("+"),
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
            STRAIGHT_THROUGH=kind.endswith("+"),
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


def _register_autograd() -> None:
    register_loss_autograd(ppo_policy_loss_triton, loss_backward_triton, 9)
    register_loss_autograd(value_loss_triton, loss_backward_triton, 6)
    register_loss_autograd(kl_loss_triton, loss_backward_triton, 5)
    register_kl_penalty_autograd(kl_penalty_triton)


_register_autograd()
