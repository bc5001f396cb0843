"""OpenRLHF's log-prob, KL, masked-mean, PPO / GSPO loss, GAE and REINFORCE-return
functions, backed by rlhf_ext's kernels.

Drop-in for ``openrlhf.models.utils`` (``log_probs_from_logits``, ``compute_approx_kl``,
``masked_mean``), the ``forward`` of ``openrlhf.models.loss.PolicyLoss`` / ``ValueLoss``, and
``RemoteExperienceMaker.get_advantages_and_returns`` (its GAE) and
``RemoteExperienceMaker.get_cumulative_returns`` (the returns of the critic-free estimators)
in ``openrlhf.trainer.ppo_utils.experience_maker``, with OpenRLHF 0.11.2's names, arguments,
defaults and semantics. ``PolicyLoss`` / ``ValueLoss`` here are ``nn.Module``s with
OpenRLHF's constructor; ``patch()`` replaces only the peer classes' ``forward``.

The group baseline of the critic-free estimators (rloo, reinforce_baseline, group_norm,
dr_grpo, flash_reinforce) is inline in OpenRLHF's ``compute_advantages_and_returns``, so it
cannot be patched; ``group_baseline`` is that step on ``rlhf_ext.group_advantages``, for a
one-line use in a trainer's own copy of the method (docs/integrations.md).

Importing this module does not import OpenRLHF; ``patch()`` does, and raises ImportError
when OpenRLHF is not installed or does not import (it needs flash-attn and DeepSpeed).
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_ext.integrations._common import global_scale
from rlhf_ext.integrations._patch import Patcher, Target, VersionRange
from rlhf_ext.ops.gae import gae as _rlhf_gae
from rlhf_ext.ops.group_advantages import group_advantages as _rlhf_group_advantages
from rlhf_ext.ops.masked_stats import masked_mean as _rlhf_masked_mean
from rlhf_ext.ops.ppo_losses import kl_penalty as _rlhf_kl_penalty
from rlhf_ext.ops.ppo_losses import policy_loss as _rlhf_policy_loss
from rlhf_ext.ops.ppo_losses import value_loss as _rlhf_value_loss
from rlhf_ext.ops.token_logprobs import token_logprobs as _rlhf_token_logprobs

PREFIX = "rlhf_ext.integrations.openrlhf"
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_CLAMP = 10.0  # OpenRLHF clamps every estimator's value to [-10, 10]
KL_IS_WEIGHT_CLIP = 10.0  # and the importance weight of its unbiased gradient to <= 10
POLICY_LOSS_TYPES = ("ppo", "gspo")  # OpenRLHF's; both on the fused kernel without IS correction
# OpenRLHF's estimators that take a group baseline (experience_maker.py:268-278), and those
# that leave the rewards as they are there.
GROUP_ESTIMATORS = ("rloo", "reinforce_baseline", "group_norm", "dr_grpo", "flash_reinforce")
UNGROUPED_ESTIMATORS = ("gae", "reinforce")
GROUP_NORM_EPS = 1e-9  # group_norm divides by std + 1e-9 (Bessel-corrected std)


def log_probs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """OpenRLHF's ``log_probs_from_logits``: ``log_softmax(logits / temperature)[labels]``
    per token, dtype of ``logits``, differentiable w.r.t. ``logits``.

    Like OpenRLHF, a temperature other than 1 divides ``logits`` in place first
    (``logits.div_(temperature)``): OpenRLHF's callers go on to use the scaled logits (e.g.
    for the entropy), so the side effect is part of the contract.
    """
    if temperature != 1.0:
        logits.div_(temperature)
    return _rlhf_token_logprobs(logits, labels).to(logits.dtype)


def compute_approx_kl(
    log_probs: torch.Tensor,
    log_probs_base: torch.Tensor,
    log_probs_old: torch.Tensor | None = None,
    kl_estimator: str = "k1",
    unbiased_gradient: bool = False,
) -> torch.Tensor:
    """OpenRLHF's ``compute_approx_kl``: the per-token estimate ``kl_estimator`` of
    KL(pi || pi_base) from ``log_ratio = log_probs - log_probs_base`` in float32 -- "k1":
    ``log_ratio``; "k2": ``log_ratio^2 / 2``; "k3": ``exp(-log_ratio) - 1 + log_ratio`` --
    clamped to [-10, 10] (all three kinds, as OpenRLHF).

    ``unbiased_gradient=True`` keeps that value and backpropagates ``w * log_ratio`` with the
    detached importance weight ``w = exp(log_probs - log_probs_old)`` clamped to <= 10 (1
    without ``log_probs_old``): the straight-through "+" kinds of rlhf_ext's kernel, scaled.
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"{PREFIX}.compute_approx_kl: `kl_estimator` must be one of {KL_ESTIMATORS}, "
            f"got {kl_estimator!r}"
        )
    log_probs, log_probs_base = log_probs.float(), log_probs_base.float()
    if not unbiased_gradient:
        value = _rlhf_kl_penalty(log_probs, log_probs_base, kind=kl_estimator)
        return value.clamp(min=-KL_CLAMP, max=KL_CLAMP)
    straight_through = _rlhf_kl_penalty(log_probs, log_probs_base, kind=kl_estimator + "+")
    weight = 1.0
    if log_probs_old is not None:
        weight = (log_probs - log_probs_old.float()).exp().clamp(max=KL_IS_WEIGHT_CLIP).detach()
    value = straight_through.detach().clamp(min=-KL_CLAMP, max=KL_CLAMP)
    return value + weight * (straight_through - straight_through.detach())


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor | None, dim: int = None) -> torch.Tensor:
    """OpenRLHF's ``masked_mean``: ``(tensor * mask).sum(dim) / mask.sum(dim)``, or
    ``tensor.mean(dim)`` without a mask; dtype of ``tensor``; differentiable. An empty mask
    raises ValueError with ``dim=None`` and gives 0 along a ``dim`` (OpenRLHF: NaN)."""
    return _rlhf_masked_mean(tensor, mask, dim).to(tensor.dtype)


