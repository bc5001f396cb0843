"""Sequence scores: a reward function or a reward model, missing-EOS penalty,
running reward normalisation and clipping."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from rlhf_ext.trainer.rollout import Batch, right_pad

REWARD = "rlhf_ext.trainer.PPOTrainer: `reward_fn_or_model`"


class RunningMoments:
    """Running mean and variance over every score seen (Chan's parallel merge)."""

    def __init__(self) -> None:
        """Start empty."""
        self.count = 0
        self.mean = 0.0
        self.var = 1.0

    def update(self, values: torch.Tensor) -> None:
        """Merge a batch of values into the running moments."""
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean = float(values.mean())
        batch_var = float(values.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        """Population standard deviation (1 before any update)."""
        return self.var**0.5 if self.count else 1.0

    def state_dict(self) -> dict:
        """Moments, for checkpoints."""
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""
        self.count, self.mean, self.var = state["count"], state["mean"], state["var"]


class RewardSource:
    """Scores a rollout with a reward function or a reward model.

    * A function is called as ``fn(prompts, completions)`` with decoded text
      (the tokenizer's ``decode``) and returns one number per row.
    * A module (reward model) is put in eval mode and called with keywords as
      ``rm(input_ids=..., attention_mask=...)`` (positionally when its forward
      does not name them) on each row's query + response tokens, packed
      contiguously and **right-padded** (so a transformers model's default
      positions 0..n-1 are right and its last non-pad token is the sequence's
      last). Its output may be ``[B]``, ``[B, 1]`` or an object with ``.logits``
      (a transformers sequence classifier). With ``reward_tokenizer`` (a reward
      model with its own vocabulary) each row's ids are decoded once as one text
      and that text is encoded with ``reward_tokenizer``.
    """

    def __init__(self, reward, tokenizer, reward_tokenizer=None) -> None:
        """Wrap ``reward`` (callable or nn.Module)."""
        if not callable(reward):
            raise TypeError(
                "rlhf_ext.trainer.PPOTrainer: `reward_fn_or_model` must be a callable or an "
                f"nn.Module, got {type(reward).__name__}"
            )
        if isinstance(reward, nn.Module):
            reward.eval()  # dropout off: a score must not depend on a dropout draw
            self._keywords = _accepts_keywords(reward)
        self.reward = reward
        self.tokenizer = tokenizer
        self.reward_tokenizer = reward_tokenizer

    def texts(self, batch: Batch) -> tuple[list[str], list[str]]:
        """Decoded prompts and completions (EOS and padding dropped)."""
        prompts = [self._decode(q[m]) for q, m in zip(batch.queries, batch.query_mask, strict=True)]
        completions = [
            self._decode(r[m]) for r, m in zip(batch.responses, batch.response_mask, strict=True)
        ]
        return prompts, completions

    def _decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)

    @torch.no_grad()
    def __call__(self, batch: Batch) -> torch.Tensor:
        """Float32 scores ``[B]`` on the batch's device."""
        device = batch.queries.device
        if isinstance(self.reward, nn.Module):
            scores = self._model_scores(batch)
        else:
            scores = self.reward(*self.texts(batch))
        scores = _as_scores(scores, device)
        if scores.numel() != batch.queries.shape[0]:
            raise ValueError(
                f"rlhf_ext.trainer.PPOTrainer: `reward_fn_or_model` gave {scores.numel()} "
                f"scores for {batch.queries.shape[0]} sequences"
            )
        return scores

    def sequences(self, batch: Batch) -> list[list[int]]:
        """Each row's real tokens: its query then its response (padding dropped)."""
        rows = zip(
            batch.queries, batch.query_mask, batch.responses, batch.response_mask, strict=True
        )
        return [torch.cat([q[qm], r[rm]]).tolist() for q, qm, r, rm in rows]

    def _model_scores(self, batch: Batch):
        sequences = self.sequences(batch)
        if self.reward_tokenizer is None:
            pad = self.tokenizer.pad_token_id
        else:
            texts = [self._decode(torch.tensor(ids)) for ids in sequences]
            sequences = [self.reward_tokenizer.encode(text) for text in texts]
            pad = self.reward_tokenizer.pad_token_id
            if pad is None:
                pad = getattr(self.reward_tokenizer, "eos_token_id", None)
        pad = 0 if pad is None else pad
        # eos -1: the mask is each row's length (an EOS inside a row stays visible)
        input_ids, mask, _ = right_pad(sequences, pad, -1, batch.queries.device)
        mask = mask.long()  # 0/1, what every transformers model accepts
        if self._keywords:
            out = self.reward(input_ids=input_ids, attention_mask=mask)
        else:
            out = self.reward(input_ids, mask)
        return out.logits[:, 0] if hasattr(out, "logits") else out


def _as_scores(scores, device) -> torch.Tensor:
    """The reward's output as float32 ``[B]``; None, strings or other non-numbers
    are a TypeError (``torch.as_tensor`` alone gives no context)."""
    if scores is None or isinstance(scores, str | bytes):
        raise TypeError(f"{REWARD}: must return numbers (one per sequence), got {scores!r}")
    try:
        tensor = torch.as_tensor(scores, dtype=torch.float32, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"{REWARD}: must return numbers (one per sequence), got {_preview(scores)}"
        ) from exc
    return tensor.reshape(-1)


def _preview(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _accepts_keywords(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes ``input_ids`` and ``attention_mask`` by name."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return "input_ids" in parameters or "attention_mask" in parameters
    return "input_ids" in parameters and "attention_mask" in parameters


def shape_scores(
    scores: torch.Tensor,
    *,
    has_eos: torch.Tensor,
    missing_eos_penalty: float | None = None,
    moments: RunningMoments | None = None,
    reward_clip: float | None = None,
) -> torch.Tensor:
    """Sequence scores ``[B]`` after, in this order: minus ``missing_eos_penalty``
    where ``has_eos [B]`` is False, ``(s - mean) / std`` with ``moments``, and a
    clamp to ``[-reward_clip, reward_clip]``. A step whose argument is None is
    skipped (with only the penalty given: the input the moments are updated with).
    """
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~has_eos).float()
    if moments is not None:
        scores = (scores - moments.mean) / max(moments.std, 1e-8)
    if reward_clip is not None:
        scores = scores.clamp(-reward_clip, reward_clip)
    return scores
