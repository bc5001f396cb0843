"""rlhf_ext.policy_loss, ppo_policy_loss, value_loss, kl_penalty and kl_loss
(docs/design.md §3.3).

Every loss op makes one pass over its inputs that yields the loss, every
statistic and the per-token derivative (before aggregation) plus a per-row
aggregation weight; the backward is one elementwise kernel,
``grad_loss * grad[b, t] * row_weight[b]`` (op ``rlhf_ext::loss_backward``).
Statistics are 0-dim float32 tensors on the inputs' device (no host sync).
"""

from __future__ import annotations

import math

import torch

from rlhf_ext import reference
from rlhf_ext._backend import compiled_available, resolve_backend
from rlhf_ext.ops._checks import (
    acc_dtype,
    check_agg,
    check_dim,
    check_kl_kind,
    check_like,
    check_mask,
    check_same_device,
    check_tensor,
)
from rlhf_ext.ops._registry import (
    first_order_only,
    input_count,
    register_backward,
    register_fakes,
    triton_loader,
)
from rlhf_ext.ops._vocab import (
    KL_LOSS_STATS,
    NORM_AGG,
    POLICY_DIVERGENCE_KINDS,
    POLICY_KIND_PARAMS,
    POLICY_KINDS,
    POLICY_LOG_CLIP_KINDS,
    POLICY_STATS,
    VALUE_STATS,
)

POLICY_OP = "rlhf_ext.policy_loss"
PPO_POLICY_OP = "rlhf_ext.ppo_policy_loss"
VALUE_OP = "rlhf_ext.value_loss"
KL_PENALTY_OP = "rlhf_ext.kl_penalty"
KL_LOSS_OP = "rlhf_ext.kl_loss"


# -- argument checks ----------------------------------------------------------


