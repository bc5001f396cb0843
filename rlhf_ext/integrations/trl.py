"""TRL's log-prob, entropy and PPO masked-statistics helpers, backed by rlhf_ext's kernels.

Drop-in for ``trl.trainer.utils.selective_log_softmax`` / ``entropy_from_logits`` and the PPO
trainer's ``masked_mean`` / ``masked_var`` / ``masked_whiten``
(``trl.experimental.ppo.ppo_trainer``, TRL 1.10 - 1.12; TRL 1.13 removed the PPO trainer).
Same names, arguments, defaults, shapes and output dtypes as TRL's; see
docs/integrations.md for the recipe and the known differences.

``grpo_loss`` is TRL 1.16 ``GRPOTrainer._compute_loss``'s policy loss (beta 0) and clip
metrics on ``rlhf_ext.policy_loss``, for a subclass's own ``_compute_loss`` (not a patch
target); ``grpo_global_metrics`` turns its local metrics into TRL's cross-process ones.

Importing this module does not import TRL; ``patch()`` does, and raises ImportError when TRL
is not installed.
"""

from __future__ import annotations

import torch

from rlhf_ext.integrations._common import entropy_from_logits as _entropy_in_dtype
from rlhf_ext.integrations._common import gather_logprobs, masked_whiten
from rlhf_ext.integrations._patch import Patcher, Target, VersionRange
from rlhf_ext.ops.linear_token_logprobs import linear_token_logprobs as _rlhf_linear_logprobs
from rlhf_ext.ops.masked_stats import masked_mean as _rlhf_masked_mean
from rlhf_ext.ops.ppo_losses import policy_loss as _rlhf_policy_loss
from rlhf_ext.ops.token_logprobs import token_logprobs as _rlhf_token_logprobs

