"""rlhf_ext.ppo_policy_loss, value_loss, kl_penalty and kl_loss (docs/design.md §3.3).

Every loss op makes one pass over its inputs that yields the loss, every
statistic and the per-token derivative (before aggregation) plus a per-row
aggregation weight; the backward is one elementwise kernel,
``grad_loss * grad[b, t] * row_weight[b]`` (op ``rlhf_ext::loss_backward``).
Statistics are 0-dim float32 tensors on the inputs' device (no host sync).
"""

from __future__ import annotations

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
    check_tensor,
)
from rlhf_ext.ops._registry import (
    first_order_only,
    input_count,
    register_backward,
    register_fakes,
    triton_loader,
)
from rlhf_ext.ops._vocab import KL_LOSS_STATS, NORM_AGG, POLICY_STATS, VALUE_STATS

POLICY_OP = "rlhf_ext.ppo_policy_loss"
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


def _loss_inputs(op, first, first_name, others, mask):
    """Check [B, T] inputs of one loss op; returns them in one floating dtype (detached
    except the first) and the mask."""
    check_tensor(op, first_name, first)
    check_dim(op, first_name, first, 2, " [B, T]")
    common = first.dtype
    for name, t in others:
        check_tensor(op, name, t)
        check_like(op, name, t, first, first_name)
        common = torch.promote_types(common, t.dtype)
    mask = check_mask(op, mask, first, first_name)
    converted = [first.to(common)] + [t.detach().to(common) for _, t in others]
    return converted, mask


def _stats(names, stats: torch.Tensor) -> dict:
    stats = stats.detach()
    return {name: stats[k] for k, name in enumerate(names)}


# -- public functions ---------------------------------------------------------


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
    """Clipped PPO policy loss with its statistics, in one pass.

    Per valid token, ``ratio = exp(clamp(logprobs - old_logprobs, -20, 20))`` and
    ``loss_t = max(-A * ratio, -A * clamp(ratio, 1 - clip_eps, 1 + clip_eps_high))``;
    with ``dual_clip=c`` (c > 1) and ``A < 0``, ``loss_t = min(loss_t, -A * c)``.

    Args:
        logprobs: ``[B, T]`` policy log-probs (the only input with a gradient).
        old_logprobs, advantages: ``[B, T]`` (treated as constants).
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
    op = POLICY_OP
    (lp, old, adv), mask = _loss_inputs(
        op, logprobs, "logprobs", [("old_logprobs", old_logprobs), ("advantages", advantages)], mask
    )
    clip_eps = _number(op, "clip_eps", clip_eps, above=0.0, none_ok=False, what="> 0")
    clip_eps_high = _number(op, "clip_eps_high", clip_eps_high, above=0.0, none_ok=True, what="> 0")
    dual_clip = _number(op, "dual_clip", dual_clip, above=1.0, none_ok=True, what="> 1")
    check_agg(op, agg)
    loss_scale_factor = _number(
        op, "loss_scale_factor", loss_scale_factor, above=0.0, none_ok=True, what="> 0"
    )
    if loss_scale_factor is not None and agg != NORM_AGG:
        raise ValueError(
            f"{op}: `loss_scale_factor` is used by agg='{NORM_AGG}' only, "
            f"got loss_scale_factor={loss_scale_factor!r} with agg={agg!r}"
        )
    high = clip_eps if clip_eps_high is None else clip_eps_high
    chosen = resolve_backend(op, backend, lp.device)
    if chosen == "torch":
        return reference.ppo_policy_loss(
            lp,
            old,
            adv,
            mask,
            clip_eps=clip_eps,
            clip_eps_high=high,
            dual_clip=dual_clip,
            agg=agg,
            loss_scale_factor=loss_scale_factor,
        )
    args = (lp, old, adv, mask, clip_eps, high, dual_clip or 0.0, agg, loss_scale_factor or 0.0)
    if chosen == "triton":
        fn = triton_kernels().ppo_policy_loss_triton
    else:
        fn = torch.ops.rlhf_ext.ppo_policy_loss
    loss, stats, _, _ = fn(*args)
    return loss, _stats(POLICY_STATS, stats)


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
    "k3" (= "low_var_kl"): with d = clamp(ref - lp, -20, 20), clamp(exp(d) - d - 1, -10, 10).
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


def policy_fake(lp, old, adv, mask, clip_eps, clip_eps_high, dual_clip, agg, factor):
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
            "ppo_policy_loss": policy_fake,
            "value_loss": value_fake,
            "kl_loss": kl_loss_fake,
            "kl_penalty": kl_penalty_fake,
            "loss_backward": loss_backward_fake,
        }
    )
    ops = torch.ops.rlhf_ext
    losses = {POLICY_OP: ops.ppo_policy_loss, VALUE_OP: ops.value_loss, KL_LOSS_OP: ops.kl_loss}
    for name, op in losses.items():
        register_loss_autograd(op, ops.loss_backward, name)
    register_kl_penalty_autograd(ops.kl_penalty)


def _register_triton(kernels) -> None:
    """The Triton ops are triton_ops: traced through, so they need no fake kernels."""
    losses = {
        POLICY_OP: kernels.ppo_policy_loss_triton,
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
