"""What each spawned process of python_tests/test_vocab_parallel.py runs: a gloo process
group, every rank building the same full inputs from one seed and passing its shard to the
vocab-parallel ops, checked against the single-device op on the full inputs. A failed check
raises in the worker, which torch.multiprocessing.spawn re-raises in the test."""

from __future__ import annotations

import datetime
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist

import rlhf_ext
from rlhf_ext.ops.vocab_parallel import SHARDED_OUTPUTS

TIMEOUT = datetime.timedelta(seconds=60)
SHORT = datetime.timedelta(seconds=3)
# float32 results of the merge against the single-device op (sums in another order)
TOL = dict(rtol=2e-5, atol=2e-5)


def shard_bounds(vocab: int, world: int) -> list[tuple[int, int]]:
    """Uneven shards tiling [0, vocab): rank r holds [start_r, end_r)."""
    cuts = [0] + [round(vocab * (r + 1) / world) + (r % 2) * 2 for r in range(world - 1)] + [vocab]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def init(rank: int, world: int, path: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{path}", rank=rank, world_size=world, timeout=TIMEOUT
    )


def _inputs(seed: int, rows_shape, vocab: int, dtype, *, targets_in=None):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*rows_shape, vocab, generator=generator) * 3).to(dtype)
    low, high = targets_in or (0, vocab)
    target = torch.randint(low, high, rows_shape, generator=generator)
    target.view(-1)[::4] = -100
    upstream = {name: torch.randn(rows_shape, generator=generator) for name in SHARDED_OUTPUTS}
    return logits, target, upstream


def _loss(result, names, upstream):
    return sum((getattr(result, name).float() * upstream[name]).sum() for name in names)


def check_token_logprobs(rank: int, world: int, dtype, seed: int, **options) -> None:
    """Values and the shard's gradient against the single-device op, every sharded output."""
    vocab = 57
    start, end = shard_bounds(vocab, world)[rank]
    targets_in = options.pop("targets_in", None)
    logits, target, upstream = _inputs(seed, (3, 7), vocab, dtype, targets_in=targets_in)
    full = logits.clone().requires_grad_()
    expected = rlhf_ext.token_logprobs(full, target, outputs=SHARDED_OUTPUTS, **options)
    _loss(expected, SHARDED_OUTPUTS, upstream).backward()
    shard = logits[..., start:end].clone().requires_grad_()
    got = rlhf_ext.vocab_parallel_token_logprobs(
        shard, target, vocab_start=start, outputs=SHARDED_OUTPUTS, timeout=TIMEOUT, **options
    )
    _loss(got, SHARDED_OUTPUTS, upstream).backward()
    for name in SHARDED_OUTPUTS:
        want, have = getattr(expected, name), getattr(got, name)
        assert have.dtype == want.dtype, (name, have.dtype, want.dtype)
        torch.testing.assert_close(have, want, **TOL, msg=f"rank {rank} {name}")
    torch.testing.assert_close(shard.grad, full.grad[..., start:end], **TOL)


def check_short_forms(rank: int, world: int) -> None:
    """return_entropy=True and the log-probs alone; ignored rows are 0 with zero gradient."""
    vocab = 40
    start, end = shard_bounds(vocab, world)[rank]
    logits, target, _ = _inputs(7, (9,), vocab, torch.float32)
    lp, ent = rlhf_ext.token_logprobs(logits, target, return_entropy=True)
    shard = logits[:, start:end].clone().requires_grad_()
    got_lp, got_ent = rlhf_ext.vocab_parallel_token_logprobs(
        shard, target, vocab_start=start, return_entropy=True, timeout=TIMEOUT
    )
    torch.testing.assert_close(got_lp, lp, **TOL)
    torch.testing.assert_close(got_ent, ent, **TOL)
    (got_lp.sum() + got_ent.sum()).backward()
    assert (shard.grad[target == -100] == 0).all()
    only = rlhf_ext.vocab_parallel_token_logprobs(
        shard.detach(), target, vocab_start=start, timeout=TIMEOUT
    )
    torch.testing.assert_close(only, lp, **TOL)


def check_invariance(rank: int, world: int) -> None:
    """A row's result does not depend on the batch, and the same inputs give the same bits."""
    vocab = 50
    start, end = shard_bounds(vocab, world)[rank]
    logits, target, _ = _inputs(3, (12,), vocab, torch.float32)
    shard = logits[:, start:end]

    def run(rows):
        return rlhf_ext.vocab_parallel_token_logprobs(
            shard[rows], target[rows], vocab_start=start, outputs=SHARDED_OUTPUTS,
            timeout=TIMEOUT,
        )  # fmt: skip

    whole, again, part = run(slice(None)), run(slice(None)), run(slice(3, 8))
    for name in SHARDED_OUTPUTS:
        assert torch.equal(getattr(whole, name), getattr(again, name)), name
        assert torch.equal(getattr(whole, name)[3:8], getattr(part, name)), name


