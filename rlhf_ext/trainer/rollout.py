"""Rollouts: batching queries, sampling responses with a KV cache, the forward
passes that give per-token log-probs, entropies and values, and the
:class:`Experience` the PPO epochs train on."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

import rlhf_ext


@dataclass
class Batch:
    """Queries (left-padded) and responses (right-padded) of one rollout.

    A response's mask covers its tokens up to and including its first EOS.
    """

    queries: torch.Tensor  # [B, Q] int64, left-padded
    query_mask: torch.Tensor  # [B, Q] bool, the real query tokens
    responses: torch.Tensor  # [B, R] int64, right-padded
    response_mask: torch.Tensor  # [B, R] bool, the tokens up to and including the first EOS
    has_eos: torch.Tensor  # [B] bool, which responses ended with EOS

    @property
    def input_ids(self) -> torch.Tensor:
        """Query and response side by side ``[B, Q + R]``."""
        return torch.cat([self.queries, self.responses], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """Real tokens of :attr:`input_ids`."""
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    def select(self, rows: torch.Tensor | slice) -> Batch:
        """The rows ``rows`` (an index tensor or a slice) of every field."""
        return Batch(*(getattr(self, f.name)[rows] for f in fields(self)))


@dataclass
class Experience:
    """One rollout and what the PPO epochs train on: the :class:`Batch` and the
    per-token statistics of its responses, computed once (no grad) before the
    updates.

    Every per-token tensor is ``[B, R]`` float32, ``R`` the width of
    ``batch.responses``, and 0 outside ``batch.response_mask``, except the
    advantages: whitening shifts every position, masked ones included (TRL's
    semantics; the losses mask them out), and the per-row estimators' advantages
    are ``[B]`` (the losses broadcast them over each row's tokens). Without a critic
    (a critic-free estimator) ``old_values`` and ``returns`` are None.
    """

    batch: Batch
    old_logprobs: torch.Tensor  # [B, R] float32, the sampling policy's (the PPO ratio's base)
    ref_logprobs: torch.Tensor  # [B, R] float32, the frozen reference's
    entropy: torch.Tensor  # [B, R] float32, the sampling policy's (for metrics only)
    old_values: torch.Tensor | None  # [B, R] float32, of the state before each token
    rewards: torch.Tensor  # [B, R] float32, score at the last token (- kl_coef * KL per token)
    advantages: torch.Tensor  # [B, R] or [B] float32, of the config's advantage_estimator
    returns: torch.Tensor | None  # [B, R] float32, GAE returns: the value loss's targets

    def __len__(self) -> int:
        """The number of rows (sequences)."""
        return self.batch.queries.shape[0]

    def select(self, rows: torch.Tensor | slice) -> Experience:
        """The sub-batch of rows ``rows`` (an index tensor on the tensors' device,
        or a slice), for mini- and micro-batches."""
        per_token = {
            f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
            for f in fields(self)
            if f.name != "batch"
        }
        return Experience(batch=self.batch.select(rows), **per_token)


def token_rows(sequences, owner: str, name: str) -> list[torch.Tensor]:
    """Each sequence of token ids as a flat int64 tensor; a bare number, a float, bool or nested
    id (which ``torch.long`` would silently truncate) is a TypeError naming
    ``owner``'s argument ``name`` and the row."""
    rows = []
    for i, seq in enumerate(sequences):
        try:
            row = torch.as_tensor(seq)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"{owner}: `{name}[{i}]` must be a sequence of int token ids, got {seq!r}"
            ) from exc
        integer = not (row.is_floating_point() or row.is_complex() or row.dtype == torch.bool)
        if row.dim() == 0 or (row.numel() and not integer):  # [] is float32 but empty
            raise TypeError(
                f"{owner}: `{name}[{i}]` must be a sequence of int token ids, got {seq!r}"
            )
        rows.append(row.long().flatten())
    return rows


