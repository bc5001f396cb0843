"""Models for the trainer: a small built-in GPT with a KV cache, a Hugging Face
adapter with the same interface, value heads and a pooled reward model.

Every causal LM the trainer drives is called as
``lm(input_ids, attention_mask, position_ids, past=None, use_cache=False,
return_logits=True) -> (logits or None, hidden [B, T, H], past or None)`` and
exposes ``hidden_size``. Dropout is off in all of them during RL (the trainer
puts them in eval mode; TinyGPT has none).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rlhf_ext import reference


@dataclass
class GPTConfig:
    """Shape of :class:`TinyGPT`."""

    vocab_size: int
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    max_seq_len: int = 128

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"rlhf_ext.trainer.GPTConfig: `{name}` must be an int >= 1, got {value!r}"
                )
        if self.d_model % self.n_head:  # each head takes d_model / n_head channels
            raise ValueError(
                f"rlhf_ext.trainer.GPTConfig: `d_model` ({self.d_model}) must be a multiple "
                f"of `n_head` ({self.n_head})"
            )


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def attention_bias(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Bool ``[B, 1, new, S]``: causal, real keys only, and always the token itself
    (so a padded query row is never all-masked, which would give NaN)."""
    total = attention_mask.shape[-1]
    device = attention_mask.device
    query_pos = torch.arange(total - new_tokens, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    causal = key_pos <= query_pos
    allowed = causal & (attention_mask.bool()[:, None, :] | (key_pos == query_pos))
    return allowed[:, None]


class _Block(nn.Module):
    """Pre-LayerNorm transformer block whose attention can extend a KV cache."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x, allowed, past):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(self.ln2(x))
        return x, (k, v)


class TinyGPT(nn.Module):
    """A small GPT in pure PyTorch (learned positions, tied LM head, KV cache).

    Used by the offline demo and the tests; any Hugging Face causal LM can take
    its place through :class:`HFCausalLM`.
    """

    def __init__(self, config: GPTConfig) -> None:
        """Build the network for ``config`` with GPT-2 style initialisation."""
        super().__init__()
        self.config = config
        self.hidden_size = config.d_model
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        self.blocks = nn.ModuleList(
            _Block(config.d_model, config.n_head) for _ in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(config.d_model)
        self.gradient_checkpointing = False  # see enable_gradient_checkpointing
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past=None,
        use_cache: bool = False,
        return_logits: bool = True,
    ):
        """Logits ``[B, T, V]`` (or None), hidden states ``[B, T, H]`` and the cache.

        ``attention_mask`` covers the cached tokens and the new ones ``[B, S]``;
        ``position_ids`` the new ones ``[B, T]`` (default: from the mask).
        """
        new = input_ids.shape[1]
        if attention_mask is None:
            past_len = 0 if past is None else past[0][0].shape[2]
            attention_mask = torch.ones(
                input_ids.shape[0], past_len + new, dtype=torch.bool, device=input_ids.device
            )
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)[:, -new:]
        if int(position_ids.max()) >= self.config.max_seq_len:
            raise ValueError(
                f"rlhf_ext.trainer.TinyGPT: position {int(position_ids.max())} is beyond "
                f"`max_seq_len` ({self.config.max_seq_len})"
            )
        x = self.tok_emb(input_ids) + self.pos_emb(position_ids)
        allowed = attention_bias(attention_mask, new)
        cache = []
        # checkpointing drops a block's activations and recomputes them in the backward:
        # only with grad and without a cache (the recomputation would extend it again)
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled() and past is None
        for i, block in enumerate(self.blocks):
            if checkpointed:
                x, kv = checkpoint(block, x, allowed, None, use_reentrant=False)
            else:
                x, kv = block(x, allowed, None if past is None else past[i])
            cache.append(kv)
        hidden = self.ln_f(x)
        logits = F.linear(hidden, self.tok_emb.weight) if return_logits else None
        return logits, hidden, (cache if use_cache else None)


class HFCausalLM(nn.Module):
    """A Hugging Face ``AutoModelForCausalLM`` behind the trainer's LM interface."""

    def __init__(self, model: nn.Module) -> None:
        """Wrap ``model`` (a transformers causal LM)."""
        super().__init__()
        self.model = model
        self.hidden_size = model.config.hidden_size
        # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns)
        parameters = inspect.signature(model.forward).parameters
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        past=None,
        use_cache=False,
        return_logits=True,
    ):
        """Same contract as :meth:`TinyGPT.forward`."""
        if attention_mask is not None and position_ids is None:
            position_ids = default_position_ids(attention_mask)[:, -input_ids.shape[1] :]
        if not return_logits:  # critic: the backbone only, so the LM head gets no gradient
            out = self.model.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,  # (a cache under checkpointing would be extended twice)
            )
            return None, out.last_hidden_state, None
        cache = {} if past is None else {self._cache_name: past}
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=True,
            **cache,
        )
        new_cache = out.get(self._cache_name) if use_cache else None
        return out.logits, out.hidden_states[-1], new_cache


