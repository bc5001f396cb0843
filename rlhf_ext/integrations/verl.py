"""verl's advantage, loss, KL and log-prob functions, backed by rlhf_ext's kernels.

Drop-in for ``verl.trainer.ppo.core_algos`` (``compute_gae_advantage_return``, ``agg_loss``,
``compute_policy_loss_vanilla``, ``compute_value_loss``, ``kl_penalty``, ``compute_rewards``)
and ``verl.utils.torch_functional`` (``masked_whiten``, ``logprobs_from_logits``,
``entropy_from_logits``), with verl 0.9.1's names, arguments, defaults and semantics,
including where they differ from rlhf_ext's own ops (documented per function and in
docs/integrations.md).

Importing this module does not import verl; ``patch()`` does, and raises ImportError when
verl is not installed.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_ext.integrations._common import (
    entropy_from_logits,
    fill_from_next_valid,
    global_scale,
    masked_whiten,
)
from rlhf_ext.integrations._patch import Patcher, Target
from rlhf_ext.ops import _vocab
from rlhf_ext.ops.gae import gae as _rlhf_gae
from rlhf_ext.ops.masked_stats import masked_whiten as _rlhf_masked_whiten
from rlhf_ext.ops.ppo_losses import kl_loss as _rlhf_kl_loss
from rlhf_ext.ops.ppo_losses import kl_penalty as _rlhf_kl_penalty
from rlhf_ext.ops.ppo_losses import ppo_policy_loss as _rlhf_policy_loss
from rlhf_ext.ops.ppo_losses import value_loss as _rlhf_value_loss
from rlhf_ext.ops.token_logprobs import token_logprobs as _rlhf_token_logprobs

PREFIX = "rlhf_ext.integrations.verl"
# verl's loss_agg_mode -> the rlhf_ext agg computed locally (_global_scale does the rest)
AGG_MODES = {
    "token-mean": "token-mean",
    "token-sum": "token-mean",
    "seq-mean-token-sum": "seq-mean-token-sum",
    "seq-mean-token-sum-norm": "seq-mean-token-sum",
    "seq-mean-token-mean": "seq-mean-token-mean",
}
# verl's kl_penalty kinds are rlhf_ext's own names (rlhf_ext/ops/_vocab.py), "full" aside.
KL_KINDS = _vocab.KL_KINDS


def _our_agg(function: str, loss_agg_mode: str) -> str:
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(
            f"{PREFIX}.{function}: `loss_agg_mode` must be one of {sorted(AGG_MODES)}, "
            f"got {loss_agg_mode!r}"
        )
    return AGG_MODES[loss_agg_mode]


def _global_scale(
    function, loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, factor
):
    """What turns rlhf_ext's local aggregate into verl's ``agg_loss`` value.

    rlhf_ext aggregates over the local batch (token-mean: / local valid tokens; seq-mean: /
    local non-empty rows). verl divides by the global counts it is given and multiplies by
    ``dp_size`` (so DDP's gradient averaging gives the global mean); "token-sum" is the
    plain sum times ``dp_size``; verl 0.9.1's "-norm" mode is seq-mean-token-sum divided by
    ``loss_scale_factor`` (default: the mask's last dimension).
    """
    valid = loss_mask != 0
    if loss_agg_mode == "token-sum":
        return valid.sum() * dp_size
    token_level = loss_agg_mode == "token-mean"
    scale = global_scale(valid, token_level, dp_size, batch_num_tokens, global_batch_size)
    if scale is None:
        if dp_size > 1:
            needed = "(global) `batch_num_tokens`" if token_level else "`global_batch_size`"
            raise ValueError(f"{PREFIX}.{function}: {needed} is required when dp_size > 1")
        scale = 1.0
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = scale / (loss_mask.shape[-1] if factor is None else factor)
    return scale


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: int | None = None,
    global_batch_size: int | None = None,
    loss_scale_factor: int | None = None,
):
    """verl's ``agg_loss``: a [bs, T] loss matrix aggregated over ``loss_mask`` by
    ``loss_agg_mode`` ("token-mean", "token-sum", "seq-mean-token-sum",
    "seq-mean-token-sum-norm", "seq-mean-token-mean"), rows with no valid token left out of
    the seq-mean modes, rescaled by the global batch counts and ``dp_size`` as verl does.

    The aggregation is rlhf_ext's fused, deterministic loss reduction (``kl_loss`` with kind
    k1 against zeros is exactly ``agg(loss_mat)``); differentiable w.r.t. ``loss_mat``.
    """
    agg = _our_agg("agg_loss", loss_agg_mode)
    local = _rlhf_kl_loss(loss_mat, torch.zeros_like(loss_mat), loss_mask, kind="k1", agg=agg)
    return local * _global_scale(
        "agg_loss",
        loss_mask,
        loss_agg_mode,
        dp_size,
        batch_num_tokens,
        global_batch_size,
        loss_scale_factor,
    )


def compute_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: torch.Tensor,
    lam: torch.Tensor,
):
    """verl's ``compute_gae_advantage_return``: GAE skipping masked (observation) tokens,
    then advantages whitened over ``response_mask``. Returns ``(advantages, returns)``.

    Where verl differs from ``rlhf_ext.gae``: at a masked position verl leaves the advantage
    carried from the next valid token (rlhf_ext writes 0), ``returns = advantages + values``
    everywhere, and the whitening covers every position. The adapter runs the fused GAE, fills
    masked positions from the next valid one, and whitens with the fused ``masked_whiten``.
    """
    with torch.no_grad():
        advantages, _ = _rlhf_gae(token_level_rewards, values, response_mask, gamma=gamma, lam=lam)
        advantages = fill_from_next_valid(advantages, response_mask).to(values.dtype)
        returns = advantages + values
        advantages = _rlhf_masked_whiten(advantages, response_mask).to(values.dtype)
    return advantages, returns


def compute_rewards(token_level_scores, old_log_prob, ref_log_prob, kl_ratio):
    """verl's ``compute_rewards``: ``token_level_scores - kl_ratio * (old_log_prob -
    ref_log_prob)`` per token (the k1 estimate from rlhf_ext's ``kl_penalty`` kernel)."""
    kl = _rlhf_kl_penalty(old_log_prob, ref_log_prob, kind="k1")
    return token_level_scores - kl.to(token_level_scores.dtype) * kl_ratio


def _config_value(config, name: str, default=None):
    getter = getattr(config, "get", None)
    if callable(getter):
        return getter(name, default)
    return getattr(config, name, default)


def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``compute_policy_loss_vanilla``: the clipped PPO surrogate with verl's dual
    clip (always on, ``clip_ratio_c`` default 3.0), aggregated by ``agg_loss``.

    ``config`` is verl's actor config: ``clip_ratio``, ``clip_ratio_low`` / ``clip_ratio_high``
    (each defaulting to ``clip_ratio``), ``clip_ratio_c`` and ``global_batch_info`` (the
    ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size`` / ``loss_scale_factor`` that
    ``agg_loss`` takes). ``rollout_is_weights`` (non-negative importance weights) scale the
    per-token loss; the fused kernel takes them folded into the advantages, which gives the
    same loss because every branch of the surrogate is linear in A for a weight >= 0 (the
    clip fractions come from a second, gradient-free pass on the unweighted advantages).
    Returns ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"})``
    with the metrics as Python floats, like verl. Differentiable w.r.t. ``log_prob``.
    """
    if config is None:
        raise ValueError(f"{PREFIX}.compute_policy_loss_vanilla: `config` is required (verl's)")
    clip_ratio = _config_value(config, "clip_ratio")
    clip_low = _config_value(config, "clip_ratio_low")
    clip_high = _config_value(config, "clip_ratio_high")
    clip_low = clip_ratio if clip_low is None else clip_low
    clip_high = clip_ratio if clip_high is None else clip_high
    clip_ratio_c = _config_value(config, "clip_ratio_c", 3.0)
    if not clip_ratio_c > 1.0:
        raise ValueError(
            f"{PREFIX}.compute_policy_loss_vanilla: `config.clip_ratio_c` must be > 1.0 "
            f"(dual-clip PPO), got {clip_ratio_c}"
        )
    batch_info = dict(_config_value(config, "global_batch_info", None) or {})
    settings = dict(
        clip_eps=clip_low,
        clip_eps_high=clip_high,
        dual_clip=clip_ratio_c,
        agg=_our_agg("compute_policy_loss_vanilla", loss_agg_mode),
    )
    weighted = advantages
    if rollout_is_weights is not None:
        weighted = advantages * rollout_is_weights.detach()
    loss, stats = _rlhf_policy_loss(log_prob, old_log_prob, weighted, response_mask, **settings)
    if rollout_is_weights is not None:  # verl's clip fractions compare unweighted surrogates
        with torch.no_grad():
            _, stats = _rlhf_policy_loss(
                log_prob.detach(), old_log_prob, advantages, response_mask, **settings
            )
    loss = loss * _global_scale(
        "compute_policy_loss_vanilla",
        response_mask,
        loss_agg_mode,
        batch_info.get("dp_size", 1),
        batch_info.get("batch_num_tokens"),
        batch_info.get("global_batch_size"),
        batch_info.get("loss_scale_factor"),
    )
    metrics = {
        "actor/pg_clipfrac": stats["clipfrac"].item(),
        "actor/ppo_kl": stats["approx_kl"].item(),
        "actor/pg_clipfrac_lower": stats["clipfrac_lower"].item(),
    }
    return loss, metrics


def compute_value_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: int | None = None,
    global_batch_size: int | None = None,
    loss_scale_factor: int | None = None,
):
    """verl's ``compute_value_loss``: ``0.5 * agg_loss(max((vpreds - returns)^2,
    (clamp(vpreds, values - c, values + c) - returns)^2))`` with ``c = cliprange_value``
    (note verl's argument order: predictions, returns, old values). Returns
    ``(vf_loss, vf_clipfrac)``, both 0-dim tensors. Differentiable w.r.t. ``vpreds``."""
    agg = _our_agg("compute_value_loss", loss_agg_mode)
    loss, stats = _rlhf_value_loss(
        vpreds, values, returns, response_mask, clip_eps=cliprange_value, agg=agg
    )
    scale = _global_scale(
        "compute_value_loss",
        response_mask,
        loss_agg_mode,
        dp_size,
        batch_num_tokens,
        global_batch_size,
        loss_scale_factor,
    )
    return loss * scale, stats["clipfrac"]


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty) -> torch.Tensor:
    """verl's ``kl_penalty``: the per-token KL estimate of kind ``kl_penalty`` ("kl"/"k1",
    "abs", "mse"/"k2", "low_var_kl"/"k3"); a "+" suffix keeps the value and takes the
    gradient of k2 (straight-through). "full" and unknown kinds raise NotImplementedError,
    as in verl. One fused kernel; differentiable w.r.t. ``logprob``."""
    if not _vocab.is_kl_kind(kl_penalty):
        raise NotImplementedError(
            f"{PREFIX}.kl_penalty: `kl_penalty` kind {kl_penalty!r} is not implemented "
            f"(verl implements {', '.join(KL_KINDS)} and their '+' variants)"
        )
    value = _rlhf_kl_penalty(logprob, ref_logprob, kind=kl_penalty)
    return value.to(torch.promote_types(logprob.dtype, ref_logprob.dtype))


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl's ``logprobs_from_logits``: ``log_softmax(logits)[labels]`` per token, shape
    ``labels.shape``, dtype of ``logits``. ``inplace_backward=True`` (verl's default, as with
    its flash-attn path) writes the gradient into the logits buffer in the backward, so the
    logits are destroyed then; pass False when something else reads them afterwards."""
    logprobs = _rlhf_token_logprobs(logits, labels, inplace_backward=bool(inplace_backward))
    return logprobs.to(logits.dtype)


