"""Pure-PyTorch implementations of every rlhf_ext op.

They are the test oracle (called on float64 inputs) and the "torch" backend.
They favour obviousness over speed: GAE is the naive right-to-left loop, the
statistics follow TRL / verl line by line. Inputs are upcast to float32 (float64
stays float64), as the kernels do.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_ext.ops._vocab import AGG_MODES as AGG_MODES  # re-exported: the oracle's modes
from rlhf_ext.ops._vocab import (
    DPPO_KL_EPS,
    GEO_MEAN_EPS,
    GSPO_TOKEN_LOG_RATIO_MAX,
    kl_base_kind,
    kl_straight_through,
)

__all__ = [
    "gae",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "kl_penalty",
    "kl_shaped_rewards",
    "token_logprobs",
    "linear_token_logprobs",
    "agg_loss",
    "policy_loss",
    "ppo_policy_loss",
    "value_loss",
    "kl_loss",
    "group_advantages",
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
    """Generalised advantage estimation, docs/design.md §3.2 semantics (see rlhf_ext.gae)."""
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


def _kl_value(diff, base):
    if base == "k1":
        return diff
    if base == "abs":
        return diff.abs()
    if base == "k2":
        return 0.5 * diff.square()
    if base == "k3":
        d = (-diff).clamp(-KL_CLAMP_LOG_RATIO, KL_CLAMP_LOG_RATIO)
        # expm1(d) - d: exp(d) - d - 1 cancels near d = 0 (kl.h: k3_from_exp)
        return (torch.expm1(d) - d).clamp(-KL_CLAMP_VALUE, KL_CLAMP_VALUE)
    raise ValueError(f"rlhf_ext.kl_penalty: unknown `kind` {base!r}")


def kl_penalty(logprobs, ref_logprobs, kind="k3"):
    """Per-token KL estimate, differentiable w.r.t. logprobs (ref_logprobs is a constant).

    A "+" suffix keeps the value of the kind and takes the gradient of k2
    (straight-through, as verl's k2 - k2.detach() + value.detach(), but exact where
    k2 is infinite).
    """
    base = kl_base_kind(kind)
    diff = _acc(logprobs) - _acc(ref_logprobs).detach()
    value = _kl_value(diff, base)
    if kl_straight_through(kind):
        return _StraightThrough.apply(value.detach(), 0.5 * diff.square())
    return value


class _StraightThrough(torch.autograd.Function):
    """`value` forward, the gradient of `proxy` backward. The additive form
    proxy - proxy.detach() + value is NaN where proxy is infinite (inf - inf), where
    the kernels give the value itself; the backward returns the incoming gradient
    untouched, so second derivatives still flow through `proxy`'s graph."""

    @staticmethod
    def forward(ctx, value, proxy):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


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


def transformed_logits(logits, *, temperature=1.0, logit_scale=1.0, softcap=None):
    """The logits the softmax sees, in float32 (float64): ``softcap * tanh(x * logit_scale
    / softcap) / temperature``, or ``x * logit_scale / temperature`` without a softcap.
    ``temperature`` is a float or a tensor broadcast against the leading shape
    (``[...]``, a prefix of it such as ``[B]``, or 0-d)."""
    z = _acc(logits)
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if isinstance(temperature, torch.Tensor):
        return z / _expand_lead(temperature.to(z.dtype), z[..., 0]).unsqueeze(-1)
    return z / temperature


