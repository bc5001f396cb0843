"""verl's advantage, loss, KL and log-prob functions, backed by rlhf_ext's kernels.

Drop-in for ``verl.trainer.ppo.core_algos`` (``compute_gae_advantage_return``, ``agg_loss``,
the policy losses of ``POLICY_LOSS_REGISTRY`` (vanilla, gpg, cispo, sapo, dppo_tv, dppo_kl,
gspo, dro, geo_mean), ``compute_value_loss``, ``kl_penalty``, ``compute_rewards``,
and the outcome advantage estimators of ``ADV_ESTIMATOR_REGISTRY``: GRPO and its vectorised
version, GDPO, Pass@k, REINFORCE++ and REINFORCE++-baseline, RLOO and its vectorised
version, OPO, ReMax, GPG), ``verl.utils.torch_functional`` (``masked_whiten``,
``logprobs_from_logits``, ``entropy_from_logits``) and the fused-kernel LM head
``verl.utils.experimental.torch_functional.FusedLinearForPPO``, with verl 0.9.1's names, arguments,
defaults and semantics,
including where they differ from rlhf_ext's own ops (documented per function and in
docs/integrations.md).

Importing this module does not import verl; ``patch()`` does, and raises ImportError when
verl is not installed.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlhf_ext.integrations._common import entropy_from_logits as _entropy_in_dtype
from rlhf_ext.integrations._common import (
    fill_from_next_valid,
    global_scale,
    masked_whiten,
)
from rlhf_ext.integrations._patch import Patcher, Target, VersionRange
from rlhf_ext.ops import _vocab
from rlhf_ext.ops.gae import gae as _rlhf_gae
from rlhf_ext.ops.group_advantages import group_advantages as _rlhf_group_advantages
from rlhf_ext.ops.linear_token_logprobs import (
    linear_token_logprobs as _rlhf_linear_token_logprobs,
)
from rlhf_ext.ops.masked_stats import masked_whiten as _rlhf_masked_whiten
from rlhf_ext.ops.ppo_losses import kl_loss as _rlhf_kl_loss
from rlhf_ext.ops.ppo_losses import kl_penalty as _rlhf_kl_penalty
from rlhf_ext.ops.ppo_losses import policy_loss as _rlhf_policy_loss
from rlhf_ext.ops.ppo_losses import value_loss as _rlhf_value_loss
from rlhf_ext.ops.token_logprobs import token_logprobs as _rlhf_token_logprobs
from rlhf_ext.ops.vocab_parallel import (
    vocab_parallel_token_logprobs as _rlhf_vocab_parallel_token_logprobs,
)

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


def _clip_band(config) -> tuple[float | None, float | None]:
    """verl's (clip_ratio_low, clip_ratio_high), each defaulting to clip_ratio; (None, None)
    without a config (_registry_loss then names the missing config)."""
    if config is None:
        return None, None
    clip_ratio = _config_value(config, "clip_ratio")
    low = _config_value(config, "clip_ratio_low")
    high = _config_value(config, "clip_ratio_high")
    return (clip_ratio if low is None else low), (clip_ratio if high is None else high)


def _registry_loss(
    function,
    kind,
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode,
    config,
    rollout_is_weights,
    **params,
):
    """(loss, stats) of one POLICY_LOSS_REGISTRY entry on the fused policy_loss, with verl's
    global-batch scaling. ``rollout_is_weights`` (non-negative) are folded into the
    advantages: every kind routed here is linear in A for a weight >= 0 with the sign of A
    kept, so the loss and gradient are verl's; the statistics come from a second,
    gradient-free pass on the unweighted advantages, as verl computes them."""
    if config is None:
        raise ValueError(f"{PREFIX}.{function}: `config` is required (verl's actor config)")
    batch_info = dict(_config_value(config, "global_batch_info", None) or {})
    agg = _our_agg(function, loss_agg_mode)
    weighted = advantages
    if rollout_is_weights is not None:
        weighted = advantages * rollout_is_weights.detach()
    loss, stats = _rlhf_policy_loss(
        log_prob, old_log_prob, weighted, response_mask, kind=kind, agg=agg, **params
    )
    if rollout_is_weights is not None:
        with torch.no_grad():
            _, stats = _rlhf_policy_loss(
                log_prob.detach(), old_log_prob, advantages, response_mask, kind=kind, agg=agg,
                **params,
            )  # fmt: skip
    scale = _global_scale(
        function,
        response_mask,
        loss_agg_mode,
        batch_info.get("dp_size", 1),
        batch_info.get("batch_num_tokens"),
        batch_info.get("global_batch_size"),
        batch_info.get("loss_scale_factor"),
    )
    return loss * scale, stats


def _clip_metrics(stats, *, lower: bool = True) -> dict[str, float]:
    """verl's three policy metrics as Python floats; ``lower=False``: verl reports 0.0."""
    return {
        "actor/pg_clipfrac": stats["clipfrac"].item(),
        "actor/ppo_kl": stats["approx_kl"].item(),
        "actor/pg_clipfrac_lower": stats["clipfrac_lower"].item() if lower else 0.0,
    }


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
    function = "compute_policy_loss_vanilla"
    if config is None:
        raise ValueError(f"{PREFIX}.{function}: `config` is required (verl's)")
    low, high = _clip_band(config)
    clip_ratio_c = _config_value(config, "clip_ratio_c", 3.0)
    if not clip_ratio_c > 1.0:
        raise ValueError(
            f"{PREFIX}.{function}: `config.clip_ratio_c` must be > 1.0 "
            f"(dual-clip PPO), got {clip_ratio_c}"
        )
    loss, stats = _registry_loss(
        function, "ppo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
        config, rollout_is_weights, clip_eps=low, clip_eps_high=high, dual_clip=clip_ratio_c,
    )  # fmt: skip
    return loss, _clip_metrics(stats)