def _global_scale(mask, like, token_level_loss, dp_size, batch_num_tokens, global_batch_size):
    """OpenRLHF's ``aggregate_loss`` divides by global counts when given (and multiplies by
    ``dp_size``); rlhf_ext's aggregate is over the local batch: this is the ratio (1 when
    the global count is not given)."""
    valid = torch.ones_like(like, dtype=torch.bool) if mask is None else mask != 0
    scale = global_scale(valid, token_level_loss, dp_size, batch_num_tokens, global_batch_size)
    return 1.0 if scale is None else scale


def policy_loss_forward(
    self,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor | None = None,
    rollout_log_probs: torch.Tensor | None = None,
    dp_size: int = 1,
    batch_num_tokens: float | None = None,
    global_batch_size: float | None = None,
):
    """OpenRLHF's ``PolicyLoss.forward`` for ``policy_loss_type`` "ppo" and "gspo" without
    the rollout importance-sampling correction, aggregated per token (``token_level_loss``)
    or per sequence and rescaled by the global counts. Returns ``(loss, clip_ratio, ppo_kl,
    None, None)`` like OpenRLHF. Differentiable w.r.t. ``log_probs``.

    - "ppo": the clipped surrogate on ``exp(clamp(new - old, -20, 20))`` with the band
      ``[1 - clip_eps_low, 1 + clip_eps_high]`` and the optional ``dual_clip``.
    - "gspo": the same clipped surrogate on each sequence's ratio ``exp(mean_t(new - old))``
      (the mean over the row's valid tokens, not clamped; the gradient flows through the
      mean) times each token's advantage; OpenRLHF's constructor makes it per-sequence.

    ``clip_ratio`` is the fraction of valid tokens whose clip won; ``ppo_kl`` the masked mean
    of the unclamped ``old - new``, as OpenRLHF. The IS correction (``is_correction_level !=
    "off"``) and "gspo" with ``dual_clip`` are not served by the fused kernel: when patched,
    those configurations run OpenRLHF's own forward; on the standalone ``PolicyLoss`` they
    raise ValueError.
    """
    if _needs_peer_policy_loss(self):
        peer_forward = _PATCHER.original(f"{LOSS}.PolicyLoss.forward") if _PATCHER.active else None
        if peer_forward is None or peer_forward is policy_loss_forward:
            raise ValueError(
                f"{PREFIX}.PolicyLoss: policy_loss_type={self.policy_loss_type!r} with "
                f"is_correction_level={getattr(self, 'is_correction_level', 'off')!r} and "
                f"dual_clip={self.dual_clip!r} is not backed by rlhf_ext; only "
                f"{POLICY_LOSS_TYPES} without IS correction are (gspo without dual_clip)"
            )
        return peer_forward(
            self,
            log_probs,
            old_log_probs,
            advantages,
            action_mask,
            rollout_log_probs,
            dp_size,
            batch_num_tokens,
            global_batch_size,
        )
    gspo = self.policy_loss_type == "gspo"
    agg = "token-mean" if self.token_level_loss else "seq-mean-token-mean"
    loss, stats = _rlhf_policy_loss(
        log_probs,
        old_log_probs,
        advantages,
        action_mask,
        kind=self.policy_loss_type,
        clip_eps=self.clip_eps_low,
        clip_eps_high=self.clip_eps_high,
        dual_clip=None if gspo else self.dual_clip,  # gspo with dual_clip runs the peer
        agg=agg,
    )
    scale = _global_scale(
        action_mask, log_probs, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size
    )
    if gspo:  # the kernel's approx_kl is the unclamped mean of old - new for gspo
        ppo_kl = stats["approx_kl"]
    else:  # for ppo it clamps the log-ratio at +-20 first; OpenRLHF does not
        ppo_kl = _rlhf_masked_mean((old_log_probs - log_probs).detach(), action_mask)
    return loss * scale, stats["clipfrac"], ppo_kl, None, None


