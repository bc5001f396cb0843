"""Tensor glue shared by the adapters: log-probs of several indices per position, entropy
alone, whitening, the local-to-global loss scale, and the "next valid position" fill that
verl's GAE needs."""

from __future__ import annotations

import torch

from rlhf_ext.ops.masked_stats import masked_whiten as _rlhf_masked_whiten
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


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """TRL's and verl's ``entropy_from_logits``: the entropy (nats) of ``softmax(logits)``
    over the last dimension, shape ``logits.shape[:-1]``, dtype of ``logits``. One fused pass
    over the logits (no [..., V] temporary); differentiable w.r.t. ``logits``."""
    return entropy_only(logits).to(logits.dtype)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True):
    """TRL PPO's and verl's ``masked_whiten``: ``(values - mean) * rsqrt(var + 1e-8)`` at
    every position (masked ones too), mean and unbiased variance over the mask, the mean
    added back when ``shift_mean=False``. One fused kernel; dtype of ``values``; not
    differentiable."""
    whitened = _rlhf_masked_whiten(values, mask, shift_mean=shift_mean, unbiased=True, eps=1e-8)
    return whitened.to(values.dtype)


def global_scale(valid, token_level: bool, dp_size, batch_num_tokens, global_batch_size):
    """The factor that turns an aggregate over the local batch into verl's / OpenRLHF's
    globally normalised loss: local count / global count * ``dp_size`` (DDP's gradient
    averaging then gives the global mean). Tokens (``valid.sum()`` over
    ``batch_num_tokens``) when ``token_level``, else non-empty rows (over
    ``global_batch_size``). None when that global count is not given."""
    if token_level:
        return None if batch_num_tokens is None else valid.sum() / batch_num_tokens * dp_size
    if global_batch_size is None:
        return None
    return valid.any(-1).sum() / global_batch_size * dp_size


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
