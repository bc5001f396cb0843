"""rlhf_ext.token_logprobs: log_softmax(logits / T)[target] and the entropy, fused."""

from __future__ import annotations

import math

import torch

from rlhf_ext import reference
from rlhf_ext._backend import compiled_available, resolve_backend
from rlhf_ext.ops._checks import (
    acc_dtype,
    check_target,
    check_tensor,
    eager,
    raise_on_bad_target,
)

OP = "rlhf_ext.token_logprobs"


def token_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    validate: bool = True,
    inplace_backward: bool = False,
    backend: str = "auto",
):
    """Log-probability of each target token, from logits in one pass.

    ``logits [..., V]`` (float32, bfloat16, float16; float64 for gradcheck) and
    ``target [...]`` (int64 or int32). Returns ``logprobs [...]`` =
    ``log_softmax(logits / temperature, -1)[target]``, and with
    ``return_entropy=True`` the pair ``(logprobs, entropy)``, the entropy of
    ``softmax(logits / temperature)`` per token. Both are float32 (float64 for
    float64 logits) and exactly 0, with zero gradient, where
    ``target == ignore_index``; such rows are not read.

    The kernels read each row once (online softmax with float32 accumulation;
    the entropy costs no extra pass) and save only the per-row log-sum-exp:
    extra memory is O(N), never a [..., V] float32 tensor. Differentiable
    w.r.t. ``logits`` through both outputs; the backward reads the logits once
    and writes the gradient (dtype of ``logits``) once. With
    ``inplace_backward=True`` that gradient is written into the logits buffer,
    which is destroyed (use it when nothing else needs the logits afterwards).

    Rows need stride 1 in the last dimension; any other strides are read in
    place (``logits[:, :-1]`` costs no copy). Layouts that need more than two
    leading strides, or a non-unit last stride, are copied first.
    ``temperature`` is a runtime float (no recompilation per value), applied
    after the upcast to float32. A -inf logit (masked vocabulary) has
    probability 0; a row of all -inf gives NaN.

    ``validate=True`` checks that every target is in [0, V) or ignore_index and
    raises ValueError naming the first bad position (one device sync);
    ``validate=False`` skips the check and gives NaN for such rows. No kernel
    reads outside the logits either way.

    A row's result is bitwise the same in any batch and run to run: the order
    of every sum depends only on V. ``backend``: "auto", "cpu", "cuda",
    "triton" or "torch" (the reference, which materialises the log-softmax;
    ``inplace_backward`` does not apply to it).
    """
    check_tensor(OP, "logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"{OP}: `logits` must have shape [..., V] with V >= 1, got {tuple(logits.shape)}"
        )
    check_target(OP, target, logits, "logits")
    temperature = _check_temperature(temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: `ignore_index` must be an int, got {type(ignore_index).__name__}")
    if validate and eager():
        raise_on_bad_target(OP, target, logits.shape[-1], ignore_index)
    chosen = resolve_backend(OP, backend, logits.device)
    if chosen == "torch":
        return reference.token_logprobs(
            logits,
            target,
            temperature=temperature,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
        )
    logprobs, entropy = TokenLogprobsFunction.apply(
        logits,
        target,
        temperature,
        ignore_index,
        bool(return_entropy),
        bool(inplace_backward),
        chosen,
    )
    return (logprobs, entropy) if return_entropy else logprobs


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{OP}: `temperature` must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{OP}: `temperature` must be a finite float > 0, got {temperature!r}")
    return float(temperature)


def _kernels(backend: str):
    """(forward, backward, in-place backward) ops of a compiled or Triton backend."""
    if backend == "triton":
        from rlhf_ext.triton import token_logprobs as kernels

        return (
            kernels.token_logprobs_fwd_triton,
            kernels.token_logprobs_bwd_triton,
            kernels.token_logprobs_bwd_inplace_triton,
        )
    ops = torch.ops.rlhf_ext
    return ops.token_logprobs_fwd, ops.token_logprobs_bwd, ops.token_logprobs_bwd_


class TokenLogprobsFunction(torch.autograd.Function):
    """Forward saves logits, target and the per-row log-sum-exp (and entropy);
    backward is one fused kernel over the logits."""

    @staticmethod
    def forward(ctx, logits, target, temperature, ignore_index, return_entropy, inplace, backend):
        forward_op = _kernels(backend)[0]
        logprobs, entropy, lse = forward_op(
            logits, target, temperature, ignore_index, return_entropy
        )
        ctx.save_for_backward(logits, target, lse, entropy if return_entropy else None)
        ctx.settings = (temperature, ignore_index, return_entropy, inplace, backend)
        if not return_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, target, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, return_entropy, inplace, backend = ctx.settings
        _, backward_op, backward_inplace_op = _kernels(backend)
        args = (
            target,
            lse,
            entropy,
            grad_logprobs,
            grad_entropy if return_entropy else None,
            temperature,
            ignore_index,
        )
        if inplace:
            backward_inplace_op(logits, *args)
            grad = logits
        else:
            grad = backward_op(logits, *args)
        return grad, None, None, None, None, None, None


# -- fake kernels ---------------------------------------------------------------


def forward_fake(logits, target, temperature, ignore_index, return_entropy):
    lead, dtype = logits.shape[:-1], acc_dtype(logits)
    entropy = logits.new_empty(lead if return_entropy else (0,), dtype=dtype)
    return logits.new_empty(lead, dtype=dtype), entropy, logits.new_empty(lead, dtype=dtype)


def backward_fake(logits, target, lse, entropy, grad_logprobs, grad_entropy, temperature, ii):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def backward_inplace_fake(logits, target, lse, entropy, grad_lp, grad_entropy, temperature, ii):
    return None


if compiled_available():
    torch.library.register_fake("rlhf_ext::token_logprobs_fwd")(forward_fake)
    torch.library.register_fake("rlhf_ext::token_logprobs_bwd")(backward_fake)
    torch.library.register_fake("rlhf_ext::token_logprobs_bwd_")(backward_inplace_fake)
