"""Small builders shared by the trainer tests (tiny models, a toy reward)."""

from __future__ import annotations

import pytest
import torch

from rlhf_ext.trainer import GPTConfig, PPOConfig, PPOTrainer, TinyGPT
from rlhf_ext.trainer.demo import DemoTokenizer, hidden_rule


def tiny_gpt(seed: int = 0, d_model: int = 16, vocab_size: int = DemoTokenizer.vocab_size):
    """A one-layer TinyGPT with a fixed initialisation."""
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig(vocab_size, n_layer=1, n_head=2, d_model=d_model, max_seq_len=32))


def tiny_config(tmp_path, **overrides) -> PPOConfig:
    """A fast PPOConfig writing under ``tmp_path``."""
    fields = dict(
        total_iterations=3,
        rollout_batch_size=8,
        mini_batch_size=4,
        ppo_epochs=2,
        max_new_tokens=6,
        learning_rate=3e-3,
        kl_coef=0.05,
        kl_horizon=100.0,
        output_dir=str(tmp_path),
        progress_bar=False,
        sample_interval=1000,
        checkpoint_interval=1000,
    )
    fields.update(overrides)
    return PPOConfig(**fields)


def a_fraction(prompts, completions):
    """The demo's hidden rule as a reward function."""
    return hidden_rule(completions)


def prompts(count: int = 16, seed: int = 0) -> list[list[int]]:
    """Random short prompts over the demo vocabulary (BOS + 2..4 content tokens)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        length = int(torch.randint(2, 5, (1,), generator=gen))
        out.append(
            [1] + (torch.randint(3, DemoTokenizer.vocab_size, (length,), generator=gen).tolist())
        )
    return out


def tiny_trainer(tmp_path, reward=a_fraction, value_model=None, seed=0, **overrides):
    """A PPOTrainer on a fresh tiny GPT with the demo tokenizer."""
    policy = tiny_gpt(seed)
    critic = tiny_gpt(seed + 1) if value_model == "separate" else None
    config = tiny_config(tmp_path, seed=seed, **overrides)
    return PPOTrainer(config, policy, None, reward, DemoTokenizer(), critic, log=_Sink())


class _Sink:
    """A log stream that keeps the lines (tests read them)."""

    def __init__(self) -> None:
        self.lines = []

    def write(self, text: str) -> None:
        self.lines.append(text)

    def flush(self) -> None:
        pass


def transformers_or_skip():
    """The transformers module, or a skip of the calling test."""
    return pytest.importorskip(
        "transformers", reason="transformers is not installed (the optional `trainer` extra)"
    )


def hf_gpt2(seed: int):
    """A tiny randomly initialised transformers GPT-2 over the ByteTokenizer's vocabulary
    (built from a config: no download). Skips the test without transformers."""
    transformers = transformers_or_skip()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=259, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    return transformers.AutoModelForCausalLM.from_config(config)


def byte_reward(prompts, completions):
    """Fraction of the letter "a" in each completion (for ByteTokenizer runs)."""
    return [c.count("a") / max(len(c), 1) for c in completions]


PICKLE_MARKER: list = []  # what a malicious checkpoint's payload would have done


def pickle_marker() -> None:
    """A harmless stand-in for ``os.system``: records that it ran."""
    PICKLE_MARKER.append("ran")


class Malicious:
    """Unpickles by calling :func:`pickle_marker` (a crafted checkpoint's trick)."""

    def __reduce__(self):
        return (pickle_marker, ())


def ddp_worker(rank: int, world_size: int, folder: str, overrides: dict | None = None) -> None:
    """One rank of the 2-process gloo test: train 2 iterations (PPOConfig ``overrides``),
    save the weights."""
    import datetime
    import gc
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),  # a lost rank fails the test, never hangs it
    )
    from rlhf_ext.trainer.distributed import local_value

    overrides = dict(overrides or {})
    iterations, resume = overrides.pop("iterations", 2), overrides.pop("resume", False)
    try:
        trainer = tiny_trainer(
            os.path.join(folder, "run"), seed=0, total_iterations=iterations, **overrides
        )
        if resume:
            trainer.load_checkpoint()
        trainer.train(prompts())
        # whole tensors (an FSDP run's parameters are sharded DTensors)
        flat = torch.cat([local_value(p.detach()).flatten() for p in trainer.all_parameters()])
        policy = {k: local_value(v.detach()) for k, v in trainer.policy_lm.named_parameters()}
        torch.save(
            {"params": flat, "kl_coef": trainer.kl_controller.value, "policy": policy},
            os.path.join(folder, f"rank{rank}.pt"),
        )
        del trainer, flat, policy  # the sharded models' DTensors, before the group goes
        gc.collect()
        # both ranks done before either tears the group down: a rank that exits while gloo
        # still holds the other's work aborts ("terminate called without an active
        # exception", seen once in a fresh-clone CI of the FSDP test)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread than with OpenMP barriers on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
