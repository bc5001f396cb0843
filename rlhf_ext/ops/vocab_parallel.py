"""rlhf_ext.vocab_parallel_token_logprobs and vocab_parallel_linear_token_logprobs: the
log-prob ops on logits (or an LM head) sharded along the vocabulary over a
torch.distributed process group (Megatron-style tensor parallelism).

Each rank runs the single-device op on its shard, with the target made local (a target in
another shard becomes a placeholder whose log-prob is dropped), and asks for the per-row
state that merges exactly: the shard's log-sum-exp ``l_r``, the target's transformed logit
where the shard holds it, and the entropy, log sum p^2 and mean of the shard's softmax as
asked. ONE all_gather of those per-row floats (in the local outputs' dtype) then gives every
rank every shard's state, merged in float64 in rank order:

    L = logsumexp_r l_r,            w_r = exp(l_r - L)      (the shard's share of the mass)
    logprob = z_y - L,              entropy = sum_r w_r (H_r - log w_r)
    log sum p^2 = logsumexp_r (2 log w_r + lsq_r),          mean = sum_r V_r m_r / V

The merge is autograd through O(N) tensors: the other ranks' states are constants, this
rank's are its op's outputs, so the backward is the single-device op's backward on the
local shard (its saved O(N) log-sum-exp, never an [N, V_local] tensor) and needs no
collective for the logits. The linear form all-reduces the hidden states' gradient once
(each rank's weight gradient is local).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import torch
import torch.distributed as dist

from rlhf_ext.ops._checks import check_ignore_index, check_tensor, raise_on_bad_target
from rlhf_ext.ops._vocab import LOGPROB_OUTPUTS
from rlhf_ext.ops.linear_token_logprobs import linear_token_logprobs
from rlhf_ext.ops.token_logprobs import check_outputs, token_logprobs
from rlhf_ext.reference import LogprobOutputs

OP = "rlhf_ext.vocab_parallel_token_logprobs"
LINEAR_OP = "rlhf_ext.vocab_parallel_linear_token_logprobs"
# is_top1 would need every shard's max logit, which the kernels do not return.
SHARDED_OUTPUTS = tuple(name for name in LOGPROB_OUTPUTS if name != "is_top1")
# The validate=True agreement check: one int64 row per rank.
_ROWS, _START, _LOCAL, _TARGET_SUM, _IGNORE, _REFUSED = range(6)


def vocab_parallel_token_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    vocab_start: int,
    process_group=None,
    temperature: float | torch.Tensor = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    outputs: Sequence[str] | None = None,
    validate: bool = True,
    timeout: datetime.timedelta | None = None,
    backend: str = "auto",
):
    """``token_logprobs`` of logits sharded along the vocabulary over ``process_group``.

    This rank holds ``logits [..., V_local]``, the columns ``[vocab_start, vocab_start +
    V_local)`` of the full ``[..., V]`` logits; the shards of the group's ranks, in rank
    order, tile ``[0, V)``. ``target [...]`` holds global ids (or ``ignore_index``), the same
    on every rank. Returns what ``token_logprobs`` of the full logits returns (the same
    ``temperature``, ``logit_scale``, ``softcap``, ``ignore_index``, ``return_entropy`` and
    ``outputs``, except ``"is_top1"``), the same on every rank, within float32 rounding of
    the single-device op.

    Each rank reads its shard once; ONE ``all_gather`` of at most 5 floats per row (the
    shard's log-sum-exp, the target logit where the shard holds it, and the entropy,
    log sum p^2 and mean asked for) merges the states, in rank order, in float64. The
    backward is local: the logits' gradient needs no collective and nothing ``[..., V_local]``
    is saved. Deterministic and batch-invariant as ``token_logprobs``.

    ``validate=True`` first gathers 6 integers per rank and raises ValueError on every rank
    (naming the rank) when the ranks disagree on the number of rows or the targets, when the
    shards do not tile ``[0, V)`` in rank order, when a target is outside ``[0, V)`` and not
    ``ignore_index``, or when a rank refused its own arguments; then it checks what
    ``token_logprobs(validate=True)`` checks. ``validate=False`` makes the one collective only
    (a mismatch is then undefined). ``timeout`` bounds the wait of each collective (a
    RuntimeError naming the op when another rank never joins); None waits for the group's
    own timeout.
    """
    wanted = _check_sharded_outputs(OP, outputs, return_entropy)
    group = _Group(OP, process_group, timeout, logits)
    refusal = _local_refusal(lambda: _check_shard(OP, logits, target, vocab_start, ignore_index))
    _agree(OP, group, logits, target, vocab_start, ignore_index, refusal, validate)
    local_target, owned = _localize(target, vocab_start, logits.shape[-1], ignore_index)
    local = token_logprobs(
        logits,
        local_target,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        ignore_index=ignore_index,
        outputs=_local_outputs(wanted),
        validate=validate,
        backend=backend,
    )
    merged = _merge(group, local, owned, target, logits.shape[-1], ignore_index, wanted)
    return _result(merged, wanted, return_entropy)


def vocab_parallel_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    vocab_start: int,
    process_group=None,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    outputs: Sequence[str] | None = None,
    chunk_size: int | None = None,
    validate: bool = True,
    timeout: datetime.timedelta | None = None,
    backend: str = "auto",
):
    """``linear_token_logprobs`` with the LM head sharded by vocabulary rows.

    ``hidden [..., H]`` is replicated on every rank of ``process_group``; this rank holds
    ``weight [V_local, H]`` (and ``bias [V_local]``), the rows ``[vocab_start, vocab_start +
    V_local)`` of the full head, the shards tiling ``[0, V)`` in rank order. Returns what
    ``linear_token_logprobs`` of the full head returns (``"is_top1"`` excepted), on every
    rank, from the same one all_gather and merge as
    :func:`vocab_parallel_token_logprobs` (whose ``validate`` and ``timeout`` it takes).
    Backward: each rank's weight (and bias) gradient is local; the hidden states' gradient
    is the sum of every rank's part, ONE all_reduce of ``[..., H]`` (only when ``hidden``
    needs a gradient).
    """
    wanted = _check_sharded_outputs(LINEAR_OP, outputs, return_entropy)
    group = _Group(LINEAR_OP, process_group, timeout, hidden)

    def check():
        check_tensor(LINEAR_OP, "hidden", hidden)
        check_tensor(LINEAR_OP, "weight", weight)
        if weight.dim() != 2 or hidden.dim() < 1 or weight.shape[-1] != hidden.shape[-1]:
            raise ValueError(
                f"{LINEAR_OP}: `weight` must be [V_local, H] with the H of `hidden` "
                f"{tuple(hidden.shape)}, got {tuple(weight.shape)}"
            )
        _check_shard(LINEAR_OP, weight.t(), target, vocab_start, ignore_index, "weight", hidden)

    refusal = _local_refusal(check)
    _agree(LINEAR_OP, group, weight.t(), target, vocab_start, ignore_index, refusal, validate,
           rows_like=hidden)  # fmt: skip
    local_target, owned = _localize(target, vocab_start, weight.shape[0], ignore_index)
    if hidden.requires_grad and torch.is_grad_enabled():
        hidden = _SumGradOverRanks.apply(hidden, group)
    local = linear_token_logprobs(
        hidden,
        weight,
        local_target,
        bias=bias,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        ignore_index=ignore_index,
        outputs=_local_outputs(wanted),
        chunk_size=chunk_size,
        validate=validate,
        backend=backend,
    )
    merged = _merge(group, local, owned, target, weight.shape[0], ignore_index, wanted)
    return _result(merged, wanted, return_entropy)


# --- the process group and its collectives -----------------------------------------------


class _Group:
    """The process group of one call, the device its collectives run on (CUDA tensors for
    NCCL, CPU ones for gloo) and the wait bound."""

    def __init__(self, op: str, process_group, timeout, like: torch.Tensor):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"{op}: needs torch.distributed initialised (dist.init_process_group); for "
                "one process, call the single-device op"
            )
        if timeout is not None and not isinstance(timeout, datetime.timedelta):
            raise TypeError(
                f"{op}: `timeout` must be a datetime.timedelta or None, got {timeout!r}"
            )
        self.op = op
        self.group = process_group if process_group is not None else dist.group.WORLD
        if dist.get_rank(self.group) < 0:
            raise ValueError(f"{op}: this rank is not a member of `process_group`")
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.timeout = timeout
        nccl = dist.get_backend(self.group) == "nccl"
        self.device = like.device if nccl else torch.device("cpu")

    def all_gather(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """[size, *tensor.shape]: every rank's ``tensor``, in rank order."""
        sent = tensor.detach().to(self.device).contiguous()
        parts = [torch.empty_like(sent) for _ in range(self.size)]
        work = dist.all_gather(parts, sent, group=self.group, async_op=True)
        self._wait(work, what)
        return torch.stack(parts).to(tensor.device)

    def all_reduce_sum(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        summed = tensor.to(self.device).contiguous()
        work = dist.all_reduce(summed, group=self.group, async_op=True)
        self._wait(work, what)
        return summed.to(tensor.device)

    def _wait(self, work, what: str) -> None:
        try:
            if self.timeout is None:
                work.wait()
            else:
                work.wait(timeout=self.timeout)
        except RuntimeError as error:
            raise RuntimeError(
                f"{self.op}: the {what} over the {self.size} ranks of the group did not "
                f"complete ({error}); another rank did not reach this call (it raised before "
                "it, or called it with another number of rows)"
            ) from error


class _SumGradOverRanks(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group's ranks (the
    replicated hidden states of a vocabulary-sharded head: each rank's gradient is the
    part through its own shard)."""

    @staticmethod
    def forward(ctx, hidden, group):
        ctx.group = group
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        # summed in float32 at least: bf16 parts summed in bf16 would round once per rank
        wide = grad.to(torch.promote_types(grad.dtype, torch.float32))
        summed = ctx.group.all_reduce_sum(wide, "all_reduce of the hidden states' gradient")
        return summed.to(grad.dtype), None


# --- arguments, agreement, the local target ----------------------------------------------


def _check_sharded_outputs(op: str, outputs, return_entropy: bool):
    wanted = check_outputs(op, outputs, return_entropy)
    if wanted is not None and "is_top1" in wanted:
        raise ValueError(
            f'{op}: `outputs` "is_top1" is not computed on sharded logits (it needs every '
            f"shard's max logit, which the kernels do not return); the sharded outputs are "
            f"{SHARDED_OUTPUTS}"
        )
    return wanted


def _check_shard(op, logits, target, vocab_start, ignore_index, name="logits", rows_like=None):
    """This rank's own arguments (the agreement check tells every rank if one fails)."""
    rows_like = logits if rows_like is None else rows_like
    if name == "logits":
        check_tensor(op, "logits", logits)
        if logits.dim() < 1 or logits.shape[-1] < 1:
            raise ValueError(
                f"{op}: `logits` must have shape [..., V_local] with V_local >= 1, got "
                f"{tuple(logits.shape)}"
            )
    elif logits.shape[-1] < 1:
        raise ValueError(f"{op}: `{name}` must hold at least one vocabulary row")
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: `target` must be an int64 or int32 tensor, got {target!r:.80}")
    rows_shape = rows_like.shape[:-1]
    if target.shape != rows_shape:
        raise ValueError(
            f"{op}: `target` must have shape {tuple(rows_shape)} (the rows of "
            f"`{'logits' if rows_like is logits else 'hidden'}`), got {tuple(target.shape)}"
        )
    if target.device != rows_like.device:
        raise ValueError(f"{op}: `target` is on {target.device}, the rows on {rows_like.device}")
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"{op}: `vocab_start` must be an int >= 0, got {vocab_start!r}")
    check_ignore_index(op, ignore_index)