def _needs_peer_policy_loss(module) -> bool:
    """Whether ``module``'s configuration is one the fused kernel does not serve: the IS
    correction, a type other than ppo / gspo (OpenRLHF raises for it), or gspo with
    ``dual_clip`` (rlhf_ext's gspo kind has no dual clip; OpenRLHF applies it)."""
    kind = module.policy_loss_type
    return (
        kind not in POLICY_LOSS_TYPES
        or getattr(module, "is_correction_level", "off") != "off"
        or (kind == "gspo" and getattr(module, "dual_clip", None) is not None)
    )


def value_loss_forward(
    self,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor | None = None,
    dp_size: int = 1,
    batch_num_tokens: float | None = None,
    global_batch_size: float | None = None,
) -> torch.Tensor:
    """OpenRLHF's ``ValueLoss.forward``: ``0.5 * aggregate(max((clipped - R)^2, (v - R)^2))``
    with ``clipped = old + clamp(v - old, -clip_eps, clip_eps)`` when ``clip_eps`` is set,
    else ``0.5 * aggregate((v - R)^2)``; per token or per sequence (``token_level_loss``),
    rescaled by the global counts. Differentiable w.r.t. ``values``."""
    agg = "token-mean" if self.token_level_loss else "seq-mean-token-mean"
    loss, _ = _rlhf_value_loss(
        values, old_values, returns, action_mask, clip_eps=self.clip_eps, agg=agg
    )
    scale = _global_scale(
        action_mask, values, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size
    )
    return loss * scale


class PolicyLoss(nn.Module):
    """OpenRLHF's ``PolicyLoss`` (same constructor and defaults), whose ``forward`` is
    ``policy_loss_forward`` (the fused policy loss kernel: PPO and GSPO)."""

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: list = (0.5, 5.0),
    ) -> None:
        """OpenRLHF's arguments: clip range ``[1 - clip_eps_low, 1 + clip_eps_high]``,
        ``dual_clip`` (None or > 1), per-token (``token_level_loss``) or per-sequence
        aggregation, ``policy_loss_type`` ("ppo", or "gspo", which forces per-sequence
        aggregation) and the rollout importance-sampling correction settings. Anything but
        ``is_correction_level="off"``, and "gspo" with ``dual_clip``, run OpenRLHF's own
        forward when patched, and raise ValueError in this standalone class's forward."""
        super().__init__()
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"{PREFIX}.PolicyLoss: `dual_clip` must be > 1.0, got {dual_clip}")
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        self.policy_loss_type = policy_loss_type
        self.token_level_loss = False if policy_loss_type == "gspo" else token_level_loss
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold

    forward = policy_loss_forward


