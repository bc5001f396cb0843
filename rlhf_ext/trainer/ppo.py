"""PPOTrainer: rollouts, reward shaping, advantages (GAE with a critic, or GRPO-style
critic-free estimators), policy-loss updates, KL control, checkpoints, metrics. Every
log-prob, advantage, KL and loss is an rlhf_ext op."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import sys
import time
from contextlib import contextmanager

import torch
from torch import nn

import rlhf_ext
from rlhf_ext.trainer import distributed as dist
from rlhf_ext.trainer.advantages import estimate_advantages
from rlhf_ext.trainer.checkpoint import (
    CHECKPOINT_FILE,
    load_trainer_checkpoint,
    remove_stale_temporaries,
    save_trainer_checkpoint,
    trainer_state,
)
from rlhf_ext.trainer.config import PPOConfig
from rlhf_ext.trainer.export import export_policy
from rlhf_ext.trainer.kl_control import build_kl_controller
from rlhf_ext.trainer.lora import apply_lora
from rlhf_ext.trainer.metrics import MetricsWriter, ProgressBar, format_sample_table, plot_metrics
from rlhf_ext.trainer.model import (
    ValueHeadModel,
    as_causal_lm,
    check_lm_head,
    enable_gradient_checkpointing,
    lm_head,
)
from rlhf_ext.trainer.rewards import RewardSource, RunningMoments, shape_scores
from rlhf_ext.trainer.rollout import (
    Batch,
    Experience,
    generate,
    left_pad,
    response_logits,
    response_logprobs,
    response_logprobs_from_hidden,
    right_pad,
    token_rows,
)

NAME = "rlhf_ext.trainer.PPOTrainer"


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite_updates`` iterations in a row that each had a
    skipped (non-finite) update."""