def _number(op: str, name: str, value, *, above: float, none_ok: bool, what: str):
    """None (when allowed) or a real number > `above`; returns it as a float."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        expected = "None or a float" if none_ok else "a float"
        raise TypeError(f"{op}: `{name}` must be {expected}, got {type(value).__name__}")
    if not value > above:  # also catches NaN
        raise ValueError(f"{op}: `{name}` must be {what}, got {value!r}")
    return float(value)


def _loss_inputs(op, first, first_name, others, mask, *, per_row=()):
    """Check [B, T] inputs of one loss op; returns them in one floating dtype (detached
    except the first) and the mask. The inputs named in `per_row` may also be [B]."""
    check_tensor(op, first_name, first)
    check_dim(op, first_name, first, 2, " [B, T]")
    common = first.dtype
    for name, t in others:
        check_tensor(op, name, t)
        if name in per_row and t.dim() == 1:
            check_same_device(op, name, t, first, first_name)
            if t.shape[0] != first.shape[0]:
                raise ValueError(
                    f"{op}: `{name}` must have the shape of `{first_name}` "
                    f"{tuple(first.shape)} or [{first.shape[0]}] (one per row), "
                    f"got {tuple(t.shape)}"
                )
        else:
            check_like(op, name, t, first, first_name)
        common = torch.promote_types(common, t.dtype)
    mask = check_mask(op, mask, first, first_name)
    converted = [first.to(common)] + [t.detach().to(common) for _, t in others]
    return converted, mask


def _stats(names, stats: torch.Tensor) -> dict:
    stats = stats.detach()
    return {name: stats[k] for k, name in enumerate(names)}


# -- public functions ---------------------------------------------------------


# The defaults of the kind-specific parameters (None in the signature: "not given").
POLICY_DEFAULTS = {"clip_eps": 0.2, "tau_pos": 1.0, "tau_neg": 1.05}
DPPO_RATIO_CAP = 20.0  # verl's clip_ratio_c default for DPPO; ppo's ratio_cap: none


def _policy_params(op, kind, given: dict) -> dict:
    """The checked parameters of `kind` (defaults filled in); an error names a parameter
    the kind does not read, or one out of range."""
    if kind not in POLICY_KINDS:
        raise ValueError(f"{op}: `kind` must be one of {POLICY_KINDS}, got {kind!r}")
    reads = POLICY_KIND_PARAMS[kind]
    for name, value in given.items():
        if value is not None and name not in reads:
            uses = ", ".join(f"`{n}`" for n in reads) or "no parameters"
            raise ValueError(
                f"{op}: `{name}` is not used by kind={kind!r} (it reads {uses}), got {value!r}"
            )
    params = {name: given[name] if given[name] is not None else POLICY_DEFAULTS.get(name)
              for name in reads}  # fmt: skip
    if "clip_eps" in params:
        params["clip_eps"] = _number(op, "clip_eps", params["clip_eps"], above=0.0,
                                     none_ok=False, what="> 0")  # fmt: skip
        high = _number(op, "clip_eps_high", params["clip_eps_high"], above=0.0, none_ok=True,
                       what="> 0")  # fmt: skip
        params["clip_eps_high"] = params["clip_eps"] if high is None else high
    if "dual_clip" in params:
        params["dual_clip"] = _number(op, "dual_clip", params["dual_clip"], above=1.0,
                                      none_ok=True, what="> 1")  # fmt: skip
    if kind in POLICY_DIVERGENCE_KINDS and params["ratio_cap"] is None:
        params["ratio_cap"] = DPPO_RATIO_CAP
    if "ratio_cap" in params:
        params["ratio_cap"] = _number(op, "ratio_cap", params["ratio_cap"], above=0.0,
                                      none_ok=True, what="None or > 0")  # fmt: skip
    for name in ("tau_pos", "tau_neg"):
        if name in params:
            params[name] = _number(op, name, params[name], above=0.0, none_ok=False, what="> 0")
    if "beta" in params:
        if params["beta"] is None:
            raise ValueError(f"{op}: `beta` (> 0) is required by kind={kind!r}")
        params["beta"] = _number(op, "beta", params["beta"], above=0.0, none_ok=False,
                                 what="> 0")  # fmt: skip
    return params


def _kernel_params(kind, params) -> dict:
    """The op schema's (lo, hi, dual_clip, ratio_cap, tau_pos, tau_neg, beta): the ratio
    band [1 - clip_eps, 1 + clip_eps_high], or the dppo kinds' divergence thresholds and
    geo_mean's log-ratio bounds as given."""
    lo = hi = 0.0
    if "clip_eps" in params:
        lo, hi = params["clip_eps"], params["clip_eps_high"]
        if kind not in POLICY_DIVERGENCE_KINDS + POLICY_LOG_CLIP_KINDS:
            lo, hi = 1.0 - lo, 1.0 + hi
    return dict(
        lo=lo,
        hi=hi,
        dual_clip=params.get("dual_clip"),
        ratio_cap=params.get("ratio_cap"),
        tau_pos=params.get("tau_pos", 1.0),
        tau_neg=params.get("tau_neg", 1.0),
        beta=params.get("beta", 0.0),
    )


