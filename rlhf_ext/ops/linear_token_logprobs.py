"""rlhf_ext.linear_token_logprobs: token_logprobs of hidden @ weight.T + bias,
chunk by chunk, never holding the whole logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_ext import reference
from rlhf_ext._backend import compiled_available, resolve_backend
from rlhf_ext.ops._checks import (
    check_ignore_index,
    check_logit_transform,
    check_same_device,
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
from rlhf_ext.ops._vocab import LINEAR_ROW_QUANTUM, LOGPROB_EXTRA_CODES
from rlhf_ext.ops.token_logprobs import (
    check_outputs,
    extras_code,
    fake_outputs,
    select_outputs,
    wants_entropy,
)

OP = "rlhf_ext.linear_token_logprobs"

# Logits held at once when chunk_size=None: a fixed budget on the CPU; on CUDA
# an eighth of the free memory, clamped to [CUDA_MIN_BUDGET, CUDA_MAX_BUDGET]
# (the cap keeps the op's extra memory under 1 GiB at the 152k-vocabulary shapes).
CPU_BUDGET_BYTES = 256 << 20
CUDA_MIN_BUDGET_BYTES = 64 << 20
CUDA_MAX_BUDGET_BYTES = 512 << 20


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    outputs: Sequence[str] | None = None,
    chunk_size: int | None = None,
    validate: bool = True,
    backend: str = "auto",
):
    """Log-probability of each target token from the LM head's input, without the logits.

    ``hidden [..., H]``, ``weight [V, H]`` (the LM head), optional ``bias [V]``
    (all one floating dtype: float32, bfloat16, float16; float64 for gradcheck)
    and ``target [...]`` (int64 or int32). Returns what
    ``token_logprobs(hidden @ weight.T + bias, target, ...)`` returns:
    ``logprobs [...]`` and with ``return_entropy=True`` the pair
    ``(logprobs, entropy)``, float32 (float64 for float64 inputs), exactly 0
    with zero gradient where ``target == ignore_index``. Differentiable w.r.t.
    ``hidden``, ``weight`` and ``bias`` through both outputs.

    ``temperature`` (a float, or a tensor per token ``[...]``, per sequence or 0-d),
    ``logit_scale`` and ``softcap`` are token_logprobs' logit transform, applied to the
    float32 logits of each tile (in the Triton forward, in its GEMM's epilogue):
    ``z = softcap * tanh(logits * logit_scale / softcap) / temperature``, or
    ``logits * logit_scale / temperature`` with ``softcap=None``; the same checks.

    ``outputs``: token_logprobs' (any subset of logprobs, entropy, lse, log_sum_sq_probs,
    mean_logits, is_top1, as a ``LogprobOutputs`` named tuple), from the same tiles: the
    extras cost no extra GEMM, and all but is_top1 are differentiable w.r.t. ``hidden``,
    ``weight`` and ``bias`` through the one tiled backward.

    Only rows whose target is not ``ignore_index`` are computed. They are taken
    ``chunk_size`` rows at a time: one GEMM into a ``[chunk_size, V]`` tile of
    logits, then the fused online-softmax rows of ``token_logprobs``, which
    keep only per-row float32 statistics. The backward recomputes the logits
    in tiles of at most ``chunk_size * V`` elements (split over the vocabulary
    so that one GEMM per vocabulary chunk covers all rows), turns each tile into
    the logit gradient in place, and accumulates ``grad_hidden`` in float32 and
    ``grad_weight`` with the GEMM's float32 accumulation.

    Logits tiles are float32 for bf16/fp16 inputs on CUDA (the forward and the
    backward's recomputation must see the same logits: a confident token's
    gradient 1 - p is smaller than p times one bf16 rounding step of its
    logit); on the CPU they keep the inputs' dtype.

    Extra memory beyond inputs, outputs and gradients: forward, one logits tile
    (``chunk_size * V`` elements, float32 or of the input dtype) plus O(N) per-row
    statistics; backward, the same tile, plus a float32 ``[N_valid, H]``
    grad_hidden accumulator (none for float32 inputs with no ignored token) and
    a copy of the valid hidden rows when some tokens are ignored. The logits
    part does not grow with N.

    ``chunk_size=None`` picks the rows per chunk from a memory budget and V
    (CPU: 256 MiB of logits; CUDA: an eighth of the free memory, between 64 and
    512 MiB), never from N; an explicit ``chunk_size`` is honoured (a GEMM
    has at least 16 rows: a smaller last chunk is padded). On the CPU a row's
    forward result is bitwise the same in any batch for a given chunk size
    (every GEMM has at least 16 rows, so a row alone takes the GEMM path it
    takes in a batch); gradients are deterministic run to run.

    ``validate=True`` checks that every target is in [0, V) or ignore_index
    (one device sync). On CUDA the op syncs once in the forward and once in
    the backward to count the valid rows.

    ``backend``: "auto" (CUDA tensors: "cuda"; CPU tensors: "cpu"), "cpu",
    "cuda" (cuBLAS GEMMs into logits tiles, then the CUDA row kernels of
    token_logprobs), "triton" (forward: one fused kernel, a GEMM whose
    epilogue is the online softmax, so no logits are ever held and
    ``chunk_size`` does not matter; backward: torch GEMMs and the Triton row
    kernels, tile by tile as above; float64 takes the tile loop both ways) or
    "torch" (the reference, which materialises the logits). Batch invariance:
    the CPU path and the Triton forward by construction; the "cuda" forward
    relies on cuBLAS picking the same kernel for a 16-row chunk as for a
    large one, which is not guaranteed.
    """
    _check_inputs(hidden, weight, bias, target)
    transform = check_logit_transform(
        OP, temperature, logit_scale, softcap, hidden, "hidden", validate
    )
    check_ignore_index(OP, ignore_index)
    wanted = check_outputs(OP, outputs, return_entropy)
    chunk_rows = resolve_chunk_size(chunk_size, weight.shape[0], hidden)
    if validate and eager():
        raise_on_bad_target(OP, target, weight.shape[0], ignore_index)
    chosen = resolve_backend(OP, backend, hidden.device)
    if chosen == "torch":
        return reference.linear_token_logprobs(
            hidden,
            weight,
            target,
            bias=bias,
            **reference_transform(transform),
            ignore_index=ignore_index,
            return_entropy=return_entropy,
            outputs=wanted,
        )
    every = _forward_op(chosen)(
        hidden,
        weight,
        bias,
        target,
        *transform,
        ignore_index,
        wants_entropy(wanted, return_entropy),
        chunk_rows,
        extras_code(wanted),
    )
    return select_outputs(every, wanted, return_entropy)


def _check_inputs(hidden, weight, bias, target) -> None:
    check_tensor(OP, "hidden", hidden)
    check_tensor(OP, "weight", weight)
    if hidden.dim() < 1:
        raise ValueError(f"{OP}: `hidden` must have shape [..., H], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(
            f"{OP}: `weight` must have shape [V, H] with V >= 1, got {tuple(weight.shape)}"
        )
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{OP}: `weight` must have shape [V, {hidden.shape[-1]}] (H of `hidden`), "
            f"got {tuple(weight.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(OP, name, t)
        check_same_device(OP, name, t, hidden, "hidden")
        if t.dtype != hidden.dtype:
            raise TypeError(
                f"{OP}: `{name}` must have the dtype of `hidden` ({hidden.dtype}), got {t.dtype}"
            )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{OP}: `bias` must have shape ({weight.shape[0]},) (V of `weight`), "
            f"got {tuple(bias.shape)}"
        )
    check_target(OP, target, hidden, "hidden")


def logits_budget_bytes(device: torch.device) -> int:
    """Bytes of logits that chunk_size=None lets one chunk hold on `device`."""
    if device.type != "cuda":
        return CPU_BUDGET_BYTES
    free, _total = torch.cuda.mem_get_info(device)
    return max(CUDA_MIN_BUDGET_BYTES, min(CUDA_MAX_BUDGET_BYTES, free // 8))


def logits_element_size(hidden: torch.Tensor) -> int:
    """Bytes per logit of a tile: float32 for bf16/fp16 on CUDA (the C++ header's
    float32_logits), else the inputs' dtype."""
    if hidden.device.type == "cuda" and hidden.dtype in (torch.bfloat16, torch.float16):
        return 4
    return hidden.element_size()


