"""Sequence scores: a reward function or a reward model, missing-EOS penalty,
running reward normalisation and clipping."""

from __future__ import annotations

import torch
from torch import nn

from rlhf_ext.trainer.rollout import Batch, right_pad


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
    * A module (reward model) is called as ``rm(input_ids, attention_mask)`` on
      query + response; its output may be ``[B]``, ``[B, 1]`` or an object with
      ``.logits`` (a transformers sequence classifier). With ``reward_tokenizer``
      (a reward model with its own vocabulary) the text is re-encoded first.
    """

    def __init__(self, reward, tokenizer, reward_tokenizer=None) -> None:
        """Wrap ``reward`` (callable or nn.Module)."""
        if not callable(reward):
            raise TypeError(
                "rlhf_ext.trainer.PPOTrainer: `reward_fn_or_model` must be a callable or an "
                f"nn.Module, got {type(reward).__name__}"
            )
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
        scores = torch.as_tensor(scores, dtype=torch.float32, device=device).reshape(-1)
        if scores.numel() != batch.queries.shape[0]:
            raise ValueError(
                f"rlhf_ext.trainer: the reward gave {scores.numel()} scores for "
                f"{batch.queries.shape[0]} sequences"
            )
        return scores

    def _model_scores(self, batch: Batch):
        if self.reward_tokenizer is None:
            out = self.reward(batch.input_ids, batch.attention_mask)
        else:
            prompts, completions = self.texts(batch)
            ids = [
                self.reward_tokenizer.encode(p + c)
                for p, c in zip(prompts, completions, strict=True)
            ]
            pad = self.reward_tokenizer.pad_token_id or 0
            input_ids, mask, _ = right_pad(ids, pad, -1, batch.queries.device)
            out = self.reward(input_ids, mask)
        return out.logits[:, 0] if hasattr(out, "logits") else out


def shape_scores(scores, has_eos, moments: RunningMoments | None, config) -> torch.Tensor:
    """Missing-EOS penalty, then running normalisation, then clipping (in that order)."""
    if config.missing_eos_penalty is not None:
        scores = scores - config.missing_eos_penalty * (~has_eos).float()
    if moments is not None:
        scores = (scores - moments.mean) / max(moments.std, 1e-8)
    if config.reward_clip is not None:
        scores = scores.clamp(-config.reward_clip, config.reward_clip)
    return scores