def _policy_loss(op, logprobs, old_logprobs, advantages, mask, kind, given, agg,
                 loss_scale_factor, backend):  # fmt: skip
    (lp, old, adv), mask = _loss_inputs(
        op,
        logprobs,
        "logprobs",
        [("old_logprobs", old_logprobs), ("advantages", advantages)],
        mask,
        per_row=("advantages",),
    )
    k = _kernel_params(kind, _policy_params(op, kind, given))
    check_agg(op, agg)
    loss_scale_factor = _number(
        op, "loss_scale_factor", loss_scale_factor, above=0.0, none_ok=True, what="> 0"
    )
    if loss_scale_factor is not None and agg != NORM_AGG:
        raise ValueError(
            f"{op}: `loss_scale_factor` is used by agg='{NORM_AGG}' only, "
            f"got loss_scale_factor={loss_scale_factor!r} with agg={agg!r}"
        )
    chosen = resolve_backend(op, backend, lp.device)
    if chosen == "torch":
        return reference.policy_loss(
            lp, old, adv, mask, kind=kind, agg=agg, loss_scale_factor=loss_scale_factor, **k
        )
    cap = math.inf if k["ratio_cap"] is None else k["ratio_cap"]
    args = (lp, old, adv, mask, kind, k["lo"], k["hi"], k["dual_clip"] or 0.0, cap,
            k["tau_pos"], k["tau_neg"], k["beta"], agg, loss_scale_factor or 0.0)  # fmt: skip
    if chosen == "triton":
        fn = triton_kernels().policy_loss_triton
    else:
        fn = torch.ops.rlhf_ext.policy_loss
    loss, stats, _, _ = fn(*args)
    return loss, _stats(POLICY_STATS, stats)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kind: str = "ppo",
    clip_eps: float | None = None,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ratio_cap: float | None = None,
    tau_pos: float | None = None,
    tau_neg: float | None = None,
    beta: float | None = None,
    agg: str = "token-mean",
    loss_scale_factor: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict]:
    """Policy loss of one kind with its statistics, in one pass (two for the gspo kinds,
    whose prologue takes each row's mean log-ratio).

    With ``d = logprobs - old_logprobs``, ``r = exp(clamp(d, -20, 20))``, ``A`` the
    advantage and ``[lo, hi] = [1 - clip_eps, 1 + clip_eps_high]``, per valid token:

    - ``"ppo"``: ``max(-A min(r, ratio_cap), -A clamp(r, lo, hi))`` (``ratio_cap``: TRL's
      two-sided ``delta``, default none); with ``dual_clip=c`` and ``A < 0``,
      ``min(., -A c)`` (verl "vanilla");
    - ``"reinforce"``: ``-A lp`` (verl "gpg");
    - ``"cispo"``: ``-sg(clamp(r, lo, hi)) A lp``;
    - ``"sapo"``: ``-A sigmoid(tau (r - 1)) 4 / tau``, ``tau = tau_pos if A > 0 else tau_neg``;
    - ``"dppo_tv"`` / ``"dppo_kl"``: ``-A sg(min(r, ratio_cap)) lp`` on the tokens inside the
      trust region: for ``A > 0`` the divergence (``p - p_old``, or the binary KL of
      ``p_old`` and ``p = exp(lp)``) at most ``clip_eps_high``, else at least
      ``-clip_eps`` (TV) / at most ``clip_eps`` (KL); here clip_eps and clip_eps_high are
      the divergence thresholds themselves;
    - ``"dro"``: ``-(lp A - beta / 2 d^2)``;
    - ``"gspo"``: the clipped surrogate on the sequence ratio ``exp(s)``, ``s`` the row's
      mean of ``d`` over its valid tokens, with the gradient through the mean (TRL's and
      OpenRLHF's GSPO);
    - ``"gspo_token"``: the same value with ``log r = min(s, 10)`` and the token-local
      gradient of ``lp - sg(lp) + sg(s)`` (verl's "gspo", GSPO-token);
    - ``"geo_mean"``: a loss per row, ``-mean_t(A) exp(mean_t d~)`` (GMPO, verl's
      "geo_mean"), ``d~`` the unclamped ``d`` clipped in log space on the side of A's sign
      (``A > 0``: ``min(d, clip_eps_high)``; ``A < 0``: ``max(d, -clip_eps)``; ``A = 0``:
      0), the means over the row's valid tokens with verl's ``n + 1e-8``; the row's loss
      takes the place of its token-loss sum in ``agg`` (verl averages it over all rows:
      ``seq-mean-token-sum`` times non-empty rows / B).

    Args:
        logprobs: ``[B, T]`` policy log-probs (the only input with a gradient).
        old_logprobs: ``[B, T]``; advantages: ``[B, T]``, or ``[B]`` broadcast over each
            row's tokens in the kernel (both treated as constants).
        mask: bool or 0/1 ``[B, T]``; None for all valid.
        kind: one of the kinds above.
        clip_eps (default 0.2), clip_eps_high (default clip_eps), dual_clip (None or > 1),
            ratio_cap (dppo: default 20; ppo: default none), tau_pos / tau_neg (defaults
            1.0 / 1.05), beta (required by "dro"): a parameter the kind does not read is
            an error.
        agg, loss_scale_factor: as in ppo_policy_loss.

    Returns ``(loss, stats)`` like ppo_policy_loss: clipfrac (the tokens whose clip won;
    cispo: whose weight was clipped; dppo: masked out; geo_mean: outside the band with
    A > 0), clipfrac_lower (ppo: dual-clipped; dppo: ratio above ratio_cap; geo_mean:
    outside the band with A < 0), approx_kl (mean of old - new; clamped to +-20 except for
    reinforce, dro, geo_mean and the gspo kinds), ratio_mean and ratio_max (the sequence
    ratio for the gspo kinds and geo_mean).
    """
    given = dict(clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip,
                 ratio_cap=ratio_cap, tau_pos=tau_pos, tau_neg=tau_neg, beta=beta)  # fmt: skip
    return _policy_loss(POLICY_OP, logprobs, old_logprobs, advantages, mask, kind, given, agg,
                        loss_scale_factor, backend)  # fmt: skip


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    loss_scale_factor: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict]:
    """Clipped PPO policy loss with its statistics, in one pass: ``policy_loss`` with
    kind "ppo".

    Per valid token, ``ratio = exp(clamp(logprobs - old_logprobs, -20, 20))`` and
    ``loss_t = max(-A * ratio, -A * clamp(ratio, 1 - clip_eps, 1 + clip_eps_high))``;
    with ``dual_clip=c`` (c > 1) and ``A < 0``, ``loss_t = min(loss_t, -A * c)``.

    Args:
        logprobs: ``[B, T]`` policy log-probs (the only input with a gradient).
        old_logprobs: ``[B, T]``; advantages: ``[B, T]`` or ``[B]`` (constants).
        mask: bool or 0/1 ``[B, T]``; None for all valid.
        clip_eps: lower clip (> 0); clip_eps_high: upper clip, default clip_eps
            ("clip-higher" when set).
        dual_clip: None or c > 1.
        agg: "token-mean", "seq-mean-token-sum", "seq-mean-token-mean" or
            "seq-mean-token-sum-norm" (verl's modes; rows with no valid token are left
            out of the seq-mean modes).
        loss_scale_factor: the "-norm" divisor (> 0, default T); only with that mode.

    Returns ``(loss, stats)``: loss is a 0-dim float32 tensor (float64 for float64
    inputs); stats maps clipfrac, clipfrac_lower, approx_kl (mean of old - new),
    ratio_mean and ratio_max to 0-dim float32 tensors on the inputs' device. An
    all-masked or empty batch gives loss 0 and zero gradient.
    """
    # None is policy_loss's "default"; here clip_eps has its default in the signature.
    clip_eps = _number(PPO_POLICY_OP, "clip_eps", clip_eps, above=0.0, none_ok=False, what="> 0")
    given = dict(clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip,
                 ratio_cap=None, tau_pos=None, tau_neg=None, beta=None)  # fmt: skip
    return _policy_loss(PPO_POLICY_OP, logprobs, old_logprobs, advantages, mask, "ppo", given,
                        agg, loss_scale_factor, backend)  # fmt: skip


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip_eps: float | None = None,
    agg: str = "token-mean",
    backend: str = "auto",
) -> tuple[torch.Tensor, dict]:
    """PPO value loss ``0.5 * agg(max((v - R)^2, (clamp(v, old - eps, old + eps) - R)^2))``
    with ``clip_eps`` set (> 0), else ``0.5 * agg((v - R)^2)``.

    Args:
        values: ``[B, T]`` value predictions (the only input with a gradient).
        old_values, returns: ``[B, T]`` (constants).
        mask: bool or 0/1 ``[B, T]``; None for all valid.
        agg: as in ppo_policy_loss ("-norm" divides by T).

    Returns ``(loss, {"clipfrac": 0-dim float32})``.
    """
    op = VALUE_OP
    (v, old, ret), mask = _loss_inputs(
        op, values, "values", [("old_values", old_values), ("returns", returns)], mask
    )
    clip_eps = _number(op, "clip_eps", clip_eps, above=0.0, none_ok=True, what="None or > 0")
    check_agg(op, agg)
    chosen = resolve_backend(op, backend, v.device)
    if chosen == "torch":
        return reference.value_loss(v, old, ret, mask, clip_eps=clip_eps, agg=agg)
    args = (v, old, ret, mask, clip_eps or 0.0, agg)
    if chosen == "triton":
        fn = triton_kernels().value_loss_triton
    else:
        fn = torch.ops.rlhf_ext.value_loss
    loss, stats, _, _ = fn(*args)
    return loss, _stats(VALUE_STATS, stats)


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, kind: str = "k3", backend: str = "auto"
) -> torch.Tensor:
    """Per-token KL estimator between the policy and the reference, any shape.

    kinds: "k1" (= "kl"): lp - ref; "abs": |lp - ref|; "k2" (= "mse"): 0.5 (lp - ref)^2;
    "k3" (= "low_var_kl"): with d = clamp(ref - lp, -20, 20), clamp(expm1(d) - d, -10, 10)
    (= exp(d) - d - 1, computed without its cancellation near d = 0).
    A "+" suffix ("k1+", "k3+") keeps the kind's value with the gradient of k2
    (straight-through, as verl). Differentiable w.r.t. logprobs only.

    Returns a float32 tensor (float64 for float64 inputs) of logprobs' shape.
    """
    op = KL_PENALTY_OP
    check_tensor(op, "logprobs", logprobs)
    check_tensor(op, "ref_logprobs", ref_logprobs)
    check_like(op, "ref_logprobs", ref_logprobs, logprobs, "logprobs")
    check_kl_kind(op, "kind", kind)
    common = torch.promote_types(logprobs.dtype, ref_logprobs.dtype)
    lp, ref = logprobs.to(common), ref_logprobs.detach().to(common)
    chosen = resolve_backend(op, backend, lp.device)
    if chosen == "torch":
        return reference.kl_penalty(lp, ref, kind)
    if chosen == "triton":
        value, _ = triton_kernels().kl_penalty_triton(lp, ref, kind)
    else:
        value, _ = torch.ops.rlhf_ext.kl_penalty(lp, ref, kind)
    return value


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kind: str = "k3",
    agg: str = "token-mean",
    backend: str = "auto",
) -> torch.Tensor:
    """``agg(kl_penalty(logprobs, ref_logprobs, kind=kind))`` over the valid tokens of a
    ``[B, T]`` batch, fused: a 0-dim tensor, differentiable w.r.t. logprobs."""
    op = KL_LOSS_OP
    (lp, ref), mask = _loss_inputs(op, logprobs, "logprobs", [("ref_logprobs", ref_logprobs)], mask)
    check_kl_kind(op, "kind", kind)
    check_agg(op, agg)
    chosen = resolve_backend(op, backend, lp.device)
    if chosen == "torch":
        return reference.kl_loss(lp, ref, mask, kind=kind, agg=agg)
    if chosen == "triton":
        fn = triton_kernels().kl_loss_triton
    else:
        fn = torch.ops.rlhf_ext.kl_loss
    loss, _, _, _ = fn(lp, ref, mask, kind, agg)
    return loss