class ValueLoss(nn.Module):
    """OpenRLHF's ``ValueLoss`` (same constructor and defaults), whose ``forward`` is
    ``value_loss_forward`` (the fused value loss kernel)."""

    def __init__(self, clip_eps: float = None, token_level_loss: bool = True) -> None:
        """OpenRLHF's arguments: ``clip_eps`` (None: unclipped; else the value clip around
        the old values) and per-token (``token_level_loss``) or per-sequence aggregation."""
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    forward = value_loss_forward


@torch.no_grad()
def get_advantages_and_returns(
    self,
    values: torch.Tensor,
    rewards: torch.Tensor,
    action_mask: torch.Tensor,
    gamma: float,
    lambd: float,
):
    """OpenRLHF's GAE (``RemoteExperienceMaker.get_advantages_and_returns``): rewards and
    values are zeroed where ``action_mask`` is 0, then the recurrence runs over every
    position (a masked position is *not* skipped, unlike ``rlhf_ext.gae``'s mask), with
    next-value 0 after the last position. Returns ``(advantages, returns)``, ``returns =
    advantages + masked values``. One fused GAE kernel. ``self`` is unused (a method in
    OpenRLHF)."""
    if action_mask is not None:
        values = action_mask * values
        rewards = action_mask * rewards
    advantages, returns = _rlhf_gae(rewards, values, None, gamma=gamma, lam=lambd)
    return advantages.to(values.dtype), returns.to(values.dtype)


@torch.no_grad()
def get_cumulative_returns(
    self,
    rewards: torch.Tensor,
    action_mask: torch.Tensor | None,
    gamma: float,
) -> torch.Tensor:
    """OpenRLHF's REINFORCE returns (``RemoteExperienceMaker.get_cumulative_returns``):
    ``G_t = r_t m_t + gamma G_{t+1}`` right to left over every position, ``G = 0`` after the
    last one (a masked position is *not* skipped: its reward is zeroed and the return runs
    on through it). Used by every critic-free estimator (reinforce, rloo, ...), whose
    advantages are these returns. One fused GAE kernel with zero values and ``lam=1``
    (bit-identical to OpenRLHF's loop on CPU). Dtype of ``rewards``; ``self`` is unused (a
    method in OpenRLHF)."""
    masked = rewards if action_mask is None else action_mask * rewards
    # values 0 and lam 1: delta_t = r_t, A_t = r_t + gamma * A_{t+1}, the same float ops
    advantages, _ = _rlhf_gae(masked, torch.zeros_like(masked), None, gamma=gamma, lam=1.0)
    return advantages.to(rewards.dtype)