def compute_policy_loss_gpg(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``compute_policy_loss_gpg`` ("gpg"): ``-A lp`` (policy_loss kind "reinforce"),
    aggregated by ``agg_loss``; ``({})`` metrics, like verl."""
    loss, _ = _registry_loss(
        "compute_policy_loss_gpg", "reinforce", old_log_prob, log_prob, advantages,
        response_mask, loss_agg_mode, config, rollout_is_weights,
    )  # fmt: skip
    return loss, {}


def compute_policy_loss_cispo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``compute_policy_loss_cispo`` ("cispo"): ``-sg(clamp(r, 1 - lo, 1 + hi)) A lp``
    (kind "cispo"); metrics pg_clipfrac (weights clipped), ppo_kl, pg_clipfrac_lower = 0."""
    low, high = _clip_band(config)
    loss, stats = _registry_loss(
        "compute_policy_loss_cispo", "cispo", old_log_prob, log_prob, advantages,
        response_mask, loss_agg_mode, config, rollout_is_weights, clip_eps=low,
        clip_eps_high=high,
    )  # fmt: skip
    return loss, _clip_metrics(stats, lower=False)


def compute_policy_loss_sapo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``compute_policy_loss_sapo`` ("sapo"): ``-A sigmoid(tau (r - 1)) 4 / tau`` with
    ``config.tau_pos`` / ``tau_neg`` (kind "sapo"), aggregated "seq-mean-token-mean" whatever
    ``loss_agg_mode`` says (as verl); metrics pg_clipfrac = pg_clipfrac_lower = 0, ppo_kl."""
    tau_pos = _config_value(config, "tau_pos") if config is not None else None
    tau_neg = _config_value(config, "tau_neg") if config is not None else None
    loss, stats = _registry_loss(
        "compute_policy_loss_sapo", "sapo", old_log_prob, log_prob, advantages, response_mask,
        "seq-mean-token-mean", config, rollout_is_weights, tau_pos=tau_pos, tau_neg=tau_neg,
    )  # fmt: skip
    metrics = _clip_metrics(stats, lower=False)
    metrics["actor/pg_clipfrac"] = 0.0
    return loss, metrics


def _dppo(function, kind, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
          config, rollout_is_weights):  # fmt: skip
    low, high = _clip_band(config)
    cap = _config_value(config, "clip_ratio_c", 20.0) if config is not None else None
    loss, stats = _registry_loss(
        function, kind, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
        config, rollout_is_weights, clip_eps=low, clip_eps_high=high, ratio_cap=cap,
    )  # fmt: skip
    return loss, _clip_metrics(stats)


def compute_policy_loss_dppo_tv(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``compute_policy_loss_dppo_tv`` ("dppo_tv", kind "dppo_tv"): the clip ratios
    are the TV thresholds and ``config.clip_ratio_c`` (default 20) the truncation; metrics
    pg_clipfrac (masked-out tokens), ppo_kl, pg_clipfrac_lower (ratio above the cap)."""
    return _dppo("compute_policy_loss_dppo_tv", "dppo_tv", old_log_prob, log_prob, advantages,
                 response_mask, loss_agg_mode, config, rollout_is_weights)  # fmt: skip


def compute_policy_loss_dppo_kl(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``compute_policy_loss_dppo_kl`` ("dppo_kl", kind "dppo_kl"): as dppo_tv with the
    binary KL as the divergence."""
    return _dppo("compute_policy_loss_dppo_kl", "dppo_kl", old_log_prob, log_prob, advantages,
                 response_mask, loss_agg_mode, config, rollout_is_weights)  # fmt: skip


def compute_policy_loss_gspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``compute_policy_loss_gspo`` ("gspo"): the clipped surrogate on the sequence
    ratio with verl's token-local gradient ``lp - sg(lp) + sg(s)`` and its clamp at 10
    (policy_loss kind "gspo_token"), aggregated by ``loss_agg_mode`` (verl 0.9.1 does; later
    verl forces seq-mean-token-mean); metrics pg_clipfrac, ppo_kl (unclamped),
    pg_clipfrac_lower = 0."""
    low, high = _clip_band(config)
    loss, stats = _registry_loss(
        "compute_policy_loss_gspo", "gspo_token", old_log_prob, log_prob, advantages,
        response_mask, loss_agg_mode, config, rollout_is_weights, clip_eps=low,
        clip_eps_high=high,
    )  # fmt: skip
    return loss, _clip_metrics(stats, lower=False)


def compute_policy_loss_dro(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``compute_policy_loss_dro`` ("dro"): ``-(lp A - beta / 2 d^2)`` with
    ``config.policy_loss.dro_beta`` (kind "dro"); metric ppo_kl (unclamped). The quadratic
    term is not linear in A, so with ``rollout_is_weights`` this calls verl's own function
    (documented in docs/integrations.md)."""
    function = "compute_policy_loss_dro"
    if config is None:
        raise ValueError(f"{PREFIX}.{function}: `config` is required (verl's actor config)")
    policy_loss = _config_value(config, "policy_loss")
    beta = None if policy_loss is None else _config_value(policy_loss, "dro_beta")
    if beta is None or beta <= 0:
        raise ValueError(
            f"{PREFIX}.{function}: `config.policy_loss.dro_beta` must be a positive value "
            f"when using DRO, got {beta!r}"
        )
    if rollout_is_weights is not None:
        return original(f"{CORE}.{function}")(
            old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
            rollout_is_weights,
        )  # fmt: skip
    loss, stats = _registry_loss(
        function, "dro", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
        config, None, beta=beta,
    )  # fmt: skip
    return loss, {"actor/ppo_kl": stats["approx_kl"].item()}


def compute_policy_loss_geo_mean(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``compute_policy_loss_geo_mean`` ("geo_mean", GMPO; policy_loss kind
    "geo_mean"): per row ``-mean_t(A) exp(mean_t d~)``, ``d~`` the unclamped log-ratio
    clipped to ``[-clip_ratio_low, clip_ratio_high]`` on the side of A's sign, averaged
    over all rows of the batch (empty ones count, with loss 0). As in verl,
    ``loss_agg_mode`` and ``config.global_batch_info`` are not used, and
    ``rollout_is_weights`` enter as each row's geometric mean
    ``exp(sum_t m log(w + 1e-10) / (n + 1e-8))``, a positive row constant that the fused
    kernel takes folded into the advantages (the signs of A, and so the clips and the
    metrics, are unchanged). Metrics pg_clipfrac / pg_clipfrac_lower (tokens outside the
    band with A > 0 / A < 0) and ppo_kl (unclamped), as Python floats."""
    function = "compute_policy_loss_geo_mean"
    if config is None:
        raise ValueError(f"{PREFIX}.{function}: `config` is required (verl's actor config)")
    low, high = _clip_band(config)
    weighted = advantages
    if rollout_is_weights is not None:
        # verl's expression, term for term: a NaN or negative weight does what it does there
        mask = response_mask.to(log_prob.dtype)
        row_weight = torch.exp(
            (torch.log(rollout_is_weights.detach() + 1e-10) * mask).sum(dim=-1)
            / (mask.sum(dim=-1) + 1e-8)
        )
        weighted = advantages * (row_weight if advantages.dim() == 1 else row_weight[:, None])
    loss, stats = _rlhf_policy_loss(
        log_prob, old_log_prob, weighted, response_mask, kind="geo_mean",
        agg="seq-mean-token-sum", clip_eps=low, clip_eps_high=high,
    )  # fmt: skip
    # rlhf_ext averages over the rows with a valid token; verl over all of them
    rows = response_mask.shape[0]
    nonempty = (response_mask != 0).any(dim=-1).sum()
    return loss * (nonempty.to(loss.dtype) / max(rows, 1)), _clip_metrics(stats)


# verl's POLICY_LOSS_REGISTRY names -> the adapters above
POLICY_LOSSES = {
    "vanilla": compute_policy_loss_vanilla,
    "gpg": compute_policy_loss_gpg,
    "cispo": compute_policy_loss_cispo,
    "sapo": compute_policy_loss_sapo,
    "dppo_tv": compute_policy_loss_dppo_tv,
    "dppo_kl": compute_policy_loss_dppo_kl,
    "gspo": compute_policy_loss_gspo,
    "dro": compute_policy_loss_dro,
    "geo_mean": compute_policy_loss_geo_mean,
}


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


# --- one read of the logits for log-probs, entropy and sum_pi_squared ---------------------
#
# verl's FSDP engine (FSDPEngineWithLMHead.prepare_model_outputs, the unfused path with
# remove-padding) calls calculate_sum_pi_squared_from_logits, entropy_from_logits and
# logprobs_from_logits one after the other on the same logits: three passes over [N, V].
# The patched method knows the labels and which of the three it will ask for before the
# first call, so the first of them makes one token_logprobs call for all of them (one read;
# one backward pass for all their gradients) and the others take their output from it.


@dataclass
class _SharedRead:
    """What one prepare_model_outputs call will ask of its logits: the labels and the
    token_logprobs output names; after the first request, the logits read and the outputs."""

    labels: torch.Tensor
    outputs: tuple[str, ...]
    logits: torch.Tensor | None = None
    version: int = -1
    result: Any = None


_SHARED = threading.local()


@contextmanager
def _share_logits_read(labels: torch.Tensor, outputs: tuple[str, ...]):
    _SHARED.plan = _SharedRead(labels, outputs)
    try:
        yield
    finally:
        _SHARED.plan = None


def _shared_output(logits: torch.Tensor, name: str, labels: torch.Tensor | None = None):
    """``name`` of the one read planned for these logits, computed on the first request;
    None outside a plan, for other logits (or labels), or logits changed since the read."""
    plan = getattr(_SHARED, "plan", None)
    if plan is None or name not in plan.outputs or torch.compiler.is_compiling():
        return None
    if labels is not None and labels is not plan.labels:
        return None
    if plan.logits is None:
        if logits.dim() != 2 or logits.shape[:-1] != plan.labels.shape:
            return None
        plan.result = _rlhf_token_logprobs(logits, plan.labels, outputs=plan.outputs)
        plan.logits, plan.version = logits, logits._version
    if logits is not plan.logits or logits._version != plan.version:
        return None
    return getattr(plan.result, name)


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl's ``logprobs_from_logits``: ``log_softmax(logits)[labels]`` per token, shape
    ``labels.shape``, dtype of ``logits``. ``inplace_backward=True`` (verl's default, as with
    its flash-attn path) writes the gradient into the logits buffer in the backward, so the
    logits are destroyed then; pass False when something else reads them afterwards. Inside
    the patched FSDP engine the log-probs can come from the one read that also gave the
    entropy / sum_pi_squared of the same logits (then the backward is out of place)."""
    logprobs = _shared_output(logits, "logprobs", labels)
    if logprobs is None:
        logprobs = _rlhf_token_logprobs(logits, labels, inplace_backward=bool(inplace_backward))
    return logprobs.to(logits.dtype)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """verl's ``entropy_from_logits``: the entropy (nats) of ``softmax(logits)`` per
    position, dtype of ``logits``, one fused pass (or the engine's shared read)."""
    entropy = _shared_output(logits, "entropy")
    return _entropy_in_dtype(logits) if entropy is None else entropy.to(logits.dtype)


def calculate_sum_pi_squared_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """verl's ``calculate_sum_pi_squared_from_logits``: ``sum_v softmax(logits)_v^2`` per
    position (the optimal-token-baseline estimator's ``sum_pi_squared``), shape
    ``logits.shape[:-1]``, dtype of ``logits``, differentiable. verl computes
    ``exp(logsumexp(2 logits) - 2 logsumexp(logits))``: two full-vocabulary passes and a
    ``[..., V]`` temporary of ``2 logits``; here one read of the logits
    (``token_logprobs(..., outputs=("log_sum_sq_probs",))``, float32 inside) and no
    temporary. A row with a NaN logit gives NaN, as verl's; a row of all -inf, NaN (verl:
    NaN too)."""
    log_sum_sq = _shared_output(logits, "log_sum_sq_probs")
    if log_sum_sq is None:
        placeholder = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
        out = _rlhf_token_logprobs(logits, placeholder, outputs=("log_sum_sq_probs",))
        log_sum_sq = out.log_sum_sq_probs
    return log_sum_sq.exp().to(logits.dtype)


def _engine_read_plan(engine, output_args, micro_batch) -> tuple[str, ...]:
    """The token_logprobs outputs that one prepare_model_outputs call can share: those of
    the unfused remove-padding path whose function is this adapter's (an entropy that is
    chunked, checkpointed or torch.compile'd stays verl's own call)."""

    def flag(key, default):
        return _flag(micro_batch, key, default)

    if flag("use_fused_kernels", False) or not flag("use_remove_padding", True):
        return ()
    if "input_ids_rmpad_rolled" not in output_args:
        return ()
    config = engine.engine_config
    plain_entropy = (
        getattr(engine, "compute_entropy_from_logits", None) is entropy_from_logits
        and not getattr(config, "entropy_checkpointing", False)
        and not getattr(config, "entropy_from_logits_with_chunking", False)
    )
    outputs = ()
    if not flag("distillation_only", False):
        outputs += ("logprobs",)
    if flag("calculate_entropy", False) and plain_entropy:
        outputs += ("entropy",)
    if flag("calculate_sum_pi_squared", False):
        outputs += ("log_sum_sq_probs",)
    return outputs if len(outputs) > 1 else ()


# --- verl's Megatron backend: logits sharded along the vocabulary -------------------------
#
# verl.utils.megatron.tensor_parallel computes the entropy with 3 all-reduces and a saved
# [N, V_local] softmax, sum_pi_squared with 3 more, the log-probs through Megatron's
# vocab_parallel_cross_entropy (3 more, softmax saved). The adapters run
# rlhf_ext.vocab_parallel_token_logprobs on Megatron's tensor-parallel group: one
# all_gather of 2 floats per row, an O(N) save. Megatron's shards are equal:
# rank r holds [r * V_local, (r + 1) * V_local).


def _megatron_shard(vocab_parallel_logits: torch.Tensor) -> dict:
    from megatron.core import parallel_state as mpu

    rank = mpu.get_tensor_model_parallel_rank()
    return dict(
        vocab_start=rank * vocab_parallel_logits.shape[-1],
        process_group=mpu.get_tensor_model_parallel_group(),
        validate=False,  # verl's functions check nothing and do not sync
    )


def _megatron_outputs(vocab_parallel_logits, outputs, labels=None):
    placeholder = torch.zeros(vocab_parallel_logits.shape[:-1], dtype=torch.long,
                              device=vocab_parallel_logits.device)  # fmt: skip
    return _rlhf_vocab_parallel_token_logprobs(
        vocab_parallel_logits,
        placeholder if labels is None else labels,
        outputs=outputs,
        **_megatron_shard(vocab_parallel_logits),
    )


def vocab_parallel_entropy(vocab_parallel_logits: torch.Tensor) -> torch.Tensor:
    """verl's Megatron ``vocab_parallel_entropy``: the entropy of the softmax over the
    whole vocabulary of logits sharded over Megatron's tensor-parallel group
    (``[..., V / tp]`` on each rank), shape ``[...]``, dtype of the logits. One all_gather
    of 2 floats per row; the backward is local and saves O(N) (verl: 3 all-reduces and the
    ``[N, V / tp]`` float32 softmax)."""
    out = _megatron_outputs(vocab_parallel_logits, ("entropy",))
    return out.entropy.to(vocab_parallel_logits.dtype)


def vocab_parallel_entropy_with_chunking(vocab_parallel_logits, chunk_size: int = 2048):
    """verl's ``vocab_parallel_entropy_with_chunking``: as ``vocab_parallel_entropy``, in
    float32 (verl fills a float32 tensor chunk by chunk); ``chunk_size`` is not needed: the
    op holds nothing ``[..., V / tp]``-sized."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"{PREFIX}.vocab_parallel_entropy_with_chunking: `chunk_size` must be a positive "
            f"int, got {chunk_size!r}"
        )
    return _megatron_outputs(vocab_parallel_logits, ("entropy",)).entropy.float()


def vocab_parallel_sum_pi_squared(vocab_parallel_logits: torch.Tensor) -> torch.Tensor:
    """verl's ``vocab_parallel_sum_pi_squared``: ``sum_v p_v^2`` over the whole vocabulary
    of tensor-parallel sharded logits, dtype of the logits, differentiable, the logits
    untouched (verl: 3 all-reduces and two ``[N, V / tp]`` temporaries)."""
    out = _megatron_outputs(vocab_parallel_logits, ("log_sum_sq_probs",))
    return out.log_sum_sq_probs.exp().to(vocab_parallel_logits.dtype)


def vocab_parallel_log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor):
    """verl's ``vocab_parallel_log_probs_from_logits``: ``log_softmax`` over the whole
    vocabulary at ``labels`` (global ids) for tensor-parallel sharded logits, dtype of the
    logits (verl: minus Megatron's ``vocab_parallel_cross_entropy``: 3 all-reduces, the
    softmax saved)."""
    out = _megatron_outputs(logits, ("logprobs",), labels)
    return out.logprobs.to(logits.dtype)


def fused_linear_for_ppo_forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
    """verl's ``FusedLinearForPPO.forward`` (the LM head of ``use_fused_kernels`` with its
    "torch" or "liger" backend): ``(log_probs, entropy)`` per token of the logits
    ``hidden_states @ vocab_weights.T / temperature``, shape ``input_ids.shape``; log_probs
    float32 and the entropy in the dtype of ``hidden_states``, as verl returns them.

    Computed by rlhf_ext.linear_token_logprobs, which never holds the logits (verl's torch
    backend forms them ``chunk_size`` rows at a time, in the inputs' dtype: bf16 logits
    there, float32 accumulation and a float32 transform here; the module's ``chunk_size``
    and backend are not read). ``temperature`` is a float as in verl, or (beyond verl,
    whose engines refuse per-sample temperatures with fused kernels) a tensor: one per
    token, or one per sequence for ``[B, T, H]`` hidden states. Inside the patched FSDP
    engine's micro-batch that asks for sum_pi_squared, the same call also computes it (from
    the same tiles) for the engine's outputs."""
    plan = getattr(_SHARED, "fused", None)
    if plan is None:
        logprobs, entropy = _rlhf_linear_token_logprobs(
            hidden_states, vocab_weights, input_ids, temperature=temperature, return_entropy=True
        )
        return logprobs, entropy.to(hidden_states.dtype)
    out = _rlhf_linear_token_logprobs(
        hidden_states, vocab_weights, input_ids, temperature=temperature,
        outputs=("logprobs", "entropy", "log_sum_sq_probs"),
    )  # fmt: skip
    plan.sum_pi_squared = out.log_sum_sq_probs.exp().to(hidden_states.dtype)
    return out.logprobs, out.entropy.to(hidden_states.dtype)


# --- verl's FSDP engine with fused kernels: what verl refuses there -----------------------
#
# With use_fused_kernels, verl 0.9.1's engine asserts a float temperature
# (prepare_model_inputs: "does not support per sample temperature yet") and raises for
# calculate_sum_pi_squared (prepare_model_outputs). With the torch / liger head the fused
# forward is FusedLinearForPPO.forward, the adapter above, which takes per-token
# temperatures and computes log sum p^2 from the same tiles. The patched methods run
# verl's own: the inputs as for the unfused path (which builds the per-token
# temperatures), handed to the model as the fused path hands its float; the outputs
# without sum_pi_squared, which the adapter's head then supplies.


@dataclass
class _FusedPlan:
    """One fused micro-batch that asks for sum_pi_squared: the head's result, once run."""

    sum_pi_squared: torch.Tensor | None = None


def _flag(micro_batch, key: str, default):
    from verl.utils import tensordict_utils as tu

    return tu.get_non_tensor_data(data=micro_batch, key=key, default=default)


def _with_flags(micro_batch, **flags):
    """A shallow copy of the micro-batch with these non-tensor flags (the caller's own
    micro-batch is not changed)."""
    from verl.utils import tensordict_utils as tu

    copy = micro_batch.copy()
    tu.assign_non_tensor(copy, **flags)
    return copy


def _fused_head_is_ours(engine) -> bool:
    """Whether the engine's fused forward is FusedLinearForPPO's (the "torch" and "liger"
    backends; "triton" is verl's linear_cross_entropy, not replaced)."""
    options = getattr(getattr(engine, "model_config", None), "fused_kernel_options", None)
    backend = options.get("impl_backend", None) if options is not None else None
    return backend in ("torch", "liger")


def prepare_model_inputs(self, micro_batch):
    """verl's ``FSDPEngineWithLMHead.prepare_model_inputs``, run as verl's own, except that
    with fused kernels (torch / liger head) a per-sample temperature tensor is accepted:
    the model gets one temperature per token (remove-padding path) or per sequence, where
    verl asserts a float. A micro-batch that asks for sum_pi_squared has the fused head
    compute it too."""
    engine_method = _PATCHER.original(f"{ENGINE}.FSDPEngineWithLMHead.prepare_model_inputs")
    _SHARED.fused = None
    if not (_flag(micro_batch, "use_fused_kernels", False) and _fused_head_is_ours(self)):
        return engine_method(self, micro_batch)
    if isinstance(micro_batch["temperature"], torch.Tensor):
        unfused = _with_flags(micro_batch, use_fused_kernels=False)
        model_inputs, output_args = engine_method(self, unfused)
        if _flag(micro_batch, "use_remove_padding", True):
            model_inputs["temperature"] = output_args["temperature_rmpad"].unsqueeze(0)
            model_inputs["shift_labels"] = output_args["input_ids_rmpad_rolled"].unsqueeze(0)
        else:
            model_inputs["temperature"] = output_args["temperature"]  # [bsz]: per sequence
        model_inputs["return_dict"] = True
    else:
        model_inputs, output_args = engine_method(self, micro_batch)
    if _flag(micro_batch, "calculate_sum_pi_squared", False):
        _SHARED.fused = _FusedPlan()
    return model_inputs, output_args


def _fused_sum_pi_squared(engine, output, output_args, micro_batch) -> torch.Tensor | None:
    """The fused head's sum_pi_squared as verl lays out the fused entropy: nested over the
    micro-batch's sequences (None when the head did not compute it)."""
    plan, _SHARED.fused = getattr(_SHARED, "fused", None), None
    if plan is None or plan.sum_pi_squared is None:
        return None
    values = plan.sum_pi_squared
    cu_seqlens = micro_batch["input_ids"].offsets()
    if _flag(micro_batch, "use_remove_padding", True):
        values = engine._gather_and_unpad_packed(values.squeeze(0), output_args["pad_size"])
    else:
        lengths = cu_seqlens.diff()
        columns = torch.arange(values.shape[1], device=values.device)
        values = values[columns < lengths.unsqueeze(1)]
    return torch.nested.nested_tensor_from_jagged(values, cu_seqlens)


def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
    """verl's ``FSDPEngineWithLMHead.prepare_model_outputs``, run as verl's own, except that
    on the unfused remove-padding path the log-probs, entropy and sum_pi_squared it asks for
    come from one read of the logits (verl: one pass each, and an out-of-place log-prob
    backward whenever the entropy is taken), and that with fused kernels (torch / liger
    head, through the patched ``prepare_model_inputs``) sum_pi_squared comes from the fused
    head, where verl raises NotImplementedError."""
    engine_method = _PATCHER.original(f"{ENGINE}.FSDPEngineWithLMHead.prepare_model_outputs")
    if _flag(micro_batch, "use_fused_kernels", False):
        wanted = _flag(micro_batch, "calculate_sum_pi_squared", False)
        sum_pi_squared = _fused_sum_pi_squared(self, output, output_args, micro_batch)
        if not wanted or sum_pi_squared is None:  # verl's own (and its refusal)
            return engine_method(self, output, output_args, micro_batch, logits_processor_func)
        without = _with_flags(micro_batch, calculate_sum_pi_squared=False)
        model_output = engine_method(self, output, output_args, without, logits_processor_func)
        model_output["sum_pi_squared"] = sum_pi_squared
        return model_output
    outputs = _engine_read_plan(self, output_args, micro_batch)
    if not outputs:
        return engine_method(self, output, output_args, micro_batch, logits_processor_func)
    with _share_logits_read(output_args["input_ids_rmpad_rolled"], outputs):
        return engine_method(self, output, output_args, micro_batch, logits_processor_func)


# --- outcome advantage estimators (verl's ADV_ESTIMATOR_REGISTRY) -------------------------
#
# verl groups the rows of a batch by ``index`` (the ``uid`` of each row's prompt: a numpy
# object array of strings) in Python loops over the rows. The adapters factorise ``index``
# into int64 group ids on the host (the only host work), then run the whole batch through
# one ``rlhf_ext.group_advantages`` call: verl's singleton convention (mean 0, std 1) is
# ``singleton="raw"``, ``torch.std`` is ``unbiased=True`` and verl adds epsilon to the std
# (``eps_mode="add"``).


def _factorize(function: str, index, rows: int, device, numeric: bool = False) -> torch.Tensor:
    """The group id (0..G-1, int64, on ``device``) of every row of ``index``.

    Labels are grouped by equality, as verl's ``id2score`` dicts group them: numpy arrays of a
    non-object dtype with ``np.unique``, anything else (object arrays of uid strings, lists)
    with a dict in first-seen order. A tensor ``index`` is grouped by value on its device
    (verl's loop estimators key their dicts by 0-d tensors there, i.e. by object identity,
    which groups nothing reliably). ``numeric=True`` first applies
    ``verl.utils.as_torch_index``'s label rules (the vectorised GRPO's): near-integer floats
    are rounded and labels that ``astype(np.int64)`` accepts (numeric strings; truncated
    floats) are grouped by that integer."""
    if isinstance(index, torch.Tensor):
        flat = index.detach().reshape(-1)
        if numeric and flat.is_floating_point():
            rounded = torch.round(flat.double())
            if torch.allclose(flat.double(), rounded, rtol=0.0, atol=1e-6):
                flat = rounded
        _check_index_rows(function, flat.numel(), rows)
        return torch.unique(flat, return_inverse=True)[1].to(device=device, dtype=torch.int64)
    labels = index if isinstance(index, np.ndarray) else None
    if labels is None:
        try:
            labels = np.asarray(index) if numeric else np.array(list(index), dtype=object)
        except (TypeError, ValueError):
            labels = np.array(list(index), dtype=object)
    labels = labels.reshape(-1)
    _check_index_rows(function, labels.shape[0], rows)
    if numeric:
        labels = _as_torch_index_labels(labels)
    if labels.dtype == object:
        first_seen: dict = {}
        inverse = np.fromiter(
            (first_seen.setdefault(label, len(first_seen)) for label in labels),
            dtype=np.int64,
            count=labels.shape[0],
        )
    else:
        inverse = np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)
    return torch.from_numpy(inverse).to(device)


def _as_torch_index_labels(labels: np.ndarray) -> np.ndarray:
    """``verl.utils.as_torch_index``'s label canonicalisation (before its factorisation)."""
    if labels.dtype != object and np.issubdtype(labels.dtype, np.integer):
        return labels.astype(np.int64, copy=False)
    if labels.dtype != object and np.issubdtype(labels.dtype, np.floating):
        as_float = labels.astype(np.float64, copy=False)
        rounded = np.rint(as_float)
        if np.allclose(as_float, rounded, rtol=0.0, atol=1e-6):
            return rounded.astype(np.int64)
    try:
        return labels.astype(np.int64)
    except (TypeError, ValueError, OverflowError):
        return labels if labels.dtype == object else labels.astype(object)


def _check_index_rows(function: str, count: int, rows: int) -> None:
    if count != rows:
        raise ValueError(
            f"{PREFIX}.{function}: `index` must have one label per row of "
            f"`token_level_rewards` ({rows}), got {count}"
        )


def _row_advantages(function, token_level_rewards, index, *, numeric=False, **options):
    """``group_advantages`` of the rows' outcome scores ``token_level_rewards.sum(-1)``
    against their ``index`` groups, in verl's conventions; ``[bs]`` in the rewards' dtype."""
    scores = token_level_rewards.sum(dim=-1)
    groups = _factorize(function, index, scores.shape[0], scores.device, numeric)
    options.setdefault("singleton", "raw")
    options.setdefault("validate", False)  # the ids are valid by construction: no host sync
    advantages = _rlhf_group_advantages(scores, groups, **options)
    return advantages.to(scores.dtype)


def _outcome_advantages(function, token_level_rewards, response_mask, index, **options):
    """verl's ``(advantages, advantages)`` of an outcome estimator: the rows'
    ``_row_advantages`` broadcast over ``response_mask``, ``[bs, T]``."""
    with torch.no_grad():
        rows = _row_advantages(function, token_level_rewards, index, **options)
        advantages = _per_token(rows, response_mask)
    return advantages, advantages


def _per_token(row_advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """verl's ``scores.unsqueeze(-1) * response_mask``: ``[bs, T]``."""
    return row_advantages.unsqueeze(-1) * response_mask


def _std_scale(norm_adv_by_std_in_grpo) -> str:
    return "group" if norm_adv_by_std_in_grpo else "none"


def _require_config(function: str, config) -> None:
    if config is None:
        raise ValueError(f"{PREFIX}.{function}: `config` is required (verl's algorithm config)")


def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_grpo_outcome_advantage`` ("grpo"): per row ``(s - mean_g) / (std_g +
    epsilon)`` of the outcome score ``s = token_level_rewards.sum(-1)`` within its ``index``
    group (Bessel std), or ``s - mean_g`` with ``norm_adv_by_std_in_grpo=False`` (Dr.GRPO);
    a group of one row keeps ``s / (1 + epsilon)`` (verl's mean 0, std 1). Returns
    ``(advantages, advantages)``, both ``[bs, T]`` = the row value times ``response_mask``
    (the same tensor twice, as verl). ``config`` is accepted and unused, as in verl.

    One ``rlhf_ext.group_advantages`` call instead of verl's per-row Python loop; its group
    sums run in double (verl: float32), so a group of equal scores gives exactly 0."""
    return _outcome_advantages(
        "compute_grpo_outcome_advantage",
        token_level_rewards,
        response_mask,
        index,
        baseline="mean",
        scale=_std_scale(norm_adv_by_std_in_grpo),
        eps=float(epsilon),
    )


def compute_grpo_vectorized_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_grpo_vectorized_outcome_advantage`` ("grpo_vectorized"): the GRPO
    advantage of ``compute_grpo_outcome_advantage``, with the groups that verl's
    ``as_torch_index`` forms from ``index`` (near-integer float labels rounded, numeric
    string labels grouped by their integer value). ``(advantages, advantages)``, ``[bs, T]``."""
    return _outcome_advantages(
        "compute_grpo_vectorized_outcome_advantage",
        token_level_rewards,
        response_mask,
        index,
        numeric=True,
        baseline="mean",
        scale=_std_scale(norm_adv_by_std_in_grpo),
        eps=float(epsilon),
    )


def _gdpo_components(token_level_rewards, config, non_tensor_batch, batch):
    """verl's GDPO inputs: ``([bs, K] component scores, [K] weights)``. With ``config``,
    ``non_tensor_batch`` and ``batch``, one component per ``config.gdpo_reward_keys`` entry
    (``non_tensor_batch[key]``, as float32) weighted by ``config.gdpo_reward_weights``
    (default ones); otherwise the single component ``token_level_rewards.sum(-1)``.

    verl writes each component score at the row's last valid response token of a zero
    ``[bs, T]`` tensor and lets GRPO sum it back; that sum is the score itself, so the
    adapter uses the scores directly (and does not read ``batch``'s prompts / mask)."""
    function = "compute_gdpo_outcome_advantage"
    device = token_level_rewards.device
    if config is None or non_tensor_batch is None or batch is None:
        scores = token_level_rewards.sum(dim=-1).unsqueeze(-1)
        return scores, torch.ones(1, dtype=torch.float32, device=device)
    keys = _config_value(config, "gdpo_reward_keys", None)
    if not keys:
        raise ValueError(
            f"{PREFIX}.{function}: GDPO requires `config.gdpo_reward_keys` listing the reward "
            "component keys returned by compute_score (e.g. ['format_reward', "
            "'accuracy_reward'])"
        )
    columns = []
    for key in keys:
        if key not in non_tensor_batch:
            raise ValueError(
                f"{PREFIX}.{function}: GDPO reward key {key!r} not found in `non_tensor_batch` "
                f"(keys: {list(non_tensor_batch.keys())}); compute_score must return it"
            )
        columns.append(np.asarray(non_tensor_batch[key], dtype=np.float32).reshape(-1))
    scores = torch.from_numpy(np.stack(columns, axis=-1)).to(device)
    weights = _config_value(config, "gdpo_reward_weights", None)
    if weights is None:
        return scores, torch.ones(len(columns), dtype=torch.float32, device=device)
    weights = torch.tensor(list(weights), dtype=torch.float32, device=device)
    if weights.numel() < len(columns):
        raise ValueError(
            f"{PREFIX}.{function}: `config.gdpo_reward_weights` must have one weight per "
            f"reward key ({len(columns)}), got {weights.numel()}"
        )
    return scores, weights[: len(columns)]  # verl ignores extra weights


def compute_gdpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
    non_tensor_batch: dict | None = None,
    batch: dict | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_gdpo_outcome_advantage`` ("gdpo"): each reward component normalised
    within its group as GRPO does (``epsilon``, ``norm_adv_by_std_in_grpo``), summed with the
    component weights, broadcast over ``response_mask`` and whitened over it (verl's
    ``masked_whiten``), times ``response_mask``. The components are
    ``non_tensor_batch[k]`` for ``k`` in ``config.gdpo_reward_keys`` (weights
    ``config.gdpo_reward_weights``) when ``config``, ``non_tensor_batch`` and ``batch`` are all
    given, else the one score ``token_level_rewards.sum(-1)``. ``(advantages, advantages)``.

    One ``group_advantages`` call over the ``[bs, K]`` components
    (``components="normalize_then_sum"``) and the fused ``masked_whiten``. A missing
    ``gdpo_reward_keys`` / key raises ValueError (verl: AssertionError)."""
    with torch.no_grad():
        scores, weights = _gdpo_components(token_level_rewards, config, non_tensor_batch, batch)
        groups = _factorize("compute_gdpo_outcome_advantage", index, scores.shape[0], scores.device)
        rows = _rlhf_group_advantages(
            scores,
            groups,
            baseline="mean",
            scale=_std_scale(norm_adv_by_std_in_grpo),
            eps=float(epsilon),
            singleton="raw",
            weights=weights,
            components="normalize_then_sum",
            validate=False,
        )
        dtype = torch.promote_types(scores.dtype, torch.float32)
        summed = _per_token(rows.to(dtype), response_mask)
        advantages = masked_whiten(summed, response_mask) * response_mask
    return advantages, advantages


def compute_grpo_passk_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_grpo_passk_outcome_advantage`` ("grpo_passk", Pass@k): in each group
    only the best row gets ``r_max - r_second_max`` (divided by ``std_g + epsilon`` when
    ``config.norm_adv_by_std_in_grpo``, default True), every other row 0; broadcast over
    ``response_mask``. As in verl, ``config`` is required and the ``norm_adv_by_std_in_grpo``
    argument is ignored (the config's value rules). A group of fewer than 2 rows raises
    ValueError, as in verl. ``(advantages, advantages)``."""
    _require_config("compute_grpo_passk_outcome_advantage", config)
    norm = _config_value(config, "norm_adv_by_std_in_grpo", True)
    return _outcome_advantages(
        "compute_grpo_passk_outcome_advantage",
        token_level_rewards,
        response_mask,
        index,
        baseline="pass_at_k",
        scale=_std_scale(norm),
        eps=float(epsilon),
        validate=True,  # groups of one row raise, as in verl (one host sync)
    )


def compute_reinforce_plus_plus_baseline_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: torch.Tensor,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_reinforce_plus_plus_baseline_outcome_advantage``
    ("reinforce_plus_plus_baseline"): ``s - mean_g`` per row (a group of one row keeps
    ``s``), broadcast over ``response_mask``, whitened over it (verl's ``masked_whiten``)
    and times ``response_mask``. ``epsilon`` and ``config`` are unused, as in verl. ``index``
    is the uid array (numpy) or a tensor of group labels. ``(advantages, advantages)``."""
    with torch.no_grad():
        rows = _row_advantages(
            "compute_reinforce_plus_plus_baseline_outcome_advantage",
            token_level_rewards,
            index,
            baseline="mean",
            scale="none",
        )
        centred = _per_token(rows, response_mask)
        advantages = masked_whiten(centred, response_mask) * response_mask
    return advantages, advantages


def compute_rloo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_rloo_outcome_advantage`` ("rloo"): ``s - mean of the group's other
    rows`` (= ``(s - mean_g) * n / (n - 1)``); a group of one row keeps ``s``. Broadcast
    over ``response_mask``; ``(advantages, advantages)``. ``epsilon`` / ``config`` unused."""
    return _outcome_advantages(
        "compute_rloo_outcome_advantage",
        token_level_rewards,
        response_mask,
        index,
        baseline="leave_one_out",
        scale="none",
    )


def compute_rloo_vectorized_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_rloo_vectorized_outcome_advantage`` ("rloo_vectorized"): the RLOO
    advantage of ``compute_rloo_outcome_advantage``, except that a group of one row gets 0
    (NaN for a non-finite score), as verl's vectorised version does. ``(advantages,
    advantages)``, ``[bs, T]``."""
    return _outcome_advantages(
        "compute_rloo_vectorized_outcome_advantage",
        token_level_rewards,
        response_mask,
        index,
        baseline="leave_one_out",
        scale="none",
        singleton="zero",
    )


def compute_opo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_opo_outcome_advantage`` ("opo"): ``s - sum_g(L s) / sum_g(L)`` with
    ``L = response_mask.sum(-1)`` (the length-weighted group baseline); a group of one row
    keeps ``s``. Broadcast over ``response_mask``; ``(advantages, advantages)``."""
    return _outcome_advantages(
        "compute_opo_outcome_advantage",
        token_level_rewards,
        response_mask,
        index,
        baseline="length_weighted",
        scale="none",
        lengths=response_mask.sum(dim=-1),
    )


def compute_reinforce_plus_plus_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_reinforce_plus_plus_outcome_advantage`` ("reinforce_plus_plus"): the
    discounted return ``R_t = r_t + gamma * R_next`` over the valid tokens of each row
    (``gamma = config.gamma``; a masked token is skipped: its reward is dropped, its return
    is 0 and the running return passes through it undiscounted), whitened over
    ``response_mask`` (verl's ``masked_whiten``) and times the mask. Returns ``(advantages,
    returns)``.

    The returns are ``rlhf_ext.gae`` with zero values and ``lam=1``: exactly that recurrence
    (gae skips masked positions the same way and writes 0 there)."""
    _require_config("compute_reinforce_plus_plus_outcome_advantage", config)
    gamma = _config_value(config, "gamma")
    with torch.no_grad():
        zeros = torch.zeros_like(token_level_rewards)
        returns, _ = _rlhf_gae(token_level_rewards, zeros, response_mask, gamma=gamma, lam=1.0)
        returns = returns.to(token_level_rewards.dtype)
        advantages = masked_whiten(returns, response_mask)
        if torch.result_type(advantages, response_mask) == advantages.dtype:
            # in place (the whitened tensor is new): a fresh [B, T] buffer costs its page
            # faults, ~25-100 ms at 4096 x 8192 on the CPU
            advantages.mul_(response_mask)
        else:  # verl's product promotes (bf16 returns, a float32 mask)
            advantages = advantages * response_mask
    return advantages, returns


def compute_remax_outcome_advantage(
    token_level_rewards: torch.Tensor,
    reward_baselines: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_remax_outcome_advantage`` ("remax"): ``returns`` = the reverse
    cumulative sum of ``token_level_rewards * response_mask`` over each row, ``advantages =
    returns - reward_baselines[:, None] * response_mask`` (note verl's argument order:
    rewards, baselines, mask). Returns ``(advantages, returns)``.

    The reverse cumulative sum is ``rlhf_ext.gae`` with ``gamma = lam = 1``, zero values and
    no mask (on the masked rewards): every position keeps the sum of the rewards after it,
    masked ones too, as verl's ``cumsum`` does."""
    with torch.no_grad():
        masked_rewards = token_level_rewards * response_mask
        zeros = torch.zeros_like(masked_rewards)
        returns, _ = _rlhf_gae(masked_rewards, zeros, None, gamma=1.0, lam=1.0)
        returns = returns.to(masked_rewards.dtype)
        advantages = returns - reward_baselines.unsqueeze(-1) * response_mask
    return advantages, returns


def compute_gpg_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    f_norm: float = 1.0,
    alpha: float = 1.0,
    config: Any = None,
    **kwargs,
):
    """verl's ``compute_gpg_outcome_advantage`` ("gpg"): ``alpha * (s - mean_g) / f_norm``
    with GPG's ``alpha = bs / #rows with a nonzero score`` (the ``alpha`` argument is
    overwritten, as in verl); a group of one row keeps ``alpha * s / f_norm``. Broadcast over
    ``response_mask``; ``(advantages, advantages)``. ``epsilon`` / ``config`` unused."""
    with torch.no_grad():
        rows = _row_advantages(
            "compute_gpg_outcome_advantage",
            token_level_rewards,
            index,
            baseline="mean",
            scale="none",
            nonzero_rescale=True,
        )
        advantages = _per_token(rows / f_norm, response_mask)
    return advantages, advantages


# verl's ADV_ESTIMATOR_REGISTRY names -> the outcome estimators above ("gae" is above too)
ADV_ESTIMATORS = {
    "grpo": compute_grpo_outcome_advantage,
    "grpo_vectorized": compute_grpo_vectorized_outcome_advantage,
    "gdpo": compute_gdpo_outcome_advantage,
    "grpo_passk": compute_grpo_passk_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "rloo_vectorized": compute_rloo_vectorized_outcome_advantage,
    "opo": compute_opo_outcome_advantage,
    "reinforce_plus_plus": compute_reinforce_plus_plus_outcome_advantage,
    "remax": compute_remax_outcome_advantage,
    "gpg": compute_gpg_outcome_advantage,
}
CORE = "verl.trainer.ppo.core_algos"
FUNCTIONAL = "verl.utils.torch_functional"
EXPERIMENTAL = "verl.utils.experimental.torch_functional"
ENGINE = "verl.workers.engine.fsdp.transformer_impl"
MEGATRON_TP = "verl.utils.megatron.tensor_parallel"  # imports only with megatron-core
MEGATRON_FUNCTIONS = (
    vocab_parallel_entropy,
    vocab_parallel_entropy_with_chunking,
    vocab_parallel_sum_pi_squared,
    vocab_parallel_log_probs_from_logits,
)
# the functions, registries and signatures of 0.9.1
SUPPORTED = VersionRange("0.9.1", "0.10")

_PATCHER = Patcher(
    package="verl",
    supported=SUPPORTED,
    pip_name="verl",
    targets=[
        Target(CORE, "compute_gae_advantage_return", compute_gae_advantage_return),
        Target(CORE, "agg_loss", agg_loss),
        *(Target(CORE, function.__name__, function) for function in POLICY_LOSSES.values()),
        Target(CORE, "compute_value_loss", compute_value_loss),
        Target(CORE, "kl_penalty", kl_penalty),
        Target(CORE, "compute_rewards", compute_rewards),
        *(Target(CORE, function.__name__, function) for function in ADV_ESTIMATORS.values()),
        Target(FUNCTIONAL, "masked_whiten", masked_whiten),
        Target(FUNCTIONAL, "logprobs_from_logits", logprobs_from_logits),
        Target(FUNCTIONAL, "entropy_from_logits", entropy_from_logits),
        Target(
            FUNCTIONAL, "calculate_sum_pi_squared_from_logits", calculate_sum_pi_squared_from_logits
        ),  # fmt: skip
        Target(EXPERIMENTAL, "FusedLinearForPPO.forward", fused_linear_for_ppo_forward),
        *(
            Target(ENGINE, f"FSDPEngineWithLMHead.{f.__name__}", f, optional=True)
            for f in (prepare_model_inputs, prepare_model_outputs)
        ),
        *(Target(MEGATRON_TP, f.__name__, f, optional=True) for f in MEGATRON_FUNCTIONS),
    ],
)


def patch(*, allow_untested: bool = False) -> list[str]:
    """Swap this module's functions into the installed verl: the defining attributes in
    ``verl.trainer.ppo.core_algos`` and ``verl.utils.torch_functional``, every loaded
    ``verl.*`` module that imported them by name, and verl's registries
    (in ``POLICY_LOSS_REGISTRY`` "vanilla", "gpg", "cispo", "sapo", "dppo_tv", "dppo_kl",
    "gspo", "dro" and "geo_mean", and in ``ADV_ESTIMATOR_REGISTRY`` "gae", "grpo",
    "grpo_vectorized", "gdpo", "grpo_passk", "reinforce_plus_plus",
    "reinforce_plus_plus_baseline", "remax", "rloo", "rloo_vectorized", "opo" and "gpg", so
    that ``get_adv_estimator_fn`` and ray_trainer's ``core_algos.<function>`` calls reach the
    adapters), and ``FusedLinearForPPO.forward`` (the fused-kernel LM head). Returns the
    qualified names replaced. Idempotent; raises ImportError naming ``verl`` when it is not
    installed. An installed verl outside
    :data:`SUPPORTED` is a RuntimeError that names both versions, and nothing is patched,
    unless ``allow_untested=True`` (or ``RLHF_EXT_ALLOW_UNTESTED_PEERS=1``): a warning,
    then the patch."""
    return _PATCHER.patch(f"{PREFIX}.patch", allow_untested)


def unpatch() -> list[str]:
    """Restore everything ``patch()`` replaced; returns the qualified names restored."""
    return _PATCHER.unpatch()


def original(qualname: str):
    """verl's own function named ``qualname``, patched or not."""
    return _PATCHER.original(qualname)
