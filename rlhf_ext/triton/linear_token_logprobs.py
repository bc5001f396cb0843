"""linear_token_logprobs on the Triton backend.

Forward (float32, bfloat16, float16): one fused kernel, a GEMM whose epilogue
is the online softmax, so no logits ever reach memory. A program owns
BLOCK_M valid rows and one vocabulary span; it computes [BLOCK_M, BLOCK_N]
logit tiles with tl.dot over H and folds each into per-row running
statistics (max, sum of exponentials, their logit-weighted sum for the
entropy, the target's logit; with EXTRAS also the sum of squared exponentials,
the sum of the logits and the largest logit before the target, for
log_sum_sq_probs, mean_logits and is_top1). A second kernel merges the spans
of each row in a fixed order. Rows are gathered through the valid-row indices, so
ignored rows are never computed. Every launch parameter depends on the
device and dtype only, never on N: a row's result is the same bits alone or
in any batch.

Backward, and the float64 forward: the chunk loops of
csrc/include/rlhf_ext/linear_logprobs_host.h (see there for the algorithm
and the memory bound), with torch GEMMs (cuBLAS on CUDA) between the Triton
row kernels of token_logprobs. For bf16/fp16 the tiles are float32 logits
(cuBLAS with a float32 output), as the fused forward formed them and as the
C++ path does on CUDA; here also on CPU tensors, under the interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import custom_op

from rlhf_ext._backend import triton_interpreting
from rlhf_ext.ops._vocab import (
    LINEAR_ACCUMULATE_ROWS,
    LINEAR_MIN_TILE_VOCAB,
    LINEAR_ROW_QUANTUM,
    LINEAR_VOCAB_QUANTUM,
    LOGPROB_EXTRA_CODES,
)
from rlhf_ext.triton import token_logprobs as rows_kernels
from rlhf_ext.triton._common import on_device_of, online_softmax_sq_step, tanh_series_max
from rlhf_ext.triton.token_logprobs import asked_outputs, row_mult, softcap_squash

OP = "rlhf_ext.linear_token_logprobs"
LOG2E = tl.constexpr(1.4426950408889634)  # a global read inside kernels must be constexpr


@dataclass(frozen=True)
class FusedConfig:
    """Tile shape of the fused forward. `span` (vocabulary columns per program,
    a multiple of block_n) sets how many programs share a row block; group_m row
    blocks run side by side so that their weight tiles are shared in L2."""

    block_m: int
    block_n: int
    block_k: int
    span: int
    group_m: int
    num_warps: int
    num_stages: int


# H100-sized tiles on a GPU: 128x128x64 with 8 warps for bfloat16/float16
# (wgmma on sm_90, at most 204 registers, no spills on sm_80 or sm_90:
# tools/triton_compile_check.py); float32, whose exact products go through
# FMA, needs smaller tiles not to spill.
# Small tiles under the interpreter, so that the tests cross tile, span and
# group boundaries.
# The extra outputs' epilogue (EXTRAS) holds more [BLOCK_M, BLOCK_N] temporaries: at
# 128x128 bf16/fp16 it spilled 16-420 bytes (sm_80 and sm_90), so it takes 64 rows.
GPU_CONFIG = FusedConfig(128, 128, 64, 4096, 8, 8, 3)
GPU_CONFIG_EXTRAS = FusedConfig(64, 128, 64, 4096, 8, 8, 3)
GPU_CONFIG_FLOAT32 = FusedConfig(64, 128, 32, 4096, 8, 8, 2)
INTERPRETER_CONFIG = FusedConfig(16, 32, 16, 64, 2, 4, 1)


def fused_config(dtype: torch.dtype, extras: bool = False) -> FusedConfig:
    if triton_interpreting():
        return INTERPRETER_CONFIG
    if dtype == torch.float32:
        return GPU_CONFIG_FLOAT32
    return GPU_CONFIG_EXTRAS if extras else GPU_CONFIG


def k_step(cfg: FusedConfig, size: int) -> int:
    """Columns of H per tl.dot step: the config's, or a smaller one that divides H.
    Masked k-steps (H not a multiple of 16) stay at 16: at 64 they spill on sm_80."""
    for step in (cfg.block_k, cfg.block_k // 2, 16):
        if step >= 16 and size % step == 0:
            return step
    return 16


@triton.jit
def _fused_program(pid, row_blocks, splits, GROUP_M: tl.constexpr):
    """(row block, vocabulary span) of program `pid`: row blocks fastest within
    groups of GROUP_M, so that programs running together read the same columns."""
    per_group = GROUP_M * splits
    group = pid // per_group
    first = group * GROUP_M
    group_size = tl.minimum(row_blocks - first, GROUP_M)
    local = pid % per_group
    return first + local % group_size, local // group_size


@triton.jit
def _dot_step(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b^T for one k-step; exact float32 products for float32 inputs."""
    if UPCAST:  # the interpreter's dot multiplies bfloat16's raw bits
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE or UPCAST:
        return tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(b), acc)


