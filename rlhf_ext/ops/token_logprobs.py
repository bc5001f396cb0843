"""rlhf_ext.token_logprobs: log_softmax(logits / T)[target] and the entropy, fused."""

from __future__ import annotations

import torch

from rlhf_ext import reference
from rlhf_ext._backend import compiled_available, resolve_backend
from rlhf_ext.ops._checks import (
    acc_dtype,
    check_ignore_index,
    check_logit_transform,
    check_target,
    check_tensor,
    eager,
    raise_on_bad_target,
    reference_transform,
)
from rlhf_ext.ops._registry import (
    first_order_only,
    input_count,
    register_backward,
    register_fakes,
    triton_loader,
)

OP = "rlhf_ext.token_logprobs"


def token_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    validate: bool = True,
    inplace_backward: bool = False,
    backend: str = "auto",
):
    """Log-probability of each target token, from logits in one pass.

    ``logits [..., V]`` (float32, bfloat16, float16; float64 for gradcheck) and
    ``target [...]`` (int64 or int32). Returns ``logprobs [...]`` =
    ``log_softmax(z, -1)[target]`` and with ``return_entropy=True`` the pair
    ``(logprobs, entropy)``, the entropy of ``softmax(z)`` per token, where ``z`` is
    the logits transformed in the order the models define it::

        z = softcap * tanh(logits * logit_scale / softcap) / temperature   # softcap set
        z = logits * logit_scale / temperature                             # softcap=None

    (``softcap``: Gemma's ``final_logit_softcapping``; ``logit_scale``: the LM head
    multiplier of Cohere / Granite / Falcon-H1 heads), computed after the upcast to
    float32, in the forward and the gradient. Both outputs are float32 (float64 for
    float64 logits) and exactly 0, with zero gradient, where ``target == ignore_index``;
    such rows are not read.

    ``temperature`` is a float (a runtime argument: no recompilation per value) or a
    float32 / float64 tensor without grad: one temperature per token (the leading shape
    ``[...]``), per sequence (a prefix of it, ``[B]`` for ``[B, T, V]`` logits) or 0-d.
    Every temperature, ``logit_scale`` and ``softcap`` must be finite and > 0, with
    ``logit_scale / temperature`` and ``logit_scale / softcap`` finite in float32
    (ValueError otherwise: temperature=1e-39 would make every log-prob NaN).

    The kernels read each row once (online softmax with float32 accumulation;
    the entropy costs no extra pass) and save only the per-row log-sum-exp:
    extra memory is O(N), never a [..., V] float32 tensor. Differentiable
    w.r.t. ``logits`` through both outputs; the backward reads the logits once
    and writes the gradient (dtype of ``logits``) once. With
    ``inplace_backward=True`` that gradient is written into the logits buffer,
    which is destroyed (use it when nothing else needs the logits afterwards). The
    write bumps the logits' version counter, so the backward of any other op that saved
    them (an entropy of the same logits computed before the log-probs) raises autograd's
    "modified by an inplace operation" error instead of reading the gradient.

    Rows need stride 1 in the last dimension; any other strides are read in
    place (``logits[:, :-1]`` costs no copy). Layouts that need more than two
    leading strides, or a non-unit last stride, are copied first.
    A -inf logit (masked vocabulary) has probability 0 without a softcap (with one
    it becomes ``-softcap``, as in the model); a row of all -inf gives NaN.

    ``validate=True`` checks that every target is in [0, V) or ignore_index, and
    every entry of a temperature tensor as above, and raises ValueError naming the
    first bad position (one device sync); ``validate=False`` skips the checks and
    gives NaN for such rows. No kernel reads outside the logits either way.

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
    transform = check_logit_transform(
        OP, temperature, logit_scale, softcap, logits, "logits", validate
    )
    check_ignore_index(OP, ignore_index)
    if inplace_backward and logits.requires_grad and _shares_elements(logits):
        raise ValueError(
            f"{OP}: `inplace_backward=True` writes the gradient into `logits`, whose elements "
            f"share memory (shape {tuple(logits.shape)}, strides {logits.stride()}: an "
            "expanded or overlapping view); pass logits that own their elements, or "
            "inplace_backward=False"
        )
    if validate and eager():
        raise_on_bad_target(OP, target, logits.shape[-1], ignore_index)
    chosen = resolve_backend(OP, backend, logits.device)
    if chosen == "torch":
        return reference.token_logprobs(
            logits,
            target,
            **reference_transform(transform),
            ignore_index=ignore_index,
            return_entropy=return_entropy,
        )
    forward_op = _forward_op(chosen)
    logprobs, entropy, _lse = forward_op(
        logits,
        target,
        *transform,
        ignore_index,
        bool(return_entropy),
        bool(inplace_backward),
    )
    return (logprobs, entropy) if return_entropy else logprobs


def _shares_elements(t: torch.Tensor) -> bool:
    """Whether two indices of `t` address one element (a stride-0 expand, an overlapping
    as_strided view): dimensions by increasing stride must each step past the extent
    of the smaller ones. A slice with gaps (logits[:, :-1]) does not share."""
    extent = 0
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n > 1):
        if stride <= extent:
            return True
        extent += stride * (size - 1)
    return False


def _forward_op(backend: str):
    """The forward op of a compiled or Triton backend (its backward is registered below)."""
    if backend == "triton":
        return triton_kernels().token_logprobs_fwd_triton
    return torch.ops.rlhf_ext.token_logprobs_fwd


# -- autograd and fake kernels (compiled and Triton ops alike) -------------------


def register_token_logprobs_autograd(forward_op, backward_op, backward_inplace_op) -> None:
    """The forward saves logits, target and the per-row log-sum-exp (and entropy);
    the backward is one fused kernel over the logits, into a fresh tensor or, with
    inplace_backward, into the logits buffer."""
    others = (None,) * (input_count(forward_op) - 1)

    def setup_context(ctx, inputs, output):
        logits, target, temperature, temperatures, logit_scale, softcap = inputs[:6]
        ignore_index, return_entropy, inplace = inputs[6:]
        _, entropy, lse = output
        ctx.save_for_backward(
            logits, target, lse, entropy if return_entropy else None, temperatures
        )
        ctx.settings = (temperature, logit_scale, softcap, ignore_index, return_entropy, inplace)
        ctx.mark_non_differentiable(lse)
        if not return_entropy:
            ctx.mark_non_differentiable(entropy)

    @first_order_only(OP)
    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        temperature, logit_scale, softcap, ignore_index, return_entropy, inplace = ctx.settings
        if inplace and getattr(ctx, "logits_overwritten", False):  # before unpacking them
            raise RuntimeError(
                f"{OP}: a second backward through a graph made with inplace_backward=True: "
                "the first one already wrote the gradient into `logits`; use "
                "inplace_backward=False to differentiate more than once"
            )
        logits, target, lse, entropy, temperatures = ctx.saved_tensors
        args = (
            target,
            lse,
            entropy,
            grad_logprobs,
            grad_entropy if return_entropy else None,
            temperature,
            temperatures,
            logit_scale,
            softcap,
            ignore_index,
        )
        if inplace:
            backward_inplace_op(logits, *args)
            ctx.logits_overwritten = True
            # the logits are gone: another op that saved them (an entropy taken from the same
            # logits earlier) must fail autograd's version check, not read the gradient
            torch.autograd.graph.increment_version(logits)
            return (logits, *others)
        return (backward_op(logits, *args), *others)

    register_backward(forward_op, backward, setup_context)


def forward_fake(logits, target, temperature, temperatures, logit_scale, softcap,
                 ignore_index, return_entropy, inplace=False):  # fmt: skip
    lead, dtype = logits.shape[:-1], acc_dtype(logits)
    entropy = logits.new_empty(lead if return_entropy else (0,), dtype=dtype)
    return logits.new_empty(lead, dtype=dtype), entropy, logits.new_empty(lead, dtype=dtype)


def backward_fake(logits, target, lse, entropy, grad_logprobs, grad_entropy, *transform_ii):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def backward_inplace_fake(logits, target, lse, entropy, grad_lp, grad_entropy, *transform_ii):
    return None


def _register_triton(kernels) -> None:
    """The Triton ops are triton_ops: traced through, so they need no fake kernels."""
    register_token_logprobs_autograd(
        kernels.token_logprobs_fwd_triton,
        kernels.token_logprobs_bwd_triton,
        kernels.token_logprobs_bwd_inplace_triton,
    )


register_fakes(
    {
        "token_logprobs_fwd": forward_fake,
        "token_logprobs_bwd": backward_fake,
        "token_logprobs_bwd_": backward_inplace_fake,
    }
)
if compiled_available():
    _ops = torch.ops.rlhf_ext
    register_token_logprobs_autograd(
        _ops.token_logprobs_fwd, _ops.token_logprobs_bwd, _ops.token_logprobs_bwd_
    )

# rlhf_ext.triton.token_logprobs with its autograd registered, imported on first use.
triton_kernels = triton_loader("token_logprobs", _register_triton)
