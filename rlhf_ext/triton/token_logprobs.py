"""token_logprobs in Triton: one program per row, the row read once in blocks
of BLOCK columns with an online softmax (running max, sum of exponentials and,
for the entropy, their weighted sum of logits); the backward reads it once more
and writes the gradient. BLOCK depends only on V, so a row's result does not
depend on the batch.

The logit transform is csrc/include/rlhf_ext/logit_transform.h's, split the same
way: y = softcap * tanh(x * logit_scale / softcap) (y = x without a softcap), then
z = y * mult with mult = numerator / T (numerator: logit_scale without a softcap, 1
with one; T the row's temperature). `params` holds [numerator / T, logit_scale,
softcap] in the accumulation dtype (a tensor, not Python floats: Triton would round
them to fp32 for float64 logits)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from rlhf_ext.ops._vocab import LOGPROB_EXTRA_CODES
from rlhf_ext.triton._common import (
    acc_tl_dtype,
    acc_torch_dtype,
    next_power_of_2,
    online_softmax_sq_step,
    tanh_series_max,
    tanh_with_slope,
)

MAX_BLOCK = 4096
EXTRA_NAMES = ("log_sum_sq_probs", "mean_logits", "is_top1")


def asked_outputs(return_entropy: bool, extras: int) -> tuple[bool, ...]:
    """Which of the six forward outputs (LOGPROB_OUTPUTS order) a call computes, from the
    forward ops' return_entropy flag and `extras` bitmask (LOGPROB_EXTRA_CODES)."""
    sum_sq, mean, top1 = (bool(extras & LOGPROB_EXTRA_CODES[name]) for name in EXTRA_NAMES)
    return True, bool(return_entropy), True, sum_sq, mean, top1


LOG2E = tl.constexpr(1.4426950408889634)  # a global read inside kernels must be constexpr