def check_linear(rank: int, world: int, dtype) -> None:
    """The sharded LM head: values, the hidden states' gradient (summed over ranks) and
    this shard's weight and bias gradients, against the single-device op."""
    vocab, size = 45, 16
    start, end = shard_bounds(vocab, world)[rank]
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(2, 6, size, generator=generator).to(dtype)
    weight = (torch.randn(vocab, size, generator=generator) * 0.5).to(dtype)
    bias = torch.randn(vocab, generator=generator).to(dtype)
    target = torch.randint(0, vocab, (2, 6), generator=generator)
    target[0, 1] = -100
    upstream = {name: torch.randn(2, 6, generator=generator) for name in SHARDED_OUTPUTS}
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    expected = rlhf_ext.linear_token_logprobs(
        leaves[0], leaves[1], target, bias=leaves[2], outputs=SHARDED_OUTPUTS
    )
    _loss(expected, SHARDED_OUTPUTS, upstream).backward()
    mine = [t.clone().requires_grad_() for t in (hidden, weight[start:end], bias[start:end])]
    got = rlhf_ext.vocab_parallel_linear_token_logprobs(
        mine[0], mine[1], target, bias=mine[2], vocab_start=start, outputs=SHARDED_OUTPUTS,
        timeout=TIMEOUT,
    )  # fmt: skip
    _loss(got, SHARDED_OUTPUTS, upstream).backward()
    for name in SHARDED_OUTPUTS:  # float32 outputs: float32's tolerance in both dtypes
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), **TOL)
    # the gradients are in the inputs' dtype: each rank's part of the hidden states' is
    # rounded to bf16 before the sum, one bf16 ulp from the single device's
    tol = TOL if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(mine[0].grad, leaves[0].grad, **tol)
    torch.testing.assert_close(mine[1].grad, leaves[1].grad[start:end], **tol)
    torch.testing.assert_close(mine[2].grad, leaves[2].grad[start:end], **tol)


def expect_error(kind, words: str, call) -> None:
    try:
        call()
    except kind as error:
        assert words in str(error), f"{words!r} not in {error}"
        return
    raise AssertionError(f"no {kind.__name__} with {words!r}")


def check_errors(rank: int, world: int) -> None:
    """Bad layouts raise on every rank (naming the rank), not a hang."""
    vocab = 30
    start, end = shard_bounds(vocab, world)[rank]
    logits, target, _ = _inputs(5, (6,), vocab, torch.float32)
    shard = logits[:, start:end]
    call = rlhf_ext.vocab_parallel_token_logprobs
    last = world - 1
    # the last rank's shard starts one column late
    wrong_start = start + (rank == last)
    expect_error(ValueError, f"rank {last}'s shard starts at",
                 lambda: call(shard, target, vocab_start=wrong_start, timeout=SHORT))  # fmt: skip
    # the last rank passes one row fewer
    rows = slice(0, 5) if rank == last else slice(None)
    expect_error(ValueError, "disagree on the number of rows",
                 lambda: call(shard[rows], target[rows], vocab_start=start,
                              timeout=SHORT))  # fmt: skip
    # the last rank's targets differ
    other = target.clone()
    other[1] = (other[1] + 1) % vocab if rank == last else other[1]
    expect_error(ValueError, "disagree on `target`",
                 lambda: call(shard, other, vocab_start=start, timeout=SHORT))  # fmt: skip
    # the last rank passes float targets: its own TypeError there, "refused" elsewhere
    bad = target.float() if rank == last else target
    if rank == last:
        expect_error(TypeError, "`target` must be an int64 or int32 tensor",
                     lambda: call(shard, bad, vocab_start=start, timeout=SHORT))  # fmt: skip
    else:
        expect_error(ValueError, f"rank {last} refused its arguments",
                     lambda: call(shard, bad, vocab_start=start, timeout=SHORT))  # fmt: skip
    # a target beyond the shards' vocabulary
    beyond = target.clone()
    beyond[2] = vocab
    expect_error(ValueError, f"outside [0, {vocab})",
                 lambda: call(shard, beyond, vocab_start=start, timeout=SHORT))  # fmt: skip
    expect_error(ValueError, '"is_top1" is not computed on sharded logits',
                 lambda: call(shard, target, vocab_start=start, outputs=("is_top1",)))  # fmt: skip
    # still in step: a good call after the refused ones
    torch.testing.assert_close(
        call(shard, target, vocab_start=start, timeout=SHORT),
        rlhf_ext.token_logprobs(logits, target),
        **TOL,
    )
    # the last rank never calls: the others get the op's timeout error
    if rank != last:
        expect_error(RuntimeError, "did not complete",
                     lambda: call(shard, target, vocab_start=start, timeout=SHORT))  # fmt: skip


