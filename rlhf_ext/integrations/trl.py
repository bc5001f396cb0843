"""TRL's log-prob, entropy and PPO masked-statistics helpers, backed by rlhf_ext's kernels.

Drop-in for ``trl.trainer.utils.selective_log_softmax`` / ``entropy_from_logits`` and the PPO
trainer's ``masked_mean`` / ``masked_var`` / ``masked_whiten``
(``trl.experimental.ppo.ppo_trainer``, TRL 1.10 - 1.12; TRL 1.13 removed the PPO trainer).
Same names, arguments, defaults, shapes and output dtypes as TRL's; see
docs/integrations.md for the recipe and the known differences.

Importing this module does not import TRL; ``patch()`` does, and raises ImportError when TRL
is not installed.
"""

from __future__ import annotations

import torch

from rlhf_ext.integrations._common import entropy_from_logits as _entropy_in_dtype
from rlhf_ext.integrations._common import gather_logprobs, masked_whiten
from rlhf_ext.integrations._patch import Patcher, Target
from rlhf_ext.ops.masked_stats import masked_mean as _rlhf_masked_mean

PPO_MODULE = "trl.experimental.ppo.ppo_trainer"


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


_PATCHER = Patcher(
    package="trl",
    pip_name="trl",
    targets=[
        Target("trl.trainer.utils", "selective_log_softmax", selective_log_softmax),
        Target("trl.trainer.utils", "entropy_from_logits", entropy_from_logits),
        Target(PPO_MODULE, "masked_mean", masked_mean, optional=True),
        Target(PPO_MODULE, "masked_var", masked_var, optional=True),
        Target(PPO_MODULE, "masked_whiten", masked_whiten, optional=True),
    ],
)


def patch() -> list[str]:
    """Swap this module's functions into the installed TRL: the defining attributes in
    ``trl.trainer.utils`` and the PPO trainer module (when the installed TRL has it), and
    every loaded ``trl.*`` module that imported them by name. Returns the qualified names
    replaced. Idempotent; raises ImportError naming ``trl`` when it is not installed."""
    return _PATCHER.patch("rlhf_ext.integrations.trl.patch")


def unpatch() -> list[str]:
    """Restore everything ``patch()`` replaced; returns the qualified names restored."""
    return _PATCHER.unpatch()


def original(qualname: str):
    """TRL's own function named ``qualname`` (e.g. ``"trl.trainer.utils.entropy_from_logits"``),
    patched or not."""
    return _PATCHER.original(qualname)