def row_layout(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(inner, outer_stride, inner_stride) of t's leading dimensions reduced to
    at most two, as csrc/include/rlhf_ext/row_layout.h; None when they do not
    reduce (the caller copies)."""
    dims: list[list[int]] = []  # [size, stride], outermost first
    for size, stride in zip(t.shape[:-1], t.stride()[:-1], strict=True):
        if size == 1:
            continue
        if dims and dims[-1][1] == size * stride:
            dims[-1] = [dims[-1][0] * size, stride]
        else:
            dims.append([size, stride])
    if len(dims) > 2:
        return None
    inner, inner_stride = dims[-1] if dims else (1, 0)
    outer_stride = dims[0][1] if len(dims) == 2 else 0
    return max(inner, 1), outer_stride, inner_stride


def _readable(logits: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """logits as the kernels can address them: in place when possible."""
    layout = row_layout(logits) if logits.shape[-1] == 1 or logits.stride(-1) == 1 else None
    if layout is None:
        logits = logits.contiguous()
        layout = row_layout(logits)
    return logits, layout


def _block(vocab: int) -> tuple[int, int]:
    block = min(next_power_of_2(vocab), MAX_BLOCK)
    return block, 8 if block >= 2048 else 4


@triton.jit
def _row_start(row, inner, outer_stride, inner_stride):
    return (row // inner) * outer_stride + (row % inner) * inner_stride


@triton.jit
def row_mult(params_ptr, temps_ptr, row, ACC: tl.constexpr, PER_ROW_TEMP: tl.constexpr,
              SOFTCAP: tl.constexpr):  # fmt: skip
    """dz / dy of this row: numerator / T; NaN for a temperature that is not finite and
    > 0 or whose multiplier overflows (reachable with validate=False only)."""
    if PER_ROW_TEMP:
        numerator = tl.load(params_ptr + 1).to(ACC)
        if SOFTCAP:
            numerator = tl.full((), 1.0, ACC)
        t = tl.load(temps_ptr + row).to(ACC)
        mult = numerator / t
        good = (t > 0) & (t < float("inf")) & (mult < float("inf"))
        mult = tl.where(good, mult, float("nan"))
    else:
        mult = tl.load(params_ptr).to(ACC)
    # One return: a scalar multiplier or one per row (row a vector) by the constexpr branch,
    # which the compiler (not the interpreter) rejects as two return types.
    return mult


@triton.jit
def softcap_squash(x, params_ptr, ACC: tl.constexpr, SERIES_MAX: tl.constexpr):
    """y = softcap * tanh(x * logit_scale / softcap) and dy/dx."""
    scale = tl.load(params_ptr + 1).to(ACC)
    cap = tl.load(params_ptr + 2).to(ACC)
    t, slope = tanh_with_slope(x * (scale / cap), SERIES_MAX)
    return cap * t, scale * slope


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,
    target_ptr,
    params_ptr,
    temps_ptr,
    logprobs_ptr,
    entropy_ptr,
    lse_ptr,
    log_sum_sq_ptr,
    mean_ptr,
    top1_ptr,
    vocab,
    inner,
    outer_stride,
    inner_stride,
    ignore_index,
    ENTROPY: tl.constexpr,
    SUM_SQ: tl.constexpr,
    MEAN: tl.constexpr,
    TOP1: tl.constexpr,
    PER_ROW_TEMP: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SERIES_MAX: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + _row_start(row, inner, outer_stride, inner_stride)
    tgt = tl.load(target_ptr + row)
    active = tgt != ignore_index  # ignored rows read nothing
    mult = row_mult(params_ptr, temps_ptr, row, ACC, PER_ROW_TEMP, SOFTCAP)
    scale = mult * LOG2E
    lanes = tl.arange(0, BLOCK)
    running_max = tl.full((), float("-inf"), ACC)
    sum_exp = tl.zeros((), ACC)
    sum_shift = tl.zeros((), ACC)
    # the extra outputs' running values (csrc/cpu/token_logprobs.cpp RowExtras): the sum of
    # the squared exponentials, the sum of y, the largest y before the target
    sum_sq = tl.zeros((), ACC)
    sum_y = tl.zeros((), ACC)
    max_before = tl.full((), float("-inf"), ACC)
    for start in range(0, vocab, BLOCK):
        cols = start + lanes
        inside = (cols < vocab) & active
        x = tl.load(x_row + cols, mask=inside, other=float("-inf")).to(ACC)
        if SOFTCAP:  # real logits only: the padding stays -inf
            x = tl.where(inside, softcap_squash(x, params_ptr, ACC, SERIES_MAX)[0], float("-inf"))
        running_max, sum_exp, sum_shift, sum_sq = online_softmax_sq_step(
            x, running_max, sum_exp, sum_shift, sum_sq, scale, 0, ENTROPY, SUM_SQ
        )
        if MEAN:
            sum_y += tl.sum(tl.where(inside, x, 0.0), axis=0)
        if TOP1:
            before = tl.where(inside & (cols < tgt) & (x == x), x, float("-inf"))
            max_before = tl.maximum(max_before, tl.max(before, axis=0))
    log_sum = tl.log(sum_exp)
    lse = running_max * mult + log_sum
    in_vocab = (tgt >= 0) & (tgt < vocab)
    x_target = tl.load(x_row + tgt, mask=in_vocab & active, other=0.0).to(ACC)
    if SOFTCAP:
        x_target = softcap_squash(x_target, params_ptr, ACC, SERIES_MAX)[0]
    logprob = tl.where(in_vocab, x_target * mult - lse, float("nan"))
    tl.store(logprobs_ptr + row, tl.where(active, logprob, 0.0))
    # +inf for a row with a +inf logit, as torch's logsumexp (softmax_math.h lse_output)
    lse_out = tl.where(running_max == float("inf"), running_max, lse)
    tl.store(lse_ptr + row, tl.where(active, lse_out, 0.0))
    if ENTROPY:
        entropy = log_sum - mult * sum_shift / sum_exp
        tl.store(entropy_ptr + row, tl.where(active, entropy, 0.0))
    if SUM_SQ:
        log_sum_sq = tl.log(sum_sq) - 2 * log_sum
        tl.store(log_sum_sq_ptr + row, tl.where(active, log_sum_sq, 0.0))
    if MEAN:
        tl.store(mean_ptr + row, tl.where(active, sum_y * mult / vocab, 0.0))
    if TOP1:  # a row without a distribution (NaN log-prob) has no top token
        top1 = (logprob == logprob) & (x_target >= running_max) & (x_target > max_before)
        tl.store(top1_ptr + row, (active & top1).to(tl.int8))


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,
    grad_ptr,
    target_ptr,
    params_ptr,
    temps_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    log_sum_sq_ptr,
    grad_lse_ptr,
    grad_sq_ptr,
    grad_mean_ptr,
    vocab,
    inner,
    outer_stride,
    inner_stride,
    grad_inner,
    grad_outer_stride,
    grad_inner_stride,
    ignore_index,
    vocab_offset,
    full_vocab,
    HAS_GRAD_LOGPROBS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    HAS_GRAD_SQ: tl.constexpr,
    HAS_GRAD_MEAN: tl.constexpr,
    PER_ROW_TEMP: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SERIES_MAX: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + _row_start(row, inner, outer_stride, inner_stride)
    g_row = grad_ptr + _row_start(row, grad_inner, grad_outer_stride, grad_inner_stride)
    tgt = tl.load(target_ptr + row)
    active = tgt != ignore_index
    # The row holds columns [vocab_offset, vocab_offset + vocab) of a full_vocab row
    # (a tile of linear_token_logprobs; the whole row for token_logprobs).
    in_vocab = (tgt >= 0) & (tgt < full_vocab)
    local_target = tgt - vocab_offset
    mult = row_mult(params_ptr, temps_ptr, row, ACC, PER_ROW_TEMP, SOFTCAP)
    # A target outside the vocabulary (validate=False) has no gradient: NaN, like its logprob.
    lse = tl.where(in_vocab, tl.load(lse_ptr + row).to(ACC), float("nan"))
    lse = tl.where(lse == float("inf"), float("nan"), lse)  # softmax_math.h lse_input
    g_lp = tl.zeros((), ACC)
    if HAS_GRAD_LOGPROBS:
        g_lp = tl.load(grad_logprobs_ptr + row).to(ACC)
    g_ent = tl.zeros((), ACC)
    entropy = tl.zeros((), ACC)
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + row).to(ACC)
        entropy = tl.load(entropy_ptr + row).to(ACC)
    # the extra outputs' terms (softmax_math.h ExtraGrad)
    g_lse = tl.zeros((), ACC)
    if HAS_GRAD_LSE:
        g_lse = tl.load(grad_lse_ptr + row).to(ACC)
    g_sq2 = tl.zeros((), ACC)
    inv_s2 = tl.zeros((), ACC)
    if HAS_GRAD_SQ:
        g_sq2 = 2 * tl.load(grad_sq_ptr + row).to(ACC)
        inv_s2 = tl.exp(-tl.load(log_sum_sq_ptr + row).to(ACC))
    g_mean_v = tl.zeros((), ACC)
    if HAS_GRAD_MEAN:
        g_mean_v = tl.load(grad_mean_ptr + row).to(ACC) / full_vocab
    lanes = tl.arange(0, BLOCK)
    for start in range(0, vocab, BLOCK):
        cols = start + lanes
        inside = cols < vocab
        x = tl.load(x_row + cols, mask=inside & active, other=0.0).to(ACC)
        if SOFTCAP:
            x, slope = softcap_squash(x, params_ptr, ACC, SERIES_MAX)
        logp = x * mult - lse
        p = tl.exp2(logp * LOG2E)
        weighted = (g_lp - g_lse) + g_ent * (logp + entropy) + g_sq2 * (1.0 - p * inv_s2)
        # p == 0 (a -inf logit) contributes nothing, even where logp is -inf.
        g = tl.where(p > 0, -p * weighted * mult, tl.where(p != p, p, 0.0)) + g_mean_v * mult
        if not (HAS_GRAD_LOGPROBS or HAS_GRAD_ENTROPY or HAS_GRAD_LSE or HAS_GRAD_SQ):
            g = g_mean_v * mult + tl.zeros_like(x)  # mean_logits' only: finite at a NaN logit
        g = tl.where(cols == local_target, g + g_lp * mult, g)
        if SOFTCAP:  # d/dx = d/dy * dy/dx
            g = g * slope
        g = tl.where(active, g, 0.0)
        tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=inside)


@triton_op("rlhf_ext::token_logprobs_fwd_triton", mutates_args=())
def token_logprobs_fwd_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    temperatures: torch.Tensor | None,
    logit_scale: float,
    softcap: float,
    ignore_index: int,
    return_entropy: bool,
    inplace_backward: bool = False,
    extras: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward with the signature of torch.ops.rlhf_ext.token_logprobs_fwd
    (inplace_backward is read by the registered backward, not here)."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    acc = acc_torch_dtype(logits)
    _, _, _, sum_sq, mean, top1 = asked_outputs(return_entropy, extras)

    def maybe(wanted, dtype=acc):
        return torch.empty(lead if wanted else (0,), dtype=dtype, device=logits.device)

    logprobs, lse = maybe(True), maybe(True)
    entropy, log_sum_sq, mean_logits = maybe(return_entropy), maybe(sum_sq), maybe(mean)
    top1_bytes = maybe(top1, torch.uint8)  # written as bytes, returned as bool
    rows = logprobs.numel()
    if rows == 0:
        return logprobs, entropy, lse, log_sum_sq, mean_logits, top1_bytes.to(torch.bool)
    logits, (inner, outer_stride, inner_stride) = _readable(logits)
    block, warps = _block(vocab)
    params, temps = transform_params(logits, temperature, temperatures, logit_scale, softcap)
    wrap_triton(_token_logprobs_fwd_kernel)[(rows,)](
        logits,
        target.to(torch.int64).contiguous(),
        params,
        temps,
        logprobs,
        entropy if return_entropy else lse,  # an output not asked for is never written
        lse,
        log_sum_sq if sum_sq else lse,
        mean_logits if mean else lse,
        top1_bytes if top1 else target,
        vocab,
        inner,
        outer_stride,
        inner_stride,
        ignore_index,
        ENTROPY=return_entropy,
        SUM_SQ=sum_sq,
        MEAN=mean,
        TOP1=top1,
        PER_ROW_TEMP=temperatures is not None,
        SOFTCAP=softcap > 0,
        SERIES_MAX=tanh_series_max(acc_tl_dtype(logits)),
        ACC=acc_tl_dtype(logits),
        BLOCK=block,
        num_warps=warps,
    )
    return logprobs, entropy, lse, log_sum_sq, mean_logits, top1_bytes.to(torch.bool)


def transform_params(logits, temperature, temperatures, logit_scale, softcap):
    """(params, temps) of the kernels: [numerator / T, logit_scale, softcap] in the
    accumulation dtype, and the per-row temperatures (params again, unread, without
    them). Fills, not a host-to-device copy: no sync; the default path is one fill."""
    acc = acc_torch_dtype(logits)
    numerator = 1.0 if softcap > 0 else logit_scale
    params = torch.full((3,), numerator / temperature, dtype=acc, device=logits.device)
    if softcap > 0 or temperatures is not None:
        params[1] = logit_scale
    if softcap > 0:
        params[2] = softcap
    if temperatures is None:
        return params, params
    return params, temperatures.to(acc).contiguous().reshape(-1)


def _launch_backward(
    logits, grad, grad_layout, target, lse, entropy, grad_logprobs, grad_entropy, temperature,
    ignore_index, vocab_slice=None, temperatures=None, logit_scale=1.0, softcap=0.0,
    extra_grads=(None, None, None, None),
):  # fmt: skip
    """The backward kernel over logits' rows; `vocab_slice` = (offset, full_vocab)
    when the rows are a vocabulary tile (default: whole rows); `temperatures` one per
    row of `logits` (flattened), or None; `extra_grads` = (log_sum_sq, grad_lse,
    grad_log_sum_sq, grad_mean_logits), each per row or None."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    vocab_offset, full_vocab = vocab_slice if vocab_slice is not None else (0, vocab)
    rows = lse.numel()
    if rows == 0:
        return
    acc = acc_torch_dtype(logits)
    per_row = lambda t: t.to(acc).contiguous().reshape(lead)  # noqa: E731
    lse = per_row(lse)
    dummy = lse  # stands in for absent per-row inputs; the kernel does not read it
    has_grad_entropy = grad_entropy is not None
    log_sum_sq, grad_lse, grad_sq, grad_mean = extra_grads
    has_grad_sq = grad_sq is not None
    block, warps = _block(vocab)
    params, temps = transform_params(logits, temperature, temperatures, logit_scale, softcap)
    wrap_triton(_token_logprobs_bwd_kernel)[(rows,)](
        logits,
        grad,
        target.to(torch.int64).contiguous(),
        params,
        temps,
        lse,
        per_row(entropy) if has_grad_entropy else dummy,
        per_row(grad_logprobs) if grad_logprobs is not None else dummy,
        per_row(grad_entropy) if has_grad_entropy else dummy,
        per_row(log_sum_sq) if has_grad_sq else dummy,
        per_row(grad_lse) if grad_lse is not None else dummy,
        per_row(grad_sq) if has_grad_sq else dummy,
        per_row(grad_mean) if grad_mean is not None else dummy,
        vocab,
        *row_layout(logits),
        *grad_layout,
        ignore_index,
        vocab_offset,
        full_vocab,
        HAS_GRAD_LOGPROBS=grad_logprobs is not None,
        HAS_GRAD_ENTROPY=has_grad_entropy,
        HAS_GRAD_LSE=grad_lse is not None,
        HAS_GRAD_SQ=has_grad_sq,
        HAS_GRAD_MEAN=grad_mean is not None,
        PER_ROW_TEMP=temperatures is not None,
        SOFTCAP=softcap > 0,
        SERIES_MAX=tanh_series_max(acc_tl_dtype(logits)),
        ACC=acc_tl_dtype(logits),
        BLOCK=block,
        num_warps=warps,
    )


@triton_op("rlhf_ext::token_logprobs_bwd_triton", mutates_args=())
def token_logprobs_bwd_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logprobs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    log_sum_sq: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    grad_log_sum_sq: torch.Tensor | None,
    grad_mean_logits: torch.Tensor | None,
    temperature: float,
    temperatures: torch.Tensor | None,
    logit_scale: float,
    softcap: float,
    ignore_index: int,
) -> torch.Tensor:
    """Triton backward with the signature of torch.ops.rlhf_ext.token_logprobs_bwd."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    readable, _ = _readable(logits)
    rows = max(lse.numel(), 1)
    contiguous = (rows, 0, logits.shape[-1])
    _launch_backward(
        readable, grad, contiguous, target, lse, entropy, grad_logprobs, grad_entropy,
        temperature, ignore_index, None, temperatures, logit_scale, softcap,
        (log_sum_sq, grad_lse, grad_log_sum_sq, grad_mean_logits),
    )  # fmt: skip
    return grad


@triton_op("rlhf_ext::token_logprobs_bwd_inplace_triton", mutates_args=("logits",))
def token_logprobs_bwd_inplace_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logprobs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    log_sum_sq: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    grad_log_sum_sq: torch.Tensor | None,
    grad_mean_logits: torch.Tensor | None,
    temperature: float,
    temperatures: torch.Tensor | None,
    logit_scale: float,
    softcap: float,
    ignore_index: int,
) -> None:
    """Triton in-place backward with the signature of torch.ops.rlhf_ext.token_logprobs_bwd_."""
    readable, layout = _readable(logits)
    _launch_backward(
        readable, readable, layout, target, lse, entropy, grad_logprobs, grad_entropy,
        temperature, ignore_index, None, temperatures, logit_scale, softcap,
        (log_sum_sq, grad_lse, grad_log_sum_sq, grad_mean_logits),
    )  # fmt: skip
    if readable.data_ptr() != logits.data_ptr():
        logits.copy_(readable)