def check_verl_megatron(rank: int, world: int) -> None:
    """verl's Megatron entry points (verl.utils.megatron.tensor_parallel, imported with a
    stand-in for megatron-core: bench/peers.py install_fake_megatron) unpatched and
    patched: values and the shard's gradients agree; the patched ones are the adapters."""
    try:
        import verl  # noqa: F401
    except ImportError:
        return
    from bench import peers

    torch._dynamo.config.disable = True  # verl's torch.compile'd helper: eager here
    peers.install_fake_megatron(dist.group.WORLD)
    from verl.utils.megatron import tensor_parallel as verl_tp

    from rlhf_ext.integrations import verl as adapter

    local = 19  # Megatron's equal shards
    generator = torch.Generator().manual_seed(21)
    logits = torch.randn(2, 5, local * world, generator=generator) * 3
    labels = torch.randint(0, local * world, (2, 5), generator=generator)
    upstream = torch.randn(2, 5, generator=generator)
    shard = logits[..., rank * local : (rank + 1) * local]
    calls = {
        "vocab_parallel_entropy": lambda m, x: m.vocab_parallel_entropy(x),
        "vocab_parallel_entropy_with_chunking":  # one chunk: see below
            lambda m, x: m.vocab_parallel_entropy_with_chunking(x, chunk_size=8),
        "vocab_parallel_sum_pi_squared": lambda m, x: m.vocab_parallel_sum_pi_squared(x),
        "vocab_parallel_log_probs_from_logits":
            lambda m, x: m.vocab_parallel_log_probs_from_logits(x, labels),
    }  # fmt: skip

    def run(name, logits_in=shard, module=verl_tp):
        leaf = logits_in.clone().requires_grad_()
        value = calls[name](module, leaf * 1.0)  # verl's entropy backward writes its input
        (value * upstream).sum().backward()
        return value.detach(), leaf.grad

    def entropy_grad(chunk_size=None):
        leaf = shard.clone().requires_grad_()
        if chunk_size is None:
            entropy = verl_tp.vocab_parallel_entropy(leaf * 1.0)
        else:
            entropy = verl_tp.vocab_parallel_entropy_with_chunking(leaf * 1.0, chunk_size)
        entropy.sum().backward()
        return leaf.grad

    # the single-device gradients, of the same functions of the full logits
    columns = slice(rank * local, (rank + 1) * local)
    single = SimpleNamespace(
        vocab_parallel_entropy=lambda x: torch.distributions.Categorical(logits=x).entropy(),
        vocab_parallel_entropy_with_chunking=lambda x, chunk_size: torch.distributions
        .Categorical(logits=x).entropy(),
        vocab_parallel_sum_pi_squared=lambda x: x.softmax(-1).pow(2).sum(-1),
        vocab_parallel_log_probs_from_logits=lambda x, y: x.log_softmax(-1).gather(
            -1, y.unsqueeze(-1)).squeeze(-1),
    )  # fmt: skip
    exact = {name: run(name, logits, single)[1][..., columns] for name in calls}
    theirs = {name: run(name) for name in calls}
    # verl's chunked entropy cannot backpropagate through two chunks: each chunk's backward
    # writes its saved view of the logits in place, and autograd refuses the others
    expect_error(RuntimeError, "modified by an inplace operation", lambda: entropy_grad(2))
    their_entropy_grad = entropy_grad()
    # verl's sum_pi_squared backpropagates through c10d's in-place all_reduce, which has no
    # autograd formula (torch warns "silently incorrect"): its gradient is wrong, by ~0.1 here
    error = theirs["vocab_parallel_sum_pi_squared"][1] - exact["vocab_parallel_sum_pi_squared"]
    assert error.abs().max() > 1e-2
    replaced = adapter.patch()
    try:
        assert all(f"verl.utils.megatron.tensor_parallel.{name}" in replaced for name in calls)
        ours = {name: run(name) for name in calls}
        torch.testing.assert_close(entropy_grad(2), their_entropy_grad, **TOL)
    finally:
        adapter.unpatch()
    assert verl_tp.vocab_parallel_entropy is not adapter.vocab_parallel_entropy
    for name in calls:
        assert ours[name][0].dtype == theirs[name][0].dtype, name
        torch.testing.assert_close(ours[name][0], theirs[name][0], **TOL, msg=name)
        torch.testing.assert_close(ours[name][1], exact[name], **TOL, msg=name)
        if name != "vocab_parallel_sum_pi_squared":
            torch.testing.assert_close(ours[name][1], theirs[name][1], **TOL, msg=name)


def run_all(rank: int, world: int, path: str) -> None:
    """Every check of one world size, in one process group."""
    init(rank, world, path)
    check_token_logprobs(rank, world, torch.float32, 0)
    check_token_logprobs(rank, world, torch.bfloat16, 1)
    temps = torch.rand(3, generator=torch.Generator().manual_seed(2)) + 0.5
    check_token_logprobs(rank, world, torch.float32, 2, temperature=temps, softcap=5.0,
                         logit_scale=1.5)  # fmt: skip
    # every target in rank 0's shard: the other ranks hold none
    check_token_logprobs(rank, world, torch.float32, 3, targets_in=(0, 10))
    check_short_forms(rank, world)
    check_invariance(rank, world)
    check_linear(rank, world, torch.float32)
    check_linear(rank, world, torch.bfloat16)
    check_verl_megatron(rank, world)
    check_errors(rank, world)