# -- autograd and fake kernels (compiled and Triton ops alike) -------------------


def register_loss_autograd(op, backward_op, public_name: str) -> None:
    """d loss / d first input = backward_op(grad_loss, grad, row_weight, dtype); the
    other inputs (as many as the op's schema declares) get no gradient. First order
    only: `grad` is a constant of the backward."""
    others = (None,) * (input_count(op) - 1)

    def setup_context(ctx, inputs, output):
        _, _, grad, row_weight = output
        ctx.dtype = inputs[0].dtype
        ctx.save_for_backward(grad, row_weight)
        # The other outputs never carry a gradient; materialising zeros for them
        # would cost a [B, T] fill per backward (as long as the kernel itself).
        ctx.set_materialize_grads(False)

    @first_order_only(public_name)
    def backward(ctx, grad_loss, _stats, _grad, _row_weight):
        if grad_loss is None:
            return (None, *others)
        grad, row_weight = ctx.saved_tensors
        return (backward_op(grad_loss, grad, row_weight, ctx.dtype), *others)

    register_backward(op, backward, setup_context)


def register_kl_penalty_autograd(op) -> None:
    """d value / d logprobs = grad_value * grad (elementwise); first order only."""
    others = (None,) * (input_count(op) - 1)

    def setup_context(ctx, inputs, output):
        ctx.dtype = inputs[0].dtype
        ctx.save_for_backward(output[1])

    @first_order_only(KL_PENALTY_OP)
    def backward(ctx, grad_value, _grad):
        (grad,) = ctx.saved_tensors
        return ((grad_value * grad).to(ctx.dtype), *others)

    register_backward(op, backward, setup_context)