class PPOTrainer:
    """PPO for language models (Ziegler et al. 2019; TRL / OpenRLHF semantics), and its
    critic-free relatives (GRPO, Dr.GRPO, RLOO, REINFORCE++: ``advantage_estimator``).

    Args:
        config: a :class:`PPOConfig`.
        policy: a :class:`TinyGPT` or a transformers causal LM (trained).
        ref_policy: the frozen reference (None: a frozen copy of ``policy``).
        reward_fn_or_model: ``fn(prompts, completions) -> scores`` on decoded
            text, or a reward model ``rm(input_ids=, attention_mask=) -> [B]``
            (eval mode; right-padded query + response rows, see RewardSource).
        tokenizer: ``pad_token_id``, ``eos_token_id``, ``encode``, ``decode``
            (a transformers tokenizer or :class:`ByteTokenizer`). pad may equal
            eos: masks come from lengths and the first EOS, never from pad ids.
        value_model: None for a value head on the policy's backbone, or a
            separate causal LM that becomes the critic. A critic-free
            ``advantage_estimator`` trains no critic: ``value_model`` must be None.
        reward_tokenizer: the reward model's own tokenizer, when it differs.
        metrics_fn: optional ``fn(prompts, completions) -> dict`` of extra
            per-iteration metrics (the demo's hidden-rule score).
        log: where text logs go (default: stdout on rank 0).

    Use :meth:`train` for the whole loop, or :meth:`step` with your own
    ``(queries, responses, scores)``. Construction seeds torch's global RNG and
    the trainer's sampling generator with ``config.seed + rank``.
    """

    def __init__(
        self,
        config: PPOConfig,
        policy: nn.Module,
        ref_policy: nn.Module | None,
        reward_fn_or_model,
        tokenizer,
        value_model: nn.Module | None = None,
        *,
        reward_tokenizer=None,
        metrics_fn=None,
        log=None,
    ) -> None:
        if not isinstance(config, PPOConfig):
            raise TypeError(f"{NAME}: `config` must be a PPOConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.rank, self.world_size = dist.rank(), dist.world_size()
        torch.manual_seed(config.seed + self.rank)
        self.generator = torch.Generator().manual_seed(config.seed + self.rank)
        self.eos_token_id, self.pad_token_id = _special_tokens(tokenizer)
        self.tokenizer = tokenizer
        self._build_models(policy, ref_policy, value_model)
        self.reward = RewardSource(reward_fn_or_model, tokenizer, reward_tokenizer)
        self.metrics_fn = metrics_fn
        self.optimizer = self._build_optimizer()
        self.kl_controller = build_kl_controller(config)
        self.reward_moments = RunningMoments() if config.normalize_reward else None
        self.iteration = 0
        self.episodes = 0  # sequences trained on, over all ranks
        self.nonfinite_in_row = 0  # iterations in a row with a skipped update
        self._skipped_this_iteration = 0
        self._log_synced = False  # metrics.jsonl cut back to self.iteration yet?
        self._owns_output_dir = False  # checked that writing there destroys nothing?
        self.writer = (
            MetricsWriter(config.output_dir, report_to=config.report_targets)
            if self.rank == 0
            else None
        )
        self._log_stream = log if log is not None else sys.stdout
        self._stop_signal = None
        self._bar = None  # the progress bar while train() runs
        self.outputs: dict = {}  # what the last train() wrote, see _report_outputs
        if self.rank == 0:  # a checkpoint write killed mid-way leaves its temporary behind
            for path in remove_stale_temporaries(config.output_dir):
                self.log(f"{NAME}: removed a stale checkpoint temporary {path}")

    # ----------------------------------------------------------- building
    def _build_models(self, policy, ref_policy, value_model) -> None:
        self.device = next(policy.parameters()).device
        if ref_policy is policy:  # freezing the reference would freeze the policy
            raise ValueError(
                f"{NAME}: `ref_policy` is `policy` itself; pass None (a frozen copy is made) "
                "or a separate model"
            )
        if not any(p.requires_grad for p in policy.parameters()):
            raise ValueError(
                f"{NAME}: `policy` has no parameter that requires grad (a frozen copy of a "
                "reference? call .requires_grad_(True) on it)"
            )
        self._check_bf16()
        # LoRA adapters go into the policy's own modules; with no ref_policy the reference
        # is the policy with its adapters switched off (no copy of the weights)
        self.peft_model = apply_lora(policy, self.config, NAME) if self.config.lora_rank else None
        if self.peft_model is not None:
            policy = self.peft_model.get_base_model()
        if not self.config.needs_critic:
            if value_model is not None:
                raise ValueError(
                    f"{NAME}: `value_model` must be None with advantage_estimator="
                    f"{self.config.advantage_estimator!r}, which trains no critic"
                )
            self.model = as_causal_lm(policy, "policy", NAME)
            self.policy_lm, self.critic = self.model, None
        elif value_model is None:
            self.model = ValueHeadModel(policy, name="policy", owner=NAME).to(self.device)
            self.policy_lm, self.critic = self.model.lm, None
        else:
            self.model = as_causal_lm(policy, "policy", NAME)
            self.policy_lm = self.model
            self.critic = ValueHeadModel(
                value_model, with_logits=False, name="value_model", owner=NAME
            ).to(self.device)
        self.ref_is_policy_without_adapters = ref_policy is None and self.peft_model is not None
        if self.ref_is_policy_without_adapters:
            self.ref_lm = self.policy_lm
        else:
            ref = ref_policy if ref_policy is not None else copy.deepcopy(self.policy_lm)
            self.ref_lm = (
                as_causal_lm(ref, "ref_policy", NAME).to(self.device).eval().requires_grad_(False)
            )
        for module in (self.model, self.critic):
            if module is not None:
                module.eval()  # dropout off during RL, also while training
        self._prepare_memory_features()
        self.train_model = _distribute(self.model, self.config.parallelism)
        self.train_critic = (
            _distribute(self.critic, self.config.parallelism) if self.critic is not None else None
        )

    def _check_bf16(self) -> None:
        if not self.config.bf16 or self.device.type != "cuda":
            return
        if not torch.cuda.is_bf16_supported():
            raise ValueError(f"{NAME}: `bf16`: this GPU ({self.device}) has no bfloat16 support")

    def _prepare_memory_features(self) -> None:
        """Gradient checkpointing on the trained LMs; the fused LM head's check that each
        LM's logits are its head applied to its hidden states."""
        cfg = self.config
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.policy_lm, NAME)
            if self.critic is not None:
                enable_gradient_checkpointing(self.critic.lm, NAME)
        if cfg.fused_lm_head:
            for lm in {id(lm): lm for lm in (self.policy_lm, self.ref_lm)}.values():
                check_lm_head(lm, self.eos_token_id, NAME)

    def autocast(self):
        """The context the forward passes run in: bfloat16 autocast with ``bf16``."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _reference_context(self):
        """What the reference's forward runs in: the policy's adapters off when the
        reference is the LoRA policy's base weights."""
        if self.ref_is_policy_without_adapters:
            return self.peft_model.disable_adapter()
        return contextlib.nullcontext()

    def _value_parameters(self) -> list[nn.Parameter]:
        """The critic's trained parameters (none without a critic: the optimizer's value
        group is then empty, so checkpoints keep one layout)."""
        if not self.config.needs_critic:
            return []
        if self.critic is not None:  # without a frozen (untied, unused) LM head
            return [p for p in self.critic.parameters() if p.requires_grad]
        return list(self.model.value_head.parameters())

    def _build_optimizer(self) -> torch.optim.Optimizer:
        value_params = self._value_parameters()
        value_ids = {id(p) for p in value_params}
        # trained weights only: a LoRA policy's frozen base gets no optimizer state
        policy_params = [
            p for p in self.model.parameters() if id(p) not in value_ids and p.requires_grad
        ]
        cfg = self.config
        groups = [
            {"params": policy_params, "lr": cfg.learning_rate},
            {"params": value_params, "lr": cfg.value_learning_rate or cfg.learning_rate},
        ]
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)

    def all_parameters(self) -> list[nn.Parameter]:
        """Every trained parameter (policy, value head or critic)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # ----------------------------------------------------------- rollouts
    def encode_prompts(self, prompts) -> list:
        """Token ids of each prompt (strings are encoded with the tokenizer)."""
        encoded = [self.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        return self._token_rows(encoded, "train", "prompts")

    def _token_rows(self, sequences, method: str, name: str) -> list[torch.Tensor]:
        """``sequences`` as int64 rows, each id checked against the policy's vocabulary
        (an embedding lookup would fail with a bare IndexError)."""
        rows = token_rows(sequences, f"{NAME}.{method}", name)
        vocab = _vocab_size(self.policy_lm)
        for i, row in enumerate(rows):
            bad = row[(row < 0) | (row >= vocab)] if vocab is not None else row[row < 0]
            if bad.numel():
                raise ValueError(
                    f"{NAME}.{method}: `{name}[{i}]` holds token id {int(bad[0])}, outside "
                    f"the policy's vocabulary [0, {vocab})"
                )
        return rows

    def generate(self, queries) -> Batch:
        """Sample responses for ``queries`` (token-id sequences) with the KV cache."""
        ids, mask = left_pad(queries, self.pad_token_id, self.device)
        with self.autocast(), dist.gathered(self.model):
            return generate(
                self.policy_lm,
                ids,
                mask,
                config=self.config,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                generator=self.generator,
            )

    def score(self, batch: Batch) -> torch.Tensor:
        """Raw scores of a rollout from the reward function or model."""
        return self.reward(batch)

    # --------------------------------------------------------------- step
    def step(self, queries, responses, scores) -> dict:
        """One PPO iteration on given ``queries``, ``responses`` (token-id
        sequences; a response ends at its first EOS) and ``scores [B]``. Like an
        iteration of :meth:`train` it advances :attr:`iteration` and appends to
        ``metrics.jsonl``. Returns the iteration's metrics. With a group estimator,
        each ``num_generations`` consecutive rows are the responses to one prompt."""
        queries = self._token_rows(queries, "step", "queries")
        responses = self._token_rows(responses, "step", "responses")
        query_ids, query_mask = left_pad(queries, self.pad_token_id, self.device)
        response_ids, response_mask, has_eos = right_pad(
            responses, self.pad_token_id, self.eos_token_id, self.device
        )
        batch = Batch(query_ids, query_mask, response_ids, response_mask, has_eos)
        if query_ids.shape[0] % self.config.num_generations:
            raise ValueError(
                f"{NAME}.step: the number of queries ({query_ids.shape[0]}) must be a multiple "
                f"of `num_generations` ({self.config.num_generations}): each group of that "
                "many consecutive rows answers one prompt"
            )
        scores = torch.as_tensor(scores, dtype=torch.float32, device=self.device).reshape(-1)
        if scores.numel() != query_ids.shape[0]:
            raise ValueError(
                f"{NAME}.step: `scores` must hold one score per query ({query_ids.shape[0]}), "
                f"got {scores.numel()}"
            )
        self._sync_metrics_log()
        start = time.perf_counter()
        metrics = self._ppo_iteration(batch, scores, timings={})
        return self._finish_iteration(batch, scores, metrics, start)

    def _ppo_iteration(self, batch: Batch, raw_scores: torch.Tensor, timings: dict) -> dict:
        """Everything of an iteration after the rollout and its scores: the
        experience, the policy-loss epochs, the metrics and the KL controller's update.
        Adds the stages' durations to ``timings``."""
        clock = time.perf_counter()
        old_logprobs, entropy, old_values = self._policy_statistics(batch)
        ref_logprobs = self._reference_logprobs(batch)
        timings["time/logprobs"] = time.perf_counter() - clock
        clock = time.perf_counter()
        scores = self._shaped_scores(raw_scores, batch.has_eos)
        kl_coef = self.kl_controller.value  # this iteration's; updated at its end
        rewards = self.shaped_rewards(scores, old_logprobs, ref_logprobs, batch.response_mask)
        advantages, returns = self._advantages(rewards, old_values, batch.response_mask)
        experience = Experience(
            batch=batch,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            entropy=entropy,
            old_values=old_values,
            rewards=rewards,
            advantages=advantages,
            returns=returns,
        )
        timings["time/advantages"] = time.perf_counter() - clock
        clock = time.perf_counter()
        update_stats = self._ppo_epochs(experience)
        timings["time/update"] = time.perf_counter() - clock
        metrics = self._metrics(experience, raw_scores, scores, kl_coef, update_stats)
        if math.isfinite(metrics["objective/kl"]):  # already the mean over ranks
            self.kl_controller.update(metrics["objective/kl"], len(batch.queries) * self.world_size)
        metrics.update(timings)
        return metrics

    def shaped_rewards(self, scores, logprobs, ref_logprobs, mask) -> torch.Tensor:
        """Per-token rewards: ``-kl_coef * kl_t`` (only when ``kl_placement="reward"``)
        plus each row's score at its last response token (rlhf_ext.kl_shaped_rewards)."""
        in_reward = self.config.kl_placement == "reward"
        return rlhf_ext.kl_shaped_rewards(
            scores,
            logprobs,
            ref_logprobs,
            mask,
            kl_coef=self.kl_controller.value if in_reward else 0.0,
            kl=self.config.kl_kind,
        )

    @torch.no_grad()
    def _policy_statistics(
        self, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The sampling policy's ``(logprobs, entropy, values)``, each ``[B, R]``,
        0 outside the response mask (values None without a critic)."""
        logprobs, entropy, values = self._forward(self.model, self.critic, batch)
        if values is not None:
            values = values.masked_fill(~batch.response_mask, 0.0)
        return logprobs, entropy, values

    @torch.no_grad()
    def _reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """The frozen reference's log-probs ``[B, R]`` of the responses."""
        with self._reference_context():
            return self._logprobs(self.ref_lm, self.ref_lm, batch)[0]

    def _logprobs(self, model, lm, batch: Batch, value_model=False, return_entropy=False):
        """``(logprobs, entropy or None, values or None)`` of the responses from ``model``
        (``lm`` or a value-head model around it), under :meth:`autocast`; with
        ``fused_lm_head`` from its hidden states and ``lm``'s head, without logits."""
        fused = self.config.fused_lm_head
        temperature = self.config.temperature
        with self.autocast():
            outputs, values = response_logits(model, batch, value_model=value_model, hidden=fused)
            if fused:
                result = response_logprobs_from_hidden(
                    outputs, lm_head(lm), batch, temperature, return_entropy
                )
            else:
                result = response_logprobs(outputs, batch, temperature, return_entropy)
        logprobs, entropy = result if return_entropy else (result, None)
        return logprobs, entropy, values

    def _forward(self, model, critic, batch: Batch):
        """``(logprobs, entropy, values)`` of the responses from ``model`` (a
        ValueHeadModel when ``critic`` is None and the estimator needs a critic) and
        ``critic``: no grad for the experience, DDP-wrapped with grad for the loss.
        Values are None without a critic."""
        shared = self.config.needs_critic and critic is None
        logprobs, entropy, values = self._logprobs(
            model, self.policy_lm, batch, value_model=shared, return_entropy=True
        )
        if critic is not None:
            with self.autocast():
                _, values = response_logits(critic, batch, value_model=True)
        return logprobs, entropy, values

    def _shaped_scores(self, raw_scores: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
        """The scores the rewards use (see :func:`shape_scores`). The running
        moments are first updated with every rank's scores after the missing-EOS
        penalty only: they describe what the normalisation divides, the scores
        before it and before the clip."""
        cfg = self.config
        if self.reward_moments is not None:
            penalised = shape_scores(
                raw_scores, has_eos=has_eos, missing_eos_penalty=cfg.missing_eos_penalty
            )
            penalised = dist.gather_from_ranks(penalised)
            self.reward_moments.update(penalised[torch.isfinite(penalised)])  # NaN never sticks
        return shape_scores(
            raw_scores,
            has_eos=has_eos,
            missing_eos_penalty=cfg.missing_eos_penalty,
            moments=self.reward_moments,
            reward_clip=cfg.reward_clip,
        )

    def _advantages(self, rewards, values, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(advantages, returns)`` of the config's ``advantage_estimator`` (see
        :func:`rlhf_ext.trainer.advantages.estimate_advantages`); returns None
        without a critic."""
        cfg = self.config
        return estimate_advantages(
            cfg.advantage_estimator,
            rewards,
            values,
            mask,
            num_generations=cfg.num_generations,
            gamma=cfg.gamma,
            lam=cfg.lam,
            whiten=cfg.whiten_advantages,
        )

    # ------------------------------------------------------------- update
    def _ppo_epochs(self, experience: Experience) -> dict:
        """``ppo_epochs`` passes over a fresh permutation of the rollout, one optimizer
        step per mini-batch; the update statistics averaged over the steps taken."""
        cfg = self.config
        sums: dict[str, float] = {}
        updates = skipped = 0
        rows = len(experience)
        self._skipped_this_iteration = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(rows, generator=self.generator)
            for start in range(0, rows, cfg.mini_batch_size):
                stats = self._update_minibatch(
                    experience, order[start : start + cfg.mini_batch_size]
                )
                if stats is None:
                    skipped += 1
                    continue
                updates += 1
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
        averages = {key: value / max(updates, 1) for key, value in sums.items()}
        averages["train/skipped_updates"] = float(skipped)
        self._count_nonfinite_iteration(skipped)
        return averages

    def _count_nonfinite_iteration(self, skipped: int) -> None:
        """The guard counts iterations, not optimizer steps: one NaN score makes every
        step of its iteration non-finite (whitening spreads it), and that alone must
        not end a run. ``max_nonfinite_updates`` such iterations in a row do."""
        if not skipped:
            self.nonfinite_in_row = 0
            return
        self.nonfinite_in_row += 1
        if self.nonfinite_in_row >= self.config.max_nonfinite_updates:
            raise NonFiniteLossError(
                f"{NAME}: {self.nonfinite_in_row} iterations in a row with non-finite updates "
                f"(max_nonfinite_updates={self.config.max_nonfinite_updates}); stopping"
            )

    def _update_minibatch(self, experience: Experience, rows: torch.Tensor) -> dict | None:
        """Forward, backward (accumulated over micro-batches), clip and step on the
        rows ``rows`` of ``experience``; None when a loss or the gradient norm was
        not finite (the update is skipped)."""
        micro = self.config.micro_batch
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for start in range(0, rows.numel(), micro):
            part = rows[start : start + micro].to(self.device)
            loss, stats = self._loss(experience.select(part))
            if dist.any_rank(not bool(torch.isfinite(loss))):
                return self._skip("loss", float(loss.detach()))
            (loss * (part.numel() / rows.numel())).backward()  # weighted by its share of rows
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value * part.numel() / rows.numel()
        grad_norm = self._clip_gradients()
        if dist.any_rank(not bool(torch.isfinite(grad_norm))):
            return self._skip("gradient norm", float(grad_norm))
        self.optimizer.step()
        totals["policy/grad_norm"] = float(grad_norm)
        return totals

    def _clip_gradients(self) -> torch.Tensor:
        """Clip to ``max_grad_norm``; the total norm before clipping."""
        params = [p for p in self.all_parameters() if p.grad is not None]
        # no max_grad_norm: an infinite one still gives the norm (metrics, non-finite guard)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm else float("inf")
        return dist.local_value(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _skip(self, what: str, value: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._skipped_this_iteration += 1
        self.log(
            f"{NAME}: non-finite {what} ({value}) at iteration {self.iteration}: "
            f"update skipped ({self._skipped_this_iteration} this iteration; "
            f"{self.nonfinite_in_row} earlier iteration(s) in a row had one)"
        )
        return None

    def _loss(self, micro_batch: Experience) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch: the ``policy_loss`` kind + vf_coef * value loss
        (with a critic) - entropy_coef * entropy (+ kl_coef * KL loss when the KL is a
        loss term), and its statistics."""
        cfg = self.config
        mask = micro_batch.batch.response_mask
        logprobs, entropy, values = self._forward(
            self.train_model, self.train_critic, micro_batch.batch
        )
        pg_loss, pg_stats = rlhf_ext.policy_loss(
            logprobs,
            micro_batch.old_logprobs,
            micro_batch.advantages,
            mask,
            kind=cfg.policy_loss,
            agg=cfg.loss_agg,
            **cfg.policy_loss_arguments(),
        )
        mean_entropy = rlhf_ext.masked_mean(entropy, mask)
        loss = pg_loss - cfg.entropy_coef * mean_entropy
        stats = {}
        if values is not None:
            vf_loss, vf_stats = rlhf_ext.value_loss(
                values,
                micro_batch.old_values,
                micro_batch.returns,
                mask,
                clip_eps=cfg.value_clip,
                agg=cfg.loss_agg,
            )
            loss = loss + cfg.vf_coef * vf_loss
            stats["loss/value_avg"] = float(vf_loss.detach())
            stats["val/clipfrac_avg"] = float(vf_stats["clipfrac"])
        if cfg.kl_placement == "loss":
            kl = rlhf_ext.kl_loss(
                logprobs, micro_batch.ref_logprobs, mask, kind=cfg.kl_kind, agg=cfg.loss_agg
            )
            loss = loss + self.kl_controller.value * kl
            stats["loss/kl_avg"] = float(kl.detach())
        stats.update(
            {
                "loss/policy_avg": float(pg_loss.detach()),
                "loss/total_avg": float(loss.detach()),
                "policy/approxkl_avg": float(pg_stats["approx_kl"]),
                "policy/clipfrac_avg": float(pg_stats["clipfrac"]),
                "policy/entropy_avg": float(mean_entropy.detach()),
                "val/ratio": float(pg_stats["ratio_mean"]),
            }
        )
        return loss, stats

    # ------------------------------------------------------------ metrics
    def _metrics(self, experience: Experience, raw_scores, scores, kl_coef, update_stats) -> dict:
        """The iteration's metrics, averaged over ranks: the rollout's, the update
        statistics ``update_stats``, ``metrics_fn``'s and the learning rates."""
        local = self._rollout_metrics(experience, raw_scores, scores)
        local.update(update_stats)
        if self.metrics_fn is not None:
            local.update(self.metrics_fn(*self.reward.texts(experience.batch)))
        metrics = dist.mean_over_ranks(local)
        metrics["val/num_eos_tokens"] *= self.world_size  # a count: the sum over ranks
        metrics.update(
            {
                "kl_coef": kl_coef,
                "objective/kl_coef": kl_coef,
                "lr": self.optimizer.param_groups[0]["lr"],
                "value_lr": self.optimizer.param_groups[1]["lr"],
            }
        )
        return metrics

    def _rollout_metrics(self, experience: Experience, raw_scores, scores) -> dict:
        """This rank's KL, entropy, reward, value (with a critic) and length figures of
        the rollout (a per-sequence sum is the masked token mean times the length)."""
        batch = experience.batch
        mask = batch.response_mask
        per_token_kl = rlhf_ext.kl_penalty(
            experience.old_logprobs, experience.ref_logprobs, kind="k1"
        )
        lengths = mask.sum(1).float()
        kl_per_seq = rlhf_ext.masked_mean(per_token_kl, mask, dim=1) * lengths
        entropy_per_seq = rlhf_ext.masked_mean(experience.entropy, mask, dim=1) * lengths
        rlhf_reward = rlhf_ext.masked_mean(experience.rewards, mask, dim=1) * lengths
        metrics = {
            "objective/kl": float(kl_per_seq.mean()),
            "objective/entropy": float(entropy_per_seq.mean()),
            "objective/scores": float(raw_scores.mean()),
            "objective/shaped_scores": float(scores.mean()),
            "objective/rlhf_reward": float(rlhf_reward.mean()),
            "objective/non_score_reward": float((rlhf_reward - scores).mean()),
            "val/num_eos_tokens": float(batch.has_eos.sum()),
            "val/mean_response_length": float(lengths.mean()),
            "val/min_response_length": float(lengths.min()),
            "val/max_response_length": float(lengths.max()),
        }
        returns, values = experience.returns, experience.old_values
        if values is not None:
            residual_var = _masked_var(returns - values, mask)
            explained = 1.0 - residual_var / max(_masked_var(returns, mask), 1e-12)
            metrics["val/var_explained"] = explained
        return metrics

    # -------------------------------------------------------------- train
    def train(self, prompts, iterations: int | None = None) -> list[dict]:
        """Run PPO from the current iteration up to ``iterations`` (default
        ``config.total_iterations``), sampling ``rollout_batch_size //
        num_generations`` prompts per rank per iteration from ``prompts`` (strings or
        token-id sequences), each answered ``num_generations`` times.

        Writes ``metrics.jsonl``, a checkpoint every ``checkpoint_interval``
        iterations and at the end, and ``metrics.png``, then logs one line naming the
        folder and those files (also in :attr:`outputs`). SIGINT / SIGTERM write a
        checkpoint and the plot after the current iteration and return. Returns this
        call's metrics, one dict per iteration.
        """
        cfg = self.config
        total = iterations if iterations is not None else cfg.total_iterations
        self._stop_signal = None  # a signal that stopped an earlier call is spent
        encoded = self.encode_prompts(prompts)
        if not encoded:
            raise ValueError(f"{NAME}.train: `prompts` is empty")
        self._sync_metrics_log()
        self.log(cfg.batch_arithmetic(self.world_size))
        # the rate and ETA count the iterations of this call, not those before a resume
        bar = ProgressBar(
            total, enabled=cfg.progress_bar and self.rank == 0, initial=self.iteration
        )
        self._bar = bar
        history, stopped = [], False
        try:
            with self._signals_caught():
                while self.iteration < total:
                    metrics = self._train_iteration(encoded)
                    history.append(metrics)
                    bar.update(self.iteration, metrics)
                    if dist.any_rank(self._stop_signal is not None):
                        stopped = True
                        break
                    if self.iteration % cfg.checkpoint_interval == 0:
                        self.save_checkpoint()
        finally:
            bar.close()
            self._bar = None
        checkpoint = self.save_checkpoint()
        if stopped:
            self.log(
                f"{NAME}.train: stopped by signal at iteration {self.iteration}; "
                f"checkpoint in {checkpoint}"
            )
        self._report_outputs(checkpoint, self.plot())
        return history

    def _report_outputs(self, checkpoint: str, plot: str | None) -> None:
        """Keep in :attr:`outputs` and log in one line the folder and the files
        ``train()`` wrote (rank 0)."""
        if self.writer is None:
            return
        records = self.writer.read()
        self.outputs = {
            "output_dir": self.config.output_dir,
            "metrics": self.writer.path,
            "plot": plot,
            "checkpoint": checkpoint,
        }
        steps = f"iterations {records[0]['step']}-{records[-1]['step']}" if records else "empty"
        files = [f"{os.path.basename(self.writer.path)} ({steps})"]
        files.append(os.path.basename(plot) if plot else "no plot")
        files.append(f"{os.path.basename(checkpoint)} (iteration {self.iteration})")
        self.log(f"{NAME}.train: wrote {', '.join(files)} in {self.config.output_dir}")

    def _train_iteration(self, encoded: list) -> dict:
        cfg = self.config
        start = time.perf_counter()
        picks = torch.randint(len(encoded), (cfg.prompts_per_iteration,), generator=self.generator)
        # a group is num_generations consecutive rows of one prompt (group_advantages' layout)
        picks = picks.repeat_interleave(cfg.num_generations)
        batch = self.generate([encoded[i] for i in picks.tolist()])
        timings = {"time/rollout": time.perf_counter() - start}
        clock = time.perf_counter()
        raw_scores = self.score(batch)
        timings["time/reward"] = time.perf_counter() - clock
        metrics = self._ppo_iteration(batch, raw_scores, timings)
        return self._finish_iteration(batch, raw_scores, metrics, start)

    def _sync_metrics_log(self) -> None:
        """A fresh run starts a fresh ``metrics.jsonl``; a resumed one cuts it back."""
        if not self._log_synced:
            self._claim_output_dir()
        if self.writer is not None and not self._log_synced:
            self.writer.truncate_after(self.iteration)
        self._log_synced = True

    def _claim_output_dir(self) -> None:
        """Before a fresh run's first write: refuse an ``output_dir`` holding another
        run's ``metrics.jsonl`` / ``checkpoint.pt`` unless ``config.overwrite`` (a
        resumed run owns them). Every rank calls it; rank 0 looks."""
        if self._owns_output_dir:
            return
        found = []
        if self.rank == 0 and not self.config.overwrite:
            for name in (os.path.basename(self.writer.path), CHECKPOINT_FILE):
                if os.path.exists(os.path.join(self.config.output_dir, name)):
                    found.append(name)
        if dist.any_rank(bool(found)):
            raise FileExistsError(
                f"{NAME}: `output_dir` {self.config.output_dir} already holds "
                f"{' and '.join(found) or 'a run'}; resume it (load_checkpoint(), --resume), "
                "pick a fresh output_dir, or set `overwrite=True` (--overwrite) to replace it"
            )
        self._owns_output_dir = True

    def _finish_iteration(self, batch: Batch, raw_scores, metrics: dict, start: float) -> dict:
        """Bookkeeping shared by :meth:`train` and :meth:`step`: advance the iteration,
        add the step / throughput metrics, write ``metrics.jsonl`` and the samples."""
        cfg = self.config
        self.iteration += 1
        self.episodes += batch.queries.shape[0] * self.world_size
        elapsed = time.perf_counter() - start
        tokens = float(batch.response_mask.sum()) * self.world_size
        metrics.update(
            {
                "step": self.iteration,
                "episode": self.episodes,
                "time/iteration": elapsed,
                "tokens/s": tokens / elapsed,
            }
        )
        if self.writer is not None and self.iteration % cfg.log_interval == 0:
            self.writer.append(metrics)
        if self.iteration % cfg.sample_interval == 0:
            prompts, completions = self.reward.texts(batch)
            self.log(
                f"samples at iteration {self.iteration}:\n"
                + format_sample_table(prompts, completions, raw_scores.tolist())
            )
        return metrics

    @contextmanager
    def _signals_caught(self):
        """SIGINT / SIGTERM set a flag checked between iterations (main thread only)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            self._stop_signal = signum
            signal.signal(signum, previous[signum])  # a second signal acts as usual

        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # -------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> str:
        """``<output_dir>/checkpoint.pt``."""
        return os.path.join(self.config.output_dir, CHECKPOINT_FILE)

    def state_dict(self) -> dict:
        """Everything a resumed run needs but the RNG states (which
        :meth:`save_checkpoint` adds for every rank)."""
        return trainer_state(self)

    def save_checkpoint(self, path: str | None = None) -> str:
        """Write a checkpoint atomically (rank 0 writes; every rank's RNG is in it)
        to ``path`` (default :attr:`checkpoint_path`); returns the path."""
        if path is None:
            self._claim_output_dir()
        return save_trainer_checkpoint(self, path or self.checkpoint_path)

    def load_checkpoint(self, path: str | None = None) -> None:
        """Continue from a checkpoint: the run then gives the same results as one
        that was never interrupted (same seed, batch sizes and world size; a
        mismatch is a ValueError naming the fields). ``metrics.jsonl`` is cut back
        to the checkpoint's iteration."""
        load_trainer_checkpoint(self, path or self.checkpoint_path)
        self._owns_output_dir = True  # a resumed run continues the files in output_dir
        self._log_synced = False
        self._sync_metrics_log()

    def export(self, output_dir: str) -> dict:
        """Write the policy (and value head or critic) to ``output_dir`` for other tools:
        ``save_pretrained`` files for a Hugging Face policy, ``model.pt`` for the built-in
        GPT, and a manifest (:func:`rlhf_ext.trainer.export.export_policy`); the manifest."""
        return export_policy(self, output_dir)

    # ------------------------------------------------------------ outputs
    def plot(self) -> str | None:
        """Write ``metrics.png`` from ``metrics.jsonl`` (rank 0); the path, or None."""
        if self.writer is None:
            return None
        cfg = self.config
        path = os.path.join(cfg.output_dir, "metrics.png")
        problem = plot_metrics(
            self.writer.read(),
            path,
            title=self._plot_title(),
            kl_target=cfg.kl_target if cfg.adaptive_kl else None,
            score_shaping=self._score_shaping(),
            kl_in_reward=cfg.kl_placement == "reward",
        )
        if problem:
            self.log(f"{NAME}.plot: {problem}")
            return None
        return path

    def _plot_title(self) -> str:
        """The algorithm, its settings that matter most, the seed and the folder."""
        cfg = self.config
        if cfg.needs_critic:
            algorithm = f"PPO ({cfg.advantage_estimator}, with a critic)"
        else:
            algorithm = (
                f"{cfg.advantage_estimator} (no critic, {cfg.num_generations} responses per prompt)"
            )
        if cfg.adaptive_kl:
            kl = f"adaptive kl_coef from {cfg.kl_coef:g} (KL target {cfg.kl_target:g})"
        else:
            kl = f"fixed kl_coef {cfg.kl_coef:g}"
        return (
            f"{algorithm}, policy_loss {cfg.policy_loss!r}, KL in the {cfg.kl_placement}, "
            f"{kl}; seed {cfg.seed}; {cfg.output_dir}"
        )

    def _score_shaping(self) -> str:
        """What turns a raw score into the shaped one, in a few words."""
        cfg = self.config
        steps = []
        if cfg.missing_eos_penalty:
            steps.append(f"-{cfg.missing_eos_penalty:g} without EOS")
        if cfg.normalize_reward:
            steps.append("minus the running mean, over the running std")
        if cfg.reward_clip is not None:
            steps.append(f"clipped at ±{cfg.reward_clip:g}")
        return ", ".join(steps) or "the raw score"

    def log(self, message: str) -> None:
        """Print ``message`` on rank 0 (on a line of its own under a progress bar)."""
        if self.rank == 0:
            if self._bar is not None:
                self._bar.break_line()
            print(message, file=self._log_stream, flush=True)


def _masked_var(x: torch.Tensor, mask: torch.Tensor) -> float:
    mean = rlhf_ext.masked_mean(x, mask)
    return float(rlhf_ext.masked_mean((x - mean) ** 2, mask))


def _vocab_size(lm: nn.Module) -> int | None:
    """The vocabulary of a TinyGPT or an HFCausalLM (None when unknown)."""
    config = getattr(lm, "config", None) or getattr(getattr(lm, "model", None), "config", None)
    size = getattr(config, "vocab_size", None)
    return size if isinstance(size, int) else None


def _special_tokens(tokenizer) -> tuple[int, int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"{NAME}: `tokenizer` needs an `eos_token_id` (generation stops at EOS)")
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(eos), int(eos if pad is None else pad)


def _distribute(module: nn.Module, parallelism: str) -> nn.Module:
    """The module the loss's forward runs through: under a process group, a DDP wrapper,
    or ``module`` itself sharded in place by FSDP2 (``parallelism="fsdp"``)."""
    if not dist.is_distributed():
        return module
    if parallelism == "fsdp":
        return dist.shard(module)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [module_device(module)] if module_device(module).type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter."""
    return next(module.parameters()).device