@triton.jit
def _linear_logprobs_fwd_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    valid_ptr,
    target_ptr,
    params_ptr,
    temps_ptr,
    parts_ptr,
    n_valid,
    vocab,
    size,
    stride_hidden,
    stride_hidden_k,
    stride_weight,
    stride_weight_k,
    span,
    HAS_BIAS: tl.constexpr,
    ENTROPY: tl.constexpr,
    EXTRAS: tl.constexpr,
    PER_ROW_TEMP: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SERIES_MAX: tl.constexpr,
    EVEN_K: tl.constexpr,
    UNIT_K: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    row_blocks = tl.cdiv(n_valid, BLOCK_M)
    splits = tl.cdiv(vocab, span)
    block, split = _fused_program(tl.program_id(0), row_blocks, splits, GROUP_M)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_valid
    # Rows past n_valid read hidden row 0 and target[0] (in bounds) and are never stored.
    src = tl.load(valid_ptr + rows, mask=row_ok, other=0)
    tgt = tl.load(target_ptr + src)
    hidden_rows = hidden_ptr + src[:, None] * stride_hidden
    # token_logprobs' transform (rlhf_ext/triton/token_logprobs.py): one multiplier per
    # row with per-row temperatures, else one for all.
    scale = row_mult(params_ptr, temps_ptr, src, tl.float32, PER_ROW_TEMP, SOFTCAP) * LOG2E
    col_begin = split * span
    col_end = tl.minimum(vocab, col_begin + span)
    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_M,), tl.float32)
    sum_shift = tl.zeros((BLOCK_M,), tl.float32)
    x_target = tl.zeros((BLOCK_M,), tl.float32)
    sum_sq = tl.zeros((BLOCK_M,), tl.float32)
    sum_y = tl.zeros((BLOCK_M,), tl.float32)
    max_before = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for start in range(col_begin, col_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < col_end
        # Columns past the span re-read its last column (in bounds) and are masked below.
        weight_cols = (
            weight_ptr + tl.minimum(cols, col_end - 1).to(tl.int64)[:, None] * stride_weight
        )
        logits = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in range(0, size, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            if not UNIT_K:  # column-major operands: ks * stride can pass 2**31
                ks = ks.to(tl.int64)
            if EVEN_K:
                a = tl.load(hidden_rows + ks[None, :] * stride_hidden_k)
                b = tl.load(weight_cols + ks[None, :] * stride_weight_k)
            else:
                k_ok = ks[None, :] < size
                a = tl.load(hidden_rows + ks[None, :] * stride_hidden_k, mask=k_ok, other=0.0)
                b = tl.load(weight_cols + ks[None, :] * stride_weight_k, mask=k_ok, other=0.0)
            logits = _dot_step(a, b, logits, IEEE, UPCAST)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            logits += bias[None, :]
        if SOFTCAP:
            logits = softcap_squash(logits, params_ptr, tl.float32, SERIES_MAX)[0]
        x = tl.where(col_ok[None, :], logits, float("-inf"))
        x_target += tl.sum(tl.where(cols[None, :] == tgt[:, None], x, 0.0), axis=1)
        # token_logprobs' online softmax, per row of the tile.
        running_max, sum_exp, sum_shift, sum_sq = online_softmax_sq_step(
            x, running_max, sum_exp, sum_shift, sum_sq, scale, 1, ENTROPY, EXTRAS, PER_ROW_TEMP
        )
        if EXTRAS:  # token_logprobs' running extras (rlhf_ext/triton/token_logprobs.py)
            sum_y += tl.sum(tl.where(col_ok[None, :], x, 0.0), axis=1)
            before = col_ok[None, :] & (cols[None, :] < tgt[:, None]) & (x == x)
            max_before = tl.maximum(max_before, tl.max(tl.where(before, x, float("-inf")), 1))
    # parts: float32 [4 or 7, splits, n_valid]; int64 offsets (splits * n_valid can pass
    # 2**31).
    out = parts_ptr + tl.cast(split, tl.int64) * n_valid + rows
    plane = tl.cast(splits, tl.int64) * n_valid
    tl.store(out, running_max, mask=row_ok)
    tl.store(out + plane, sum_exp, mask=row_ok)
    tl.store(out + 2 * plane, sum_shift, mask=row_ok)
    tl.store(out + 3 * plane, x_target, mask=row_ok)
    if EXTRAS:
        tl.store(out + 4 * plane, sum_sq, mask=row_ok)
        tl.store(out + 5 * plane, sum_y, mask=row_ok)
        tl.store(out + 6 * plane, max_before, mask=row_ok)


@triton.jit
def _linear_logprobs_merge_kernel(
    parts_ptr,
    valid_ptr,
    target_ptr,
    params_ptr,
    temps_ptr,
    logprobs_ptr,
    entropy_ptr,
    lse_ptr,
    log_sum_sq_ptr,
    mean_ptr,
    top1_ptr,
    n_valid,
    vocab,
    splits,
    ENTROPY: tl.constexpr,
    SUM_SQ: tl.constexpr,
    MEAN: tl.constexpr,
    TOP1: tl.constexpr,
    PER_ROW_TEMP: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n_valid
    plane = tl.cast(splits, tl.int64) * n_valid
    src = tl.load(valid_ptr + rows, mask=row_ok, other=0)
    mult = row_mult(params_ptr, temps_ptr, src, tl.float32, PER_ROW_TEMP, SOFTCAP)
    scale = mult * LOG2E
    top = tl.full((BLOCK,), float("-inf"), tl.float32)
    largest = tl.full((BLOCK,), float("-inf"), tl.float32)  # also over spans with no sum
    for s in range(0, splits):
        at = parts_ptr + tl.cast(s, tl.int64) * n_valid + rows
        seen = tl.load(at + plane, mask=row_ok, other=0.0) > 0
        part_max = tl.load(at, mask=row_ok, other=0.0)
        top = tl.where(seen, tl.maximum(top, part_max), top)
        largest = tl.maximum(largest, part_max)
    base = tl.where(top == float("-inf"), 0.0, top)
    sum_exp = tl.zeros((BLOCK,), tl.float32)
    sum_shift = tl.zeros((BLOCK,), tl.float32)
    x_target = tl.zeros((BLOCK,), tl.float32)
    sum_sq = tl.zeros((BLOCK,), tl.float32)
    sum_y = tl.zeros((BLOCK,), tl.float32)
    max_before = tl.full((BLOCK,), float("-inf"), tl.float32)
    for s in range(0, splits):  # a fixed order: deterministic, batch-invariant
        at = parts_ptr + tl.cast(s, tl.int64) * n_valid + rows
        part_exp = tl.load(at + plane, mask=row_ok, other=0.0)
        seen = part_exp > 0
        delta = tl.where(seen, tl.load(at, mask=row_ok, other=0.0) - base, 0.0)
        factor = tl.where(seen, tl.exp2(delta * scale), 0.0)
        sum_exp += factor * part_exp
        if ENTROPY:
            part_shift = tl.load(at + 2 * plane, mask=row_ok, other=0.0)
            sum_shift += factor * (part_shift + delta * part_exp)
        x_target += tl.load(at + 3 * plane, mask=row_ok, other=0.0)
        if SUM_SQ:
            sum_sq += factor * factor * tl.load(at + 4 * plane, mask=row_ok, other=0.0)
        if MEAN:
            sum_y += tl.load(at + 5 * plane, mask=row_ok, other=0.0)
        if TOP1:
            part_before = tl.load(at + 6 * plane, mask=row_ok, other=float("-inf"))
            max_before = tl.maximum(max_before, part_before)
    log_sum = tl.log(sum_exp)
    lse = top * mult + log_sum
    tgt = tl.load(target_ptr + src, mask=row_ok, other=0)
    in_vocab = (tgt >= 0) & (tgt < vocab)
    logprob = tl.where(in_vocab, x_target * mult - lse, float("nan"))
    tl.store(logprobs_ptr + src, logprob, mask=row_ok)
    # +inf for a row with a +inf logit, as token_logprobs (softmax_math.h lse_output)
    tl.store(lse_ptr + src, tl.where(largest == float("inf"), largest, lse), mask=row_ok)
    if ENTROPY:
        tl.store(entropy_ptr + src, log_sum - mult * sum_shift / sum_exp, mask=row_ok)
    if SUM_SQ:
        tl.store(log_sum_sq_ptr + src, tl.log(sum_sq) - 2 * log_sum, mask=row_ok)
    if MEAN:
        tl.store(mean_ptr + src, sum_y * mult / vocab, mask=row_ok)
    if TOP1:  # a row without a distribution (NaN log-prob) has no top token
        top1 = (logprob == logprob) & (x_target >= largest) & (x_target > max_before)
        tl.store(top1_ptr + src, top1.to(tl.int8), mask=row_ok)


def _outputs(hidden, rows: int, return_entropy: bool, extras: int, acc=torch.float32):
    """The op's six flat outputs, zero (False) at ignored rows; an output not asked for
    is empty. is_top1 is held as bytes (the kernels write int8)."""
    dtypes = (acc,) * 5 + (torch.uint8,)
    return [
        hidden.new_zeros(rows if asked else 0, dtype=dtype)
        for asked, dtype in zip(asked_outputs(return_entropy, extras), dtypes, strict=True)
    ]


def _fused_forward(hidden, weight, bias, target, transform, ignore_index, return_entropy, extras):
    """The six flat outputs from the fused kernels (not float64), is_top1 as bytes."""
    size, vocab = hidden.shape[-1], weight.shape[0]
    rows = target.numel()
    flat_hidden = hidden.reshape(rows, size)  # any strides: the kernel takes both
    bias = bias.contiguous() if bias is not None else None  # read as bias[col]
    flat_target = target.reshape(rows).long().contiguous()
    out = _outputs(hidden, rows, return_entropy, extras)
    valid = _valid_rows(flat_target, ignore_index)
    n_valid = valid.numel()
    if n_valid == 0:
        return out
    cfg = fused_config(hidden.dtype, extras != 0)
    block_k = k_step(cfg, size)
    splits = triton.cdiv(vocab, cfg.span)
    parts = hidden.new_empty((7 if extras else 4, splits, n_valid), dtype=torch.float32)
    temperature, temperatures, logit_scale, softcap = transform
    params, temps = rows_kernels.transform_params(hidden, *transform)
    per_row_temp, capped = temperatures is not None, softcap > 0
    programs = triton.cdiv(n_valid, cfg.block_m) * splits
    _linear_logprobs_fwd_kernel[(programs,)](
        flat_hidden, weight, bias if bias is not None else weight, valid, flat_target, params,
        temps, parts, n_valid, vocab, size, *flat_hidden.stride(), *weight.stride(), cfg.span,
        HAS_BIAS=bias is not None,
        ENTROPY=return_entropy,
        EXTRAS=extras != 0,
        PER_ROW_TEMP=per_row_temp,
        SOFTCAP=capped,
        SERIES_MAX=tanh_series_max(tl.float32),
        EVEN_K=size % block_k == 0,
        UNIT_K=flat_hidden.stride(1) == 1 and weight.stride(1) == 1,
        IEEE=hidden.dtype == torch.float32,
        UPCAST=hidden.dtype == torch.bfloat16 and triton_interpreting(),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    asked = asked_outputs(return_entropy, extras)
    # An output not asked for is never written: the lse stands in for its pointer.
    written = [t if wanted else out[2] for t, wanted in zip(out, asked, strict=True)]
    merge_block = 128
    _linear_logprobs_merge_kernel[(triton.cdiv(n_valid, merge_block),)](
        parts, valid, flat_target, params, temps, *written, n_valid, vocab, splits,
        ENTROPY=return_entropy, SUM_SQ=asked[3], MEAN=asked[4], TOP1=asked[5],
        PER_ROW_TEMP=per_row_temp, SOFTCAP=capped, BLOCK=merge_block,
    )  # fmt: skip
    return out


def _logits_tile(hidden_rows, weight_rows, bias_cols, float32_logits: bool = False):
    """hidden_rows @ weight_rows.T + bias_cols, as logits_tile in the C++ header;
    float32_logits: float32 sums of the bf16/fp16 products, never rounded, as the
    fused forward forms them."""
    if float32_logits:
        if hidden_rows.is_cuda:
            tile = torch.mm(hidden_rows, weight_rows.T, out_dtype=torch.float32)
        else:  # torch's CPU GEMM has no float32 output for bf16/fp16 (the interpreter's tests)
            tile = hidden_rows.float() @ weight_rows.float().T
        if bias_cols is not None:
            tile += bias_cols
        return tile
    if bias_cols is None:
        return hidden_rows @ weight_rows.T
    return torch.addmm(bias_cols, hidden_rows, weight_rows.T)


def _chunk_rows(flat_hidden, valid, begin: int, end: int):
    """(indices, rows) of valid rows [begin, end) padded up to a multiple of 16 rows,
    as chunk_rows in the C++ header: a slice of hidden when no row is ignored."""
    padded = -(-(end - begin) // LINEAR_ROW_QUANTUM) * LINEAR_ROW_QUANTUM
    rows = flat_hidden.shape[0]
    if valid.numel() == rows and begin + padded <= rows:
        return valid[begin : begin + padded], flat_hidden[begin : begin + padded]
    idx = valid[begin:end]
    if padded > end - begin:
        idx = torch.cat([idx, idx[-1:].expand(padded - (end - begin))])
    return idx, flat_hidden.index_select(0, idx)


def _valid_rows(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return torch.nonzero(target.reshape(-1) != ignore_index).reshape(-1)


@custom_op("rlhf_ext::linear_token_logprobs_fwd_triton", mutates_args=())
def linear_token_logprobs_fwd_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    temperature: float,
    temperatures: torch.Tensor | None,
    logit_scale: float,
    softcap: float,
    ignore_index: int,
    return_entropy: bool,
    chunk_size: int,
    extras: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward with the signature of torch.ops.rlhf_ext.linear_token_logprobs_fwd:
    the fused kernels, or for float64 the chunk loop (chunk_size rows at a time)."""
    if extras < 0 or extras & ~sum(LOGPROB_EXTRA_CODES.values()):
        raise ValueError(
            f"{OP}: `extras` must be a combination of the bits {LOGPROB_EXTRA_CODES}, got {extras}"
        )
    transform = (temperature, temperatures, logit_scale, softcap)
    with on_device_of(hidden):
        if hidden.dtype == torch.float64:
            out = _chunked_forward(
                hidden, weight, bias, target, transform, ignore_index, return_entropy,
                chunk_size, extras,
            )  # fmt: skip
        else:
            out = _fused_forward(
                hidden, weight, bias, target, transform, ignore_index, return_entropy, extras
            )
    lead = hidden.shape[:-1]
    out[5] = out[5].to(torch.bool)
    asked = asked_outputs(return_entropy, extras)
    return tuple(t.view(lead) if wanted else t for t, wanted in zip(out, asked, strict=True))


def _chunked_forward(
    hidden, weight, bias, target, transform, ignore_index, return_entropy, chunk_size, extras
):  # fmt: skip
    """The six flat outputs from the chunk loop (float64 only): a logits tile of
    chunk_size rows, then token_logprobs' Triton row kernel."""
    rows, size = target.numel(), hidden.shape[-1]
    flat_hidden, flat_target = hidden.reshape(rows, size), target.reshape(rows).long()
    out = _outputs(hidden, rows, return_entropy, extras, torch.float64)
    valid = _valid_rows(flat_target, ignore_index)
    temperature, temperatures, logit_scale, softcap = transform
    for begin in range(0, valid.numel(), chunk_size):
        end = min(valid.numel(), begin + chunk_size)
        idx, chunk = _chunk_rows(flat_hidden, valid, begin, end)
        tile = _logits_tile(chunk, weight, bias)
        tile_target = flat_target.index_select(0, idx)
        tile_target[end - begin :] = ignore_index  # padding rows: skipped by the kernel
        tile_temps = _rows_of(temperatures, idx)
        parts = rows_kernels.token_logprobs_fwd_triton(
            tile, tile_target, temperature, tile_temps, logit_scale, softcap, ignore_index,
            return_entropy, False, extras,
        )  # fmt: skip
        here = valid[begin:end]
        for whole, part in zip(out, parts, strict=True):
            if whole.numel():
                whole.index_copy_(0, here, part[: end - begin].to(whole.dtype))
    return out


def _rows_of(temperatures: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """The per-token temperatures of some of the flat rows (None without them)."""
    return None if temperatures is None else temperatures.reshape(-1).index_select(0, rows)


def tile_geometry(valid_rows: int, vocab: int, chunk_rows: int) -> tuple[int, int]:
    """(rows, vocab) of a backward tile: the C++ header's tile_geometry, pinned to it
    over a grid of shapes by python_tests/test_op_contract.py."""
    budget = chunk_rows * vocab
    if valid_rows <= chunk_rows:
        return max(valid_rows, 1), vocab
    cols = budget // valid_rows // LINEAR_VOCAB_QUANTUM * LINEAR_VOCAB_QUANTUM
    narrow = min(vocab, LINEAR_MIN_TILE_VOCAB)
    if cols >= narrow:
        return valid_rows, min(vocab, cols)
    return max(1, budget // narrow), narrow


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc in float32 (float64) and a, b in the inputs' dtype,
    LINEAR_ACCUMULATE_ROWS rows of the product at a time (a bounded temporary)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    for row in range(0, a.shape[0], LINEAR_ACCUMULATE_ROWS):
        rows = slice(row, row + LINEAR_ACCUMULATE_ROWS)
        if acc.is_cuda:
            acc[rows] += torch.mm(a[rows], b, out_dtype=acc.dtype)
        else:
            acc[rows] += a[rows] @ b


@custom_op("rlhf_ext::linear_token_logprobs_bwd_triton", mutates_args=())
def linear_token_logprobs_bwd_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
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
    chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward with the signature of torch.ops.rlhf_ext.linear_token_logprobs_bwd."""
    transform = (temperature, temperatures, logit_scale, softcap)
    extra_grads = (log_sum_sq, grad_lse, grad_log_sum_sq, grad_mean_logits)
    with on_device_of(hidden):
        return _backward(
            hidden, weight, bias, target, lse, entropy, grad_logprobs, grad_entropy,
            extra_grads, transform, ignore_index, chunk_size, need_grad_hidden,
            need_grad_weight,
        )  # fmt: skip


def _backward(
    hidden, weight, bias, target, lse, entropy, grad_logprobs, grad_entropy, extra_grads,
    transform, ignore_index, chunk_size, need_grad_hidden, need_grad_weight,
):  # fmt: skip
    if grad_entropy is not None and entropy is None:
        raise ValueError(f"{OP}: `entropy` is needed with `grad_entropy`")
    if extra_grads[2] is not None and extra_grads[0] is None:
        raise ValueError(f"{OP}: `log_sum_sq` is needed with `grad_log_sum_sq`")
    size, vocab = hidden.shape[-1], weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rows = target.numel()
    flat_hidden, flat_target = hidden.reshape(rows, size), target.reshape(rows).long()
    valid = _valid_rows(flat_target, ignore_index)
    valid_rows = valid.numel()

    def per_valid_row(t):
        return None if t is None else t.reshape(rows).index_select(0, valid).to(acc).contiguous()

    tgt, lse_v = flat_target.index_select(0, valid), per_valid_row(lse)
    glp, gent = per_valid_row(grad_logprobs), per_valid_row(grad_entropy)
    ent = per_valid_row(entropy) if grad_entropy is not None else None
    extras_v = tuple(per_valid_row(t) for t in extra_grads)
    temperature, temperatures, logit_scale, softcap = transform
    temps_v = _rows_of(temperatures, valid)
    dense = flat_hidden if valid_rows == rows else flat_hidden.index_select(0, valid)
    grad_hidden_acc = hidden.new_zeros((valid_rows, size), dtype=acc) if need_grad_hidden else None
    # Contiguous like the C++ op and the fake kernel, whatever the layout of weight.
    grad_weight = weight.new_empty(weight.shape) if need_grad_weight else weight.new_empty(0)
    grad_bias_acc = weight.new_zeros(vocab, dtype=acc) if bias is not None else None
    # The forward's lse and entropy come from float32 logits, so must the backward's
    # probabilities: with logits rounded to bf16 they would not sum to 1 (a confident
    # token's gradient, 1 - p, drowns in p times the rounding). Low-precision inputs
    # take a float32 logits tile plus a tile of their dtype for its gradient: 6 bytes
    # per logit against the 4 that chunk_size=None budgets, so two thirds of the rows.
    float32_logits = hidden.dtype in (torch.bfloat16, torch.float16)
    budget_rows = max(1, chunk_size * 2 // 3) if float32_logits else chunk_size
    tile_rows, tile_vocab = tile_geometry(valid_rows, vocab, budget_rows)
    split_rows = tile_rows < valid_rows
    for col in range(0, vocab if valid_rows else 0, tile_vocab):
        cols = slice(col, min(vocab, col + tile_vocab))
        weight_cols, bias_cols = weight[cols], (None if bias is None else bias[cols])
        grad_weight_acc = None
        if need_grad_weight and split_rows:
            grad_weight_acc = weight.new_zeros((cols.stop - col, size), dtype=acc)
        for row in range(0, valid_rows, tile_rows):
            here = slice(row, min(valid_rows, row + tile_rows))
            hidden_rows = dense[here]
            grad_tile = _logits_tile(hidden_rows, weight_cols, bias_cols, float32_logits)
            rows_kernels._launch_backward(  # the gradient in place of the logits
                grad_tile, grad_tile, rows_kernels.row_layout(grad_tile), tgt[here],
                lse_v[here], None if ent is None else ent[here],
                None if glp is None else glp[here], None if gent is None else gent[here],
                temperature, ignore_index, vocab_slice=(col, vocab),
                temperatures=None if temps_v is None else temps_v[here],
                logit_scale=logit_scale, softcap=softcap,
                extra_grads=tuple(None if t is None else t[here] for t in extras_v),
            )  # fmt: skip
            if grad_bias_acc is not None:
                grad_bias_acc[cols] += grad_tile.sum(0, dtype=acc)
            dlogits = grad_tile.to(hidden.dtype)  # the GEMMs' operand
            del grad_tile  # a float32 tile is freed before the GEMMs' temporaries
            if need_grad_hidden:
                _accumulate_mm(grad_hidden_acc[here], dlogits, weight_cols)
            if grad_weight_acc is not None:
                _accumulate_mm(grad_weight_acc, dlogits.T, hidden_rows)
            elif need_grad_weight:
                torch.mm(dlogits.T, hidden_rows, out=grad_weight[cols])
        if grad_weight_acc is not None:
            grad_weight[cols] = grad_weight_acc
    if need_grad_weight and valid_rows == 0:
        grad_weight.zero_()
    grad_hidden = hidden.new_empty(0)
    if need_grad_hidden:
        grad_hidden = hidden.new_zeros((rows, size))
        grad_hidden.index_copy_(0, valid, grad_hidden_acc.to(hidden.dtype))
        grad_hidden = grad_hidden.view(hidden.shape)
    grad_bias = weight.new_empty(0) if bias is None else grad_bias_acc.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias
