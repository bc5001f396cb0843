"""Tensor glue shared by the adapters: log-probs of several indices per position, entropy
alone, and the "next valid position" fill that verl's GAE needs."""

from __future__ import annotations

import torch

from rlhf_ext.ops.token_logprobs import token_logprobs


def gather_logprobs(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0):
    """``log_softmax(logits / temperature)`` gathered at ``index``: shape ``logits.shape[:-1]``
    (one index per position) or ``logits.shape[:-1] + (K,)`` (K indices per position).

    One index per position is one fused kernel call. For K indices, the kernel gives the
    log-prob of the first index; the log-sum-exp follows as ``z_0 - logprob_0`` (z =
    logits / temperature, in float32) and the other K - 1 log-probs as ``z_k - lse``. Autograd
    through that identity gives the exact softmax gradient, so nothing [..., V]-sized beyond
    the gradient is materialised. Result in float32 (float64 for float64 logits).
    """
    if index.dim() == logits.dim() - 1:
        return token_logprobs(logits, index, temperature=temperature)
    first = index[..., 0].contiguous()
    first_logprobs = token_logprobs(logits, first, temperature=temperature)
    compute_dtype = first_logprobs.dtype
    picked = torch.gather(logits, -1, index).to(compute_dtype) / temperature
    lse = picked[..., 0] - first_logprobs
    return picked - lse.unsqueeze(-1)


def entropy_only(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` per position, from the fused log-probs
    kernel (target 0 for every row: the entropy does not depend on the target, and the
    kernel reads each row once either way). Float32 (float64 for float64 logits)."""
    target = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    _, entropy = token_logprobs(logits, target, temperature=temperature, return_entropy=True)
    return entropy


def fill_from_next_valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with every masked position replaced by ``x`` at the nearest valid position to
    its right in the same row (0 when there is none). This is what a right-to-left
    recurrence that carries its state through masked positions leaves there."""
    rows, length = x.shape
    positions = torch.arange(length, device=x.device).expand(rows, length)
    valid_or_end = torch.where(mask != 0, positions, torch.full_like(positions, length))
    next_valid = valid_or_end.flip(-1).cummin(-1).values.flip(-1)
    padded = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
    return torch.gather(padded, 1, next_valid)
