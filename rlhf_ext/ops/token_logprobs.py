"""rlhf_ext.token_logprobs: log_softmax(logits / T)[target] and the entropy, fused."""

from __future__ import annotations

from collections.abc import Sequence

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
from rlhf_ext.ops._vocab import LOGPROB_EXTRA_CODES, LOGPROB_OUTPUTS
from rlhf_ext.reference import LogprobOutputs

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
    outputs: Sequence[str] | None = None,
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

    ``outputs`` asks for any subset of, in one read of the logits (rlhf_ext/ops/_vocab.py
    LOGPROB_OUTPUTS): ``"logprobs"``, ``"entropy"``, ``"lse"`` (logsumexp of z),
    ``"log_sum_sq_probs"`` (log sum_v p_v^2: verl's sum_pi_squared, in log form),
    ``"mean_logits"`` (the mean of z over the vocabulary) and ``"is_top1"`` (bool: the target
    is the argmax of z, ties going to the first index as ``argmax``; False for a row without
    a distribution, whose log-prob is NaN). It returns a ``LogprobOutputs`` named tuple with
    those fields set and the others None; every output but is_top1 is differentiable.
    ``return_entropy`` stays the short form of ``outputs=("logprobs", "entropy")`` (a pair).

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
    wanted = check_outputs(OP, outputs, return_entropy)
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
            outputs=wanted,
        )
    every = _forward_op(chosen)(
        logits,
        target,
        *transform,
        ignore_index,
        wants_entropy(wanted, return_entropy),
        bool(inplace_backward),
        extras_code(wanted),
    )
    return select_outputs(every, wanted, return_entropy)


def check_outputs(op: str, outputs, return_entropy: bool) -> tuple[str, ...] | None:
    """None, or the names asked for: a non-empty sequence of distinct LOGPROB_OUTPUTS names,
    not together with return_entropy=True (errors name `op`)."""
    if outputs is None:
        return None
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list)):
        raise TypeError(
            f"{op}: `outputs` must be a tuple or list of names from {LOGPROB_OUTPUTS}, got "
            f"{outputs!r}"
        )
    unknown = [name for name in outputs if name not in LOGPROB_OUTPUTS]
    if unknown:
        raise ValueError(
            f"{op}: `outputs` has unknown name {unknown[0]!r}; the outputs are {LOGPROB_OUTPUTS}"
        )
    if not outputs or len(set(outputs)) != len(outputs):
        raise ValueError(f"{op}: `outputs` must name each output once, got {tuple(outputs)}")
    if return_entropy:
        raise ValueError(
            f'{op}: pass either `return_entropy=True` or `outputs` (with "entropy" in it), not both'
        )
    return tuple(outputs)


def wants_entropy(wanted: tuple[str, ...] | None, return_entropy: bool) -> bool:
    """The forward ops' return_entropy flag for check_outputs' result."""
    return bool(return_entropy or (wanted is not None and "entropy" in wanted))


def extras_code(wanted: tuple[str, ...] | None) -> int:
    """The forward ops' `extras` bitmask (LOGPROB_EXTRA_CODES) for the outputs asked for."""
    return sum(LOGPROB_EXTRA_CODES[name] for name in wanted or () if name in LOGPROB_EXTRA_CODES)


def select_outputs(every, wanted: tuple[str, ...] | None, return_entropy: bool):
    """The public result from a forward op's six outputs (LOGPROB_OUTPUTS order): a
    LogprobOutputs of the names asked for, the (logprobs, entropy) pair, or logprobs."""
    if wanted is not None:
        named = dict(zip(LOGPROB_OUTPUTS, every, strict=True))
        return LogprobOutputs(**{name: named[name] for name in wanted})
    return (every[0], every[1]) if return_entropy else every[0]


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
    """The forward saves logits, target and the per-row log-sum-exp (and the entropy and
    log sum p^2 when computed); the backward is one fused kernel over the logits, into a
    fresh tensor or, with inplace_backward, into the logits buffer. Outputs that no
    gradient reaches arrive as None (not zeros), so their terms cost nothing."""
    others = (None,) * (input_count(forward_op) - 1)

    def setup_context(ctx, inputs, output):
        logits, target, temperature, temperatures, logit_scale, softcap = inputs[:6]
        ignore_index, return_entropy, inplace, extras = inputs[6:]
        _, entropy, lse, log_sum_sq, mean_logits, is_top1 = output
        with_sq = bool(extras & LOGPROB_EXTRA_CODES["log_sum_sq_probs"])
        ctx.save_for_backward(
            logits, target, lse, entropy if return_entropy else None, temperatures,
            log_sum_sq if with_sq else None,
        )  # fmt: skip
        ctx.settings = (temperature, logit_scale, softcap, ignore_index, return_entropy, inplace)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(is_top1)
        if not return_entropy:
            ctx.mark_non_differentiable(entropy)
        if not with_sq:
            ctx.mark_non_differentiable(log_sum_sq)
        if not extras & LOGPROB_EXTRA_CODES["mean_logits"]:
            ctx.mark_non_differentiable(mean_logits)

    @first_order_only(OP)
    def backward(ctx, grad_logprobs, grad_entropy, grad_lse, grad_sq, grad_mean, _grad_top1):
        temperature, logit_scale, softcap, ignore_index, return_entropy, inplace = ctx.settings
        if inplace and getattr(ctx, "logits_overwritten", False):  # before unpacking them
            raise RuntimeError(
                f"{OP}: a second backward through a graph made with inplace_backward=True: "
                "the first one already wrote the gradient into `logits`; use "
                "inplace_backward=False to differentiate more than once"
            )
        logits, target, lse, entropy, temperatures, log_sum_sq = ctx.saved_tensors
        grads = (grad_logprobs, grad_entropy, grad_lse, grad_sq, grad_mean)
        if all(g is None for g in grads):
            return (None, *others)
        args = (
            target,
            lse,
            entropy,
            grad_logprobs,
            grad_entropy if return_entropy else None,
            log_sum_sq,
            grad_lse,
            grad_sq if log_sum_sq is not None else None,
            grad_mean,
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


def fake_outputs(inputs: torch.Tensor, return_entropy: bool, extras: int) -> tuple:
    """The six forward outputs' fakes (LOGPROB_OUTPUTS order) for inputs [..., V or H]:
    [...] each in the accumulation dtype (is_top1 bool), or empty when not asked for."""
    lead, dtype = inputs.shape[:-1], acc_dtype(inputs)

    def maybe(wanted, dtype=dtype):
        return inputs.new_empty(lead if wanted else (0,), dtype=dtype)

    return (
        maybe(True),
        maybe(return_entropy),
        maybe(True),
        maybe(extras & LOGPROB_EXTRA_CODES["log_sum_sq_probs"]),
        maybe(extras & LOGPROB_EXTRA_CODES["mean_logits"]),
        maybe(extras & LOGPROB_EXTRA_CODES["is_top1"], torch.bool),
    )


def forward_fake(logits, target, temperature, temperatures, logit_scale, softcap,
                 ignore_index, return_entropy, inplace=False, extras=0):  # fmt: skip
    return fake_outputs(logits, return_entropy, extras)


def backward_fake(logits, target, lse, entropy, grad_logprobs, grad_entropy, *rest):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def backward_inplace_fake(logits, target, lse, entropy, grad_lp, grad_entropy, *rest):
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
