"""The few collective operations the trainer needs; no-ops in a single process. And
FSDP2's parameter sharding (``parallelism="fsdp"``)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn


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


def shard(module: nn.Module) -> nn.Module:
    """FSDP2 (``fully_shard``) over ``module`` in place: each block of every
    ``nn.ModuleList`` (a transformer's layers) is its own unit, gathered for its forward
    and backward only, and the rest (embeddings, head, value head) the root's. Returns
    ``module``, whose parameters are now DTensors sharded over the ranks."""
    from torch.distributed.fsdp import fully_shard

    for child in module.modules():
        if isinstance(child, nn.ModuleList):
            for block in child:
                fully_shard(block)
    fully_shard(module)
    # FSDP2 makes the first module to run forward the root; generation calls the policy LM,
    # a child of a value-head model, first: initialise from the real root now (a private
    # call: torch has no public one; checked by the 2-process FSDP tests)
    module._get_fsdp_state()._lazy_init()
    return module


def is_sharded(module: nn.Module | None) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gathered(module: nn.Module):
    """Every FSDP unit of ``module`` unsharded for the whole block, with no collective
    inside it: generation runs as many forwards as its longest sequence needs, which
    differs between ranks. A no-op for a module that is not sharded."""
    units = [m for m in module.modules() if is_sharded(m)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield module
    finally:
        for unit in reversed(units):
            unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's value as a plain tensor (a plain tensor as it is)."""
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else tensor
