"""PPOConfig: every knob of the PPO trainer, validated with clear errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from rlhf_ext.ops._vocab import (
    AGG_MODES,
    KL_KINDS,
    POLICY_KIND_PARAMS,
    POLICY_KINDS,
    POLICY_ROW_LEVEL_KINDS,
)
from rlhf_ext.trainer.advantages import ADVANTAGE_ESTIMATORS

NAME = "rlhf_ext.trainer.PPOConfig"
KL_PLACEMENTS = ("reward", "loss")
# across processes: replicas (DistributedDataParallel) or FSDP2's sharded parameters
PARALLELISMS = ("ddp", "fsdp")
# below this, logits / temperature overflow float32 and sampling gets NaN probabilities
MIN_TEMPERATURE = 1e-6
BOOL_FIELDS = (
    "whiten_advantages",
    "adaptive_kl",
    "normalize_reward",
    "progress_bar",
    "overwrite",
    "bf16",
    "gradient_checkpointing",
    "fused_lm_head",
)
# where the metrics go besides metrics.jsonl (always written): TRL's `report_to` names
REPORT_TARGETS = ("tensorboard",)
# the policy-loss parameters that are fields of their own; the others go in policy_loss_options
POLICY_LOSS_FIELDS = ("clip_eps", "clip_eps_high", "dual_clip")
# the loss_agg of the row-level kinds (geo_mean): the mean of the row losses, as verl's GMPO
ROW_LEVEL_AGG = "seq-mean-token-sum"


@dataclass
class PPOConfig:
    """Hyper-parameters of :class:`rlhf_ext.trainer.PPOTrainer` (docs/design.md §6).

    Names follow TRL's ``PPOConfig`` / OpenRLHF's flags where one exists. Batch
    sizes are per process (per rank): each rank rolls out ``rollout_batch_size``
    sequences per iteration, splits them into ``rollout_batch_size //
    mini_batch_size`` optimizer steps per PPO epoch, and each mini-batch into
    ``mini_batch_size // micro_batch_size`` gradient-accumulation passes.

    KL: ``kl_placement="reward"`` adds ``-kl_coef * kl_t`` to every token's reward
    (classic RLHF; the score is added at the last real token);
    ``kl_placement="loss"`` adds ``kl_coef * kl_loss(new, ref)`` to the loss (GRPO
    style). The adaptive controller (``adaptive_kl=True``) is fed the batch mean
    of the per-sequence *sum* of per-token k1 KL (TRL's ``objective/kl``).

    Advantages: ``advantage_estimator`` is one of
    :data:`rlhf_ext.trainer.advantages.ADVANTAGE_ESTIMATORS`: "gae" trains a value head
    (or ``value_model``) as the critic; "grpo", "dr_grpo", "rloo", "reinforce_pp" and
    "reinforce_pp_baseline" train no critic. The group estimators compare each row with
    the other ``num_generations - 1`` responses sampled for the same prompt (each
    iteration samples ``rollout_batch_size // num_generations`` prompts).

    Policy loss: ``policy_loss`` is a kind of :func:`rlhf_ext.policy_loss` ("ppo",
    "gspo", "cispo", ...). ``clip_eps``, ``clip_eps_high`` and ``dual_clip`` go to the
    kinds that take them; the other parameters of a kind (``ratio_cap``, ``tau_pos``,
    ``tau_neg``, ``beta``) go in ``policy_loss_options``.
    """

    # optimisation
    learning_rate: float = 1e-5
    value_learning_rate: float | None = None  # None: learning_rate
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    # batching
    total_iterations: int = 100
    rollout_batch_size: int = 64
    mini_batch_size: int = 16
    micro_batch_size: int | None = None  # None: mini_batch_size (no accumulation)
    ppo_epochs: int = 4
    # policy loss
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    policy_loss: str = "ppo"
    policy_loss_options: dict = field(default_factory=dict)
    loss_agg: str = "token-mean"
    entropy_coef: float = 0.0
    # value loss
    vf_coef: float = 0.1
    value_clip: float | None = 0.2
    # advantages
    advantage_estimator: str = "gae"
    num_generations: int = 1  # responses sampled per prompt (a group)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    # KL
    kl_coef: float = 0.05
    adaptive_kl: bool = True
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    kl_kind: str = "k1"
    kl_placement: str = "reward"
    # rewards
    normalize_reward: bool = False
    reward_clip: float | None = None
    missing_eos_penalty: float | None = None
    # sampling
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = 32
    # memory and precision
    bf16: bool = False  # forward passes under bfloat16 autocast (TRL's `bf16`)
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward
    fused_lm_head: bool = False  # log-probs from hidden states + LM head (no [B, T, V] logits)
    # LoRA (needs peft): adapters on the policy only; 0 trains every policy weight
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str | list = "all-linear"
    # processes (under torchrun): "ddp" replicates the trained models, "fsdp" shards their
    # parameters, gradients and optimizer state (FSDP2, fully_shard); one process: no effect
    parallelism: str = "ddp"
    # run
    seed: int = 0
    log_interval: int = 1
    sample_interval: int = 10
    checkpoint_interval: int = 50
    output_dir: str = "runs/ppo"
    max_nonfinite_updates: int = 3  # iterations in a row with a skipped (non-finite) update
    progress_bar: bool = True
    report_to: str | list = field(default_factory=list)  # "tensorboard", a list, or "none"
    overwrite: bool = False  # a fresh run may replace metrics.jsonl / checkpoint.pt in output_dir
    extra: dict = field(default_factory=dict)  # free-form, carried into checkpoints

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise ValueError / TypeError naming the first bad field."""
        self._check_positive_floats()
        self._check_optional_positive()
        self._check_ints()
        self._check_batching()
        self._check_choices()
        self._check_bools()
        if not 0.0 <= self.gamma <= 1.0:
            self._fail("gamma", "a float in [0, 1]", self.gamma)
        if not 0.0 <= self.lam <= 1.0:
            self._fail("lam", "a float in [0, 1]", self.lam)
        if self.kl_coef < 0:
            self._fail("kl_coef", "a float >= 0", self.kl_coef)
        if self.dual_clip is not None and self._number("dual_clip", self.dual_clip) <= 1:
            self._fail("dual_clip", "None or a float > 1", self.dual_clip)
        if self.top_p is not None and not 0.0 < self._number("top_p", self.top_p) <= 1.0:
            self._fail("top_p", "None or a float in (0, 1]", self.top_p)
        self._check_estimator()
        self._check_policy_loss()
        self._check_lora()
        self._check_parallelism()
        self.report_targets  # noqa: B018 (raises on a bad `report_to`)

    def _fail(self, name: str, expected: str, got) -> None:
        raise ValueError(f"{NAME}: `{name}` must be {expected}, got {got!r}")

    def _number(self, name: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{NAME}: `{name}` must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            self._fail(name, "finite", value)
        return value

    def _check_positive_floats(self) -> None:
        for name in ("learning_rate", "adam_eps", "clip_eps", "kl_target", "kl_horizon"):
            if self._number(name, getattr(self, name)) <= 0:
                self._fail(name, "a float > 0", getattr(self, name))
        if self._number("temperature", self.temperature) < MIN_TEMPERATURE:
            self._fail("temperature", f"a float >= {MIN_TEMPERATURE:g}", self.temperature)
        for name in ("weight_decay", "vf_coef", "entropy_coef", "gamma", "lam", "kl_coef"):
            self._number(name, getattr(self, name))

    def _check_optional_positive(self) -> None:
        for name in (
            "value_learning_rate",
            "max_grad_norm",
            "clip_eps_high",
            "value_clip",
            "reward_clip",
        ):
            value = getattr(self, name)
            if value is not None and self._number(name, value) <= 0:
                self._fail(name, "None or a float > 0", value)
        if self.missing_eos_penalty is not None:
            self._number("missing_eos_penalty", self.missing_eos_penalty)

    def _check_ints(self) -> None:
        for name in (
            "total_iterations",
            "rollout_batch_size",
            "mini_batch_size",
            "ppo_epochs",
            "max_new_tokens",
            "log_interval",
            "sample_interval",
            "checkpoint_interval",
            "max_nonfinite_updates",
            "num_generations",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self._fail(name, "an int >= 1", value)
        for name in ("micro_batch_size", "top_k"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                self._fail(name, "None or an int >= 1", value)
            if value is not None and value < 1:
                self._fail(name, "None or an int >= 1", value)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            self._fail("seed", "an int", self.seed)

    def _check_bools(self) -> None:
        # a JSON "false" string is truthy: take true / false only
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                self._fail(name, "a bool (true or false)", getattr(self, name))
        for name in ("extra", "policy_loss_options"):
            if not isinstance(getattr(self, name), dict):
                self._fail(name, "a dict", getattr(self, name))

    def _check_batching(self) -> None:
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(
                f"{NAME}: `rollout_batch_size` ({self.rollout_batch_size}) must be a multiple "
                f"of `mini_batch_size` ({self.mini_batch_size})"
            )
        if self.mini_batch_size % self.micro_batch:
            raise ValueError(
                f"{NAME}: `mini_batch_size` ({self.mini_batch_size}) must be a multiple "
                f"of `micro_batch_size` ({self.micro_batch_size})"
            )

    def _check_choices(self) -> None:
        choices = {
            "loss_agg": AGG_MODES,
            "kl_kind": KL_KINDS,
            "kl_placement": KL_PLACEMENTS,
            "advantage_estimator": tuple(ADVANTAGE_ESTIMATORS),
            "policy_loss": POLICY_KINDS,
            "parallelism": PARALLELISMS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                self._fail(name, f"one of {allowed}", getattr(self, name))

    def _check_estimator(self) -> None:
        estimator = ADVANTAGE_ESTIMATORS[self.advantage_estimator]
        if estimator.grouped and self.num_generations < 2:
            self._fail(
                "num_generations",
                f"an int >= 2 with advantage_estimator={self.advantage_estimator!r} (it "
                "compares each response with the others sampled for its prompt)",
                self.num_generations,
            )
        if self.rollout_batch_size % self.num_generations:
            raise ValueError(
                f"{NAME}: `rollout_batch_size` ({self.rollout_batch_size}) must be a multiple "
                f"of `num_generations` ({self.num_generations})"
            )

    def _check_policy_loss(self) -> None:
        """Parameters the kind does not read are errors; the values are checked by
        running the loss once on one token (the op's own range checks and messages)."""
        takes = POLICY_KIND_PARAMS[self.policy_loss]
        allowed = [name for name in takes if name not in POLICY_LOSS_FIELDS]
        unread = sorted(set(self.policy_loss_options) - set(allowed))
        if unread:
            raise ValueError(
                f"{NAME}: `policy_loss_options` for policy_loss={self.policy_loss!r} may hold "
                f"{allowed} (clip_eps, clip_eps_high and dual_clip are fields of their own), "
                f"got {unread}"
            )
        for name in ("clip_eps_high", "dual_clip"):  # clip_eps has a default: not checked
            if getattr(self, name) is not None and name not in takes:
                self._fail(name, f"None with policy_loss={self.policy_loss!r}", getattr(self, name))
        if self.policy_loss in POLICY_ROW_LEVEL_KINDS and self.loss_agg != ROW_LEVEL_AGG:
            # token-mean would divide the row losses by the token count: not GMPO, and it
            # would reweigh them against the KL and entropy terms
            self._fail(
                "loss_agg",
                f"{ROW_LEVEL_AGG!r} with policy_loss={self.policy_loss!r} (a loss per row: "
                "the mean of the row losses)",
                self.loss_agg,
            )
        import torch

        from rlhf_ext.ops.ppo_losses import policy_loss

        one = torch.zeros(1, 1)
        try:
            policy_loss(one, one, one, kind=self.policy_loss, **self.policy_loss_arguments())
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{NAME}: `policy_loss` / its parameters: {exc}") from None

    def _check_lora(self) -> None:
        rank = self.lora_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            self._fail("lora_rank", "an int >= 0 (0: no LoRA)", rank)
        if self._number("lora_alpha", self.lora_alpha) <= 0:
            self._fail("lora_alpha", "a float > 0", self.lora_alpha)
        if not 0.0 <= self._number("lora_dropout", self.lora_dropout) < 1.0:
            self._fail("lora_dropout", "a float in [0, 1)", self.lora_dropout)
        targets = self.lora_target_modules
        names = [targets] if isinstance(targets, str) else targets
        if not isinstance(names, list | tuple) or not names:
            self._fail("lora_target_modules", '"all-linear" or a list of module names', targets)
        if not all(isinstance(name, str) and name for name in names):
            self._fail("lora_target_modules", '"all-linear" or a list of module names', targets)

    def _check_parallelism(self) -> None:
        if self.parallelism != "fsdp":
            return
        # the fused head reads the LM head's weight outside the model's forward, where FSDP
        # holds only this rank's shard of it; peft's adapters are not sharded here (yet)
        for name, value, why in (("fused_lm_head", self.fused_lm_head, "the LM head's weight "
                                  "is read outside the forward, where FSDP holds a shard"),
                                 ("lora_rank", self.lora_rank, "LoRA adapters are not "
                                  "sharded")):  # fmt: skip
            if value:
                raise ValueError(
                    f'{NAME}: `parallelism="fsdp"` does not take `{name}={value!r}` ({why}); '
                    'use parallelism="ddp" with it'
                )

    @property
    def report_targets(self) -> tuple[str, ...]:
        """``report_to`` as a tuple of :data:`REPORT_TARGETS` names ("none": empty)."""
        value = self.report_to
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            self._fail("report_to", f"a name or a list of names among {REPORT_TARGETS}", value)
        names = [n for n in names if n != "none"]
        unknown = [n for n in names if n not in REPORT_TARGETS]
        if unknown:
            self._fail("report_to", f'"none" or names among {REPORT_TARGETS}', value)
        return tuple(dict.fromkeys(names))

    def policy_loss_arguments(self) -> dict:
        """The keyword arguments of :func:`rlhf_ext.policy_loss` for ``policy_loss``:
        the clip fields the kind takes, plus ``policy_loss_options``."""
        takes = POLICY_KIND_PARAMS[self.policy_loss]
        arguments = {name: getattr(self, name) for name in POLICY_LOSS_FIELDS if name in takes}
        arguments.update(self.policy_loss_options)
        return arguments

    @property
    def needs_critic(self) -> bool:
        """Whether the estimator trains a critic (a value head or ``value_model``)."""
        return ADVANTAGE_ESTIMATORS[self.advantage_estimator].needs_critic

    @property
    def prompts_per_iteration(self) -> int:
        """Prompts sampled per rank per iteration (each gets ``num_generations`` responses)."""
        return self.rollout_batch_size // self.num_generations

    # ------------------------------------------------------------ arithmetic
    @property
    def micro_batch(self) -> int:
        """The micro-batch size in effect (``mini_batch_size`` when unset)."""
        return self.micro_batch_size or self.mini_batch_size

    @property
    def mini_batches_per_epoch(self) -> int:
        """Optimizer steps per PPO epoch."""
        return self.rollout_batch_size // self.mini_batch_size

    @property
    def updates_per_iteration(self) -> int:
        """Optimizer steps per iteration (PPO epochs x mini-batches)."""
        return self.ppo_epochs * self.mini_batches_per_epoch

    def batch_arithmetic(self, world_size: int = 1) -> str:
        """The batch-size arithmetic, printed at the start of a run."""
        accum = self.mini_batch_size // self.micro_batch
        groups = (
            f" ({self.prompts_per_iteration} prompt(s) x {self.num_generations} generations)"
            if self.num_generations > 1
            else ""
        )
        return (
            f"rollout batch {self.rollout_batch_size}{groups} per rank x {world_size} rank(s) = "
            f"{self.rollout_batch_size * world_size} sequences per iteration; "
            f"{self.mini_batches_per_epoch} mini-batch(es) of {self.mini_batch_size} "
            f"({accum} micro-batch(es) of {self.micro_batch}) x {self.ppo_epochs} PPO epoch(s) "
            f"= {self.updates_per_iteration} optimizer step(s) per iteration"
        )

    # ------------------------------------------------------------------- I/O
    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PPOConfig:
        """Build from a dict; an unknown key is an error that names it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{NAME}: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> PPOConfig:
        """Read a JSON file holding the fields (or a ``"ppo"`` section of them)."""
        data = load_config_file(path)
        return cls.from_dict(ppo_section(data.get("ppo", data), path))


def ppo_section(section, path) -> dict:
    """``section`` (a config file's ``ppo`` entry) if it is a dict; else a ValueError."""
    if not isinstance(section, dict):
        raise ValueError(
            f"{NAME}: `ppo` in {os.fspath(path)} must be an object of PPOConfig fields, "
            f"got {type(section).__name__}"
        )
    return section


def load_config_file(path: str | os.PathLike) -> dict:
    """Parse a JSON (``.json``) or TOML (``.toml``, Python 3.11+) config file; its
    top level must be an object (a table). Errors name the file."""
    path = os.fspath(path)
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        else:
            with open(path) as fh:
                data = json.load(fh)
    except ValueError as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(
            f"rlhf_ext.trainer.load_config_file: {path} does not parse: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise ValueError(
            f"rlhf_ext.trainer.load_config_file: {path} must hold an object at the top level, "
            f"got {type(data).__name__}"
        )
    return data
