"""``python -m bench vocab_parallel``: log-probs and entropy of vocabulary-sharded logits
over a gloo process group of ``--world`` CPU processes (spawned here, one thread each):
rlhf_ext.vocab_parallel_token_logprobs against verl's Megatron path
(``vocab_parallel_entropy`` then ``vocab_parallel_log_probs_from_logits``, verl's own code
run on a stand-in for megatron-core: bench/peers.py ``install_fake_megatron``), and the
single-process op on the whole logits (as many threads as ranks).

Per rank and call (forward + backward of log-probs + entropy): the collectives and the
bytes each rank contributes to them (counted by wrapping torch.distributed's functions), the
bytes the autograd graph saves for the backward beyond the logits themselves (a
saved-tensors hook), and the median time. Nothing is saved: the figures go to
docs/performance.md by hand.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import harness

# (rows N, vocabulary columns per rank V_local): issue 21's shape
SHAPE = (8192, 38000)
QUICK_SHAPE = (512, 4000)
WORLD = 2
REPEATS, QUICK_REPEATS = 5, 3


class _Counter:
    """Wraps torch.distributed's all_reduce and all_gather: calls and the bytes this rank
    puts in."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.calls, self.bytes = dist, 0, 0
        self.originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}

    def __enter__(self):
        def counted(original, sent_of):
            def call(*args, **kwargs):
                self.calls += 1
                sent = sent_of(*args, **kwargs)
                self.bytes += sent.numel() * sent.element_size()
                return original(*args, **kwargs)

            return call

        self.dist.all_reduce = counted(self.originals["all_reduce"], lambda t, *a, **k: t)
        self.dist.all_gather = counted(self.originals["all_gather"], lambda out, t, *a, **k: t)
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(self.dist, name, original)


def _saved_bytes(run: Callable[[], torch.Tensor], logits: torch.Tensor) -> tuple[int, object]:
    """Bytes of the distinct storages the autograd graph of ``run()`` saves, other than
    the logits' own; and the output (to backpropagate through)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() != logits.untyped_storage().data_ptr():
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(storages.values()), out


def _implementations(rank: int, shard: torch.Tensor, labels: torch.Tensor, vocab_start: int):
    """name -> a call returning log-probs + entropy (a scalar to backpropagate)."""
    import rlhf_ext

    impls = {}
    try:
        import torch.distributed as dist

        from . import peers

        peers.install_fake_megatron(dist.group.WORLD)
        torch._dynamo.config.disable = True  # verl's torch.compile'd helper runs eagerly
        from verl.utils.megatron import tensor_parallel as verl_tp

        def verl(x):
            entropy = verl_tp.vocab_parallel_entropy(x)
            logprobs = verl_tp.vocab_parallel_log_probs_from_logits(x, labels)
            return logprobs.sum() + entropy.sum()

        impls["verl (Megatron)"] = verl
    except ImportError:
        pass

    def ours(x):
        logprobs, entropy = rlhf_ext.vocab_parallel_token_logprobs(
            x, labels, vocab_start=vocab_start, return_entropy=True, validate=False
        )
        return logprobs.sum() + entropy.sum()

    impls["rlhf_ext"] = ours
    return impls


def _rank_main(rank: int, world: int, rendezvous: str, shape, repeats: int, out: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)  # fmt: skip
    rows, local = shape
    generator = torch.Generator().manual_seed(rank)
    shard = torch.randn(rows, local, generator=generator) * 3
    labels = torch.randint(0, local * world, (rows,), generator=torch.Generator().manual_seed(99))
    report = {}
    for name, impl in _implementations(rank, shard, labels, rank * local).items():
        leaf = shard.clone().requires_grad_()
        logits = leaf * 1.0  # a model's output: verl's entropy backward writes it in place
        with _Counter() as counter:
            saved, loss = _saved_bytes(lambda impl=impl, logits=logits: impl(logits), logits)
            loss.backward()
        seconds = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            leaf.grad = None
            impl(leaf * 1.0).backward()
            seconds.append(time.perf_counter() - start)
        report[name] = dict(calls=counter.calls, bytes=counter.bytes, saved=saved,
                            ms=1e3 * statistics.median(seconds))  # fmt: skip
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    dist.destroy_process_group()


def _single_process(shape, world: int, repeats: int) -> dict:
    import rlhf_ext

    rows, local = shape
    threads = torch.get_num_threads()
    torch.set_num_threads(world)
    try:
        logits = torch.randn(rows, local * world) * 3
        labels = torch.randint(0, local * world, (rows,))
        leaf = logits.requires_grad_()

        def run(x):
            logprobs, entropy = rlhf_ext.token_logprobs(x, labels, return_entropy=True)
            return logprobs.sum() + entropy.sum()

        x = leaf * 1.0
        saved, loss = _saved_bytes(lambda: run(x), x)
        loss.backward()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            leaf.grad = None
            run(leaf * 1.0).backward()
            seconds.append(time.perf_counter() - start)
        return dict(calls=0, bytes=0, saved=saved, ms=1e3 * statistics.median(seconds))
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    """Spawn the ranks, time each implementation, print the table."""
    import torch.multiprocessing as mp

    def extra(parser):
        parser.add_argument("--world", type=int, default=WORLD, help="processes (default 2)")

    args = harness.parse_args("vocab_parallel", argv, __doc__.splitlines()[0], extra)
    shape = QUICK_SHAPE if args.quick else SHAPE
    repeats = QUICK_REPEATS if args.quick else REPEATS
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        mp.spawn(_rank_main, args=(args.world, os.path.join(tmp, "rendezvous"), shape, repeats,
                                   out), nprocs=args.world)  # fmt: skip
        report = json.loads(Path(out).read_text())
    report[f"single process ({args.world} threads)"] = _single_process(shape, args.world, repeats)
    rows, local = shape
    print(f"\nvocab-parallel log-probs + entropy, forward + backward: N={rows}, V_local={local}, "
          f"{args.world} gloo ranks (V={local * args.world}), float32")  # fmt: skip
    print(f"{'implementation':30s} {'collectives':>11s} {'bytes/rank':>12s} {'floats/row':>10s} "
          f"{'saved MiB/rank':>14s} {'median ms':>10s}")  # fmt: skip
    for name, row in report.items():
        print(f"{name:30s} {row['calls']:11d} {row['bytes']:12d} {row['bytes'] / 4 / rows:10.2f} "
              f"{row['saved'] / 2**20:14.1f} {row['ms']:10.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
