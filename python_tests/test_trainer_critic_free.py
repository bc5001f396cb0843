"""The trainer's critic-free mode: the advantage estimators against plain-torch
formulas, prompts sampled in groups, no critic trained, every policy-loss kind, config
errors, and resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import trainer_helpers as th
from trainer_helpers import one_thread  # noqa: F401  (autouse fixture)

from rlhf_ext.ops._vocab import POLICY_KINDS
from rlhf_ext.trainer import PPOConfig, PPOTrainer
from rlhf_ext.trainer.advantages import ADVANTAGE_ESTIMATORS, estimate_advantages

GROUPED = [name for name, e in ADVANTAGE_ESTIMATORS.items() if e.grouped]
CRITIC_FREE = [name for name, e in ADVANTAGE_ESTIMATORS.items() if not e.needs_critic]
# what each kind needs beyond the trainer's defaults
KIND_OPTIONS = {"dro": {"beta": 0.1}, "sapo": {"tau_pos": 1.0, "tau_neg": 1.05}}
KIND_FIELDS = {"geo_mean": {"loss_agg": "seq-mean-token-sum"}}


def _rollout(rows=12, width=7, seed=0):
    """Per-token rewards shaped like PPOTrainer.shaped_rewards: a KL-like term on every
    valid token and a score at the last one; 0 outside the mask."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    rewards = 0.05 * torch.randn(rows, width, generator=gen)
    rewards[torch.arange(rows), lengths - 1] += torch.randn(rows, generator=gen)
    return rewards * mask, mask


def _whiten(x, mask):
    valid = x[mask].double()
    return ((x.double() - valid.mean()) / torch.sqrt(valid.var() + 1e-8)).float()


def _groups(scores, n):
    return scores.double().view(-1, n)


def _expected(estimator, rewards, mask, n, gamma):
    """The estimators written out in plain torch (float64)."""
    scores = rewards.double().sum(1)
    grouped = _groups(scores, n)
    mean = grouped.mean(1, keepdim=True)
    if estimator == "grpo":  # verl's: (s - mean) / (std + 1e-6), Bessel
        return ((grouped - mean) / (grouped.std(1, keepdim=True) + 1e-6)).view(-1).float()
    if estimator == "dr_grpo":
        return (grouped - mean).view(-1).float()
    if estimator == "rloo":
        others = (grouped.sum(1, keepdim=True) - grouped) / (n - 1)
        return (grouped - others).view(-1).float()
    if estimator == "reinforce_pp_baseline":
        per_token = (grouped - mean).view(-1, 1).expand_as(rewards).float()
        return _whiten(per_token, mask)
    assert estimator == "reinforce_pp"
    returns = torch.zeros_like(rewards, dtype=torch.float64)
    carry = torch.zeros(rewards.shape[0], dtype=torch.float64)
    for t in reversed(range(rewards.shape[1])):  # masked tokens are skipped, as gae's mask
        valid = mask[:, t]
        carry = torch.where(valid, rewards[:, t].double() + gamma * carry, carry)
        returns[:, t] = torch.where(valid, carry, 0.0)
    return _whiten(returns.float(), mask)


@pytest.mark.parametrize("estimator", CRITIC_FREE)
def test_estimators_match_plain_torch(estimator):
    rewards, mask = _rollout()
    n, gamma = 4, 0.9
    got, returns = estimate_advantages(
        estimator, rewards, None, mask, num_generations=n, gamma=gamma, lam=0.95, whiten=False
    )
    expected = _expected(estimator, rewards, mask, n, gamma)
    assert returns is None
    assert got.shape == expected.shape
    assert got.shape == ((12,) if ADVANTAGE_ESTIMATORS[estimator].per_row else (12, 7))
    compare = mask if got.dim() == 2 else torch.ones_like(got, dtype=torch.bool)
    torch.testing.assert_close(got[compare], expected[compare], rtol=1e-5, atol=1e-5)


def test_gae_estimator_is_the_gae_op():
    import rlhf_ext

    rewards, mask = _rollout()
    values = torch.randn(rewards.shape)
    got = estimate_advantages(
        "gae", rewards, values, mask, num_generations=1, gamma=0.9, lam=0.8, whiten=True
    )
    advantages, returns = rlhf_ext.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(got[0], rlhf_ext.masked_whiten(advantages, mask))
    torch.testing.assert_close(got[1], returns)