def _local_refusal(check) -> Exception | None:
    """This rank's argument error, or None. Raised after the agreement check, so that
    every rank learns of it instead of waiting for this one."""
    try:
        check()
    except (TypeError, ValueError) as error:
        return error
    return None


def _agree(op, group, logits, target, vocab_start, ignore_index, refusal, validate,
           rows_like=None):  # fmt: skip
    """validate=True: one all_gather of 6 integers per rank, then the same ValueError on
    every rank where the ranks disagree (or one refused its arguments)."""
    if not validate:
        if refusal is not None:
            raise refusal
        return
    rows_like = logits if rows_like is None else rows_like
    mine = torch.zeros(6, dtype=torch.int64)
    if refusal is None:
        mine[_ROWS] = rows_like.shape[:-1].numel()
        mine[_START], mine[_LOCAL] = vocab_start, logits.shape[-1]
        mine[_TARGET_SUM] = int(target.long().sum())  # one sync (validate only)
        mine[_IGNORE] = ignore_index
    mine[_REFUSED] = refusal is not None
    every = group.all_gather(mine, "agreement check (validate=True)").tolist()
    if refusal is not None:
        raise refusal
    refused = [rank for rank, row in enumerate(every) if row[_REFUSED]]
    if refused:
        raise ValueError(f"{op}: rank {refused[0]} refused its arguments (its error says why)")
    _raise_on_disagreement(op, every, group.rank)
    # the vocabulary of all the shards
    raise_on_bad_target(op, target, sum(row[_LOCAL] for row in every), ignore_index)


