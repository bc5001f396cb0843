"""Atomic checkpoints and the random-number state they carry."""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch


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
