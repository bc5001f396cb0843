"""rlhf_ext.gae: generalised advantage estimation as one reversed scan."""

from __future__ import annotations

import math

import torch

from rlhf_ext import reference
from rlhf_ext._backend import resolve_backend
from rlhf_ext.ops._checks import acc_dtype, check_like, check_mask, check_rows, check_tensor, eager
from rlhf_ext.ops._registry import register_fakes, triton_loader

OP = "rlhf_ext.gae"


def _split_rate(name: str, rate, rows: int, like: torch.Tensor):
    """(scalar, per-row tensor or None) for a float-or-[B] discount argument."""
    if isinstance(rate, bool):
        raise TypeError(f"{OP}: `{name}` must be a float or a [B] tensor, got bool")
    if isinstance(rate, torch.Tensor) and rate.dim() == 0:
        rate = rate.expand(rows)  # one value for every row, read on the device (no sync)
    rate = check_rows(OP, name, rate, rows, like)
    if isinstance(rate, torch.Tensor):
        return 1.0, rate.detach()
    if not isinstance(rate, (int, float)):
        raise TypeError(
            f"{OP}: `{name}` must be a float or a [B] tensor, got {type(rate).__name__}"
        )
    if not math.isfinite(rate):  # a NaN discount would make every advantage NaN
        raise ValueError(f"{OP}: `{name}` must be finite, got {rate!r}")
    return float(rate), None


def _check_cu_seqlens(cu_seqlens, total: int, like: torch.Tensor) -> None:
    check_tensor(OP, "cu_seqlens", cu_seqlens, floating=False)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{OP}: `cu_seqlens` must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"{OP}: `cu_seqlens` must have shape [B + 1], got {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != like.device:
        raise ValueError(f"{OP}: `cu_seqlens` must be on {like.device}, got {cu_seqlens.device}")


def _validate_cu_seqlens_values(cu_seqlens: torch.Tensor, total: int) -> None:
    """Host-side check of the offsets (one device sync on CUDA)."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"{OP}: `cu_seqlens` must start at 0, got {bounds[0]}")
    for i in range(1, len(bounds)):
        if bounds[i] < bounds[i - 1]:
            raise ValueError(
                f"{OP}: `cu_seqlens` must be non-decreasing, got {bounds[i]} after "
                f"{bounds[i - 1]} at index {i}"
            )
    if bounds[-1] != total:
        raise ValueError(
            f"{OP}: `cu_seqlens` must end at the number of tokens {total}, got {bounds[-1]}"
        )


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma: float | torch.Tensor = 1.0,
    lam: float | torch.Tensor = 0.95,
    last_value: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    validate: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; returns ``(advantages, returns)``.

    Right to left over the valid positions of each row::

        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next
        R_t     = A_t + V_t

    A masked position is skipped: the running next-value and advantage pass
    through it unchanged (verl's multi-turn semantics), and both outputs are 0
    there. ``V_next`` after a row's last valid token is ``last_value`` (default 0).

    Args:
        rewards, values: ``[B, T]`` (padded form) or ``[total]`` with ``cu_seqlens``
            (packed form, each segment its own sequence). float32/bfloat16/float16/float64.
        mask: bool or 0/1, the shape of ``rewards``; None means all valid.
        gamma, lam: floats, or ``[B]`` (or 0-d) tensors for per-row discounts.
        last_value: ``[B]`` bootstrap value after each row's last token.
        cu_seqlens: ``[B + 1]`` int32/int64 segment offsets (flash-attn's varlen layout).
        validate: check ``cu_seqlens`` on the host (a device sync on CUDA). With
            False, the CUDA and Triton kernels clamp a malformed ``cu_seqlens`` so
            they never read out of bounds (the result is then meaningless); the CPU
            kernel checks it anyway, as that costs nothing there.
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Returns:
        advantages, returns: float32 (float64 for float64 inputs), the input's shape.
        No gradient: the inputs are detached.
    """
    check_tensor(OP, "rewards", rewards)
    check_tensor(OP, "values", values)
    check_like(OP, "values", values, rewards, "rewards")
    if cu_seqlens is None:
        if rewards.dim() != 2:
            raise ValueError(
                f"{OP}: `rewards` must be 2-D [B, T] (or 1-D with `cu_seqlens`), got shape "
                f"{tuple(rewards.shape)}"
            )
        rows = rewards.shape[0]
    else:
        if rewards.dim() != 1:
            raise ValueError(
                f"{OP}: with `cu_seqlens`, `rewards` must be 1-D [total], "
                f"got shape {tuple(rewards.shape)}"
            )
        _check_cu_seqlens(cu_seqlens, rewards.numel(), rewards)
        rows = cu_seqlens.numel() - 1
        if validate and eager():
            _validate_cu_seqlens_values(cu_seqlens, rewards.numel())
    mask = check_mask(OP, mask, rewards, "rewards")
    last_value = check_rows(OP, "last_value", last_value, rows, rewards)
    if last_value is not None and not isinstance(last_value, torch.Tensor):
        last_value = torch.full(
            (rows,), float(last_value), dtype=acc_dtype(rewards), device=rewards.device
        )
    gamma_scalar, gamma_rows = _split_rate("gamma", gamma, rows, rewards)
    lam_scalar, lam_rows = _split_rate("lam", lam, rows, rewards)
    # Inputs of the two tensors may differ in dtype (bf16 values, fp32 rewards).
    common = torch.promote_types(rewards.dtype, values.dtype)
    rewards, values = rewards.detach().to(common), values.detach().to(common)
    if last_value is not None:
        last_value = last_value.detach()

    chosen = resolve_backend(OP, backend, rewards.device)
    args = (
        rewards,
        values,
        mask,
        cu_seqlens,
        last_value,
        gamma_rows,
        lam_rows,
        gamma_scalar,
        lam_scalar,
    )
    if chosen in ("cpu", "cuda"):
        return tuple(torch.ops.rlhf_ext.gae(*args))
    if chosen == "triton":
        return tuple(triton_kernels().gae_triton(*args))
    return reference.gae(
        rewards,
        values,
        mask,
        gamma=gamma if gamma_rows is None else gamma_rows,
        lam=lam if lam_rows is None else lam_rows,
        last_value=last_value,
        cu_seqlens=cu_seqlens,
    )


def _fake(rewards, values, mask, cu_seqlens, last_value, gamma_rows, lam_rows, gamma, lam):
    dtype = acc_dtype(rewards)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(
        rewards.shape, dtype=dtype
    )


# No gradient (the inputs are detached): a fake kernel for the compiled op only.
register_fakes({"gae": _fake})
# rlhf_ext.triton.gae, imported on first use (a triton_op: traced through, no fake kernel).
triton_kernels = triton_loader("gae", lambda kernels: None)
