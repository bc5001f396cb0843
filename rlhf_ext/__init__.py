"""rlhf_ext: fused C++ / CUDA / Triton kernels for RLHF and PPO training.

The public API (docs/design.md §3). Every op takes ``backend="auto"``; see
``available_backends()`` for what this install can run.
"""

from rlhf_ext._backend import BackendUnavailableError, available_backends, build_info
from rlhf_ext._version import __version__
from rlhf_ext.ops.gae import gae
from rlhf_ext.ops.group_advantages import group_advantages
from rlhf_ext.ops.kl_shaped_rewards import kl_shaped_rewards
from rlhf_ext.ops.linear_token_logprobs import linear_token_logprobs
from rlhf_ext.ops.masked_stats import masked_mean, masked_whiten
from rlhf_ext.ops.ppo_losses import kl_loss, kl_penalty, policy_loss, ppo_policy_loss, value_loss
from rlhf_ext.ops.token_logprobs import token_logprobs
from rlhf_ext.ops.vocab_parallel import (
    vocab_parallel_linear_token_logprobs,
    vocab_parallel_token_logprobs,
)

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "available_backends",
    "build_info",
    "gae",
    "group_advantages",
    "kl_loss",
    "kl_penalty",
    "kl_shaped_rewards",
    "linear_token_logprobs",
    "masked_mean",
    "masked_whiten",
    "policy_loss",
    "ppo_policy_loss",
    "token_logprobs",
    "value_loss",
    "vocab_parallel_linear_token_logprobs",
    "vocab_parallel_token_logprobs",
]
