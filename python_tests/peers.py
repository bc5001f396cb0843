"""The peers' own implementations, written as the peers write them.

The test suite checks rlhf_ext against them and the benchmarks (bench/) import them from
here as their baselines. Only torch is imported at module level; TorchRL is optional.
"""

from __future__ import annotations

import torch


def trl_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """GAE as TRL's PPO trainer (and verl before its multi-turn mask) computes it.

    The Python loop over time steps, one handful of [B] kernels per step; no mask (the
    recurrence runs over every position). Returns ``(advantages, returns)``.
    """
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages, returns


def verl_gae(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
):
    """GAE as verl's ``compute_gae_advantage_return`` computes it (with the multi-turn
    mask: masked positions pass the running value and advantage through), without the
    ``masked_whiten`` verl applies afterwards (a separate op, benchmarked on its own).

    Differs from rlhf_ext.gae only at masked positions: verl writes the carried
    advantage there, rlhf_ext writes 0. On an all-valid mask they agree.
    """
    with torch.no_grad():
        nextvalues = 0
        lastgaelam = 0
        advantages_reversed = []
        gen_len = token_level_rewards.shape[-1]
        for t in reversed(range(gen_len)):
            delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            # skip values and TD-error on observation tokens
            nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages + values
    return advantages, returns


def torchrl_available() -> bool:
    """Whether TorchRL's vectorised GAE can be imported."""
    try:
        from torchrl.objectives.value.functional import vec_generalized_advantage_estimate  # noqa: F401
    except Exception:
        return False
    return True


def torchrl_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """GAE through TorchRL's ``vec_generalized_advantage_estimate`` (a convolution with
    the (gamma*lam)^k series instead of a loop), on [B, T] inputs with no mask.

    TorchRL takes ``[B, T, 1]`` tensors and an explicit next-state value; each row is one
    trajectory that terminates at its last step (next value 0 there, as in TRL). The
    reshaping a [B, T] caller needs is part of what is timed.
    """
    from torchrl.objectives.value.functional import vec_generalized_advantage_estimate

    state_value = values.unsqueeze(-1)
    next_state_value = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1).unsqueeze(
        -1
    )
    done = torch.zeros_like(state_value, dtype=torch.bool)
    done[:, -1] = True
    reward = rewards.unsqueeze(-1)
    try:
        advantages, value_target = vec_generalized_advantage_estimate(
            gamma, lam, state_value, next_state_value, reward, done, terminated=done, time_dim=-2
        )
    except TypeError:  # TorchRL before `terminated` was added
        advantages, value_target = vec_generalized_advantage_estimate(
            gamma, lam, state_value, next_state_value, reward, done, time_dim=-2
        )
    return advantages.squeeze(-1), value_target.squeeze(-1)


# -- token log-probs ---------------------------------------------------------------------


def eager_logprobs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The common eager form: upcast, ``log_softmax`` over the vocabulary, ``gather``.

    Materialises the [..., V] float32 log-probs (the memory RLHF trainers run out of).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def verl_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy as verl's ``entropy_from_logits`` writes it: a softmax, then
    ``logsumexp - sum(p * logits)``; a second full pass over the logits."""
    logits = logits.float()
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (pd * logits).sum(dim=-1)


def trl_selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's ``selective_log_softmax`` approach on [B, T, V] logits.

    float32 / float64: the target logit minus a per-sequence ``logsumexp`` (a loop over
    the B sequences keeps the temporaries at one sequence). bfloat16 / float16: a
    per-sequence ``log_softmax`` in the input dtype (logsumexp is unstable there).
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - lse
    rows = []
    for row_logits, row_index in zip(logits, index, strict=True):
        row_logps = torch.log_softmax(row_logits, dim=-1)
        rows.append(row_logps.gather(dim=-1, index=row_index.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def trl_entropy(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TRL's ``entropy_from_logits`` approach: log-softmax over chunks of rows,
    ``-(exp(logp) * logp).sum(-1)`` per chunk."""
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_size, dim=0):
        logps = torch.log_softmax(chunk.float(), dim=-1)
        parts.append(-(torch.exp(logps) * logps).sum(-1))
    return torch.cat(parts).reshape(logits.shape[:-1])
