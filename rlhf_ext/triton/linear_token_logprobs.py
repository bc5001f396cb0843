"""linear_token_logprobs on the Triton backend: the chunk loops of
csrc/include/rlhf_ext/linear_logprobs_host.h (see there for the algorithm and
the memory bound), with torch GEMMs (cuBLAS on CUDA) between the Triton row
kernels of token_logprobs. The same tiles, in the same order, as the C++ path."""

from __future__ import annotations

import torch
from torch.library import custom_op

from rlhf_ext.ops.linear_token_logprobs import OP, backward_fake, forward_fake
from rlhf_ext.triton import token_logprobs as rows_kernels

ROW_QUANTUM = 16
MIN_TILE_VOCAB = 1024
VOCAB_QUANTUM = 64


def _logits_tile(hidden_rows, weight_rows, bias_cols):
    if bias_cols is None:
        return hidden_rows @ weight_rows.T
    return torch.addmm(bias_cols, hidden_rows, weight_rows.T)


def _chunk_rows(flat_hidden, valid, begin: int, end: int):
    """(indices, rows) of valid rows [begin, end) padded up to a multiple of 16 rows,
    as chunk_rows in the C++ header: a slice of hidden when no row is ignored."""
    padded = -(-(end - begin) // ROW_QUANTUM) * ROW_QUANTUM
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
    ignore_index: int,
    return_entropy: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward with the signature of torch.ops.rlhf_ext.linear_token_logprobs_fwd."""
    lead, size = hidden.shape[:-1], hidden.shape[-1]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rows = target.numel()
    flat_hidden, flat_target = hidden.reshape(rows, size), target.reshape(rows).long()
    logprobs = hidden.new_zeros(rows, dtype=acc)
    lse = hidden.new_zeros(rows, dtype=acc)
    entropy = hidden.new_zeros(rows if return_entropy else 0, dtype=acc)
    valid = _valid_rows(flat_target, ignore_index)
    for begin in range(0, valid.numel(), chunk_size):
        end = min(valid.numel(), begin + chunk_size)
        idx, chunk = _chunk_rows(flat_hidden, valid, begin, end)
        tile = _logits_tile(chunk, weight, bias)
        tile_target = flat_target.index_select(0, idx)
        tile_target[end - begin :] = ignore_index  # padding rows: skipped by the kernel
        lp, ent, ls = rows_kernels.token_logprobs_fwd_triton(
            tile, tile_target, temperature, ignore_index, return_entropy
        )
        here = valid[begin:end]
        logprobs.index_copy_(0, here, lp[: end - begin])
        lse.index_copy_(0, here, ls[: end - begin])
        if return_entropy:
            entropy.index_copy_(0, here, ent[: end - begin])
    return logprobs.view(lead), entropy.view(lead) if return_entropy else entropy, lse.view(lead)


def _tile_geometry(valid_rows: int, vocab: int, chunk_rows: int) -> tuple[int, int]:
    """(rows, vocab) of a backward tile, as tile_geometry in the C++ header."""
    budget = chunk_rows * vocab
    if valid_rows <= chunk_rows:
        return max(valid_rows, 1), vocab
    cols = budget // valid_rows // VOCAB_QUANTUM * VOCAB_QUANTUM
    narrow = min(vocab, MIN_TILE_VOCAB)
    if cols >= narrow:
        return valid_rows, min(vocab, cols)
    return max(1, budget // narrow), narrow


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc in float32 (float64) and a, b in the inputs' dtype."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:
        acc.add_(a @ b)


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
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward with the signature of torch.ops.rlhf_ext.linear_token_logprobs_bwd."""
    if grad_entropy is not None and entropy is None:
        raise ValueError(f"{OP}: `entropy` is needed with `grad_entropy`")
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
    dense = flat_hidden if valid_rows == rows else flat_hidden.index_select(0, valid)
    grad_hidden_acc = hidden.new_zeros((valid_rows, size), dtype=acc) if need_grad_hidden else None
    # Contiguous like the C++ op and the fake kernel, whatever the layout of weight.
    grad_weight = weight.new_empty(weight.shape) if need_grad_weight else weight.new_empty(0)
    grad_bias_acc = weight.new_zeros(vocab, dtype=acc) if bias is not None else None
    tile_rows, tile_vocab = _tile_geometry(valid_rows, vocab, chunk_size)
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
            dlogits = _logits_tile(hidden_rows, weight_cols, bias_cols)
            rows_kernels._launch_backward(
                dlogits, dlogits, rows_kernels.row_layout(dlogits), tgt[here], lse_v[here],
                None if ent is None else ent[here], None if glp is None else glp[here],
                None if gent is None else gent[here], temperature, ignore_index,
                vocab_slice=(col, vocab),
            )  # fmt: skip
            if need_grad_hidden:
                _accumulate_mm(grad_hidden_acc[here], dlogits, weight_cols)
            if grad_weight_acc is not None:
                _accumulate_mm(grad_weight_acc, dlogits.T, hidden_rows)
            elif need_grad_weight:
                torch.mm(dlogits.T, hidden_rows, out=grad_weight[cols])
            if grad_bias_acc is not None:
                grad_bias_acc[cols] += dlogits.sum(0, dtype=acc)
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


linear_token_logprobs_fwd_triton.register_fake(forward_fake)
linear_token_logprobs_bwd_triton.register_fake(backward_fake)