PPO_MODULE = "trl.experimental.ppo.ppo_trainer"
PREFIX = "rlhf_ext.integrations.trl"


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """TRL's ``selective_log_softmax``: ``log_softmax(logits / temperature)`` gathered at
    ``index``, without materialising the log-softmax.

    ``index`` has shape ``logits.shape[:-1]`` (one token per position) or
    ``logits.shape[:-1] + (K,)`` (K tokens per position, e.g. top-K). ``temperature`` and
    ``row_mask`` (positions where it is 0 return 0) are TRL >= 1.16's arguments; TRL <= 1.15
    callers pass neither. Output has the dtype of ``logits`` (TRL computes in that dtype;
    here the math runs in float32 and the result is cast). Differentiable w.r.t. ``logits``.
    """
    if temperature <= 0:
        raise ValueError(
            f"rlhf_ext.integrations.trl.selective_log_softmax: `temperature` must be > 0, "
            f"got {temperature!r}"
        )
    if row_mask is not None and index.dim() == logits.dim() - 1:
        index = index.masked_fill(row_mask == 0, -100)  # skipped rows: never read, 0
    logprobs = gather_logprobs(logits, index, float(temperature))
    if row_mask is not None and index.dim() == logits.dim():
        logprobs = logprobs.masked_fill((row_mask == 0).unsqueeze(-1), 0.0)
    return logprobs.to(logits.dtype)


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL 1.16's ``selective_log_softmax_and_entropy``: ``(log-probs, entropy)`` of
    ``softmax(logits / temperature)`` per position, ``index`` of shape ``logits.shape[:-1]``
    (one token per position), from one read of the logits (rlhf_ext.token_logprobs with
    the entropy). Positions where ``row_mask`` is 0 are not read and give 0 for both (TRL
    masks them after computing). With ``entropy_requires_grad=False`` the entropy is
    detached, and the backward reads only the log-probs' terms. Both outputs have the dtype
    of ``logits`` (TRL's path without its CUDA kernel computes in that dtype; here the math
    runs in float32 and the results are cast)."""
    name = f"{PREFIX}.selective_log_softmax_and_entropy"
    if temperature <= 0:
        raise ValueError(f"{name}: `temperature` must be > 0, got {temperature!r}")
    if index.shape != logits.shape[:-1]:
        raise ValueError(
            f"{name}: `index` must have shape {tuple(logits.shape[:-1])} (one token per "
            f"position), got {tuple(index.shape)}"
        )
    if row_mask is not None:
        index = index.masked_fill(row_mask == 0, -100)  # skipped rows: never read, 0
    logprobs, entropy = _rlhf_token_logprobs(
        logits, index, temperature=float(temperature), return_entropy=True
    )
    if not entropy_requires_grad:
        entropy = entropy.detach()
    return logprobs.to(logits.dtype), entropy.to(logits.dtype)


# TRL 1.16's fused LM head outputs (trl/kernels/chunked_logprob.py OPTIONAL_OUTPUTS, after the
# log-probs it always computes), and their names among rlhf_ext's LOGPROB_OUTPUTS.
FUSED_HEAD_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
FUSED_HEAD_DEFAULT_OUTPUTS = FUSED_HEAD_OUTPUTS[1:]
_OUR_OUTPUT = {"log_probs": "logprobs"}


class ChunkedLogProbFunction:
    """TRL 1.16's ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` (the fused LM head
    behind ``add_fused_lm_head``, which GRPO, RLOO, SFT, DPO and KTO call) on
    ``rlhf_ext.linear_token_logprobs``: the same ``apply`` arguments and results.

    ``apply(hidden [N, H], weight [V, H], bias [V] | None, targets [N], temperature,
    chunk_size, final_logit_softcapping=None, logit_scale=1.0, outputs=(entropy,
    log_sum_sq_probs, mean_logits, is_top1))`` returns ``(log_probs, entropy,
    log_sum_sq_probs, mean_logits, is_top1)``, float32 (is_top1 bool), None for an output
    not in ``outputs`` (log_probs always), of ``z = softcap * tanh(x * logit_scale /
    softcap) / temperature`` with ``x = hidden @ weight.T + bias`` in TRL's compute dtype
    (the autocast dtype under autocast, else hidden's). log_probs and entropy are
    differentiable w.r.t. hidden, weight and bias; the other three are not (TRL marks them
    non-differentiable; rlhf_ext's are, through ``linear_token_logprobs`` itself).

    ``chunk_size`` (TRL's vocabulary columns per tile) is accepted and unused: the op picks
    its tiles from a memory budget. A target equal to -100 gives 0 (TRL's caller never passes
    one); a target outside [0, V) otherwise is a ValueError (TRL returns a wrong value).
    ``final_logit_softcapping`` and ``logit_scale`` must be > 0 (TRL would read a softcap of
    0 as 1 and a scale of 0 as all-equal logits).
    """

    @staticmethod
    def apply(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = FUSED_HEAD_DEFAULT_OUTPUTS,
    ):
        name = f"{PREFIX}.ChunkedLogProbFunction"
        unknown = [o for o in outputs if o not in FUSED_HEAD_OUTPUTS]
        if isinstance(outputs, str) or unknown:
            raise ValueError(
                f"{name}: `outputs` must be a tuple of names from {FUSED_HEAD_OUTPUTS}, got "
                f"{outputs!r}"
            )
        if final_logit_softcapping is not None and not final_logit_softcapping > 0:
            raise ValueError(
                f"{name}: `final_logit_softcapping` must be None or > 0, got "
                f"{final_logit_softcapping!r}"
            )
        if not logit_scale > 0:
            raise ValueError(f"{name}: `logit_scale` must be > 0, got {logit_scale!r}")
        device = hidden.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else hidden.dtype
        asked = tuple(
            _OUR_OUTPUT.get(o, o) for o in FUSED_HEAD_OUTPUTS if o == "log_probs" or o in outputs
        )
        with torch.autocast(device, enabled=False):  # the GEMMs in `dtype`, as TRL's
            out = _rlhf_linear_logprobs(
                hidden.to(dtype),
                weight.to(dtype),
                targets,
                bias=None if bias is None else bias.to(dtype),
                temperature=temperature,
                logit_scale=float(logit_scale),
                softcap=None if final_logit_softcapping is None else float(final_logit_softcapping),
                outputs=asked,
            )

        def detached(t):
            return None if t is None else t.detach()

        return (
            out.logprobs,
            out.entropy,
            detached(out.log_sum_sq_probs),
            detached(out.mean_logits),
            out.is_top1,
        )


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TRL's ``entropy_from_logits``: the Shannon entropy (nats) of ``softmax(logits)`` over
    the last dimension, shape ``logits.shape[:-1]``, dtype of ``logits``.

    ``chunk_size`` is accepted for compatibility and must be positive like TRL's; the fused
    kernel streams every row once, so no chunking is needed. Differentiable w.r.t. ``logits``.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(
            "rlhf_ext.integrations.trl.entropy_from_logits: `chunk_size` must be a positive "
            f"int, got {chunk_size!r}"
        )
    return _entropy_in_dtype(logits)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """TRL PPO's ``masked_mean``: ``(values * mask).sum(axis) / mask.sum(axis)``, in the
    dtype of ``values``. A 0/1 mask selects positions. With ``axis=None`` an empty mask raises
    ValueError (TRL returns NaN); along an ``axis`` an empty row gives 0 (TRL: NaN).
    Differentiable w.r.t. ``values``."""
    return _rlhf_masked_mean(values, mask, axis).to(values.dtype)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """TRL PPO's ``masked_var``: the masked mean of squared deviations from the masked mean,
    times ``n / (n - 1)`` when ``unbiased``. Two fused masked means; dtype of ``values``.
    Fewer than one valid element (two when ``unbiased``) raises ValueError (TRL: NaN/inf)."""
    count = int((mask != 0).sum())
    if count < (2 if unbiased else 1):
        raise ValueError(
            f"rlhf_ext.integrations.trl.masked_var: `mask` keeps {count} element(s); at least "
            f"{2 if unbiased else 1} needed{' (unbiased variance)' if unbiased else ''}"
        )
    mean = _rlhf_masked_mean(values, mask)
    variance = _rlhf_masked_mean((values - mean) ** 2, mask)
    if unbiased:
        variance = variance * (count / (count - 1))
    return variance.to(values.dtype)


# -- TRL 1.16 GRPOTrainer._compute_loss's policy loss -----------------------------------------

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo")
# TRL 1.16's other loss_type: its gamma weights need a row-sum prologue rlhf_ext lacks.
GRPO_UNSUPPORTED_LOSS_TYPES = ("vespo",)
GRPO_CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # TRL's clip branch
GRPO_IS_LEVELS = ("token", "sequence")
GRPO_MODES = ("train", "eval")
# The rlhf_ext aggregation of each loss type; the adapter rescales it to TRL's (see grpo_loss).
GRPO_AGGS = {
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "seq-mean-token-sum-norm",
    "cispo": "seq-mean-token-sum-norm",
    "luspo": "seq-mean-token-sum-norm",
}
_CLIP_SUMS = ("clip_ratio/low_sum", "clip_ratio/high_sum", "clip_ratio/region_sum")


def _float_arg(name, arg, value, *, above=None, none_ok=False):
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: `{arg}` must be a float, got {type(value).__name__}")
    if above is not None and not value > above:
        raise ValueError(f"{name}: `{arg}` must be > {above}, got {value!r}")
    return float(value)


def _int_arg(name, arg, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: `{arg}` must be a positive int, got {value!r}")
    return value


def _check_grpo_tensors(name, lp, old, adv, mask, sampling):
    if not isinstance(lp, torch.Tensor) or lp.dim() != 2 or not lp.is_floating_point():
        raise ValueError(f"{name}: `per_token_logps` must be a floating [B, T] tensor")
    shape = tuple(lp.shape)
    for arg, t in (("old_per_token_logps", old), ("sampling_per_token_logps", sampling)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: `{arg}` must have the shape {shape} of `per_token_logps`, "
                             f"got {got}")  # fmt: skip
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name}: `completion_mask` must have the shape {shape} of "
                         f"`per_token_logps`, got {got}")  # fmt: skip
    if not isinstance(adv, torch.Tensor) or tuple(adv.shape) not in ((shape[0],), shape):
        got = tuple(adv.shape) if isinstance(adv, torch.Tensor) else type(adv).__name__
        raise ValueError(f"{name}: `advantages` must have the shape [{shape[0]}] (TRL's) or "
                         f"{shape}, got {got}")  # fmt: skip


def _nan_extreme(x: torch.Tensor, largest: bool) -> torch.Tensor:
    """TRL's ``nanmin`` / ``nanmax`` (trl/trainer/utils.py:1124-1155) without a host sync:
    the min / max of the non-NaN entries, NaN when there is none."""
    if x.numel() == 0:
        return x.new_full((), float("nan"))
    nan = x.isnan()
    fill = float("-inf") if largest else float("inf")
    kept = torch.where(nan, fill, x)
    extreme = kept.amax() if largest else kept.amin()
    return torch.where(nan.all(), float("nan"), extreme)


def _trl_metric_pieces(flag: torch.Tensor, m: torch.Tensor):
    """TRL's ``global_masked_mean`` local (sum, count) and ``masked_seq_mean`` of a flag
    (grpo_trainer.py:3254-3264): per row when the flag is (B, 1), else per token."""
    x = flag.float()
    if x.shape[1] == 1:  # sequence level: one value per sequence, every row counts
        return x.sum(), x.new_tensor(float(x.shape[0])), x.squeeze(1)
    return (x * m).sum(), m.sum(), (x * m).sum(-1) / m.sum(-1)  # empty row: 0/0 = NaN


def _trl_aggregate(per_token, m, loss_type, rows, max_completion_length, normalizer):
    """TRL 1.16's aggregation of a per-token loss (grpo_trainer.py:3153-3182) before the
    division by the gradient-accumulation steps (``normalizer``: dapo / cispo's Z)."""
    per_token = per_token * m
    if loss_type in ("grpo", "sapo"):
        return (per_token.sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return per_token.sum() / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return per_token.sum() / (rows * max_completion_length)
    if loss_type in ("dapo", "cispo"):
        return per_token.sum() / normalizer
    return per_token.sum(-1).mean()  # luspo


def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    max_completion_length: int = 512,
    num_items_in_batch: torch.Tensor | float | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: int | None = None,
    off_policy_mask_threshold: float | None = None,
    sampling_per_token_logps: torch.Tensor | None = None,
    mode: str = "train",
    beta: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict]:
    """TRL 1.16 ``GRPOTrainer._compute_loss``'s policy loss (``beta == 0``, no entropy mask,
    no vLLM IS ratio, no entropy bonus / aux loss) on ``rlhf_ext.policy_loss``, with TRL's
    clip metrics as tensors (no host sync).

    Arguments carry TRL's names: ``epsilon_low`` / ``epsilon_high`` are the trainer's
    (``args.epsilon``, ``args.epsilon_high or args.epsilon``); ``gradient_accumulation_steps``
    is ``self.current_gradient_accumulation_steps``; ``steps_per_generation`` is
    ``args.steps_per_generation`` (None: ``gradient_accumulation_steps``);
    ``num_items_in_batch`` is ``inputs["num_items_in_batch"]`` (required by dapo / cispo);
    ``num_processes`` is ``accelerator.num_processes``; ``mode`` is ``"train"`` when
    ``self.model.training`` else ``"eval"`` (no accumulation scaling). ``old_per_token_logps``
    None means ``per_token_logps.detach()`` (TRL's fallback); ``sampling_per_token_logps``
    (OPSM only) defaults to the old log-probs. ``advantages``: ``[B]`` (TRL's) or ``[B, T]``.

    Mapping (docs/integrations.md): the clipped types on kind "ppo" (``ratio_cap=delta``)
    at token level and "gspo" at sequence level; cispo on kind "cispo" with the band
    ``[0, epsilon_high]`` at token level (``epsilon_high > 1``), else on kind "reinforce"
    with TRL's detached weight folded into the advantages; sapo on kind "sapo" (token level
    only). OPSM's keep-mask and sequence-level ``delta``'s capped rows are folded into the
    advantages (exact: every kind used is 0 with 0 gradient at A = 0). Aggregations are
    rescaled to TRL's with device tensors.

    Returns ``(loss, metrics)``: the micro-batch loss TRL backpropagates, and 0-d tensors:
    ``policy_loss`` (before the accumulation division, as TRL's); for the clipped types
    ``clip_ratio/low_mean``, ``/high_mean``, ``/region_mean`` (local means), ``/low_min``,
    ``/high_max`` (local), the pieces of TRL's cross-process values ``clip_ratio/low_sum``,
    ``/high_sum``, ``/region_sum``, ``/count`` (SUM-reduce, then sum / count.clamp(min=1)),
    ``clip_ratio/low_per_row`` and ``/high_per_row`` (``[B]``, NaN for an empty row at
    token level: gather, then nanmin / nanmax); for cispo ``cispo_clip_ratio`` and its
    ``cispo_clip_ratio/sum`` / ``/count``. ``grpo_global_metrics`` does the reductions.
    """
    name = f"{PREFIX}.grpo_loss"
    if loss_type in GRPO_UNSUPPORTED_LOSS_TYPES:
        raise ValueError(
            f"{name}: `loss_type`={loss_type!r} is not backed by rlhf_ext yet (its gamma "
            f"weights need kernel work); supported: {GRPO_LOSS_TYPES}"
        )
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"{name}: `loss_type` must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    if not isinstance(beta, (int, float)) or beta != 0.0:
        raise ValueError(
            f"{name}: `beta`={beta!r}: the KL term (TRL's bias-corrected, unclamped k3) is not "
            "backed by rlhf_ext yet; only beta == 0 is supported"
        )
    if importance_sampling_level not in GRPO_IS_LEVELS:
        raise ValueError(f"{name}: `importance_sampling_level` must be one of {GRPO_IS_LEVELS}, "
                         f"got {importance_sampling_level!r}")  # fmt: skip
    if mode not in GRPO_MODES:
        raise ValueError(f"{name}: `mode` must be one of {GRPO_MODES}, got {mode!r}")
    sequence = importance_sampling_level == "sequence"
    if sequence and loss_type == "sapo":
        raise ValueError(
            f"{name}: `importance_sampling_level`='sequence' with loss_type='sapo' is not "
            "backed by rlhf_ext yet (kind 'sapo' is token level)"
        )
    eps_low = _float_arg(name, "epsilon_low", epsilon_low)
    eps_high = _float_arg(name, "epsilon_high", epsilon_high, none_ok=True)
    eps_high = eps_low if eps_high is None else eps_high
    uses_delta = delta is not None and loss_type in GRPO_CLIPPED_LOSS_TYPES  # TRL: else unused
    if uses_delta:
        delta = _float_arg(name, "delta", delta, above=0.0)
        if sequence and not delta >= 1.0 + eps_high:
            raise ValueError(
                f"{name}: `delta` must be >= 1 + epsilon_high = {1.0 + eps_high!r} with "
                f"importance_sampling_level='sequence' (kind 'gspo' has no ratio cap; a capped "
                f"row is then constant), got {delta!r}"
            )
    tau_pos = _float_arg(name, "sapo_temperature_pos", sapo_temperature_pos, above=0.0)
    tau_neg = _float_arg(name, "sapo_temperature_neg", sapo_temperature_neg, above=0.0)
    threshold = _float_arg(name, "off_policy_mask_threshold", off_policy_mask_threshold,
                           none_ok=True)  # fmt: skip
    max_completion_length = _int_arg(name, "max_completion_length", max_completion_length)
    num_processes = _int_arg(name, "num_processes", num_processes)
    accumulation = _int_arg(name, "gradient_accumulation_steps", gradient_accumulation_steps)
    steps = accumulation if steps_per_generation is None else steps_per_generation
    steps = _int_arg(name, "steps_per_generation", steps)
    _check_grpo_tensors(name, per_token_logps, old_per_token_logps, advantages,
                        completion_mask, sampling_per_token_logps)  # fmt: skip

    lp = per_token_logps
    old = lp.detach() if old_per_token_logps is None else old_per_token_logps.detach()
    rows = lp.shape[0]
    valid = completion_mask != 0
    acc = torch.float64 if lp.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        m = valid.to(acc)
        adv = advantages.detach().to(acc)
        adv2 = adv.unsqueeze(1) if adv.dim() == 1 else adv  # TRL's (B, 1)
        # TRL's ratio (grpo_trainer.py:3083-3095), unclamped, for the metrics and the caps.
        log_ratio = torch.where(valid, lp.detach().to(acc) - old.to(acc), 0.0)
        if sequence:
            log_ratio = (log_ratio.sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef_1 = torch.exp(log_ratio)
        keep = None
        if threshold is not None:  # get_off_policy_mask, grpo_trainer.py:2945-2968
            sampling = old if sampling_per_token_logps is None else sampling_per_token_logps
            kl = torch.nan_to_num(sampling.detach().to(acc) - lp.detach().to(acc), nan=0.0)
            kl = torch.where(valid, kl, 0.0)
            avg_kl = kl.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)
            keep = ((adv2 >= 0) | (avg_kl <= threshold)).float()
        kernel_adv = adv2 if keep is None else adv2 * keep
        constant = None
        if uses_delta and sequence:  # capped rows: -min(A delta, A (1 + eps_high)), no gradient
            capped = coef_1 > delta
            constant = torch.where(
                capped, -torch.minimum(adv2 * delta, adv2 * (1.0 + eps_high)), 0.0
            )
            constant = constant if keep is None else constant * keep
            kernel_adv = torch.where(capped, 0.0, kernel_adv)
        fold_cispo = loss_type == "cispo" and (sequence or not eps_high > 1.0)
        if fold_cispo:  # TRL's sg(clamp(coef_1, max=epsilon_high)) as an advantage factor
            kernel_adv = kernel_adv * coef_1.clamp(max=eps_high)
        if kernel_adv.shape[1] == 1 and kernel_adv.shape != lp.shape:
            kernel_adv = kernel_adv.squeeze(1)

    params: dict = {}
    if loss_type == "sapo":
        kind, params = "sapo", dict(tau_pos=tau_pos, tau_neg=tau_neg)
    elif fold_cispo:
        kind = "reinforce"
    elif loss_type == "cispo":  # band [1 - 1, 1 + (eps_high - 1)]: TRL's cap, no lower bound
        kind, params = "cispo", dict(clip_eps=1.0, clip_eps_high=eps_high - 1.0)
    elif sequence:
        kind, params = "gspo", dict(clip_eps=eps_low, clip_eps_high=eps_high)
    else:
        cap = delta if uses_delta else None
        kind, params = "ppo", dict(clip_eps=eps_low, clip_eps_high=eps_high, ratio_cap=cap)
    agg = GRPO_AGGS[loss_type]
    factor = None
    if loss_type == "dr_grpo":
        factor = float(max(rows, 1) * max_completion_length)
    elif loss_type in ("dapo", "cispo"):
        factor = 1.0  # the token sum
    elif loss_type == "luspo":
        factor = float(max(rows, 1))
    loss, _ = _rlhf_policy_loss(lp, old, kernel_adv, valid, kind=kind, agg=agg,
                                loss_scale_factor=factor, backend=backend, **params)  # fmt: skip

    normalizer = None
    if loss_type in ("dapo", "cispo"):
        n_items = num_items_in_batch
        if n_items is None:
            raise ValueError(f"{name}: `num_items_in_batch` (inputs['num_items_in_batch']) is "
                             f"required by loss_type={loss_type!r}")  # fmt: skip
        if not isinstance(n_items, torch.Tensor):
            n_items = torch.tensor(float(n_items), device=lp.device)
        normalizer = n_items.detach().to(lp.device).clamp(min=1.0) / num_processes
        if mode == "train":
            normalizer = normalizer * accumulation / steps
        loss = loss / normalizer
    elif loss_type in ("grpo", "sapo"):  # rlhf_ext leaves empty rows out; TRL counts them as 0
        loss = loss * (valid.any(-1).sum() / max(rows, 1))
    if constant is not None:
        loss = loss + _trl_aggregate(constant, m, loss_type, rows, max_completion_length,
                                     normalizer)  # fmt: skip
    metrics = {"policy_loss": loss.detach()}
    if loss_type not in ("dapo", "cispo") and mode == "train":
        loss = loss / accumulation

    with torch.no_grad():
        if loss_type in GRPO_CLIPPED_LOSS_TYPES:  # grpo_trainer.py:3273-3283
            ratio = coef_1.clamp(max=delta) if uses_delta else coef_1
            low = (ratio < 1 - eps_low) & (adv2 < 0)
            high = (ratio > 1 + eps_high) & (adv2 > 0)
            for key, flag in (("low", low), ("high", high), ("region", low | high)):
                total, count, per_row = _trl_metric_pieces(flag, m)
                metrics[f"clip_ratio/{key}_sum"] = total
                metrics["clip_ratio/count"] = count
                metrics[f"clip_ratio/{key}_mean"] = total / count.clamp(min=1.0)
                if key != "region":
                    metrics[f"clip_ratio/{key}_per_row"] = per_row
            metrics["clip_ratio/low_min"] = _nan_extreme(metrics["clip_ratio/low_per_row"], False)
            metrics["clip_ratio/high_max"] = _nan_extreme(metrics["clip_ratio/high_per_row"], True)
        elif loss_type == "cispo":  # grpo_trainer.py:3284-3286: the uncapped coef_1
            total, count, _ = _trl_metric_pieces((coef_1 > eps_high) & (adv2 > 0), m)
            metrics["cispo_clip_ratio/sum"] = total
            metrics["cispo_clip_ratio/count"] = count
            metrics["cispo_clip_ratio"] = total / count.clamp(min=1.0)
    return loss, metrics


def grpo_global_metrics(metrics: dict, accelerator) -> dict:
    """TRL 1.16's logged clip metrics across processes from ``grpo_loss``'s local ones, as
    0-d tensors (call ``.item()`` when logging): one SUM ``accelerator.reduce`` of the
    stacked (sums, count) for the means (TRL's ``global_masked_mean``), and
    ``accelerator.gather`` of the per-row fractions for ``clip_ratio/low_min`` (nanmin) and
    ``clip_ratio/high_max`` (nanmax). ``accelerator`` needs ``reduce(t, reduction="sum")``
    and ``gather(t)``. Keys without cross-process pieces (``policy_loss``) are left out."""
    out = {}
    if "clip_ratio/count" in metrics:
        stacked = torch.stack([metrics[k] for k in _CLIP_SUMS] + [metrics["clip_ratio/count"]])
        totals = accelerator.reduce(stacked, reduction="sum")
        for k, key in enumerate(("low", "high", "region")):
            out[f"clip_ratio/{key}_mean"] = totals[k] / totals[3].clamp(min=1.0)
        low = accelerator.gather(metrics["clip_ratio/low_per_row"])
        out["clip_ratio/low_min"] = _nan_extreme(low, False)
        high = accelerator.gather(metrics["clip_ratio/high_per_row"])
        out["clip_ratio/high_max"] = _nan_extreme(high, True)
    if "cispo_clip_ratio/count" in metrics:
        pair = torch.stack([metrics["cispo_clip_ratio/sum"], metrics["cispo_clip_ratio/count"]])
        totals = accelerator.reduce(pair, reduction="sum")
        out["cispo_clip_ratio"] = totals[0] / totals[1].clamp(min=1.0)
    return out


# CI tests 1.10-1.12 (the PPO-era targets); 1.16's wheel is tested where it is downloaded
SUPPORTED = VersionRange("1.10", "1.17")

_PATCHER = Patcher(
    package="trl",
    supported=SUPPORTED,
    pip_name="trl",
    targets=[
        Target("trl.trainer.utils", "selective_log_softmax", selective_log_softmax),
        Target("trl.trainer.utils", "entropy_from_logits", entropy_from_logits),
        Target(  # TRL >= 1.16
            "trl.trainer.utils",
            "selective_log_softmax_and_entropy",
            selective_log_softmax_and_entropy,
            optional=True,
        ),
        Target(  # TRL >= 1.16: the fused LM head of add_fused_lm_head
            "trl.kernels.chunked_logprob",
            "ChunkedLogProbFunction",
            ChunkedLogProbFunction,
            optional=True,
        ),
        Target(PPO_MODULE, "masked_mean", masked_mean, optional=True),
        Target(PPO_MODULE, "masked_var", masked_var, optional=True),
        Target(PPO_MODULE, "masked_whiten", masked_whiten, optional=True),
    ],
)


def patch(*, allow_untested: bool = False) -> list[str]:
    """Swap this module's functions into the installed TRL: the defining attributes in
    ``trl.trainer.utils`` and the PPO trainer module (when the installed TRL has it), and
    every loaded ``trl.*`` module that imported them by name. Returns the qualified names
    replaced. Idempotent; raises ImportError naming ``trl`` when it is not installed. An
    installed TRL outside :data:`SUPPORTED` is a RuntimeError that names both versions,
    and nothing is patched, unless ``allow_untested=True`` (or
    ``RLHF_EXT_ALLOW_UNTESTED_PEERS=1``): a warning, then the patch."""
    return _PATCHER.patch("rlhf_ext.integrations.trl.patch", allow_untested)


def unpatch() -> list[str]:
    """Restore everything ``patch()`` replaced; returns the qualified names restored."""
    return _PATCHER.unpatch()


def original(qualname: str):
    """TRL's own function named ``qualname`` (e.g. ``"trl.trainer.utils.entropy_from_logits"``),
    patched or not."""
    return _PATCHER.original(qualname)
