"""rlhf_ext.kl_shaped_rewards: per-token KL penalty plus the sequence score."""

from __future__ import annotations

import torch

from rlhf_ext import reference
from rlhf_ext._backend import resolve_backend
from rlhf_ext.ops._checks import (
    acc_dtype,
    check_dim,
    check_finite_float,
    check_kl_kind,
    check_like,
    check_mask,
    check_tensor,
)
from rlhf_ext.ops._registry import register_fakes, triton_loader

OP = "rlhf_ext.kl_shaped_rewards"


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kl_coef: float,
    kl: str = "k1",
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token rewards for PPO-RLHF (TRL / OpenRLHF reward shaping).

    ``-kl_coef * kl_t`` at every valid token, where ``kl_t`` is the estimator
    ``kl`` ("k1"/"kl", "abs", "k2"/"mse", "k3"/"low_var_kl"; see
    rlhf_ext.kl_penalty) of the policy's ``logprobs`` against ``ref_logprobs``,
    plus ``scores[b]`` at row b's last valid token; 0 at masked positions. A row
    with no valid token gets no score.

    Args:
        scores: ``[B]`` sequence scores (e.g. from the reward model).
        logprobs, ref_logprobs: ``[B, T]``.
        mask: bool or 0/1 ``[B, T]``, None for all valid.
        kl_coef: the KL coefficient (a float).

    Returns ``[B, T]`` float32 (float64 for float64 inputs); no gradient.
    """
    check_tensor(OP, "logprobs", logprobs)
    check_dim(OP, "logprobs", logprobs, 2, " [B, T]")
    check_tensor(OP, "ref_logprobs", ref_logprobs)
    check_like(OP, "ref_logprobs", ref_logprobs, logprobs, "logprobs")
    check_tensor(OP, "scores", scores)
    if scores.device != logprobs.device:
        raise ValueError(f"{OP}: `scores` must be on {logprobs.device}, got {scores.device}")
    if scores.shape != (logprobs.shape[0],):
        raise ValueError(
            f"{OP}: `scores` must have shape [{logprobs.shape[0]}], got {tuple(scores.shape)}"
        )
    mask = check_mask(OP, mask, logprobs, "logprobs")
    kl_coef = check_finite_float(OP, "kl_coef", kl_coef)
    check_kl_kind(OP, "kl", kl)
    common = torch.promote_types(logprobs.dtype, ref_logprobs.dtype)
    logprobs, ref_logprobs = logprobs.detach().to(common), ref_logprobs.detach().to(common)
    scores = scores.detach()
    chosen = resolve_backend(OP, backend, logprobs.device)
    if chosen in ("cpu", "cuda"):
        return torch.ops.rlhf_ext.kl_shaped_rewards(
            scores, logprobs, ref_logprobs, mask, float(kl_coef), kl
        )
    if chosen == "triton":
        return triton_kernels().kl_shaped_rewards_triton(
            scores, logprobs, ref_logprobs, mask, float(kl_coef), kl
        )
    return reference.kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, kl=kl)


def _fake(scores, logprobs, ref_logprobs, mask, kl_coef, kl):
    return logprobs.new_empty(logprobs.shape, dtype=acc_dtype(logprobs))


register_fakes({"kl_shaped_rewards": _fake})
# rlhf_ext.triton.kl_shaped_rewards, imported on first use (a triton_op: traced
# through, no fake kernel; no gradient).
triton_kernels = triton_loader("kl_shaped_rewards", lambda kernels: None)
