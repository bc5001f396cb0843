"""Checkpoints of the PPO trainer: what they hold, how they are written
(atomically, every rank's random-number state in them) and how a run resumes
from one."""

from __future__ import annotations

import os
import random
import tempfile
from typing import TYPE_CHECKING

import numpy as np
import torch

from rlhf_ext.trainer import distributed as dist

if TYPE_CHECKING:  # the trainer imports this module
    from rlhf_ext.trainer.config import PPOConfig
    from rlhf_ext.trainer.ppo import PPOTrainer

TRAINER = "rlhf_ext.trainer.PPOTrainer"
CHECKPOINT_FILE = "checkpoint.pt"  # in the run's output_dir
# a resumed run must agree with its checkpoint on these (the sampling and batching)
RESUME_FIELDS = ("seed", "rollout_batch_size", "mini_batch_size", "micro_batch_size")


def trainer_state(trainer: PPOTrainer) -> dict:
    """The trainer's state a resumed run needs, without the RNG states (those of
    every rank are added by :func:`save_trainer_checkpoint` under ``"rng"``)."""
    return {
        "iteration": trainer.iteration,
        "episodes": trainer.episodes,
        "config": trainer.config.to_dict(),
        "model": trainer.model.state_dict(),
        "critic": trainer.critic.state_dict() if trainer.critic is not None else None,
        "optimizer": trainer.optimizer.state_dict(),
        "kl_controller": trainer.kl_controller.state_dict(),
        "reward_moments": (
            trainer.reward_moments.state_dict() if trainer.reward_moments is not None else None
        ),
        "nonfinite_in_row": trainer.nonfinite_in_row,
    }


def save_trainer_checkpoint(trainer: PPOTrainer, path: str) -> str:
    """Write ``trainer``'s checkpoint to ``path`` atomically: rank 0 writes it,
    with every rank's RNG states (a collective: every rank must call it)."""
    rng_states = dist.gather_objects(capture_rng(trainer.generator))
    if trainer.rank == 0:
        state = trainer_state(trainer)
        state["rng"] = rng_states
        atomic_torch_save(state, path)
    dist.barrier()  # no rank reads the file before it is complete
    return path


def load_trainer_checkpoint(trainer: PPOTrainer, path: str) -> None:
    """Restore ``trainer`` (models, optimizer, KL controller, reward moments,
    counters, this rank's RNG states) from a checkpoint written by
    :func:`save_trainer_checkpoint`, after checking that this run can continue it."""
    state = load_checkpoint(path)
    check_resumable(state, trainer.config, trainer.world_size, path)
    trainer.model.load_state_dict(state["model"])
    if trainer.critic is not None:
        trainer.critic.load_state_dict(state["critic"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.kl_controller.load_state_dict(state["kl_controller"])
    if trainer.reward_moments is not None and state["reward_moments"] is not None:
        trainer.reward_moments.load_state_dict(state["reward_moments"])
    trainer.iteration = state["iteration"]
    # a checkpoint without the counter: count every iteration as a full rollout
    trainer.episodes = state.get(
        "episodes", trainer.iteration * trainer.config.rollout_batch_size * trainer.world_size
    )
    trainer.nonfinite_in_row = state["nonfinite_in_row"]
    restore_rng(state["rng"][trainer.rank], trainer.generator)


def check_resumable(state: dict, config: PPOConfig, world_size: int, path: str) -> None:
    """ValueError unless a run of ``world_size`` ranks with ``config`` gives the
    results the checkpoint's own run would have: same world size and the same
    :data:`RESUME_FIELDS` (each mismatch named)."""
    written_by = len(state["rng"])  # one RNG state per rank
    if written_by != world_size:
        raise ValueError(
            f"{TRAINER}.load_checkpoint: {path} was written by {written_by} rank(s), "
            f"this run has {world_size}"
        )
    stored = state.get("config", {})  # a checkpoint without a config is not checked
    mismatched = [
        f"`{name}` (checkpoint {stored[name]!r}, this run {getattr(config, name)!r})"
        for name in RESUME_FIELDS
        if name in stored and stored[name] != getattr(config, name)
    ]
    if mismatched:
        raise ValueError(
            f"{TRAINER}.load_checkpoint: {path} was written with a different "
            + ", ".join(mismatched)
            + "; resume with the checkpoint's values or start a fresh output_dir"
        )


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename it over
    ``path``: a reader (or a crash) never sees a half-written checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def capture_rng(generator: torch.Generator) -> dict:
    """Every random state a run draws from: torch (CPU, CUDA), the trainer's
    sampling generator, Python's and NumPy's."""
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    """Undo :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by the trainer (CPU tensors)."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"rlhf_ext.trainer.checkpoint.load_checkpoint: `path`: no checkpoint at {path}"
        )
    return torch.load(path, map_location="cpu", weights_only=False)