class LMHead(NamedTuple):
    """A causal LM's head as the fused log-prob ops take it: ``logits = softcap *
    tanh((hidden @ weight.T + bias) * logit_scale / softcap)``, or without the tanh when
    ``softcap`` is None (rlhf_ext.linear_token_logprobs' transform)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float = 1.0
    softcap: float | None = None


def lm_head(lm: nn.Module) -> LMHead:
    """The LM head of a TinyGPT or an HFCausalLM: its weight ``[V, H]``, bias ``[V]`` or
    None, and the logit transform its model config declares (:func:`head_transform`);
    checked against the model's own logits by :func:`check_lm_head`."""
    if isinstance(lm, TinyGPT):
        return LMHead(lm.tok_emb.weight, None)  # tied
    head = lm.model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"rlhf_ext.trainer.lm_head: the output embeddings of {type(lm.model).__name__} are "
            f"a {type(head).__name__}, not an nn.Linear"
        )
    return LMHead(head.weight, head.bias, *head_transform(lm.model.config))


def head_transform(config) -> tuple[float, float | None]:
    """(logit_scale, softcap) of a transformers config, as its model applies them after
    the LM head: Gemma 2 / 3's ``final_logit_softcapping``, Cohere's ``logit_scale``
    (a multiplier), Granite's ``logits_scaling`` (a divisor), Falcon-H1's
    ``lm_head_multiplier``. An unset attribute (None, or absent) is the identity."""
    scale = 1.0
    for name, invert in (("logit_scale", False), ("logits_scaling", True),
                         ("lm_head_multiplier", False)):  # fmt: skip
        value = getattr(config, name, None)
        if value is not None:
            scale = scale / float(value) if invert else scale * float(value)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, None if softcap is None else float(softcap)


@torch.no_grad()
def check_lm_head(lm: nn.Module, token_id: int, owner: str) -> None:
    """ValueError (naming ``owner``) unless ``lm``'s logits are its :func:`lm_head` applied
    to the hidden states it returns without logits (what ``fused_lm_head`` computes from):
    one forward of two tokens, in float32, compared to 1e-4 of the logits' scale. A head
    that does more than the transforms :func:`head_transform` reads is refused."""
    device = next(lm.parameters()).device
    ids = torch.full((1, 2), int(token_id), dtype=torch.long, device=device)
    logits, _, _ = lm(ids)
    _, hidden, _ = lm(ids, return_logits=False)
    head = lm_head(lm)
    linear = F.linear(hidden.float(), head.weight.float(),
                      None if head.bias is None else head.bias.float())  # fmt: skip
    recomputed = reference.transformed_logits(
        linear, logit_scale=head.logit_scale, softcap=head.softcap
    )
    scale = float(logits.float().abs().max()) + 1e-6
    if not torch.allclose(recomputed, logits.float(), rtol=1e-4, atol=1e-4 * scale):
        raise ValueError(
            f"{owner}: `fused_lm_head`: {type(getattr(lm, 'model', lm)).__name__}'s logits "
            f"are not its LM head applied to its last hidden state with logit_scale="
            f"{head.logit_scale!r}, softcap={head.softcap!r} (a head that transforms the "
            "logits in another way); set fused_lm_head=False"
        )