@torch.no_grad()
def group_baseline(rewards: torch.Tensor, advantage_estimator: str) -> torch.Tensor:
    """The group step of OpenRLHF's ``compute_advantages_and_returns`` (experience_maker.py
    lines 268-278, inline there, so not patchable): ``rewards`` is the ``[num_prompts,
    n_samples_per_prompt]`` score matrix in prompt order, as OpenRLHF reshapes it; returns
    the shaped scores, same shape and dtype, one fused ``rlhf_ext.group_advantages`` pass:

    - "rloo": ``r - (sum_group(r) - r) / (n - 1)`` (leave-one-out mean);
    - "reinforce_baseline", "dr_grpo": ``r - mean_group(r)``;
    - "group_norm": ``(r - mean_group(r)) / (std_group(r) + 1e-9)``, Bessel-corrected std;
    - "flash_reinforce": ``r - mean(r)`` over the whole batch;
    - "gae", "reinforce": ``rewards`` unchanged.

    Use: in a copy of ``compute_advantages_and_returns``, replace that if/elif chain with
    ``rewards = group_baseline(rewards, args.algo.advantage.estimator)``. With one sample
    per prompt, "rloo" and "group_norm" give 0 (OpenRLHF: NaN, from 0/0 and a one-sample
    std). Not differentiable.
    """
    name = f"{PREFIX}.group_baseline"
    if advantage_estimator not in GROUP_ESTIMATORS + UNGROUPED_ESTIMATORS:
        raise ValueError(
            f"{name}: `advantage_estimator` must be one of "
            f"{GROUP_ESTIMATORS + UNGROUPED_ESTIMATORS}, got {advantage_estimator!r}"
        )
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards)
        raise ValueError(
            f"{name}: `rewards` must be a [num_prompts, n_samples_per_prompt] tensor "
            f"(OpenRLHF's reshape), got {shape}"
        )
    if advantage_estimator in UNGROUPED_ESTIMATORS or rewards.numel() == 0:
        return rewards
    options = dict(baseline="mean", scale="none", group_size=rewards.shape[1])
    if advantage_estimator == "rloo":
        options["baseline"] = "leave_one_out"
    elif advantage_estimator == "group_norm":
        options.update(scale="group", unbiased=True, eps=GROUP_NORM_EPS, eps_mode="add")
    elif advantage_estimator == "flash_reinforce":  # one group: the whole rollout batch
        options["group_size"] = rewards.numel()
    # validate=False: consecutive groups of an arange are never malformed, so skip the
    # validation's device sync
    shaped = _rlhf_group_advantages(rewards.reshape(-1), validate=False, **options)
    return shaped.reshape(rewards.shape).to(rewards.dtype)


UTILS = "openrlhf.models.utils"
LOSS = "openrlhf.models.loss"
EXPERIENCE = "openrlhf.trainer.ppo_utils.experience_maker"
# the adapter's targets and call sites as in 0.11.2 (0.11.0's ppo_actor unpacks 4 loss values)
SUPPORTED = VersionRange("0.11.2", "0.12")

_PATCHER = Patcher(
    package="openrlhf",
    supported=SUPPORTED,
    pip_name="openrlhf",
    targets=[
        Target(UTILS, "log_probs_from_logits", log_probs_from_logits),
        Target(UTILS, "compute_approx_kl", compute_approx_kl),
        Target(UTILS, "masked_mean", masked_mean),
        Target(LOSS, "PolicyLoss.forward", policy_loss_forward),
        Target(LOSS, "ValueLoss.forward", value_loss_forward),
        Target(
            EXPERIENCE,
            "RemoteExperienceMaker.get_advantages_and_returns",
            get_advantages_and_returns,
        ),
        Target(
            EXPERIENCE,
            "RemoteExperienceMaker.get_cumulative_returns",
            get_cumulative_returns,
        ),
    ],
)


def patch(*, allow_untested: bool = False) -> list[str]:
    """Swap this module's functions into the installed OpenRLHF: ``openrlhf.models.utils``'s
    functions (and every loaded ``openrlhf.*`` module that imported them by name), the
    ``forward`` of ``PolicyLoss`` and ``ValueLoss``, and the experience maker's GAE and
    cumulative returns (not its inline group baseline: see ``group_baseline``). Returns
    the qualified names replaced. Idempotent; raises ImportError naming ``openrlhf`` when it
    is not installed or does not import. An installed OpenRLHF outside
    :data:`SUPPORTED` is a RuntimeError that names both versions, and nothing is patched,
    unless ``allow_untested=True`` (or ``RLHF_EXT_ALLOW_UNTESTED_PEERS=1``): a warning,
    then the patch."""
    return _PATCHER.patch(f"{PREFIX}.patch", allow_untested)


def unpatch() -> list[str]:
    """Restore everything ``patch()`` replaced; returns the qualified names restored."""
    return _PATCHER.unpatch()


def original(qualname: str):
    """OpenRLHF's own object named ``qualname``, patched or not."""
    return _PATCHER.original(qualname)
