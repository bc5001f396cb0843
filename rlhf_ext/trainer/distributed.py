"""The few collective operations the trainer needs; no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group (e.g. under torchrun)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo CPU ones.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value across ranks (one all-reduce for the whole dict)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    packed = packed.to(_collective_device())
    dist.all_reduce(packed)
    packed = packed.cpu() / world_size()
    return dict(zip(keys, packed.tolist(), strict=True))


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on any rank (so every rank takes the same branch)."""
    if not is_distributed():
        return flag
    packed = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return bool(packed.item() > 0)


def gather_from_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors from every rank along dim 0."""
    if not is_distributed():
        return tensor
    local = tensor.to(_collective_device())
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(tensor.device)


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (a picklable value), in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank."""
    if is_distributed():
        dist.barrier()
