"""The trainer's advantage estimators: GAE with a critic, and the critic-free ones
(GRPO, Dr.GRPO, RLOO, REINFORCE++ and REINFORCE++ with a group baseline).

Every estimator starts from the per-token rewards ``[B, R]`` that
:meth:`PPOTrainer.shaped_rewards` builds (each row's score at its last token, minus
``kl_coef * kl_t`` per token when ``kl_placement="reward"``). The outcome estimators
score a row by the sum of its rewards (verl's ``token_level_rewards.sum(-1)``; TRL's
RLOO subtracts the sequence KL the same way) and compare it with the other rows of its
group: the ``num_generations`` consecutive rows sampled from one prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_ext


@dataclass(frozen=True)
class Estimator:
    """What an estimator needs and gives."""

    needs_critic: bool  # GAE's value baseline: a value head or a critic is trained
    grouped: bool  # compares a row with its group: needs num_generations >= 2
    per_row: bool  # one advantage per row [B] (the losses broadcast it in the kernel)
    summary: str


ADVANTAGE_ESTIMATORS = {
    "gae": Estimator(True, False, False, "GAE(gamma, lam) on the critic's values"),
    "grpo": Estimator(False, True, True, "(s - group mean) / (group std + 1e-6), Bessel"),
    "dr_grpo": Estimator(False, True, True, "s - group mean (Dr.GRPO: no std division)"),
    "rloo": Estimator(False, True, True, "s - mean of the group's other rows (RLOO)"),
    "reinforce_pp": Estimator(
        False, False, False, "discounted returns (gamma, lam = 1), whitened over the batch"
    ),
    "reinforce_pp_baseline": Estimator(
        False, True, False, "s - group mean at every token, whitened over the batch"
    ),
}
# group_advantages' options per outcome estimator (its defaults for the rest: eps 1e-6
# added to the Bessel-corrected std, as verl)
GROUP_OPTIONS = {
    "grpo": dict(baseline="mean", scale="group"),
    "dr_grpo": dict(baseline="mean", scale="none"),
    "rloo": dict(baseline="leave_one_out", scale="none"),
    "reinforce_pp_baseline": dict(baseline="mean", scale="none"),
}


def estimate_advantages(
    estimator: str,
    rewards: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    num_generations: int,
    gamma: float,
    lam: float,
    whiten: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(advantages, returns)`` of one rollout for ``estimator`` (a key of
    :data:`ADVANTAGE_ESTIMATORS`): ``[B, R]`` advantages, or ``[B]`` for the per-row
    estimators; returns (the value loss's targets) only for "gae". ``whiten`` applies to
    "gae" (the REINFORCE++ estimators always whiten; the group ones never do)."""
    if estimator == "gae":
        advantages, returns = rlhf_ext.gae(rewards, values, mask, gamma=gamma, lam=lam)
        if whiten:
            advantages = rlhf_ext.masked_whiten(advantages, mask)
        return advantages, returns
    if estimator == "reinforce_pp":
        zeros = torch.zeros_like(rewards)
        discounted, _ = rlhf_ext.gae(rewards, zeros, mask, gamma=gamma, lam=1.0)
        return rlhf_ext.masked_whiten(discounted, mask), None
    row_scores = rewards.sum(dim=1)  # rewards are 0 outside the mask
    row_advantages = rlhf_ext.group_advantages(
        row_scores, group_size=num_generations, **GROUP_OPTIONS[estimator]
    )
    if estimator == "reinforce_pp_baseline":
        per_token = row_advantages[:, None].expand_as(rewards)
        return rlhf_ext.masked_whiten(per_token, mask), None
    return row_advantages, None
