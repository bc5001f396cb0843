"""Pure-PyTorch implementations of every rlhf_ext op.

They are the test oracle (called on float64 inputs) and the "torch" backend.
They favour obviousness over speed: GAE is the naive right-to-left loop, the
statistics follow TRL / verl line by line. Inputs are upcast to float32 (float64
stays float64), as the kernels do.
"""

from __future__ import annotations

import torch

__all__ = [
    "gae",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "kl_penalty",
    "kl_shaped_rewards",
    "token_logprobs",
]

KL_CLAMP_LOG_RATIO = 20.0
KL_CLAMP_VALUE = 10.0


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _per_row(x, rows: int, like: torch.Tensor) -> torch.Tensor:
    """A float or a [rows] tensor as a [rows] tensor in like's dtype."""
    if isinstance(x, torch.Tensor):
        return x.to(like.dtype)
    return torch.full((rows,), float(x), dtype=like.dtype, device=like.device)


def _gae_padded(rewards, values, mask, gamma, lam, last_value):
    rows, steps = rewards.shape
    gamma = _per_row(gamma, rows, rewards)
    lam = _per_row(lam, rows, rewards)
    next_value = _per_row(0.0 if last_value is None else last_value, rows, rewards)
    next_advantage = torch.zeros(rows, dtype=rewards.dtype, device=rewards.device)
    advantages = torch.zeros_like(rewards)
    returns = torch.zeros_like(rewards)
    for t in reversed(range(steps)):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # A masked position is skipped: both running quantities pass through it.
        next_advantage = torch.where(valid, advantage, next_advantage)
        next_value = torch.where(valid, values[:, t], next_value)
        advantages[:, t] = torch.where(valid, advantage, 0.0)
        returns[:, t] = torch.where(valid, advantage + values[:, t], 0.0)
    return advantages, returns


def _row_of(x, row: int):
    """Row `row` of a per-row tensor argument (as a [1] tensor); scalars pass through."""
    return x[row : row + 1] if isinstance(x, torch.Tensor) else x


def gae(rewards, values, mask=None, *, gamma=1.0, lam=0.95, last_value=None, cu_seqlens=None):
    """Generalised advantage estimation, DESIGN 3.2 semantics (see rlhf_ext.gae)."""
    rewards, values = _acc(rewards.detach()), _acc(values.detach()).to(_acc(rewards).dtype)
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.detach() != 0
    if cu_seqlens is None:
        return _gae_padded(rewards, values, mask, gamma, lam, last_value)
    advantages = torch.zeros_like(rewards)
    returns = torch.zeros_like(rewards)
    bounds = cu_seqlens.tolist()
    for row, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        a, r = _gae_padded(
            rewards[None, lo:hi],
            values[None, lo:hi],
            mask[None, lo:hi],
            _row_of(gamma, row),
            _row_of(lam, row),
            _row_of(last_value, row),
        )
        advantages[lo:hi], returns[lo:hi] = a[0], r[0]
    return advantages, returns


def masked_mean(x, mask=None, dim=None):
    """Mean over valid elements (TRL's (x * mask).sum(dim) / mask.sum(dim) for 0/1 masks).

    A row with no valid element gives 0 (the kernels' convention; rlhf_ext's
    public function raises instead when the whole tensor is empty).
    """
    x = _acc(x)
    valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask != 0
    # where(), not x * mask: a mask selects (nonzero = valid), it does not weight, and a
    # masked-out inf / NaN must not leak into the mean.
    kept = torch.where(valid, x, 0.0)
    total = kept.sum() if dim is None else kept.sum(dim)
    count = valid.sum() if dim is None else valid.sum(dim)
    return torch.where(count > 0, total / count.clamp_min(1), 0.0)


def masked_var(x, mask=None, unbiased=True):
    """TRL / verl masked variance, with Bessel's correction when unbiased."""
    x = _acc(x)
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = x.numel() if mask is None else (mask != 0).sum()
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(x, mask=None, shift_mean=True, unbiased=True, eps=1e-8):
    """TRL / verl whitening: (x - mean) * rsqrt(var + eps), mean added back unless shift_mean."""
    x = _acc(x)
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


_KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}


def kl_penalty(logprobs, ref_logprobs, kind="k3"):
    """Per-token KL estimate (value only; see rlhf_ext.kl_penalty for gradients)."""
    base = _KL_ALIASES.get(kind.rstrip("+"), kind.rstrip("+"))
    diff = _acc(logprobs) - _acc(ref_logprobs)
    if base == "k1":
        return diff
    if base == "abs":
        return diff.abs()
    if base == "k2":
        return 0.5 * diff.square()
    if base == "k3":
        d = (-diff).clamp(-KL_CLAMP_LOG_RATIO, KL_CLAMP_LOG_RATIO)
        return (torch.exp(d) - d - 1).clamp(-KL_CLAMP_VALUE, KL_CLAMP_VALUE)
    raise ValueError(f"rlhf_ext.kl_penalty: unknown `kind` {kind!r}")


def kl_shaped_rewards(scores, logprobs, ref_logprobs, mask=None, *, kl_coef, kl="k1"):
    """-kl_coef * KL per valid token, plus each row's score at its last valid token."""
    logprobs = _acc(logprobs)
    rows, steps = logprobs.shape
    mask = torch.ones_like(logprobs, dtype=torch.bool) if mask is None else mask != 0
    rewards = torch.where(mask, -kl_coef * kl_penalty(logprobs, ref_logprobs, kl), 0.0)
    positions = torch.arange(steps, device=logprobs.device).expand(rows, steps)
    last = torch.where(mask, positions, -1).amax(dim=1) if steps else torch.full((rows,), -1)
    has_token = last >= 0
    row_index = torch.arange(rows, device=logprobs.device)[has_token]
    rewards[row_index, last[has_token]] += scores.to(rewards.dtype)[has_token]
    return rewards


def token_logprobs(logits, target, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """log_softmax(logits / temperature) at `target` over the last dim (and the entropy).

    0 (and no gradient) where target == ignore_index; NaN where a target is
    outside [0, V) otherwise. Materialises the [..., V] log-probs: the oracle
    and the "torch" backend, not a fast path.
    """
    logp = torch.log_softmax(_acc(logits) / temperature, dim=-1)
    ignored = target == ignore_index
    in_vocab = (target >= 0) & (target < logp.shape[-1])
    picked = logp.gather(-1, torch.where(in_vocab, target, 0).long().unsqueeze(-1)).squeeze(-1)
    picked = torch.where(in_vocab, picked, float("nan"))
    logprobs = torch.where(ignored, 0.0, picked)
    if not return_entropy:
        return logprobs
    p = logp.exp()
    # A -inf logit has p = 0 and adds 0 (not 0 * -inf), with a zero gradient.
    finite_logp = torch.where(p > 0, logp, 0.0)
    entropy = torch.where(ignored, 0.0, -(p * finite_logp).sum(-1))
    return logprobs, entropy