def _expand_lead(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t (like's shape, a prefix of it, or 0-d) expanded to like's shape."""
    return t.reshape(t.shape + (1,) * (like.dim() - t.dim())).expand(like.shape)


class LogprobOutputs(NamedTuple):
    """token_logprobs(..., outputs=...)'s result (rlhf_ext/ops/_vocab.py LOGPROB_OUTPUTS):
    the outputs asked for, None for the others."""

    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


def token_logprobs(
    logits,
    target,
    *,
    temperature=1.0,
    logit_scale=1.0,
    softcap=None,
    ignore_index=-100,
    return_entropy=False,
    outputs=None,
):
    """log_softmax(z) at `target` over the last dim (and the entropy), with z the
    transformed logits (transformed_logits); with ``outputs`` (names of LOGPROB_OUTPUTS)
    a LogprobOutputs of those: also lse = logsumexp(z), log_sum_sq_probs = log sum p^2,
    mean_logits = mean(z) and is_top1 = (target is the first argmax of z, and the row
    has a log-prob: not NaN).

    0 (False, and no gradient) where target == ignore_index; NaN where a target is
    outside [0, V) otherwise. Materialises the [..., V] log-probs: the oracle
    and the "torch" backend, not a fast path.
    """
    ignored = target == ignore_index
    # An ignored row is not read: where() (not a product) keeps a NaN / inf there, or a
    # bad temperature of that row, out of the backward (0 * NaN), as the kernels never
    # touch the row.
    kept = torch.where(ignored.unsqueeze(-1), 0.0, _acc(logits))
    if isinstance(temperature, torch.Tensor):
        temps = _expand_lead(temperature.to(kept.dtype), ignored)
        # A temperature that is not finite and > 0 gives its row NaN (as in the kernels).
        temps = torch.where((temps > 0) & torch.isfinite(temps), temps, float("nan"))
        temperature = torch.where(ignored, 1.0, temps)
    z = transformed_logits(kept, temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    logp = torch.log_softmax(z, dim=-1)
    in_vocab = (target >= 0) & (target < logp.shape[-1])
    picked = logp.gather(-1, torch.where(in_vocab, target, 0).long().unsqueeze(-1)).squeeze(-1)
    picked = torch.where(in_vocab, picked, float("nan"))
    logprobs = torch.where(ignored, 0.0, picked)
    if not return_entropy and outputs is None:
        return logprobs
    p = logp.exp()
    # A -inf logit has p = 0 and adds 0 (not 0 * -inf), with a zero gradient.
    finite_logp = torch.where(p > 0, logp, 0.0)
    entropy = torch.where(ignored, 0.0, -(p * finite_logp).sum(-1))
    if outputs is None:
        return logprobs, entropy
    every = {"logprobs": logprobs, "entropy": entropy}
    every["lse"] = torch.where(ignored, 0.0, torch.logsumexp(z, -1))
    every["log_sum_sq_probs"] = torch.where(ignored, 0.0, torch.logsumexp(2 * logp, -1))
    every["mean_logits"] = torch.where(ignored, 0.0, z.mean(-1))
    first_max = torch.nan_to_num(z.detach(), nan=float("-inf")).argmax(-1)
    every["is_top1"] = (first_max == target) & in_vocab & ~ignored & ~torch.isnan(picked)
    return LogprobOutputs(**{name: every[name] for name in outputs})


def linear_token_logprobs(
    hidden,
    weight,
    target,
    *,
    bias=None,
    temperature=1.0,
    logit_scale=1.0,
    softcap=None,
    ignore_index=-100,
    return_entropy=False,
    outputs=None,
):
    """token_logprobs of the logits hidden @ weight.T + bias (any of its ``outputs``),
    materialised whole
    (in the inputs' dtype, as an eager LM head computes them). An ignored row's hidden
    state is zeroed first, so that neither it nor (through 0 * NaN in the GEMM's
    backward) a non-finite weight reaches that row's gradient or the weight's."""
    ignored = (target == ignore_index).unsqueeze(-1)
    logits = torch.where(ignored, torch.zeros((), dtype=hidden.dtype), hidden) @ weight.T
    if bias is not None:
        logits = logits + bias
    return token_logprobs(
        logits,
        target,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        outputs=outputs,
    )


# -- losses (docs/design.md §3.3; AGG_MODES: rlhf_ext/ops/_vocab.py) ------------


def _valid(mask, like):
    return torch.ones_like(like, dtype=torch.bool) if mask is None else mask.to(like.device) != 0


def agg_loss(loss_mat, mask=None, agg="token-mean", loss_scale_factor=None):
    """verl's four aggregation modes over a [B, T] per-token loss.

    Rows with no valid token are left out of the seq-mean modes; an all-masked
    batch gives 0 (with zero gradient), never NaN. "-norm" divides the sum by
    loss_scale_factor (default T).
    """
    valid = _valid(mask, loss_mat)
    kept = torch.where(valid, loss_mat, 0.0)
    row_sum = kept.sum(-1)
    row_count = valid.sum(-1).to(loss_mat.dtype)
    rows = (row_count > 0).sum().to(loss_mat.dtype)
    if agg == "token-mean":
        return kept.sum() / row_count.sum().clamp_min(1)
    if agg == "seq-mean-token-sum":
        return row_sum.sum() / rows.clamp_min(1)
    if agg == "seq-mean-token-mean":
        return (row_sum / row_count.clamp_min(1)).sum() / rows.clamp_min(1)
    if agg == "seq-mean-token-sum-norm":
        factor = loss_mat.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return kept.sum() / (factor if factor > 0 else 1)
    raise ValueError(f"rlhf_ext.agg_loss: unknown `agg` {agg!r}")


def _valid_only(valid, *tensors):
    """The tensors with their masked positions set to 0: what a masked token holds
    (NaN, inf) must reach neither the loss nor, through 0 * NaN, the gradient."""
    return [torch.where(valid, t, torch.zeros((), dtype=t.dtype)) for t in tensors]


def _token_mean(x, valid):
    """Mean over valid tokens as a float32 0-d tensor (0 when none is valid)."""
    with torch.no_grad():
        count = valid.sum().clamp_min(1)
        return (torch.where(valid, x.to(torch.float64), 0.0).sum() / count).float()


def _per_token(advantages, like):
    """[B] advantages broadcast over the tokens of their row; [B, T] as they are."""
    return advantages.unsqueeze(-1).expand_as(like) if advantages.dim() == 1 else advantages


def _row_mean_log_ratio(raw, valid):
    """The mean of lp - old over each row's valid tokens, [B, 1] (0 for a row without any)."""
    count = valid.sum(-1, keepdim=True).clamp_min(1).to(raw.dtype)
    return torch.where(valid, raw, 0.0).sum(-1, keepdim=True) / count


def _sequence_surrogate(log_ratio, adv, lo, hi):
    ratio = torch.exp(log_ratio).expand_as(adv)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(lo, hi)
    return torch.maximum(unclipped, clipped), ratio, clipped > unclipped


def _policy_tokens(kind, lp, old, adv, valid, p):
    """Per-token (loss, ratio, neg_log_ratio, clipped, clipped_lower) of one policy kind
    (csrc/include/rlhf_ext/policy_math.h), the loss differentiable w.r.t. lp."""
    raw = lp - old
    log_ratio = raw.clamp(-KL_CLAMP_LOG_RATIO, KL_CLAMP_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    neg_log_ratio = -log_ratio
    clipped = lower = torch.zeros_like(valid)
    if kind == "ppo":
        capped = ratio if p["ratio_cap"] is None else ratio.clamp(max=p["ratio_cap"])
        unclipped = -adv * capped
        clipped_loss = -adv * ratio.clamp(p["lo"], p["hi"])
        loss = torch.maximum(unclipped, clipped_loss)
        clipped = clipped_loss > unclipped
        if p["dual_clip"] is not None:
            floor = -adv * p["dual_clip"]
            lower = (adv < 0) & (loss > floor)
            loss = torch.where(adv < 0, torch.minimum(loss, floor), loss)
    elif kind == "reinforce":
        loss = -adv * lp
        neg_log_ratio = -raw
    elif kind == "cispo":
        weight = ratio.clamp(p["lo"], p["hi"])
        loss = -weight.detach() * adv * lp
        clipped = ratio != weight
    elif kind == "sapo":
        tau = torch.where(adv > 0, lp.new_tensor(p["tau_pos"]), lp.new_tensor(p["tau_neg"]))
        loss = -(torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)) * adv
    elif kind in ("dppo_tv", "dppo_kl"):
        with torch.no_grad():
            prob, old_prob = torch.exp(lp), torch.exp(old)
            if kind == "dppo_tv":
                valid_pos = prob - old_prob <= p["hi"]
                valid_neg = prob - old_prob >= -p["lo"]
            else:
                eps = DPPO_KL_EPS
                binary_kl = old_prob * (old - lp) + (1 - old_prob) * torch.log(
                    (1.0 - old_prob + eps) / (1.0 - prob + eps)
                )
                valid_pos = (binary_kl <= p["hi"]) | (prob <= old_prob)
                valid_neg = (binary_kl <= p["lo"]) | (prob >= old_prob)
            inside = torch.where(adv > 0, valid_pos, valid_neg)
            truncated = ratio.clamp(max=p["ratio_cap"])
        loss = -adv * truncated * lp * inside.to(lp.dtype)
        clipped = ~inside
        lower = (ratio > p["ratio_cap"]) & inside
    elif kind == "dro":
        loss = -(lp * adv - 0.5 * p["beta"] * raw.square())
        neg_log_ratio = -raw
    elif kind == "gspo":  # the gradient flows through the row mean
        loss, ratio, clipped = _sequence_surrogate(
            _row_mean_log_ratio(raw, valid), adv, p["lo"], p["hi"]
        )
        neg_log_ratio = -raw
    elif kind == "gspo_token":  # verl: lp - sg(lp) + sg(s), clamped above at 10
        seq = _row_mean_log_ratio(raw, valid).detach()
        log_seq_ratio = (lp - lp.detach() + seq).clamp(max=GSPO_TOKEN_LOG_RATIO_MAX)
        loss, ratio, clipped = _sequence_surrogate(log_seq_ratio, adv, p["lo"], p["hi"])
        neg_log_ratio = -raw
    elif kind == "geo_mean":  # verl's GMPO: a loss per row, spread over its valid tokens
        loss, ratio, clipped, lower = _geo_mean_tokens(raw, adv, valid, p["lo"], p["hi"])
        neg_log_ratio = -raw
    else:
        raise ValueError(f"rlhf_ext.policy_loss: unknown `kind` {kind!r}")
    return loss, ratio, neg_log_ratio, clipped, lower


def _geo_mean_tokens(raw, adv, valid, lo, hi):
    """GMPO (verl's compute_policy_loss_geo_mean): the row loss
    ``L = -mean(A) exp(mean(d~))`` with verl's ``n + 1e-8`` means, as ``L / n`` at each
    valid token (so that the row's token-loss sum is L), the row ratio at each token, and
    the clip flags (outside [-lo, hi], split by the sign of A)."""
    # verl's sign(A) * min(sign(A) d, sign(A) clamp(d, -lo, hi)), in the equal form
    # A > 0: min(d, hi), A < 0: max(d, -lo), else 0 (NaN for an infinite d or a NaN A, as
    # 0 * inf and sign(NaN) there), with selects: a row with a NaN loss gives NaN gradients
    # only where d~ depends on lp (verl's product with sign(A) = 0 spreads it to A = 0).
    band = raw.clamp(-lo, hi)
    zero = (raw * adv * 0.0).detach()
    tilde = torch.where(
        adv > 0,
        torch.minimum(raw, torch.full_like(raw, hi)),
        torch.where(adv < 0, torch.maximum(raw, torch.full_like(raw, -lo)), zero),
    )
    count = valid.sum(-1, keepdim=True).to(raw.dtype)
    denom = count + GEO_MEAN_EPS
    seq_ratio = torch.exp(torch.where(valid, tilde, 0.0).sum(-1, keepdim=True) / denom)
    seq_advantage = torch.where(valid, adv, 0.0).sum(-1, keepdim=True) / denom
    row_loss = -seq_advantage * seq_ratio
    loss = (row_loss / count.clamp_min(1)).expand_as(raw)
    outside = raw != band
    return loss, seq_ratio.expand_as(raw), outside & (adv > 0), outside & (adv < 0)


def policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask=None,
    *,
    kind="ppo",
    lo=0.8,
    hi=1.2,
    dual_clip=None,
    ratio_cap=None,
    tau_pos=1.0,
    tau_neg=1.05,
    beta=0.0,
    agg="token-mean",
    loss_scale_factor=None,
):
    """Policy loss of one kind (docs/design.md §3.3; formulas in
    csrc/include/rlhf_ext/policy_math.h): (loss, stats), gradient w.r.t. logprobs only.
    ``lo`` / ``hi``: the ratio band, or the divergence thresholds of the dppo kinds;
    ``ratio_cap``: the dppo truncation, or ppo's cap of the unclipped ratio (None: none)."""
    lp = _acc(logprobs)
    old = _acc(old_logprobs).detach().to(lp.dtype)
    adv = _per_token(_acc(advantages).detach().to(lp.dtype), lp)
    valid = _valid(mask, lp)
    lp, old, adv = _valid_only(valid, lp, old, adv)
    params = dict(lo=lo, hi=hi, dual_clip=dual_clip, ratio_cap=ratio_cap, tau_pos=tau_pos,
                  tau_neg=tau_neg, beta=beta)  # fmt: skip
    loss_t, ratio, neg_log_ratio, clipped, lower = _policy_tokens(kind, lp, old, adv, valid, params)
    loss = agg_loss(loss_t, valid, agg, loss_scale_factor)
    with torch.no_grad():
        kept_ratio = torch.where(valid, ratio, 0.0)
        ratio_max = kept_ratio.amax() if ratio.numel() else ratio.new_zeros(())
        stats = {
            "clipfrac": _token_mean(clipped, valid),
            "clipfrac_lower": _token_mean(lower, valid),
            "approx_kl": _token_mean(neg_log_ratio, valid),
            "ratio_mean": _token_mean(ratio, valid),
            "ratio_max": ratio_max.float(),
        }
    return loss, stats


def ppo_policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask=None,
    *,
    clip_eps=0.2,
    clip_eps_high=None,
    dual_clip=None,
    agg="token-mean",
    loss_scale_factor=None,
):
    """Clipped PPO surrogate (docs/design.md §3.3): policy_loss with kind "ppo"."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    return policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        kind="ppo",
        lo=1.0 - clip_eps,
        hi=1.0 + high,
        dual_clip=dual_clip,
        agg=agg,
        loss_scale_factor=loss_scale_factor,
    )


def value_loss(values, old_values, returns, mask=None, *, clip_eps=None, agg="token-mean"):
    """(Clipped) value loss 0.5 * agg(max((v - R)^2, (clip(v) - R)^2)): (loss, stats)."""
    v = _acc(values)
    old = _acc(old_values).detach().to(v.dtype)
    ret = _acc(returns).detach().to(v.dtype)
    valid = _valid(mask, v)
    v, old, ret = _valid_only(valid, v, old, ret)
    unclipped = (v - ret).square()
    if clip_eps is None:
        loss_t, is_clipped = unclipped, torch.zeros_like(valid)
    else:
        v_clipped = torch.clamp(v, old - clip_eps, old + clip_eps)
        clipped = (v_clipped - ret).square()
        loss_t, is_clipped = torch.maximum(unclipped, clipped), clipped > unclipped
    loss = 0.5 * agg_loss(loss_t, valid, agg)
    return loss, {"clipfrac": _token_mean(is_clipped, valid)}


def kl_loss(logprobs, ref_logprobs, mask=None, *, kind="k3", agg="token-mean"):
    """agg(kl_penalty(logprobs, ref_logprobs, kind)) over the valid tokens."""
    valid = _valid(mask, logprobs)
    logprobs, ref_logprobs = _valid_only(valid, _acc(logprobs), _acc(ref_logprobs))
    per_token = kl_penalty(logprobs, ref_logprobs, kind)
    return agg_loss(per_token, valid, agg)


# -- critic-free advantages (docs/design.md §3.2) --------------------------------


def group_advantages(
    scores,
    group_ids=None,
    *,
    group_size=None,
    baseline="mean",
    scale="group",
    unbiased=True,
    eps=1e-6,
    eps_mode="add",
    singleton="zero",
    nan_scores="propagate",
    lengths=None,
    baselines=None,
    nonzero_rescale=False,
    weights=None,
    components="normalize_then_sum",
):
    """Per-row advantages of outcome scores against their group (rlhf_ext.group_advantages),
    one group at a time, as the peers' loops compute them. [B] float32 (float64 stays)."""
    s = _acc(scores)
    rows = s.shape[0]
    if group_ids is None:
        group_ids = torch.arange(rows, device=s.device) // group_size
    as_row = lambda t: None if t is None else _acc(t).to(s.dtype)  # noqa: E731
    lengths, baselines = as_row(lengths), as_row(baselines)
    columns = s.unsqueeze(-1) if s.dim() == 1 else s
    w = torch.ones(columns.shape[1], dtype=s.dtype, device=s.device)
    if weights is not None:
        w = _acc(weights).to(s.dtype)
    one = dict(baseline=baseline, scale=scale, unbiased=unbiased, eps=eps, eps_mode=eps_mode,
               singleton=singleton, ignore_nan=nan_scores == "ignore", lengths=lengths,
               baselines=baselines, nonzero_rescale=nonzero_rescale)  # fmt: skip
    if components == "sum_then_normalize":
        weighted = columns * w
        total = weighted.nansum(-1) if nan_scores == "ignore" else weighted.sum(-1)
        if nan_scores == "ignore":  # a row with no scorable component stays unscorable
            total = torch.where(columns.isnan().all(-1), float("nan"), total)
        return _group_component(total, group_ids, **one)
    out = torch.zeros(rows, dtype=s.dtype, device=s.device)
    for k in range(columns.shape[1]):
        out = out + w[k] * _group_component(columns[:, k], group_ids, **one)
    return out


def _scaled(diff, var, eps, eps_mode):
    if eps_mode == "add":
        return diff / (var.sqrt() + eps)
    return diff / var.clamp_min(eps).sqrt()


def _variance(x, unbiased):
    n = x.numel()
    return ((x - x.mean()) ** 2).sum() / (n - 1 if unbiased else n)


def _group_component(s, group_ids, *, baseline, scale, unbiased, eps, eps_mode, singleton,
                     ignore_nan, lengths, baselines, nonzero_rescale):  # fmt: skip
    usable = ~s.isnan() if ignore_nan else torch.ones_like(s, dtype=torch.bool)
    out = torch.zeros_like(s)
    batch_var = _variance(s[usable], unbiased)
    alpha = s.numel() / max(int(torch.count_nonzero(s)), 1)
    for group in torch.unique(group_ids).tolist():
        rows = ((group_ids == group) & usable).nonzero().flatten()
        n = rows.numel()
        if n == 0:
            continue
        x = s[rows]
        if n == 1 and singleton == "zero":
            out[rows] = x - x
            continue
        if n == 1:  # "raw": baseline 0, group std 1
            diff, var = x, torch.ones((), dtype=s.dtype, device=s.device)
        else:
            var = _variance(x, unbiased)
            if baseline == "mean":
                diff = x - x.mean()
            elif baseline == "leave_one_out":
                diff = x - (x.sum() - x) / (n - 1)
            elif baseline == "length_weighted":
                length = lengths[rows]
                diff = x - (length * x).sum() / length.sum()
            elif baseline == "given":
                diff = x - baselines[rows]
            elif baseline == "none":
                diff = x
            else:  # pass_at_k: only the best row, by r_max - r_2nd
                top = torch.topk(x, 2)
                diff = torch.zeros_like(x)
                diff[top.indices[0]] = top.values[0] - top.values[1]
        if scale == "batch":
            diff = _scaled(diff, batch_var, eps, eps_mode)
        elif scale == "group":
            diff = _scaled(diff, var, eps, eps_mode)
        out[rows] = diff * alpha if nonzero_rescale else diff
    return out