CORE = "verl.trainer.ppo.core_algos"
FUNCTIONAL = "verl.utils.torch_functional"
_PATCHER = Patcher(
    package="verl",
    pip_name="verl",
    targets=[
        Target(CORE, "compute_gae_advantage_return", compute_gae_advantage_return),
        Target(CORE, "agg_loss", agg_loss),
        Target(CORE, "compute_policy_loss_vanilla", compute_policy_loss_vanilla),
        Target(CORE, "compute_value_loss", compute_value_loss),
        Target(CORE, "kl_penalty", kl_penalty),
        Target(CORE, "compute_rewards", compute_rewards),
        Target(FUNCTIONAL, "masked_whiten", masked_whiten),
        Target(FUNCTIONAL, "logprobs_from_logits", logprobs_from_logits),
        Target(FUNCTIONAL, "entropy_from_logits", entropy_from_logits),
    ],
)


def patch() -> list[str]:
    """Swap this module's functions into the installed verl: the defining attributes in
    ``verl.trainer.ppo.core_algos`` and ``verl.utils.torch_functional``, every loaded
    ``verl.*`` module that imported them by name, and verl's registries
    (``POLICY_LOSS_REGISTRY["vanilla"]``, ``ADV_ESTIMATOR_REGISTRY["gae"]``). Returns the
    qualified names replaced. Idempotent; raises ImportError naming ``verl`` when it is not
    installed."""
    return _PATCHER.patch(f"{PREFIX}.patch")


def unpatch() -> list[str]:
    """Restore everything ``patch()`` replaced; returns the qualified names restored."""
    return _PATCHER.unpatch()


def original(qualname: str):
    """verl's own function named ``qualname``, patched or not."""
    return _PATCHER.original(qualname)
