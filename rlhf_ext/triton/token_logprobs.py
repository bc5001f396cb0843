"""token_logprobs in Triton: one program per row, the row read once in blocks
of BLOCK columns with an online softmax (running max, sum of exponentials and,
for the entropy, their weighted sum of logits); the backward reads it once more
and writes the gradient. BLOCK depends only on V, so a row's result does not
depend on the batch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from rlhf_ext.triton._common import (
    acc_tl_dtype,
    acc_torch_dtype,
    next_power_of_2,
    online_softmax_step,
)

MAX_BLOCK = 4096
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
def _token_logprobs_fwd_kernel(
    logits_ptr,
    target_ptr,
    inv_temp_ptr,
    logprobs_ptr,
    entropy_ptr,
    lse_ptr,
    vocab,
    inner,
    outer_stride,
    inner_stride,
    ignore_index,
    ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + _row_start(row, inner, outer_stride, inner_stride)
    tgt = tl.load(target_ptr + row)
    active = tgt != ignore_index  # ignored rows read nothing
    inv_temp = tl.load(inv_temp_ptr).to(ACC)
    scale = inv_temp * LOG2E
    lanes = tl.arange(0, BLOCK)
    running_max = tl.full((), float("-inf"), ACC)
    sum_exp = tl.zeros((), ACC)
    sum_shift = tl.zeros((), ACC)
    for start in range(0, vocab, BLOCK):
        cols = start + lanes
        x = tl.load(x_row + cols, mask=(cols < vocab) & active, other=float("-inf")).to(ACC)
        running_max, sum_exp, sum_shift = online_softmax_step(
            x, running_max, sum_exp, sum_shift, scale, 0, ENTROPY
        )
    log_sum = tl.log(sum_exp)
    lse = running_max * inv_temp + log_sum
    in_vocab = (tgt >= 0) & (tgt < vocab)
    x_target = tl.load(x_row + tgt, mask=in_vocab & active, other=0.0).to(ACC)
    logprob = tl.where(in_vocab, x_target * inv_temp - lse, float("nan"))
    tl.store(logprobs_ptr + row, tl.where(active, logprob, 0.0))
    tl.store(lse_ptr + row, tl.where(active, lse, 0.0))
    if ENTROPY:
        entropy = log_sum - inv_temp * sum_shift / sum_exp
        tl.store(entropy_ptr + row, tl.where(active, entropy, 0.0))


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,
    grad_ptr,
    target_ptr,
    inv_temp_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
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
    inv_temp = tl.load(inv_temp_ptr).to(ACC)
    # A target outside the vocabulary (validate=False) has no gradient: NaN, like its logprob.
    lse = tl.where(in_vocab, tl.load(lse_ptr + row).to(ACC), float("nan"))
    g_lp = tl.zeros((), ACC)
    if HAS_GRAD_LOGPROBS:
        g_lp = tl.load(grad_logprobs_ptr + row).to(ACC)
    g_ent = tl.zeros((), ACC)
    entropy = tl.zeros((), ACC)
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + row).to(ACC)
        entropy = tl.load(entropy_ptr + row).to(ACC)
    lanes = tl.arange(0, BLOCK)
    for start in range(0, vocab, BLOCK):
        cols = start + lanes
        inside = cols < vocab
        x = tl.load(x_row + cols, mask=inside & active, other=0.0).to(ACC)
        logp = x * inv_temp - lse
        p = tl.exp2(logp * LOG2E)
        weighted = g_lp + g_ent * (logp + entropy)
        # p == 0 (a -inf logit) contributes nothing, even where logp is -inf.
        g = tl.where(p > 0, -p * weighted * inv_temp, tl.where(p != p, p, 0.0))
        g = tl.where(cols == local_target, g + g_lp * inv_temp, g)
        g = tl.where(active, g, 0.0)
        tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=inside)


@triton_op("rlhf_ext::token_logprobs_fwd_triton", mutates_args=())
def token_logprobs_fwd_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward with the signature of torch.ops.rlhf_ext.token_logprobs_fwd
    (inplace_backward is read by the registered backward, not here)."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    acc = acc_torch_dtype(logits)
    logprobs = torch.empty(lead, dtype=acc, device=logits.device)
    lse = torch.empty(lead, dtype=acc, device=logits.device)
    entropy = torch.empty(lead if return_entropy else (0,), dtype=acc, device=logits.device)
    rows = logprobs.numel()
    if rows == 0:
        return logprobs, entropy, lse
    logits, (inner, outer_stride, inner_stride) = _readable(logits)
    block, warps = _block(vocab)
    wrap_triton(_token_logprobs_fwd_kernel)[(rows,)](
        logits,
        target.to(torch.int64).contiguous(),
        # A tensor, not a Python float: Triton would round 1 / T to fp32 for float64 logits.
        torch.full((1,), 1.0 / temperature, dtype=acc, device=logits.device),
        logprobs,
        entropy if return_entropy else lse,  # never written without ENTROPY
        lse,
        vocab,
        inner,
        outer_stride,
        inner_stride,
        ignore_index,
        ENTROPY=return_entropy,
        ACC=acc_tl_dtype(logits),
        BLOCK=block,
        num_warps=warps,
    )
    return logprobs, entropy, lse


def _launch_backward(
    logits, grad, grad_layout, target, lse, entropy, grad_logprobs, grad_entropy, temperature,
    ignore_index, vocab_slice=None,
):  # fmt: skip
    """The backward kernel over logits' rows; `vocab_slice` = (offset, full_vocab)
    when the rows are a vocabulary tile (default: whole rows)."""
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
    block, warps = _block(vocab)
    wrap_triton(_token_logprobs_bwd_kernel)[(rows,)](
        logits,
        grad,
        target.to(torch.int64).contiguous(),
        torch.full((1,), 1.0 / temperature, dtype=acc, device=logits.device),
        lse,
        per_row(entropy) if has_grad_entropy else dummy,
        per_row(grad_logprobs) if grad_logprobs is not None else dummy,
        per_row(grad_entropy) if has_grad_entropy else dummy,
        vocab,
        *row_layout(logits),
        *grad_layout,
        ignore_index,
        vocab_offset,
        full_vocab,
        HAS_GRAD_LOGPROBS=grad_logprobs is not None,
        HAS_GRAD_ENTROPY=has_grad_entropy,
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
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """Triton backward with the signature of torch.ops.rlhf_ext.token_logprobs_bwd."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    readable, _ = _readable(logits)
    rows = max(lse.numel(), 1)
    contiguous = (rows, 0, logits.shape[-1])
    _launch_backward(
        readable, grad, contiguous, target, lse, entropy, grad_logprobs, grad_entropy,
        temperature, ignore_index,
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
    temperature: float,
    ignore_index: int,
) -> None:
    """Triton in-place backward with the signature of torch.ops.rlhf_ext.token_logprobs_bwd_."""
    readable, layout = _readable(logits)
    _launch_backward(
        readable, readable, layout, target, lse, entropy, grad_logprobs, grad_entropy,
        temperature, ignore_index,
    )  # fmt: skip
    if readable.data_ptr() != logits.data_ptr():
        logits.copy_(readable)
