"""rlhf_ext.vocab_parallel_token_logprobs / vocab_parallel_linear_token_logprobs on 2 and
4 processes with gloo (spawned here; every collective has a timeout): results and gradients
equal to the single-device op on the full logits, ignored rows, ranks whose shard holds no
target, bf16, batch invariance, and errors on every rank for bad layouts
(python_tests/vocab_parallel_workers.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import vocab_parallel_workers as workers

import rlhf_ext

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.timeout(300)
def test_vocab_parallel_ops_match_the_single_device_op(world, tmp_path):
    mp.spawn(workers.run_all, args=(world, str(tmp_path / "rendezvous")), nprocs=world)


def test_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        rlhf_ext.vocab_parallel_token_logprobs(
            torch.randn(2, 5), torch.zeros(2, dtype=torch.long), vocab_start=0
        )


def test_shard_bounds_tile_the_vocabulary():
    for world in (2, 4):
        bounds = workers.shard_bounds(57, world)
        assert bounds[0][0] == 0 and bounds[-1][1] == 57
        pairs = zip(bounds[:-1], bounds[1:], strict=True)
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in pairs)