def loss_fake(first, n_stats: int):
    acc = acc_dtype(first)
    return (
        first.new_empty((), dtype=acc),
        first.new_empty((n_stats,), dtype=torch.float32),
        first.new_empty(first.shape, dtype=acc),
        first.new_empty((first.shape[0],), dtype=acc),
    )


def policy_fake(lp, old, adv, mask, kind, lo, hi, dual_clip, ratio_cap, tau_pos, tau_neg, beta,
                agg, factor):  # fmt: skip
    return loss_fake(lp, len(POLICY_STATS))


def value_fake(values, old_values, returns, mask, clip_eps, agg):
    return loss_fake(values, len(VALUE_STATS))


def kl_loss_fake(lp, ref, mask, kind, agg):
    return loss_fake(lp, len(KL_LOSS_STATS))


def kl_penalty_fake(lp, ref, kind):
    acc = acc_dtype(lp)
    return lp.new_empty(lp.shape, dtype=acc), lp.new_empty(lp.shape, dtype=acc)


def loss_backward_fake(grad_loss, grad, row_weight, dtype):
    return grad.new_empty(grad.shape, dtype=dtype)


def _register_compiled() -> None:
    register_fakes(
        {
            "policy_loss": policy_fake,
            "value_loss": value_fake,
            "kl_loss": kl_loss_fake,
            "kl_penalty": kl_penalty_fake,
            "loss_backward": loss_backward_fake,
        }
    )
    ops = torch.ops.rlhf_ext
    losses = {POLICY_OP: ops.policy_loss, VALUE_OP: ops.value_loss, KL_LOSS_OP: ops.kl_loss}
    for name, op in losses.items():
        register_loss_autograd(op, ops.loss_backward, name)
    register_kl_penalty_autograd(ops.kl_penalty)


def _register_triton(kernels) -> None:
    """The Triton ops are triton_ops: traced through, so they need no fake kernels."""
    losses = {
        POLICY_OP: kernels.policy_loss_triton,
        VALUE_OP: kernels.value_loss_triton,
        KL_LOSS_OP: kernels.kl_loss_triton,
    }
    for name, op in losses.items():
        register_loss_autograd(op, kernels.loss_backward_triton, name)
    register_kl_penalty_autograd(kernels.kl_penalty_triton)


# rlhf_ext.triton.ppo_losses with its autograd registered, imported on first use.
triton_kernels = triton_loader("ppo_losses", _register_triton)

if compiled_available():
    _register_compiled()