# ------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(advantage_estimator="ppo"), "`advantage_estimator` must be one of"),
        (dict(advantage_estimator="grpo"), "`num_generations` must be an int >= 2 with "),
        (dict(num_generations=0), "`num_generations` must be an int >= 1"),
        (dict(num_generations=3), "`rollout_batch_size` \\(64\\) must be a multiple of "),
        (dict(policy_loss="clip"), "`policy_loss` must be one of"),
        (dict(policy_loss_options={"beta": 1.0}), "`policy_loss_options` for policy_loss='ppo'"),
        (dict(policy_loss_options={"clip_eps": 0.1}), ".*are fields of their own"),
        (dict(policy_loss="reinforce", dual_clip=3.0), "`dual_clip` must be None with"),
        (
            dict(policy_loss="dro", clip_eps_high=0.28, policy_loss_options={"beta": 0.1}),
            "`clip_eps_high` must be None with policy_loss='dro'",
        ),
        (dict(policy_loss="geo_mean"), "`loss_agg` must be 'seq-mean-token-sum' with "),
        (dict(policy_loss="dro"), "`policy_loss` / its parameters: .*beta"),
        (
            dict(policy_loss="sapo", policy_loss_options={"tau_pos": -1.0}),
            ".*`tau_pos` must be > 0",
        ),
        (dict(policy_loss_options=[1]), "`policy_loss_options` must be a dict"),
    ],
)
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match="^rlhf_ext.trainer.PPOConfig: " + message):
        PPOConfig(**fields)


def test_policy_loss_arguments_take_the_kinds_parameters():
    config = PPOConfig(policy_loss="ppo", clip_eps_high=0.3, policy_loss_options={"ratio_cap": 4})
    assert config.policy_loss_arguments() == dict(
        clip_eps=0.2, clip_eps_high=0.3, dual_clip=None, ratio_cap=4
    )
    assert PPOConfig(policy_loss="reinforce").policy_loss_arguments() == {}
    assert PPOConfig(policy_loss="dro", policy_loss_options={"beta": 0.5}).needs_critic


# ---------------------------------------------------------------- trainer
def _grpo(tmp_path, **overrides):
    fields = dict(advantage_estimator="grpo", num_generations=4)
    fields.update(overrides)
    return th.tiny_trainer(tmp_path, **fields)


def test_no_critic_is_built_or_trained(tmp_path):
    trainer = _grpo(tmp_path)
    assert trainer.critic is None and trainer.model is trainer.policy_lm
    assert not hasattr(trainer.model, "value_head")
    assert trainer.optimizer.param_groups[1]["params"] == []
    policy_ids = {id(p) for p in trainer.policy_lm.parameters()}
    assert {id(p) for p in trainer.all_parameters()} == policy_ids
    history = trainer.train(th.prompts(), iterations=2)
    for key in ("loss/value_avg", "val/clipfrac_avg", "val/var_explained"):
        assert key not in history[-1]
    for key in ("loss/policy_avg", "objective/kl", "policy/grad_norm", "objective/scores"):
        assert math.isfinite(history[-1][key]), key


def test_value_model_with_a_critic_free_estimator_is_refused(tmp_path):
    with pytest.raises(ValueError, match="PPOTrainer: `value_model` must be None with "):
        _grpo(tmp_path, value_model="separate")


def test_a_frozen_policy_is_refused(tmp_path):
    policy = th.tiny_gpt().requires_grad_(False)
    config = th.tiny_config(tmp_path)
    with pytest.raises(ValueError, match="PPOTrainer: `policy` has no parameter that requires"):
        PPOTrainer(config, policy, None, th.a_fraction, th.DemoTokenizer())


def test_each_prompt_is_answered_num_generations_times(tmp_path):
    trainer = _grpo(tmp_path, rollout_batch_size=8, mini_batch_size=4)
    seen = []
    generate = trainer.generate
    trainer.generate = lambda queries: (
        seen.append([q.tolist() for q in queries]) or generate(queries)
    )
    trainer.train(th.prompts(), iterations=2)
    for queries in seen:
        groups = [queries[i : i + 4] for i in range(0, len(queries), 4)]
        assert len(groups) == 2 and all(g.count(g[0]) == 4 for g in groups)
    assert "(2 prompt(s) x 4 generations)" in "".join(trainer._log_stream.lines)


def test_group_advantages_reach_the_loss_per_row(tmp_path):
    trainer = _grpo(tmp_path)
    captured = {}
    loss = trainer._loss

    def spy(micro_batch):
        captured.setdefault("advantages", micro_batch.advantages)
        return loss(micro_batch)

    trainer._loss = spy
    trainer.train(th.prompts(), iterations=1)
    assert captured["advantages"].dim() == 1  # [B]: broadcast in the kernel


