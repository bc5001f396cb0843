"""The PPO trainer's pieces against hand-computed cases, and short runs: the
reward rises, resume equals an uninterrupted run, the non-finite guard."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import trainer_helpers as th
from trainer_helpers import one_thread  # noqa: F401  (autouse fixture)

import rlhf_ext
from rlhf_ext.trainer import (
    AdaptiveKLController,
    FixedKLController,
    NonFiniteLossError,
    PPOConfig,
    RunningMoments,
)
from rlhf_ext.trainer.rewards import shape_scores
from rlhf_ext.trainer.rollout import (
    Batch,
    Experience,
    filter_logits,
    left_pad,
    response_mask_from_eos,
)

TRL_METRICS = (
    "objective/kl",
    "objective/entropy",
    "objective/scores",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "val/num_eos_tokens",
    "kl_coef",
    "lr",
    "tokens/s",
    "time/rollout",
    "time/update",
    "objective/kl_coef",
    "val/var_explained",
    "policy/grad_norm",
)


# ---------------------------------------------------------------- KL control
@pytest.mark.parametrize(
    "kl, expected",
    [
        (9.0, 0.1 * (1 + 0.2 * 64 / 1000)),  # error 0.5 clipped to +0.2
        (3.0, 0.1 * (1 - 0.2 * 64 / 1000)),  # error -0.5 clipped to -0.2
        (6.6, 0.1 * (1 + 0.1 * 64 / 1000)),  # error 0.1 inside the clip
        (6.0, 0.1),  # on target
    ],
)
def test_adaptive_kl_update_formula(kl, expected):
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000.0)
    assert ctl.update(kl, 64) == pytest.approx(expected, rel=1e-12)
    assert ctl.value == pytest.approx(expected, rel=1e-12)


def test_kl_controllers_state_and_fixed():
    fixed = FixedKLController(0.3)
    assert fixed.update(100.0, 64) == 0.3
    ctl = AdaptiveKLController(0.2, target=1.0, horizon=10.0)
    ctl.update(5.0, 1)
    other = AdaptiveKLController(0.2, target=1.0, horizon=10.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value == pytest.approx(0.2 * 1.02)
    with pytest.raises(ValueError, match="AdaptiveKLController: `target`"):
        AdaptiveKLController(0.1, target=0.0, horizon=1.0)


# ------------------------------------------------------------ reward shaping
def test_shaped_rewards_hand_computed(tmp_path):
    trainer = th.tiny_trainer(tmp_path, kl_coef=0.5, kl_kind="k1")
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -0.2, -1.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    scores = torch.tensor([2.0, -1.0])
    rewards = trainer.shaped_rewards(scores, logprobs, ref, mask)
    expected = torch.tensor(
        [
            [-0.5 * 0.5, -0.5 * -1.0, -0.5 * 0.0 + 2.0],
            [-0.5 * -0.2, -0.5 * -0.5 - 1.0, 0.0],
        ]
    )
    torch.testing.assert_close(rewards, expected)


def test_kl_as_a_loss_term_leaves_rewards_unshaped(tmp_path):
    trainer = th.tiny_trainer(tmp_path, kl_coef=0.5, kl_placement="loss")
    logprobs, ref = torch.randn(2, 3) - 1, torch.randn(2, 3) - 1
    mask = torch.tensor([[True, True, False], [True, True, True]])
    rewards = trainer.shaped_rewards(torch.tensor([3.0, 4.0]), logprobs, ref, mask)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 4.0]]))


def test_score_penalty_normalisation_and_clip():
    shaping = dict(missing_eos_penalty=1.5, reward_clip=2.0)
    scores = torch.tensor([1.0, 3.0, -4.0])
    has_eos = torch.tensor([True, False, True])
    torch.testing.assert_close(
        shape_scores(scores, has_eos=has_eos, **shaping), torch.tensor([1.0, 1.5, -2.0])
    )
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 3.0]))
    moments.update(torch.tensor([5.0]))  # running: mean 3, population var 8/3
    assert moments.mean == pytest.approx(3.0) and moments.var == pytest.approx(8 / 3)
    normed = shape_scores(
        torch.tensor([5.0]), has_eos=torch.tensor([True]), moments=moments, **shaping
    )
    torch.testing.assert_close(normed, torch.tensor([2.0 / math.sqrt(8 / 3)]))


def test_running_moments_match_the_whole_stream():
    values = torch.randn(50, dtype=torch.float64) * 3 + 1
    moments = RunningMoments()
    for part in values.split([7, 13, 30]):
        moments.update(part)
    assert moments.count == 50
    assert moments.mean == pytest.approx(float(values.mean()), rel=1e-12)
    assert moments.var == pytest.approx(float(values.var(unbiased=False)), rel=1e-12)


# --------------------------------------------------------------- rollouts
def test_response_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    mask, has_eos = response_mask_from_eos(ids, torch.tensor([4, 4, 4]), eos_token_id=2)
    assert mask.tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
    ]
    assert has_eos.tolist() == [True, False, True]


def test_left_pad_and_filters():
    ids, mask = left_pad([[4, 5, 6], [7]], pad_token_id=0, device="cpu")
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 2, None)).tolist() == [[True, False, False, True]]
    # probs ~ [0.087, 0.644, 0.237, 0.032]: top_p 0.7 keeps the two largest
    kept = ~torch.isinf(filter_logits(logits, None, 0.7))
    assert kept.tolist() == [[False, True, True, False]]
    with pytest.raises(ValueError, match="^rlhf_ext.trainer.left_pad: every sequence of `queries`"):
        left_pad([[1], []], 0, "cpu")


def test_kv_cache_matches_full_forward():
    model = th.tiny_gpt(3)
    ids, mask = left_pad([[1, 5, 6, 7], [1, 9]], 0, "cpu")
    new = torch.tensor([[4, 8], [10, 11]])
    full_mask = torch.cat([mask, torch.ones(2, 2, dtype=torch.bool)], dim=1)
    full_logits, _, _ = model(torch.cat([ids, new], 1), full_mask)
    _, _, past = model(ids, mask, use_cache=True)
    step_logits = []
    for t in range(2):
        logits, _, past = model(
            new[:, t : t + 1], full_mask[:, : 4 + t + 1], past=past, use_cache=True
        )
        step_logits.append(logits[:, 0])
    torch.testing.assert_close(
        torch.stack(step_logits, 1), full_logits[:, 4:], atol=1e-5, rtol=1e-5
    )


def test_experience_select_takes_the_same_rows_of_every_field():
    rows, query_width, response_width = 5, 3, 4
    batch = Batch(
        torch.arange(rows * query_width).view(rows, query_width),
        torch.rand(rows, query_width) > 0.3,
        torch.arange(rows * response_width).view(rows, response_width),
        torch.rand(rows, response_width) > 0.3,
        torch.rand(rows) > 0.5,
    )
    per_token = {
        f.name: torch.randn(rows, response_width)
        for f in dataclasses.fields(Experience)
        if f.name != "batch"
    }
    experience = Experience(batch=batch, **per_token)
    assert len(experience) == rows
    for index in (torch.tensor([3, 0, 3]), slice(1, 3)):
        picked = experience.select(index)
        assert len(picked) == len(torch.arange(rows)[index])
        for f in dataclasses.fields(Batch):
            assert torch.equal(getattr(picked.batch, f.name), getattr(batch, f.name)[index])
        for name, value in per_token.items():
            assert torch.equal(getattr(picked, name), value[index]), name


def test_generation_is_seeded_and_stops_at_eos(tmp_path):
    first = th.tiny_trainer(tmp_path / "a").generate(th.prompts(6))
    second = th.tiny_trainer(tmp_path / "b").generate(th.prompts(6))
    assert torch.equal(first.responses, second.responses)
    eos_rows = first.has_eos.nonzero().flatten().tolist()
    for row in eos_rows:
        length = int(first.response_mask[row].sum())
        assert first.responses[row, length - 1] == 2
        assert (first.responses[row, length:] == 0).all()


# ---------------------------------------------------- minibatch bookkeeping
def test_minibatch_bookkeeping(tmp_path):
    trainer = th.tiny_trainer(
        tmp_path, rollout_batch_size=12, mini_batch_size=6, micro_batch_size=3, ppo_epochs=3
    )
    seen, steps, micro = [], [], []
    update = trainer._update_minibatch
    loss = trainer._loss

    def spy_update(experience, rows):
        seen.append(sorted(rows.tolist()))
        return update(experience, rows)

    def spy_loss(micro_batch):
        micro.append(micro_batch.batch.queries.shape[0])
        return loss(micro_batch)

    trainer._update_minibatch, trainer._loss = spy_update, spy_loss
    optimizer_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (steps.append(1), optimizer_step(*a, **k))[1]
    trainer.train(th.prompts(), iterations=1)
    assert trainer.config.updates_per_iteration == 6 == len(seen) == len(steps)
    for epoch in range(3):  # each epoch visits every row exactly once
        rows = seen[2 * epoch] + seen[2 * epoch + 1]
        assert sorted(rows) == list(range(12))
    assert micro == [3] * 12
    assert "2 mini-batch(es) of 6 (2 micro-batch(es) of 3) x 3 PPO epoch(s) = 6" in "".join(
        trainer._log_stream.lines
    )


# ------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("learning_rate", 0.0, "`learning_rate` must be a float > 0"),
        ("rollout_batch_size", 10, "`rollout_batch_size` \\(10\\) must be a multiple"),
        ("micro_batch_size", 3, "`mini_batch_size` \\(16\\) must be a multiple"),
        ("clip_eps", -0.1, "`clip_eps` must be a float > 0"),
        ("dual_clip", 1.0, "`dual_clip` must be None or a float > 1"),
        ("loss_agg", "mean", "`loss_agg` must be one of"),
        ("kl_kind", "k9", "`kl_kind` must be one of"),
        ("kl_placement", "both", "`kl_placement` must be one of"),
        ("gamma", 1.5, "`gamma` must be a float in \\[0, 1\\]"),
        ("top_p", 0.0, "`top_p` must be None or a float in \\(0, 1\\]"),
        ("top_p", 1.5, "`top_p` must be None or a float in \\(0, 1\\]"),
        ("max_new_tokens", 0, "`max_new_tokens` must be an int >= 1"),
        ("temperature", float("nan"), "`temperature` must be finite"),
        ("kl_coef", -1.0, "`kl_coef` must be a float >= 0"),
        ("ppo_epochs", 2.5, "`ppo_epochs` must be an int >= 1"),
        ("temperature", 1e-40, "`temperature` must be a float >= 1e-06"),
        ("whiten_advantages", "false", "`whiten_advantages` must be a bool"),
        ("normalize_reward", "no", "`normalize_reward` must be a bool"),
        ("overwrite", 1, "`overwrite` must be a bool"),
    ],
)
def test_config_errors(field, value, message):
    with pytest.raises(ValueError, match="^rlhf_ext.trainer.PPOConfig: " + message):
        PPOConfig(**{field: value})


def test_config_type_errors_and_dict_round_trip(tmp_path):
    with pytest.raises(TypeError, match="`vf_coef` must be a number, got str"):
        PPOConfig(vf_coef="0.1")
    with pytest.raises(ValueError, match="unknown field\\(s\\) \\['lr'\\]"):
        PPOConfig.from_dict({"lr": 1e-3})
    config = PPOConfig(learning_rate=3e-4, kl_placement="loss", top_k=5)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"ppo": config.to_dict()}))
    assert PPOConfig.from_file(path) == config


def test_trainer_argument_errors(tmp_path):
    class NoEos:
        pad_token_id = 0
        eos_token_id = None

    with pytest.raises(ValueError, match="PPOTrainer: `tokenizer` needs an `eos_token_id`"):
        rlhf_ext.trainer.PPOTrainer(
            th.tiny_config(tmp_path), th.tiny_gpt(), None, th.a_fraction, NoEos()
        )
    with pytest.raises(TypeError, match="PPOTrainer: `config` must be a PPOConfig"):
        rlhf_ext.trainer.PPOTrainer({}, th.tiny_gpt(), None, th.a_fraction, NoEos())
    trainer = th.tiny_trainer(tmp_path)
    with pytest.raises(ValueError, match="PPOTrainer.step: `scores` must hold one score"):
        trainer.step([[1, 4]], [[5, 2]], [1.0, 2.0])


# ----------------------------------------------------------------- end to end
def test_reward_rises_end_to_end(tmp_path):
    trainer = th.tiny_trainer(
        tmp_path,
        total_iterations=14,
        rollout_batch_size=32,
        mini_batch_size=8,
        ppo_epochs=2,
        learning_rate=1e-2,
        kl_coef=0.01,
    )
    history = trainer.train(th.prompts(32))
    scores = [m["objective/scores"] for m in history]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.1, scores
    for key in TRL_METRICS:
        assert all(math.isfinite(m[key]) for m in history), key
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 15))
    assert (tmp_path / "checkpoint.pt").exists()


def test_step_api_and_variants(tmp_path):
    for index, variant in enumerate(
        (
            dict(value_model="separate"),
            dict(kl_placement="loss", kl_kind="k3"),
            dict(
                normalize_reward=True,
                reward_clip=3.0,
                dual_clip=3.0,
                clip_eps_high=0.28,
                loss_agg="seq-mean-token-mean",
                top_k=10,
                top_p=0.9,
                temperature=0.7,
                entropy_coef=0.01,
            ),
        )
    ):
        trainer = th.tiny_trainer(tmp_path / f"variant{index}", **variant)  # a run each
        before = [p.detach().clone() for p in trainer.all_parameters()]
        metrics = trainer.step(
            [[1, 4, 5], [1, 6]] * 4, [[7, 8, 2], [9]] * 4, torch.randn(8).tolist()
        )
        for key in TRL_METRICS[:11]:
            assert math.isfinite(metrics[key]), (variant, key)
        changed = [
            not torch.equal(a, b) for a, b in zip(before, trainer.all_parameters(), strict=True)
        ]
        assert all(changed), variant  # value head (zero-initialised) and policy both move
        assert metrics["val/num_eos_tokens"] == 4
        if variant.get("kl_placement") == "loss":
            assert "loss/kl_avg" in metrics


# ------------------------------------------------------------------ resume
def _comparable(records):
    return [
        {k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens/s"}
        for r in records
    ]


def test_resume_equals_uninterrupted_run(tmp_path):
    whole = th.tiny_trainer(tmp_path / "whole", total_iterations=4, normalize_reward=True)
    whole.train(th.prompts())
    first = th.tiny_trainer(tmp_path / "split", total_iterations=4, normalize_reward=True)
    first.train(th.prompts(), iterations=2)
    resumed = th.tiny_trainer(tmp_path / "split", total_iterations=4, normalize_reward=True, seed=0)
    torch.manual_seed(123)  # the checkpoint's RNG states must win over anything drawn since
    resumed.load_checkpoint()
    assert resumed.iteration == 2
    resumed.train(th.prompts())
    for a, b in zip(whole.all_parameters(), resumed.all_parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.kl_controller.value == whole.kl_controller.value
    assert _comparable(resumed.writer.read()) == _comparable(whole.writer.read())


# ------------------------------------------------------------ non-finite guard
def test_nonfinite_loss_skips_then_stops(tmp_path):
    def nan_reward(prompts, completions):
        return [float("nan")] * len(completions)

    trainer = th.tiny_trainer(tmp_path, reward=nan_reward, max_nonfinite_updates=3)
    before = [p.detach().clone() for p in trainer.all_parameters()]
    with pytest.raises(NonFiniteLossError, match="3 iterations in a row with non-finite"):
        trainer.train(th.prompts(), iterations=5)
    for a, b in zip(before, trainer.all_parameters(), strict=True):
        assert torch.equal(a, b)  # no skipped update touched the weights
    skipped = sum("update skipped" in line for line in trainer._log_stream.lines)
    assert skipped == 3 * trainer.config.updates_per_iteration  # the guard counts iterations
    assert trainer.iteration == 2  # raised in the third


def test_one_nan_score_does_not_stop_a_run_with_defaults(tmp_path):
    calls = []

    def one_nan(prompts, completions):
        calls.append(1)
        scores = th.a_fraction(prompts, completions)
        if len(calls) == 1:
            scores[0] = float("nan")
        return scores

    trainer = th.tiny_trainer(tmp_path, reward=one_nan)
    assert trainer.config.max_nonfinite_updates < trainer.config.updates_per_iteration
    history = trainer.train(th.prompts(), iterations=3)
    assert history[0]["train/skipped_updates"] == trainer.config.updates_per_iteration
    assert [m["train/skipped_updates"] for m in history[1:]] == [0, 0]
    assert trainer.nonfinite_in_row == 0 and trainer.iteration == 3


def test_nonfinite_once_is_skipped_and_logged(tmp_path):
    calls = []

    def flaky(prompts, completions):
        calls.append(1)
        scores = th.a_fraction(prompts, completions)
        return [float("nan")] * len(scores) if len(calls) == 1 else scores

    trainer = th.tiny_trainer(
        tmp_path, reward=flaky, max_nonfinite_updates=5, normalize_reward=True
    )
    history = trainer.train(th.prompts(), iterations=3)
    assert math.isfinite(trainer.reward_moments.mean) and trainer.reward_moments.count == 16
    assert math.isfinite(trainer.kl_controller.value)
    assert history[0]["train/skipped_updates"] == trainer.config.updates_per_iteration
    assert history[1]["train/skipped_updates"] == 0 and trainer.nonfinite_in_row == 0
    assert (
        json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["objective/scores"]
        is None
    )  # NaN is written as null


def test_a_fresh_run_starts_a_fresh_metrics_log(tmp_path):
    th.tiny_trainer(tmp_path, total_iterations=2).train(th.prompts())
    th.tiny_trainer(tmp_path, total_iterations=2, overwrite=True).train(th.prompts())
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_rollout_pipeline_matches_plain_torch(tmp_path):
    """Log-probs line up with the tokens they score (the classic off-by-one), and
    rewards -> GAE -> whitening equal the pure-PyTorch reference chain."""
    from rlhf_ext import reference

    trainer = th.tiny_trainer(tmp_path, temperature=0.7, kl_coef=0.3, gamma=0.9, lam=0.8)
    captured = {}

    def capture(experience):
        captured["experience"] = experience
        return {}

    trainer._ppo_epochs = capture
    assert not trainer.model.value_head.weight.any()  # the value head starts at zero
    torch.nn.init.normal_(trainer.model.value_head.weight)  # non-zero values for GAE
    batch = trainer.generate(th.prompts(6))
    scores = torch.randn(6)
    trainer._ppo_iteration(batch, scores, timings={})
    experience, mask = captured["experience"], batch.response_mask
    assert experience.batch is batch

    logits, _, _ = trainer.policy_lm(batch.input_ids, batch.attention_mask)
    q = batch.queries.shape[1]
    by_hand = torch.log_softmax(logits[:, q - 1 : -1].double() / 0.7, -1)
    by_hand = by_hand.gather(-1, batch.responses[..., None]).squeeze(-1) * mask
    torch.testing.assert_close(experience.old_logprobs.double(), by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(experience.ref_logprobs, experience.old_logprobs)  # ref = copy

    rewards = reference.kl_shaped_rewards(
        scores, experience.old_logprobs, experience.ref_logprobs, mask, kl_coef=0.3, kl="k1"
    )
    advantages, returns = reference.gae(rewards, experience.old_values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(experience.rewards, rewards)
    torch.testing.assert_close(experience.returns, returns)
    torch.testing.assert_close(experience.advantages, reference.masked_whiten(advantages, mask))


# ------------------------------------------------------- signals, step, resume
def test_a_second_train_after_a_signal_runs_to_the_end(tmp_path):
    import os
    import signal

    calls = []

    def signalling(prompts, completions):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # caught: stop after this iteration
        return th.a_fraction(prompts, completions)

    trainer = th.tiny_trainer(tmp_path, reward=signalling)
    assert len(trainer.train(th.prompts(), iterations=3)) == 1
    assert trainer.iteration == 1
    assert len(trainer.train(th.prompts(), iterations=3)) == 2  # not stopped by the old signal
    assert trainer.iteration == 3


def test_step_advances_the_iteration_and_writes_metrics(tmp_path):
    trainer = th.tiny_trainer(tmp_path, overwrite=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 7}\n')  # an older run's log
    for expected in (1, 2):
        metrics = trainer.step([[1, 4, 5], [1, 6]] * 2, [[7, 8, 2], [9]] * 2, [0.5, 1.0] * 2)
        assert trainer.iteration == expected == metrics["step"]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["episode"]) for r in records] == [(1, 4), (2, 8)]


def test_load_checkpoint_checks_seed_and_batch_sizes(tmp_path):
    trainer = th.tiny_trainer(tmp_path)
    with pytest.raises(
        FileNotFoundError, match="checkpoint.load_checkpoint: `path`: no checkpoint"
    ):
        trainer.load_checkpoint()
    trainer.save_checkpoint()
    with pytest.raises(ValueError, match=r"load_checkpoint: .*different `seed` \(checkpoint 0"):
        th.tiny_trainer(tmp_path, seed=1).load_checkpoint()
    with pytest.raises(ValueError, match="`rollout_batch_size` \\(checkpoint 8, this run 16\\)"):
        th.tiny_trainer(tmp_path, rollout_batch_size=16).load_checkpoint()
    th.tiny_trainer(tmp_path, total_iterations=9).load_checkpoint()  # other fields may change


def test_demo_routes_the_trainer_log_through_its_log_function(tmp_path):
    from rlhf_ext.trainer.demo import _LogStream

    lines = []
    trainer = rlhf_ext.trainer.PPOTrainer(
        th.tiny_config(tmp_path), th.tiny_gpt(), None, th.a_fraction, th.DemoTokenizer(),
        log=_LogStream(lines.append),
    )  # fmt: skip
    trainer.log("hello\nworld")
    assert lines == ["hello\nworld"]


# ------------------------------------------------------------ reliability
def test_resume_applies_the_configs_learning_rates(tmp_path):
    th.tiny_trainer(tmp_path, total_iterations=1).train(th.prompts())
    resumed = th.tiny_trainer(
        tmp_path, total_iterations=2, learning_rate=1e-3, value_learning_rate=2e-3
    )
    resumed.load_checkpoint()
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [1e-3, 2e-3]
    history = resumed.train(th.prompts())
    assert (history[-1]["lr"], history[-1]["value_lr"]) == (1e-3, 2e-3)


def test_resume_cuts_a_torn_metrics_line(tmp_path):
    th.tiny_trainer(tmp_path, total_iterations=2).train(th.prompts())
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as fh:
        fh.write('{"step": 3, "objective/kl": 0.1')  # a full disk cut the write short
    resumed = th.tiny_trainer(tmp_path, total_iterations=3)
    resumed.load_checkpoint()
    assert metrics.read_text().endswith("}\n")  # the torn line is gone
    resumed.train(th.prompts())
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3]


def test_a_bad_metrics_line_inside_the_file_names_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"MetricsWriter.read: .*metrics.jsonl line 2"):
        rlhf_ext.trainer.metrics.MetricsWriter(str(tmp_path)).read()


def test_a_failed_metrics_write_names_the_file_and_leaves_no_torn_line(tmp_path, monkeypatch):
    import errno

    from rlhf_ext.trainer import metrics as metrics_module

    writer = metrics_module.MetricsWriter(str(tmp_path))
    writer.append({"step": 1})

    class FullDisk:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            self.fh.write(text[:5])
            self.fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics_module, "open", lambda *a: FullDisk(open(*a)), raising=False)
    with pytest.raises(OSError, match=r"MetricsWriter.append: could not write to .*metrics.jsonl"):
        writer.append({"step": 2})
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_fresh_run_refuses_an_existing_output_dir(tmp_path):
    th.tiny_trainer(tmp_path, total_iterations=1).train(th.prompts())
    before = (tmp_path / "metrics.jsonl").read_text()
    fresh = th.tiny_trainer(tmp_path, total_iterations=1)
    match = "PPOTrainer: `output_dir` .* already holds metrics.jsonl and checkpoint.pt"
    with pytest.raises(FileExistsError, match=match):
        fresh.train(th.prompts())
    with pytest.raises(FileExistsError, match=match):
        fresh.step([[1, 4]], [[5, 2]], [1.0])
    with pytest.raises(FileExistsError, match=match):
        fresh.save_checkpoint()
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing was touched
    th.tiny_trainer(tmp_path, total_iterations=1, overwrite=True).train(th.prompts())


def test_checkpoints_load_weights_only(tmp_path):
    th.tiny_trainer(tmp_path, total_iterations=1).train(th.prompts())
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # plain data only
    assert state["iteration"] == 1 and state["config"]["seed"] == 0


def test_load_checkpoint_refuses_a_malicious_pickle(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": th.Malicious(), "optimizer": {}, "rng": []}, path)
    with pytest.raises(ValueError, match=f"load_checkpoint: {path} holds objects other than"):
        th.tiny_trainer(tmp_path).load_checkpoint()
    assert th.PICKLE_MARKER == []  # its __reduce__ never ran


def test_an_old_format_checkpoint_is_a_clear_error(tmp_path):
    import numpy as np

    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "optimizer": {}, "rng": [{"numpy": np.random.get_state()}]}, path)
    with pytest.raises(ValueError, match="an old-format checkpoint"):
        th.tiny_trainer(tmp_path).load_checkpoint()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", "truncated"])
def test_unreadable_checkpoints_name_the_path(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    if content == "truncated":
        th.tiny_trainer(tmp_path).save_checkpoint()
        content = path.read_bytes()[:-200]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"load_checkpoint: {path} is not a readable checkpoint"):
        th.tiny_trainer(tmp_path).load_checkpoint()


def test_stale_checkpoint_temporaries_are_removed_at_start(tmp_path):
    names = [".tmp-ab_cd123.pt", ".tmp-notes.txt", "mine.pt", ".tmp-ab_cd123.pt.bak"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    trainer = th.tiny_trainer(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
    assert "removed a stale checkpoint temporary" in "".join(trainer._log_stream.lines)


@pytest.mark.parametrize("returned", [None, ["high"] * 8, "0.5", [None] * 8])
def test_a_reward_function_returning_non_numbers_is_named(tmp_path, returned):
    trainer = th.tiny_trainer(tmp_path, reward=lambda p, c: returned)
    with pytest.raises(TypeError, match="`reward_fn_or_model`: must return numbers"):
        trainer.train(th.prompts())


def test_gpt_config_checks_heads_divide_the_width():
    with pytest.raises(ValueError, match=r"GPTConfig: `d_model` \(30\) must be a multiple"):
        rlhf_ext.trainer.GPTConfig(27, n_head=4, d_model=30)


def test_token_ids_are_checked_in_step_and_train(tmp_path):
    trainer = th.tiny_trainer(tmp_path)
    vocab = th.DemoTokenizer.vocab_size
    with pytest.raises(ValueError, match=rf"step: `queries\[1\]` holds token id {vocab}, out"):
        trainer.step([[1, 4], [1, vocab]], [[5, 2], [5]], [1.0, 0.0])
    with pytest.raises(ValueError, match=r"step: `responses\[0\]` holds token id -1"):
        trainer.step([[1, 4]], [[-1, 2]], [1.0])
    with pytest.raises(TypeError, match=r"step: `queries\[0\]` must be a sequence of int"):
        trainer.step([[1.0, 4.5]], [[5, 2]], [1.0])
    with pytest.raises(TypeError, match=r"train: `prompts\[0\]` must be a sequence of int"):
        trainer.train([3, 4])