def _raise_on_disagreement(op: str, every: list[list[int]], rank: int) -> None:
    for field, name in ((_ROWS, "the number of rows"), (_TARGET_SUM, "`target`"),
                        (_IGNORE, "`ignore_index`")):  # fmt: skip
        values = [row[field] for row in every]
        if len(set(values)) > 1:
            other = next(r for r, value in enumerate(values) if value != values[rank])
            shown = f" ({values})" if field == _ROWS else ""
            raise ValueError(
                f"{op}: the ranks disagree on {name}{shown}: rank {rank} and rank {other} "
                "differ; every rank must pass the same rows and targets"
            )
    end = 0
    for r, row in enumerate(every):
        if row[_START] != end:
            raise ValueError(
                f"{op}: rank {r}'s shard starts at vocab_start={row[_START]} where rank "
                f"{r - 1}'s ends at {end} (shards [vocab_start, vocab_start + V_local) must "
                "tile [0, V) in rank order)"
                if r
                else f"{op}: rank 0's shard must start at vocab_start=0, got {row[_START]}"
            )
        end = row[_START] + row[_LOCAL]


def _localize(target, vocab_start, vocab_local, ignore_index):
    """(the local op's target, whether this shard holds the row's target): a target in
    another shard becomes id 0 of this one (its row's softmax state is needed, its log-prob
    is dropped); ignored rows stay ignored."""
    local = target.long() - vocab_start
    owned = (local >= 0) & (local < vocab_local) & (target != ignore_index)
    placeholder = torch.where(target == ignore_index, ignore_index, 0)
    return torch.where(owned, local, placeholder), owned