def resolve_chunk_size(chunk_size, vocab: int, hidden: torch.Tensor) -> int:
    """Rows per chunk: `chunk_size` itself, or, for None, as many whole multiples of
    16 rows as the logits budget holds at this V (never fewer than 16)."""
    if chunk_size is None:
        if torch.compiler.is_compiling():  # no free-memory query while tracing: the cap,
            budget = CUDA_MAX_BUDGET_BYTES if hidden.device.type == "cuda" else CPU_BUDGET_BYTES
        else:  # which eager mode also picks whenever 4 GiB or more are free
            budget = logits_budget_bytes(hidden.device)
        rows = budget // (vocab * logits_element_size(hidden))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(
            f"{OP}: `chunk_size` must be an int or None, got {type(chunk_size).__name__}"
        )
    elif chunk_size < 1:
        raise ValueError(f"{OP}: `chunk_size` must be an int >= 1, got {chunk_size}")
    else:
        return chunk_size
    return max(LINEAR_ROW_QUANTUM, rows // LINEAR_ROW_QUANTUM * LINEAR_ROW_QUANTUM)


def _forward_op(backend: str):
    """The forward op of a compiled or Triton backend (its backward is registered below)."""
    if backend == "triton":
        return triton_kernels().linear_token_logprobs_fwd_triton
    return torch.ops.rlhf_ext.linear_token_logprobs_fwd


# -- autograd and fake kernels (compiled and Triton ops alike) -------------------


def register_linear_autograd(forward_op, backward_op) -> None:
    """The forward saves the inputs and the per-row log-sum-exp (and the entropy and
    log sum p^2 when computed); the backward recomputes the logits tile by tile. Outputs
    that no gradient reaches arrive as None, so their terms cost nothing. Its kernels have
    no derivative, so a second-order gradient raises (first_order_only)."""
    others = (None,) * (input_count(forward_op) - 3)

    def setup_context(ctx, inputs, output):
        hidden, weight, bias, target, temperature, temperatures, logit_scale, softcap = inputs[:8]
        ignore_index, return_entropy, chunk, extras = inputs[8:]
        _, entropy, lse, log_sum_sq, mean_logits, is_top1 = output
        with_sq = bool(extras & LOGPROB_EXTRA_CODES["log_sum_sq_probs"])
        ctx.save_for_backward(
            hidden, weight, bias, target, lse, entropy if return_entropy else None, temperatures,
            log_sum_sq if with_sq else None,
        )  # fmt: skip
        ctx.settings = (temperature, logit_scale, softcap, ignore_index, return_entropy, chunk)
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
        if all(g is None for g in (grad_logprobs, grad_entropy, grad_lse, grad_sq, grad_mean)):
            return (None, None, None, *others)
        hidden, weight, bias, target, lse, entropy, temperatures, log_sum_sq = ctx.saved_tensors
        temperature, logit_scale, softcap, ignore_index, return_entropy, chunk_rows = ctx.settings
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        inputs = (hidden, weight, bias, target)
        statistics = (
            lse, entropy, grad_logprobs, grad_entropy if return_entropy else None, log_sum_sq,
            grad_lse, grad_sq if log_sum_sq is not None else None, grad_mean,
        )  # fmt: skip
        transform = (temperature, temperatures, logit_scale, softcap)
        settings = (*transform, ignore_index, chunk_rows, need_hidden, need_weight)
        grad_hidden, grad_weight, grad_bias = backward_op(*inputs, *statistics, *settings)
        return (
            grad_hidden if need_hidden else None,
            grad_weight if need_weight else None,
            grad_bias if need_bias else None,
            *others,
        )

    register_backward(forward_op, backward, setup_context)


def forward_fake(hidden, weight, bias, target, temperature, temperatures, logit_scale, softcap,
                 ignore_index, return_entropy, chunk, extras=0):  # fmt: skip
    return fake_outputs(hidden, return_entropy, extras)


def backward_fake(hidden, weight, bias, target, lse, entropy, grad_lp, grad_ent, log_sum_sq,
                  grad_lse, grad_log_sum_sq, grad_mean_logits, temperature, temperatures,
                  logit_scale, softcap, ignore_index, chunk, need_grad_hidden,
                  need_grad_weight):  # fmt: skip
    def fresh(shape, like):
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    return (
        fresh(hidden.shape if need_grad_hidden else (0,), hidden),
        fresh(weight.shape if need_grad_weight else (0,), weight),
        fresh(bias.shape, bias) if bias is not None else fresh((0,), weight),
    )


def _register_triton(kernels) -> None:
    """The Triton pair are custom_ops (their bodies mix torch GEMMs, data-dependent row
    selection and raw kernel launches), so they take the same fake kernels."""
    kernels.linear_token_logprobs_fwd_triton.register_fake(forward_fake)
    kernels.linear_token_logprobs_bwd_triton.register_fake(backward_fake)
    register_linear_autograd(
        kernels.linear_token_logprobs_fwd_triton, kernels.linear_token_logprobs_bwd_triton
    )


register_fakes(
    {"linear_token_logprobs_fwd": forward_fake, "linear_token_logprobs_bwd": backward_fake}
)
if compiled_available():
    register_linear_autograd(
        torch.ops.rlhf_ext.linear_token_logprobs_fwd, torch.ops.rlhf_ext.linear_token_logprobs_bwd
    )

# rlhf_ext.triton.linear_token_logprobs with its fakes and autograd registered,
# imported on first use.
triton_kernels = triton_loader("linear_token_logprobs", _register_triton)