def left_pad(queries: list, pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id sequences as a left-padded ``[B, Q]`` tensor and its bool mask."""
    rows = [torch.as_tensor(q, dtype=torch.long).flatten() for q in queries]
    if any(r.numel() == 0 for r in rows):
        raise ValueError(
            "rlhf_ext.trainer.left_pad: every sequence of `queries` needs at least one token"
        )
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - r.numel() :] = r
        mask[i, width - r.numel() :] = True
    return ids.to(device), mask.to(device)


def right_pad(responses: list, pad_token_id: int, eos_token_id: int, device) -> tuple:
    """Response sequences as ``[B, R]`` ids, mask (up to the first EOS) and has_eos."""
    rows = [torch.as_tensor(r, dtype=torch.long).flatten() for r in responses]
    width = max(1, max(r.numel() for r in rows))
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : r.numel()] = r
    lengths = torch.tensor([r.numel() for r in rows])
    mask, has_eos = response_mask_from_eos(ids, lengths, eos_token_id)
    return ids.to(device), mask.to(device), has_eos.to(device)


def response_mask_from_eos(ids: torch.Tensor, lengths: torch.Tensor, eos_token_id: int):
    """Mask of tokens up to and including the first EOS (within ``lengths``), and
    whether each row has one."""
    positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
    in_length = positions < lengths.to(ids.device)[:, None]
    is_eos = (ids == eos_token_id) & in_length
    eos_seen_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return in_length & ~eos_seen_before, is_eos.any(1)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: excluded tokens get -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p  # keeps the first token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(lm, queries, query_mask, *, config, eos_token_id, pad_token_id, generator) -> Batch:
    """Sample up to ``config.max_new_tokens`` tokens per query with a KV cache.

    The logits are divided by ``config.temperature`` (the same division the
    log-prob passes apply), filtered by top-k / top-p and sampled with
    ``generator``. A row stops at its first EOS; later positions hold pad.
    """
    attention = query_mask.clone()
    logits, _, past = lm(queries, attention, use_cache=True)
    next_logits = logits[:, -1].float()
    finished = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    tokens = []
    for step in range(config.max_new_tokens):
        probs = filter_logits(next_logits / config.temperature, config.top_k, config.top_p)
        probs = probs.softmax(-1)
        token = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1)
        token = torch.where(finished, pad_token_id, token.to(queries.device))
        tokens.append(token)
        finished = finished | (token == eos_token_id)
        if bool(finished.all()) or step == config.max_new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones_like(finished)[:, None]], dim=1)
        logits, _, past = lm(token[:, None], attention, past=past, use_cache=True)
        next_logits = logits[:, -1].float()
    responses = torch.stack(tokens, dim=1)
    lengths = torch.full((responses.shape[0],), responses.shape[1])
    mask, has_eos = response_mask_from_eos(responses, lengths, eos_token_id)
    responses = responses.masked_fill(~mask, pad_token_id)
    return Batch(queries, query_mask, responses, mask, has_eos)


def response_logits(lm_or_model, batch: Batch, value_model=False, hidden=False):
    """Run the full sequence; return the logits that predict each response token
    ``[B, R, V]`` (with ``hidden``: the last hidden states there ``[B, R, H]``, no
    logits computed) and, for a value-head model, the values ``[B, R]`` of the states
    before each response token."""
    q = batch.queries.shape[1]
    r = batch.responses.shape[1]
    if value_model:
        outputs, values = lm_or_model(batch.input_ids, batch.attention_mask, return_hidden=hidden)
        values = values[:, q - 1 : q + r - 1]
    else:
        logits, states, _ = lm_or_model(
            batch.input_ids, batch.attention_mask, return_logits=not hidden
        )
        outputs, values = (states if hidden else logits), None
    outputs = None if outputs is None else outputs[:, q - 1 : q + r - 1]
    return outputs, values


def response_targets(batch: Batch) -> torch.Tensor:
    """The response tokens, -100 (ignored) outside the response mask."""
    return batch.responses.masked_fill(~batch.response_mask, -100)


def response_logprobs(logits, batch: Batch, temperature: float, return_entropy=False):
    """rlhf_ext.token_logprobs of the response tokens (0 at masked positions)."""
    return rlhf_ext.token_logprobs(
        logits, response_targets(batch), temperature=temperature, return_entropy=return_entropy
    )


def response_logprobs_from_hidden(
    hidden, head, batch: Batch, temperature: float, return_entropy=False
):
    """rlhf_ext.linear_token_logprobs of the response tokens from the last hidden states
    ``[B, R, H]`` and ``head`` (model.LMHead: weight ``[V, H]``, bias or None, the logit
    transform): the same values as :func:`response_logprobs` of the model's logits
    without the ``[B, R, V]`` logits. Under autocast the head runs in the autocast dtype,
    as ``F.linear`` would."""
    weight, bias = head.weight, head.bias
    dtype = torch.get_autocast_dtype(hidden.device.type) if _autocasting(hidden) else weight.dtype
    return rlhf_ext.linear_token_logprobs(
        hidden.to(dtype),
        weight.to(dtype),
        response_targets(batch),
        bias=None if bias is None else bias.to(dtype),
        temperature=temperature,
        logit_scale=head.logit_scale,
        softcap=head.softcap,
        return_entropy=return_entropy,
    )


def _autocasting(tensor: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(tensor.device.type)