def _asked(wanted: tuple[str, ...] | None) -> tuple[str, ...]:
    return ("logprobs", "entropy") if wanted is None else wanted


def _local_outputs(wanted: tuple[str, ...] | None) -> tuple[str, ...]:
    """The local op's outputs: the log-probs (the kernels compute them anyway), the
    log-sum-exp (the merge's weights), and the entropy, log sum p^2 and mean asked for."""
    extras = ("entropy", "log_sum_sq_probs", "mean_logits")
    return ("logprobs", "lse") + tuple(name for name in extras if name in _asked(wanted))


# --- the merge -------------------------------------------------------------------------


def _merge(group, local, owned, target, vocab_local, ignore_index, wanted):
    """Every output asked for of the full logits, from this rank's local outputs and the
    others': ONE all_gather of [k, N + 1] per rank, k <= 5 per-row states (the target's
    logit where this shard holds it and 0 elsewhere, when the log-probs are asked for; the
    log-sum-exp; the entropy, log sum p^2 and mean asked for) and this shard's width, for
    the mean over the whole vocabulary. Returns a dict name -> tensor in the local outputs'
    dtype, shaped as ``target``."""
    asked = _asked(wanted)
    wire = {"lse": local.lse}
    if "logprobs" in asked:
        wire["target_logit"] = torch.where(owned, local.logprobs + local.lse, 0.0)
    for name in _local_outputs(wanted)[2:]:
        wire[name] = getattr(local, name)
    flat = torch.stack([row.reshape(-1) for row in wire.values()])
    # exact: V_local < 2^24 (float32's integers)
    sent = torch.cat([flat, flat.new_full((len(wire), 1), float(vocab_local))], dim=1)
    gathered = group.all_gather(sent, "all_gather of the per-row states")
    # this rank's slot is its own live state (the gradient flows through it)
    slots = [sent if r == group.rank else gathered[r] for r in range(group.size)]
    states = torch.stack(slots).double()  # [ranks, k, N + 1], merged in float64
    state = {name: states[:, i, :-1] for i, name in enumerate(wire)}  # each [ranks, N]
    widths = states[:, 0, -1]
    total = torch.logsumexp(state["lse"], dim=0)
    log_w = state["lse"] - total
    held = state["lse"] > float("-inf")  # a shard whose row is all -inf: no mass, NaN stats
    out = {"lse": total}
    if "target_logit" in state:
        out["logprobs"] = state["target_logit"].sum(0) - total
    if "entropy" in state:
        out["entropy"] = torch.where(held, log_w.exp() * (state["entropy"] - log_w), 0.0).sum(0)
    if "log_sum_sq_probs" in state:
        terms = torch.where(held, 2 * log_w + state["log_sum_sq_probs"], -torch.inf)
        out["log_sum_sq_probs"] = torch.logsumexp(terms, dim=0)
    if "mean_logits" in state:
        out["mean_logits"] = (widths[:, None] * state["mean_logits"]).sum(0) / widths.sum()
    flat_target = target.reshape(-1)
    ignored = flat_target == ignore_index
    # validate=False: a target in no shard gives NaN for its row, as token_logprobs' does
    stray = ~ignored & ((flat_target < 0) | (flat_target >= widths.sum()))
    shape, dtype = target.shape, local.lse.dtype
    return {name: torch.where(ignored, 0.0, torch.where(stray, torch.nan, value))
            .to(dtype).reshape(shape) for name, value in out.items() if name in asked}  # fmt: skip


def _result(merged: dict, wanted, return_entropy: bool):
    if wanted is not None:
        return LogprobOutputs(**{name: merged[name] for name in wanted})
    if return_entropy:
        return merged["logprobs"], merged["entropy"]
    return merged["logprobs"]