@pytest.mark.parametrize("kind", POLICY_KINDS)
def test_every_policy_loss_kind_trains(tmp_path, kind):
    trainer = _grpo(
        tmp_path,
        policy_loss=kind,
        policy_loss_options=KIND_OPTIONS.get(kind, {}),
        **KIND_FIELDS.get(kind, {}),
    )
    before = [p.detach().clone() for p in trainer.all_parameters()]
    history = trainer.train(th.prompts(), iterations=1)
    assert math.isfinite(history[-1]["loss/policy_avg"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.all_parameters(), strict=True))


@pytest.mark.parametrize("estimator", CRITIC_FREE)
def test_each_critic_free_estimator_trains(tmp_path, estimator):
    generations = 4 if ADVANTAGE_ESTIMATORS[estimator].grouped else 1
    trainer = th.tiny_trainer(tmp_path, advantage_estimator=estimator, num_generations=generations)
    history = trainer.train(th.prompts(), iterations=2)
    assert all(math.isfinite(m["loss/policy_avg"]) for m in history)


def test_grpo_raises_the_reward(tmp_path):
    trainer = _grpo(
        tmp_path,
        total_iterations=14,
        rollout_batch_size=32,
        mini_batch_size=8,
        num_generations=8,
        ppo_epochs=2,
        learning_rate=1e-2,
        kl_coef=0.01,
    )
    history = trainer.train(th.prompts(32))
    scores = [m["objective/scores"] for m in history]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.1, scores


def test_step_checks_groups(tmp_path):
    trainer = _grpo(tmp_path)
    with pytest.raises(ValueError, match="PPOTrainer.step: the number of queries \\(3\\) must"):
        trainer.step([[1, 4]] * 3, [[5, 2]] * 3, [1.0, 2.0, 3.0])
    metrics = trainer.step([[1, 4]] * 4, [[5, 2], [6, 2], [3, 5, 2], [7]], [0.1, 0.5, 0.2, 0.9])
    assert metrics["step"] == 1


def test_grpo_resume_equals_uninterrupted_run(tmp_path):
    whole = _grpo(tmp_path / "whole", total_iterations=4)
    whole.train(th.prompts())
    first = _grpo(tmp_path / "split", total_iterations=4)
    first.train(th.prompts(), iterations=2)
    resumed = _grpo(tmp_path / "split", total_iterations=4)
    resumed.load_checkpoint()
    resumed.train(th.prompts())
    for a, b in zip(whole.all_parameters(), resumed.all_parameters(), strict=True):
        assert torch.equal(a, b)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def test_resume_checks_the_critic_and_the_group_size(tmp_path):
    _grpo(tmp_path).save_checkpoint()
    with pytest.raises(ValueError, match="`advantage_estimator` \\(checkpoint 'grpo', which "
                       "trains no critic; this run 'gae', which trains a critic\\)"):  # fmt: skip
        th.tiny_trainer(tmp_path, num_generations=4).load_checkpoint()
    with pytest.raises(ValueError, match="`num_generations` \\(checkpoint 4, this run 8\\)"):
        _grpo(tmp_path, num_generations=8).load_checkpoint()
    # another critic-free estimator over the same models may continue the run
    _grpo(tmp_path, advantage_estimator="rloo").load_checkpoint()


def test_a_checkpoint_from_before_the_estimators_is_a_gae_one(tmp_path):
    from rlhf_ext.trainer.checkpoint import atomic_torch_save, load_checkpoint

    th.tiny_trainer(tmp_path).save_checkpoint()
    path = str(tmp_path / "checkpoint.pt")
    state = load_checkpoint(path)
    for name in ("advantage_estimator", "num_generations"):
        del state["config"][name]
    atomic_torch_save(state, path)
    th.tiny_trainer(tmp_path).load_checkpoint()
    with pytest.raises(ValueError, match="`num_generations` \\(checkpoint 1, this run 4\\)"):
        _grpo(tmp_path).load_checkpoint()


def test_the_policy_as_its_own_reference_is_refused(tmp_path):
    policy = th.tiny_gpt()
    with pytest.raises(ValueError, match="PPOTrainer: `ref_policy` is `policy` itself"):
        PPOTrainer(th.tiny_config(tmp_path), policy, policy, th.a_fraction, th.DemoTokenizer())