def enable_gradient_checkpointing(lm: nn.Module, owner: str) -> None:
    """Recompute each transformer block in the backward instead of keeping its
    activations (TinyGPT: torch.utils.checkpoint per block; transformers:
    ``gradient_checkpointing_enable``, non-reentrant).

    transformers checkpoints a layer only while the layer is in training mode; the
    trainer keeps its models in eval mode (dropout off), so only the checkpointed
    layers' own flag is set, never their children's (dropout stays off)."""
    if isinstance(lm, TinyGPT):
        lm.gradient_checkpointing = True
        return
    model = lm.model
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{owner}: `gradient_checkpointing`: {type(model).__name__} does not support it"
        )
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52 checkpoints in the model's own loop
        raise ValueError(
            f"{owner}: `gradient_checkpointing` needs transformers >= 4.52 "
            "(GradientCheckpointingLayer)"
        ) from None
    # transformers 5.2x renamed it activation_checkpointing_enable (the old name warns)
    non_reentrant = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
    # only the layers: a model that sees its own flag in training mode drops the KV cache
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.training = True  # the flag transformers reads; children stay in eval mode
    if not layers:
        raise ValueError(
            f"{owner}: `gradient_checkpointing`: no layer of {type(model).__name__} took it"
        )


def as_causal_lm(
    model: nn.Module, name: str = "model", owner: str = "rlhf_ext.trainer.as_causal_lm"
) -> nn.Module:
    """The model itself when it speaks the trainer's interface, else a HF adapter.
    A TypeError names ``owner`` (the function) and ``name`` (its argument)."""
    if isinstance(model, TinyGPT | HFCausalLM):
        return model
    if hasattr(model, "config") and hasattr(model.config, "hidden_size"):
        return HFCausalLM(model)
    raise TypeError(
        f"{owner}: `{name}` must be a TinyGPT or a transformers causal LM, "
        f"got {type(model).__name__}"
    )


class ValueHeadModel(nn.Module):
    """A causal LM plus a scalar value head (initialised to zero) on its hidden states.

    With the policy's own backbone this is the shared actor-critic; around a
    separate model it is a critic (``with_logits=False`` skips the LM head, and
    an untied LM head is frozen: it gets no gradient, which DDP would reject).
    """

    def __init__(
        self,
        lm: nn.Module,
        with_logits: bool = True,
        *,
        name: str = "lm",
        owner: str = "rlhf_ext.trainer.ValueHeadModel",
    ) -> None:
        """Put a zero-initialised ``Linear(hidden, 1)`` on ``lm`` (errors name
        ``owner`` and ``name``)."""
        super().__init__()
        self.lm = as_causal_lm(lm, name, owner)
        self.with_logits = with_logits
        if not with_logits:
            _freeze_untied_lm_head(self.lm)
        self.hidden_size = self.lm.hidden_size
        self.value_head = nn.Linear(self.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask=None, position_ids=None, return_hidden=False):
        """``(logits or None, values [B, T] float32)``; with ``return_hidden`` the LM's
        last hidden states ``[B, T, H]`` in place of the logits (none computed)."""
        logits, hidden, _ = self.lm(
            input_ids,
            attention_mask,
            position_ids,
            return_logits=self.with_logits and not return_hidden,
        )
        values = self.value_head(hidden).squeeze(-1).float()
        return (hidden if return_hidden else logits), values


def _freeze_untied_lm_head(lm: nn.Module) -> None:
    """``requires_grad_(False)`` on a transformers model's output embeddings when they
    are not the input embeddings (a tied head is the embedding, which is used)."""
    if not isinstance(lm, HFCausalLM):
        return  # TinyGPT's head is its token embedding
    head = lm.model.get_output_embeddings()
    embeddings = lm.model.get_input_embeddings()
    if head is None or head.weight is getattr(embeddings, "weight", None):
        return
    head.requires_grad_(False)


class PooledRewardModel(nn.Module):
    """A reward model: a causal LM's hidden states, mean-pooled over real tokens,
    then ``Linear(hidden, 1)``. Called as ``rm(input_ids, attention_mask) -> [B]``."""

    def __init__(self, lm: nn.Module) -> None:
        """Put a scalar head on ``lm``'s pooled hidden states."""
        super().__init__()
        self.lm = as_causal_lm(lm, "lm", "rlhf_ext.trainer.PooledRewardModel")
        self.score_head = nn.Linear(self.lm.hidden_size, 1)

    def forward(self, input_ids, attention_mask):
        """One float32 score per row."""
        _, hidden, _ = self.lm(input_ids, attention_mask, return_logits=False)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.score_head(pooled).squeeze(-1).float()


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 3..258) plus pad=0, bos=1, eos=2: a tokenizer for
    the built-in GPT that needs no vocabulary file."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        """BOS followed by the bytes of ``text``."""
        return [self.bos_token_id] + [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of ``ids`` (special tokens dropped)."""
        data = bytes(int(i) - 3 for i in ids if int(i) >= 3)
        return data.decode("utf-8", errors="replace")
