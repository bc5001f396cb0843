"""Checkpoints of the PPO trainer: what they hold, how they are written
(atomically, every rank's random-number state in them) and how a run resumes
from one."""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from typing import TYPE_CHECKING

import numpy as np
import torch

from rlhf_ext.trainer import distributed as dist
from rlhf_ext.trainer.advantages import ADVANTAGE_ESTIMATORS
from rlhf_ext.trainer.export import describe_lm, describe_tokenizer

if TYPE_CHECKING:  # the trainer imports this module
    from rlhf_ext.trainer.config import PPOConfig
    from rlhf_ext.trainer.ppo import PPOTrainer

TRAINER = "rlhf_ext.trainer.PPOTrainer"
CHECKPOINT_FILE = "checkpoint.pt"  # in the run's output_dir
# a resumed run must agree with its checkpoint on these (the sampling and batching)
RESUME_FIELDS = (
    "seed",
    "rollout_batch_size",
    "mini_batch_size",
    "micro_batch_size",
    "num_generations",
    # how the weights are stored: whole in checkpoint.pt (ddp) or sharded beside it (fsdp)
    "parallelism",
    # the LoRA layout: which weights the state dicts hold
    "lora_rank",
    "lora_alpha",
    "lora_target_modules",
)
# what a checkpoint from before a field existed was written with (PPOConfig's defaults)
RESUME_DEFAULTS = {
    "parallelism": "ddp",
    "num_generations": 1,
    "advantage_estimator": "gae",
    "lora_rank": 0,
    "lora_alpha": 16.0,
    "lora_target_modules": "all-linear",
}
# atomic_torch_save's temporaries: mkstemp's prefix, 8 random name characters, suffix
TMP_PREFIX, TMP_SUFFIX = ".tmp-", ".pt"
TMP_PATTERN = re.compile(re.escape(TMP_PREFIX) + r"[a-z0-9_]{8}" + re.escape(TMP_SUFFIX))
LOAD = "rlhf_ext.trainer.checkpoint.load_checkpoint"
# parallelism="fsdp": the models' and optimizer's shards, a torch.distributed.checkpoint
# folder next to checkpoint.pt (its name is in checkpoint.pt under "sharded")
SHARDED_SUFFIX = ".shards"


def _trained_modules(trainer: PPOTrainer):
    """The trained models under one module, the keys of the sharded state dicts
    ("model." / "critic." prefixes)."""
    modules = {"model": trainer.model}
    if trainer.critic is not None:
        modules["critic"] = trainer.critic
    return torch.nn.ModuleDict(modules)


def trainer_state(trainer: PPOTrainer) -> dict:
    """The trainer's state a resumed run needs, without the RNG states (those of
    every rank are added by :func:`save_trainer_checkpoint` under ``"rng"``). Sharded
    models (``parallelism="fsdp"``) leave "model", "critic" and "optimizer" empty: their
    shards are in the folder named under "sharded"."""
    if dist.is_sharded(trainer.model):
        return {**_common_state(trainer), "model": {}, "critic": None, "optimizer": {}}
    return {
        **_common_state(trainer),
        "model": trainer.model.state_dict(),
        "critic": trainer.critic.state_dict() if trainer.critic is not None else None,
        "optimizer": trainer.optimizer.state_dict(),
    }


