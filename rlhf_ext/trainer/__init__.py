"""The PPO trainer (docs/design.md §6): ``PPOConfig``, ``PPOTrainer``, the KL controllers,
the built-in GPT and the Hugging Face adapter.

Every log-prob, advantage, KL and loss in it goes through rlhf_ext's own ops.
"""

from rlhf_ext.trainer.config import PPOConfig
from rlhf_ext.trainer.export import (
    Export,
    export_checkpoint,
    export_policy,
    load_export,
    load_weights,
)
from rlhf_ext.trainer.kl_control import AdaptiveKLController, FixedKLController
from rlhf_ext.trainer.model import (
    ByteTokenizer,
    GPTConfig,
    HFCausalLM,
    PooledRewardModel,
    TinyGPT,
    ValueHeadModel,
)
from rlhf_ext.trainer.ppo import NonFiniteLossError, PPOTrainer
from rlhf_ext.trainer.rewards import RunningMoments

__all__ = [
    "AdaptiveKLController",
    "ByteTokenizer",
    "Export",
    "FixedKLController",
    "GPTConfig",
    "HFCausalLM",
    "NonFiniteLossError",
    "PPOConfig",
    "PPOTrainer",
    "PooledRewardModel",
    "RunningMoments",
    "TinyGPT",
    "ValueHeadModel",
    "export_checkpoint",
    "export_policy",
    "load_export",
    "load_weights",
]
