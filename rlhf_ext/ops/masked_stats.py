"""rlhf_ext.masked_mean and rlhf_ext.masked_whiten (TRL / verl semantics)."""

from __future__ import annotations

import torch

from rlhf_ext import reference
from rlhf_ext._backend import compiled_available, resolve_backend
from rlhf_ext.ops._checks import acc_dtype, check_mask, check_tensor, eager
from rlhf_ext.ops._registry import register_backward, register_fakes, triton_loader

MEAN_OP = "rlhf_ext.masked_mean"
WHITEN_OP = "rlhf_ext.masked_whiten"


def _check_dim(dim, x: torch.Tensor):
    if dim is None:
        return None
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{MEAN_OP}: `dim` must be an int or None, got {type(dim).__name__}")
    if not -x.dim() <= dim < max(x.dim(), 1) or x.dim() == 0:
        raise ValueError(
            f"{MEAN_OP}: `dim` must be in [{-x.dim()}, {x.dim() - 1}] for `x` of shape "
            f"{tuple(x.shape)}, got {dim}"
        )
    return dim


def _raise_if_empty(op: str, count: torch.Tensor, minimum: int) -> None:
    """Eager-mode check that the mask keeps enough elements (one device sync)."""
    kept = int(count.item())
    if kept < minimum:
        what = "no valid element" if kept == 0 else f"{kept} valid element(s)"
        need = "at least one" if minimum == 1 else f"at least {minimum} (unbiased variance)"
        raise ValueError(f"{op}: the mask keeps {what}; {need} needed")


def masked_mean(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    dim: int | None = None,
    *,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true (nonzero).

    ``dim=None`` averages all valid elements (a 0-d result); an int reduces that
    dimension only. Equal to TRL's ``(x * mask).sum(dim) / mask.sum(dim)``.
    With ``dim=None`` a mask with no valid element raises ValueError (one device
    sync in eager mode; ``validate=False`` skips the check and gives 0); along a
    ``dim``, a row with no valid element gives 0.

    Differentiable w.r.t. ``x``. Result in float32 (float64 for float64 ``x``).
    The reduction order is fixed (chunks of 4096 merged in order): the same
    values give the same bits in any batch.
    """
    check_tensor(MEAN_OP, "x", x)
    mask = check_mask(MEAN_OP, mask, x, "x")
    dim = _check_dim(dim, x)
    chosen = resolve_backend(MEAN_OP, backend, x.device)
    if chosen in ("cpu", "cuda"):
        mean, count = torch.ops.rlhf_ext.masked_mean(x, mask, dim)
    elif chosen == "triton":
        mean, count = triton_kernels().masked_mean_triton(x, mask, dim)
    else:
        mean = reference.masked_mean(x, mask, dim)
        count = None if dim is not None else (x.numel() if mask is None else (mask != 0).sum())
        count = torch.as_tensor(count) if count is not None else None
    if validate and dim is None and eager():
        _raise_if_empty(MEAN_OP, count, 1)
    return mean


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    *,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Whiten ``x`` with the mean and variance of its valid elements (TRL / verl).

    ``(x - mean) * rsqrt(var + eps)`` at every position (masked ones included,
    as in TRL), with the mean added back when ``shift_mean`` is False. The
    variance is Bessel-corrected when ``unbiased``. A mask with no valid element
    (or a single one when ``unbiased``) raises ValueError in eager mode (one
    device sync; ``validate=False`` skips the check, and the variance is then
    taken as 0); it never returns NaN for finite ``x``.

    Not differentiable: ``x`` is detached (whitening is applied to advantages).
    Result in float32 (float64 for float64 ``x``), the shape of ``x``.
    """
    check_tensor(WHITEN_OP, "x", x)
    mask = check_mask(WHITEN_OP, mask, x, "x")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(
            f"{WHITEN_OP}: `eps` must be a float > 0 (it keeps rsqrt finite), got {eps!r}"
        )
    x = x.detach()
    chosen = resolve_backend(WHITEN_OP, backend, x.device)
    if chosen in ("cpu", "cuda"):
        out, count = torch.ops.rlhf_ext.masked_whiten(
            x, mask, bool(shift_mean), bool(unbiased), float(eps)
        )
    elif chosen == "triton":
        out, count = triton_kernels().masked_whiten_triton(
            x, mask, bool(shift_mean), bool(unbiased), float(eps)
        )
    else:
        count = torch.as_tensor(x.numel() if mask is None else (mask != 0).sum())
        if count.item() >= (2 if unbiased else 1):
            out = reference.masked_whiten(x, mask, shift_mean, unbiased, eps)
        else:
            out = torch.zeros_like(x, dtype=acc_dtype(x))
    if validate and eager():
        _raise_if_empty(WHITEN_OP, count, 2 if unbiased else 1)
    return out


# -- autograd and fake kernels (compiled and Triton ops alike) -------------------


def _mean_setup_context(ctx, inputs, output):
    x, mask, dim = inputs[:3]
    _, count = output
    ctx.dim = dim
    ctx.x_shape = x.shape
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(mask, count)


def _mean_backward(ctx, grad_mean, _grad_count):
    mask, count = ctx.saved_tensors
    if ctx.dim is not None:
        grad_mean = grad_mean.unsqueeze(ctx.dim)
        count = count.unsqueeze(ctx.dim)
    scale = torch.where(count > 0, grad_mean / count.clamp_min(1), 0.0)
    grad = scale.expand(ctx.x_shape)
    if mask is not None:
        grad = grad * (mask != 0)
    return grad.to(ctx.x_dtype), None, None


def register_masked_mean_autograd(op) -> None:
    """Gradient of a masked_mean op (compiled or Triton): grad * mask / count."""
    register_backward(op, _mean_backward, _mean_setup_context)


def mean_fake(x, mask, dim):
    dtype = acc_dtype(x)
    if dim is None:
        shape = ()
    else:
        d = dim % x.dim()
        shape = x.shape[:d] + x.shape[d + 1 :]
    return x.new_empty(shape, dtype=dtype), x.new_empty(shape, dtype=dtype)


def whiten_fake(x, mask, shift_mean, unbiased, eps):
    dtype = acc_dtype(x)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((), dtype=dtype)


# masked_whiten detaches its input: no gradient to register.
register_fakes({"masked_mean": mean_fake, "masked_whiten": whiten_fake})
if compiled_available():
    register_masked_mean_autograd(torch.ops.rlhf_ext.masked_mean)

# rlhf_ext.triton.masked_stats with its autograd registered, imported on first use
# (triton_ops: traced through, so no fake kernels).
triton_kernels = triton_loader(
    "masked_stats", lambda kernels: register_masked_mean_autograd(kernels.masked_mean_triton)
)
