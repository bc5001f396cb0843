"""Whole runs of the trainer: 2-process DDP (gloo), SIGTERM then --resume through
the CLI, the offline demo at a tiny scale, and the Hugging Face path."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import trainer_helpers as th
from trainer_helpers import one_thread  # noqa: F401  (autouse fixture)

import rlhf_ext
from rlhf_ext.__main__ import main
from rlhf_ext.trainer import PPOTrainer
from rlhf_ext.trainer.checkpoint import load_checkpoint

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def test_two_process_ddp_run(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(th.ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0["params"], rank1["params"])  # DDP kept the replicas equal
    assert rank0["kl_coef"] == rank1["kl_coef"]  # the controller saw the global KL
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in records] == [16, 32]  # 8 rollouts per rank x 2 ranks
    assert len(load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["rng"]) == 2


def test_two_process_ddp_run_with_the_memory_features(tmp_path):
    """The fused LM head uses the tied head outside DDP's forward, checkpointing recomputes
    inside it, LoRA trains a subset (when peft is installed): the replicas stay equal."""
    import importlib.util

    import torch.multiprocessing as mp

    overrides = {"fused_lm_head": True, "gradient_checkpointing": True, "bf16": True}
    if importlib.util.find_spec("peft") is not None:
        overrides["lora_rank"] = 4
    mp.spawn(th.ddp_worker, args=(2, str(tmp_path), overrides), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0["params"], rank1["params"])
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_updates"] for r in records] == [0, 0]


def _spawn_run(folder, overrides=None):
    import torch.multiprocessing as mp

    folder.mkdir(parents=True, exist_ok=True)
    mp.spawn(th.ddp_worker, args=(2, str(folder), overrides), nprocs=2, join=True)
    return [torch.load(folder / f"rank{r}.pt") for r in (0, 1)]


def test_two_process_fsdp_run_matches_ddp_and_exports(tmp_path):
    """parallelism="fsdp" (FSDP2) trains what DDP trains (to float32 rounding: the
    reduce-scatter sums in another order), its checkpoint keeps the shards beside
    checkpoint.pt, and `python -m rlhf_ext export` rebuilds the whole policy from them."""
    from rlhf_ext.trainer.export import export_checkpoint, load_export

    ddp, _ = _spawn_run(tmp_path / "ddp")
    fsdp0, fsdp1 = _spawn_run(tmp_path / "fsdp", {"parallelism": "fsdp"})
    assert torch.equal(fsdp0["params"], fsdp1["params"])
    torch.testing.assert_close(fsdp0["params"], ddp["params"], rtol=1e-4, atol=1e-5)
    assert fsdp0["kl_coef"] == pytest.approx(ddp["kl_coef"], rel=1e-5)
    run = tmp_path / "fsdp" / "run"
    state = load_checkpoint(str(run / "checkpoint.pt"))
    assert state["sharded"] == "checkpoint.pt.shards" and state["model"] == {}
    assert (run / "checkpoint.pt.shards").is_dir() and len(state["rng"]) == 2
    export_checkpoint(str(run / "checkpoint.pt"), str(tmp_path / "export"))
    exported = dict(load_export(str(tmp_path / "export")).policy.named_parameters())
    assert sorted(exported) == sorted(fsdp0["policy"])
    for name, value in fsdp0["policy"].items():
        assert torch.equal(exported[name].detach(), value), name


def test_two_process_fsdp_resume_gives_the_uninterrupted_run(tmp_path):
    """One iteration, its sharded checkpoint, a fresh pair of processes that resume it and
    run the second: the same weights as two iterations in one go."""
    straight, _ = _spawn_run(tmp_path / "straight", {"parallelism": "fsdp"})
    first = tmp_path / "resumed"
    _spawn_run(first, {"parallelism": "fsdp", "iterations": 1})
    (first / "store").unlink()  # the first pair's rendezvous file
    resumed, _ = _spawn_run(first, {"parallelism": "fsdp", "iterations": 2, "resume": True})
    assert torch.equal(resumed["params"], straight["params"])


def test_fsdp_refuses_what_it_cannot_shard(tmp_path):
    with pytest.raises(ValueError, match="does not take `fused_lm_head=True`"):
        th.tiny_config(tmp_path, parallelism="fsdp", fused_lm_head=True)
    with pytest.raises(ValueError, match="`parallelism` must be one of"):
        th.tiny_config(tmp_path, parallelism="zero3")


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_torchrun_cli_two_cpu_processes(tmp_path, parallelism):
    config = _train_config(tmp_path, iterations=2, parallelism=parallelism)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]), OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "rlhf_ext",
        "train",
        "--config",
        config,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "x 2 rank(s) = 16 sequences per iteration" in done.stdout
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in records] == [16, 32]
    assert len(load_checkpoint(str(tmp_path / "out" / "checkpoint.pt"))["rng"]) == 2


def _train_config(tmp_path, iterations: int, **overrides) -> str:
    ppo = th.tiny_config(tmp_path / "out", total_iterations=iterations, **overrides)
    spec = {
        "policy": {"builtin": {"n_layer": 1, "n_head": 2, "d_model": 16, "max_seq_len": 48}},
        "reward": "trainer_helpers:byte_reward",
        "prompts": ["abc", "hello", "a cat"],
        "ppo": ppo.to_dict(),
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(spec))
    return str(path)


def _cli(config: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "rlhf_ext", "train", "--config", config, *extra]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for_lines(path, count: int, proc, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended early:\n{proc.stdout.read()}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail("the run wrote no metrics in time")


def test_sigterm_writes_a_checkpoint_and_resume_continues(tmp_path):
    config = _train_config(tmp_path, iterations=100_000)
    metrics = tmp_path / "out" / "metrics.jsonl"
    proc = _cli(config)
    _wait_for_lines(metrics, 2, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "stopped by signal" in output
    stopped_at = load_checkpoint(str(tmp_path / "out" / "checkpoint.pt"))["iteration"]
    assert stopped_at >= 2
    resumed = _cli(config, "--resume", "--iterations", str(stopped_at + 2))
    output, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, output
    assert "resumed from" in output and f"at iteration {stopped_at}" in output
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, stopped_at + 3))
    assert load_checkpoint(str(tmp_path / "out" / "checkpoint.pt"))["iteration"] == stopped_at + 2


def test_demo_command_quick(tmp_path, capsys):
    threads = torch.get_num_threads()
    command = ["demo", "--quick", "--seeds", "0", "--iterations", "2", "--output-dir"]
    try:
        for _ in range(2):  # `make demo` twice: the demo replaces its own runs
            assert main([*command, str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["seed"], r["algorithm"]) for r in summary] == [(0, "ppo"), (0, "grpo")]
    for run in summary:
        for stage in ("start", "end"):
            assert set(run[stage]) == {"hidden_rule", "rm_score", "kl"}
        assert run["start"]["kl"] == 0.0  # the policy starts as the reference
        assert run["start"] == summary[0]["start"]  # one pretrained model and reward model
    for algorithm in ("ppo", "grpo"):
        assert (tmp_path / "seed0" / algorithm / "metrics.jsonl").exists()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "ppo_vs_grpo.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "| seed | algorithm | RM pair accuracy | hidden rule start |" in out
    assert "[seed 0 grpo] rollout batch 16 (2 prompt(s) x 8 generations)" in out


def test_hugging_face_causal_lm_from_config(tmp_path):
    from rlhf_ext.trainer import ByteTokenizer

    for critic in (None, th.hf_gpt2(1)):
        config = th.tiny_config(tmp_path / str(critic is None), total_iterations=2)
        trainer = PPOTrainer(config, th.hf_gpt2(0), None, th.byte_reward, ByteTokenizer(), critic)
        before = [p.detach().clone() for p in trainer.all_parameters()]
        history = trainer.train(["abc", "hello"])
        assert len(history) == 2
        assert any(
            not torch.equal(a, b) for a, b in zip(before, trainer.all_parameters(), strict=True)
        )


def test_plot_or_the_reason_there_is_none(tmp_path):
    trainer = th.tiny_trainer(tmp_path, total_iterations=2)
    trainer.train(th.prompts())
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert any("matplotlib is not installed" in line for line in trainer._log_stream.lines)
        assert not (tmp_path / "metrics.png").exists()
    else:
        assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_command_config_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"reward": "trainer_helpers:byte_reward", "ppo": {}}))
    with pytest.raises(ValueError, match="train: the config file needs a `policy` entry"):
        main(["train", "--config", str(path)])
    path.write_text(json.dumps({"policy": {"builtin": {}}, "ppo": {"lr": 1.0}}))
    with pytest.raises(ValueError, match="PPOConfig: unknown field\\(s\\) \\['lr'\\]"):
        main(["train", "--config", str(path)])
    path.write_text(json.dumps({"policy": {"builtin": {"d_model": 16}}, "reward": 3}))
    with pytest.raises(ValueError, match="`reward` must be 'module:function'"):
        main(["train", "--config", str(path)])


def test_reward_model_with_its_own_tokenizer(tmp_path):
    from rlhf_ext.trainer import ByteTokenizer, PooledRewardModel

    seen = []

    class Recording(PooledRewardModel):
        def forward(self, input_ids, attention_mask):
            seen.append(input_ids)
            return super().forward(input_ids, attention_mask)

    reward_model = Recording(th.tiny_gpt(5, vocab_size=ByteTokenizer.vocab_size))
    trainer = PPOTrainer(
        th.tiny_config(tmp_path),
        th.tiny_gpt(),
        None,
        reward_model,
        th.DemoTokenizer(),
        reward_tokenizer=ByteTokenizer(),
    )
    batch = trainer.generate([[1, 4, 5], [1, 9]])
    scores = trainer.score(batch)
    prompts, completions = trainer.reward.texts(batch)
    text = th.DemoTokenizer().decode(trainer.reward.sequences(batch)[1])  # the row, decoded once
    assert text == prompts[1] + " " + completions[1]  # a word tokenizer: not prompt + completion
    expected = ByteTokenizer().encode(text)
    assert seen[0][1, : len(expected)].tolist() == expected  # re-encoded as bytes
    assert not seen[0][1, len(expected) :].any()  # then right padding
    assert scores.shape == (2,) and scores.dtype == torch.float32


def test_hugging_face_reward_model_scores_like_a_direct_call(tmp_path):
    """A transformers sequence classifier as the reward model: called by keyword on
    right-padded rows, in eval mode, it gives the score a direct call on each row's text
    gives (with and without its own tokenizer), and drives a training step."""
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (the optional `trainer` extra)"
    )
    from rlhf_ext.trainer import ByteTokenizer

    torch.manual_seed(7)
    config = transformers.GPT2Config(
        vocab_size=259, n_positions=64, n_embd=32, n_layer=1, n_head=2, num_labels=1,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    reward_model = transformers.AutoModelForSequenceClassification.from_config(config).train()
    tokenizer = ByteTokenizer()
    for reward_tokenizer in (None, ByteTokenizer()):
        trainer = PPOTrainer(
            th.tiny_config(tmp_path / str(reward_tokenizer is None), total_iterations=1),
            th.tiny_gpt(vocab_size=tokenizer.vocab_size),
            None,
            reward_model,
            tokenizer,
            reward_tokenizer=reward_tokenizer,
        )
        assert not reward_model.training  # put in eval mode by the trainer
        batch = trainer.generate([tokenizer.encode(p) for p in ("abc", "hello there", "a")])
        scores = trainer.score(batch)
        for row, ids in enumerate(trainer.reward.sequences(batch)):
            if reward_tokenizer is not None:  # the row's text, re-encoded
                ids = reward_tokenizer.encode(tokenizer.decode(ids))
            with torch.no_grad():
                direct = reward_model(input_ids=torch.tensor([ids])).logits[0, 0]
            torch.testing.assert_close(scores[row], direct, atol=1e-5, rtol=1e-5)
        history = trainer.train(["abc", "hello"])
        assert len(history) == 1 and math.isfinite(history[0]["objective/scores"])


def test_resume_without_a_checkpoint_warns(tmp_path, capsys):
    config = _train_config(tmp_path, iterations=1)
    assert main(["train", "--config", config, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "warning: python -m rlhf_ext train --resume: no checkpoint at" in out
    assert "starting a fresh run" in out


def test_untied_critic_head_is_frozen_and_every_trainable_parameter_gets_a_gradient(tmp_path):
    """A separate transformers critic with an untied LM head: the head is unused
    (values come from the backbone), so it is frozen and left out of the optimizer;
    DDP would otherwise wait for its gradient ("Expected to have finished reduction")."""
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (the optional `trainer` extra)"
    )
    from rlhf_ext.trainer import ByteTokenizer
    from rlhf_ext.trainer.rollout import response_logits

    torch.manual_seed(3)
    config = transformers.GPT2Config(
        vocab_size=259, n_positions=64, n_embd=32, n_layer=1, n_head=2, tie_word_embeddings=False
    )
    critic_lm = transformers.AutoModelForCausalLM.from_config(config)
    head = critic_lm.get_output_embeddings()
    assert head.weight is not critic_lm.get_input_embeddings().weight
    trainer = PPOTrainer(
        th.tiny_config(tmp_path),
        th.tiny_gpt(vocab_size=259),
        None,
        th.byte_reward,
        ByteTokenizer(),
        critic_lm,
    )
    assert not head.weight.requires_grad
    optimised = {id(p) for p in trainer.all_parameters()}
    assert id(head.weight) not in optimised
    batch = trainer.generate([ByteTokenizer().encode(p) for p in ("abc", "hello")])
    _, values = response_logits(trainer.critic, batch, value_model=True)
    returns = torch.randn_like(values)
    loss, _ = rlhf_ext.value_loss(values, values.detach(), returns, batch.response_mask)
    loss.backward()
    trainable = [(n, p) for n, p in trainer.critic.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable), [
        n for n, p in trainable if p.grad is None
    ]
    assert {id(p) for _, p in trainable} <= optimised


def test_model_argument_errors_name_function_and_argument(tmp_path):
    config = th.tiny_config(tmp_path)
    with pytest.raises(TypeError, match="^rlhf_ext.trainer.PPOTrainer: `value_model` must be"):
        PPOTrainer(
            config, th.tiny_gpt(), None, th.a_fraction, th.DemoTokenizer(), torch.nn.Linear(2, 2)
        )
    with pytest.raises(TypeError, match="^rlhf_ext.trainer.PPOTrainer: `ref_policy` must be"):
        PPOTrainer(config, th.tiny_gpt(), torch.nn.Linear(2, 2), th.a_fraction, th.DemoTokenizer())
    with pytest.raises(TypeError, match="^rlhf_ext.trainer.PPOTrainer: `policy` must be"):
        PPOTrainer(config, torch.nn.Linear(2, 2), None, th.a_fraction, th.DemoTokenizer())


def _weights(folder) -> dict:
    return load_checkpoint(str(folder / "checkpoint.pt"))["model"]


def test_train_command_same_seed_same_run(tmp_path):
    config = _train_config(tmp_path, iterations=1)
    for name in ("a", "b"):
        torch.rand(3)  # whatever drew from torch's RNG before must not matter
        assert main(["train", "--config", config, "--output-dir", str(tmp_path / name)]) == 0
    first, second = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_train_command_refuses_an_existing_output_dir(tmp_path):
    config = _train_config(tmp_path, iterations=1)
    assert main(["train", "--config", config]) == 0
    with pytest.raises(FileExistsError, match="already holds metrics.jsonl and checkpoint.pt"):
        main(["train", "--config", config])
    assert main(["train", "--config", config, "--overwrite"]) == 0
    assert main(["train", "--config", config, "--resume", "--iterations", "2"]) == 0
    steps = [json.loads(x)["step"] for x in (tmp_path / "out" / "metrics.jsonl").open()]
    assert steps == [1, 2]


@pytest.mark.parametrize(
    "content, message",
    [
        ([{"policy": "gpt2"}], "load_config_file: .*bad.json must hold an object .* got list"),
        ("{", "load_config_file: .*bad.json does not parse"),
        ({"policy": {"builtin": {}}, "ref_polcy": None}, r"unknown key\(s\) \['ref_polcy'\] in"),
        ({"policy": {"builtin": {}}, "ppo": [["seed", 1]]}, "`ppo` in .*bad.json must be an obj"),
        ({"prompts": [1, 2]}, r"`prompts\[0\]` must be a string or a list of int token ids"),
        ({"prompts": [[1, 2.0]]}, r"`prompts\[0\]` must be a string or a list of int token ids"),
        ({"policy": {"builtin": {"n_head": 3}}}, r"GPTConfig: `d_model` \(64\) must be a mult"),
    ],
)
def test_train_command_malformed_config_files(tmp_path, content, message):
    spec = json.loads(Path(_train_config(tmp_path, iterations=1)).read_text())
    if isinstance(content, dict):
        spec.update(content)
    else:
        spec = content
    path = tmp_path / "bad.json"
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    with pytest.raises(ValueError, match=message):
        main(["train", "--config", str(path)])