def _common_state(trainer: PPOTrainer) -> dict:
    return {
        "iteration": trainer.iteration,
        "episodes": trainer.episodes,
        "config": trainer.config.to_dict(),
        # how to rebuild the models without the run's code (python -m rlhf_ext export)
        "models": {
            "policy": describe_lm(trainer.policy_lm),
            "critic": describe_lm(trainer.critic.lm) if trainer.critic is not None else None,
            "tokenizer": describe_tokenizer(trainer.tokenizer),
        },
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
    sharded = dist.is_sharded(trainer.model)
    if sharded:
        _save_shards(trainer, path + SHARDED_SUFFIX)
    if trainer.rank == 0:
        state = trainer_state(trainer)
        state["rng"] = rng_states
        if sharded:
            state["sharded"] = os.path.basename(path) + SHARDED_SUFFIX
        atomic_torch_save(state, path)
    dist.barrier()  # no rank reads the file before it is complete
    return path


def _sharded_state(trainer: PPOTrainer) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    modules = _trained_modules(trainer)
    return {"models": get_model_state_dict(modules),
            "optimizer": get_optimizer_state_dict(modules, trainer.optimizer)}  # fmt: skip


def _save_shards(trainer: PPOTrainer, folder: str) -> None:
    """Every rank writes its shards (torch.distributed.checkpoint) into a fresh folder,
    which then replaces ``folder``: a crash mid-way leaves the previous shards whole."""
    import shutil

    import torch.distributed.checkpoint as dcp

    fresh = folder + ".tmp"
    if trainer.rank == 0 and os.path.exists(fresh):
        shutil.rmtree(fresh)
    dist.barrier()
    dcp.save(_sharded_state(trainer), checkpoint_id=fresh)
    dist.barrier()
    if trainer.rank == 0:
        old = folder + ".old"
        if os.path.exists(folder):
            os.replace(folder, old)
        os.replace(fresh, folder)
        if os.path.exists(old):
            shutil.rmtree(old)
    dist.barrier()


def _load_shards(trainer: PPOTrainer, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{TRAINER}.load_checkpoint: the shards {folder} are missing")
    state = _sharded_state(trainer)
    dcp.load(state, checkpoint_id=folder)
    modules = _trained_modules(trainer)
    set_model_state_dict(modules, state["models"])
    set_optimizer_state_dict(modules, trainer.optimizer, state["optimizer"])


def full_sharded_states(path: str, state: dict) -> dict:
    """A sharded checkpoint's models in one process, without a process group: ``state``
    (read from ``path``) with "model" and "critic" filled from the shards."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = os.path.join(os.path.dirname(os.path.abspath(path)), state["sharded"])
    with tempfile.TemporaryDirectory() as tmp:
        whole = os.path.join(tmp, "whole.pt")
        dcp_to_torch_save(folder, whole)
        models = torch.load(whole, map_location="cpu", weights_only=True)["models"]
    split = {"model": {}, "critic": {}}
    for key, value in models.items():
        owner, _, name = key.partition(".")
        split[owner][name] = value
    return {**state, "model": split["model"], "critic": split["critic"] or None}


def load_trainer_checkpoint(trainer: PPOTrainer, path: str) -> None:
    """Restore ``trainer`` (models, optimizer, KL controller, reward moments,
    counters, this rank's RNG states) from a checkpoint written by
    :func:`save_trainer_checkpoint`, after checking that this run can continue it."""
    state = load_checkpoint(path)
    check_resumable(state, trainer.config, trainer.world_size, path)
    if state.get("sharded"):
        _load_shards(trainer, os.path.join(os.path.dirname(os.path.abspath(path)),
                                           state["sharded"]))  # fmt: skip
    else:
        trainer.model.load_state_dict(state["model"])
        if trainer.critic is not None:
            trainer.critic.load_state_dict(state["critic"])
        trainer.optimizer.load_state_dict(state["optimizer"])
    # the state restores the old hyper-parameters; this run's config may change them
    apply_optimizer_settings(trainer.optimizer, trainer.config)
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


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, config: PPOConfig) -> None:
    """Set the config's learning rates, weight decay and eps on the optimizer's two
    parameter groups (policy, then value head or critic)."""
    rates = (config.learning_rate, config.value_learning_rate or config.learning_rate)
    for group, lr in zip(optimizer.param_groups, rates, strict=True):
        group.update(lr=lr, weight_decay=config.weight_decay, eps=config.adam_eps)


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
    stored = state.get("config")
    if not stored:  # a checkpoint without a config is not checked
        return
    stored = {**RESUME_DEFAULTS, **stored}
    mismatched = [
        f"`{name}` (checkpoint {stored[name]!r}, this run {getattr(config, name)!r})"
        for name in RESUME_FIELDS
        if name in stored and stored[name] != getattr(config, name)
    ]
    # the models: a critic (value head or value_model) or none; estimators that agree on
    # that may follow each other (grpo -> rloo)
    written = ADVANTAGE_ESTIMATORS.get(stored["advantage_estimator"])
    if written is not None and written.needs_critic != config.needs_critic:
        has = {True: "trains a critic", False: "trains no critic"}
        mismatched.append(
            f"`advantage_estimator` (checkpoint {stored['advantage_estimator']!r}, which "
            f"{has[written.needs_critic]}; this run {config.advantage_estimator!r}, which "
            f"{has[config.needs_critic]})"
        )
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
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=folder)
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


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete what a killed :func:`atomic_torch_save` left in ``folder`` (only names
    of its own pattern); the paths removed."""
    if not os.path.isdir(folder):
        return []
    stale = [os.path.join(folder, n) for n in os.listdir(folder) if TMP_PATTERN.fullmatch(n)]
    for path in stale:
        os.remove(path)
    return stale


def capture_rng(generator: torch.Generator) -> dict:
    """Every random state a run draws from: torch (CPU, CUDA), the trainer's
    sampling generator, Python's and NumPy's (as tensors and plain values, which
    a ``weights_only`` load accepts)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    """Undo :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    random.setstate(state["python"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (numpy["name"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by the trainer (CPU tensors). ``weights_only``: a
    file holding any other object (a crafted pickle, an old-format checkpoint
    with NumPy arrays) is refused before it can run code."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{LOAD}: `path`: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():  # a class or function to import
            raise ValueError(
                f"{LOAD}: {path} holds objects other than tensors and plain containers; "
                "refused unloaded (an old-format checkpoint, or not written by the trainer)"
            ) from exc
        raise ValueError(f"{LOAD}: {path} is not a readable checkpoint ({exc})") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ValueError(
            f"{LOAD}: {path} is not a readable checkpoint (corrupt, truncated or empty: {exc})"
        ) from exc
    if not isinstance(state, dict) or not {"model", "optimizer", "rng"} <= set(state):
        raise ValueError(f"{LOAD}: {path} is not a trainer checkpoint (no model/optimizer/rng)")
    return state
