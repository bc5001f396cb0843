"""``python -m bench threads``: the CPU kernels when another process holds a core.

On a shared machine, an OpenMP parallel region waits at its barrier for every thread, and
a thread whose core another process holds runs only when the scheduler gives it a turn:
a kernel split over all cores can then take a time slice (milliseconds) for microseconds
of work. This benchmark times each CPU kernel at small, medium and large sizes four ways:
with ``--threads`` threads (default: every core) and with one, each on a quiet machine and
with a competing process (a busy loop pinned to the last core). Its target, per kernel and
size: ``contended / quiet <= 2`` at every thread count (``slowdown`` in the table; above
2x is marked ``!``). Rows go to the device's CSV like the other benchmarks' (op
``threads:<kernel>``, impl ``rlhf_ext, <n> thread(s), quiet|contended``, baseline the
quiet run on the most threads; the note holds each row's slowdown). A quiet start matters,
so the run says when the load average was high. Each case alternates ``--pairs`` quiet and
contended timings (default 3) and reports the medians: a shared virtual machine drifts by
2x within a minute.

Kernels: ``gae``, ``masked_whiten`` (row statistics, then the affine map), ``token_logprobs``
(with entropy), ``policy_loss`` (ppo, forward and backward).
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from collections.abc import Callable

import torch

from . import harness

OP = "threads"
# (rows, cols) per kernel: small (the trainer's and the quick benches' sizes), medium, large
SIZES = {
    "gae": [(64, 256), (256, 1024), (1024, 4096)],
    "masked_whiten": [(64, 256), (256, 1024), (1024, 4096)],
    "token_logprobs": [(64, 256), (256, 4096), (1024, 32768)],
    "policy_loss": [(64, 256), (256, 1024), (1024, 4096)],
}
QUICK_SIZES = {name: sizes[:2] for name, sizes in SIZES.items()}
TARGET_SLOWDOWN = 2.0


def _spin() -> None:  # the competitor: one core busy until terminated
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    while True:
        pass


class Competitor:
    """A busy-loop process pinned to the last core, while the ``with`` block runs."""

    def __enter__(self):
        self.process = multiprocessing.get_context("spawn").Process(target=_spin, daemon=True)
        self.process.start()
        time.sleep(0.2)  # running and pinned before the timing starts
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.join()


def kernel_call(name: str, rows: int, cols: int) -> tuple[Callable[[], object], int]:
    """A no-argument call of the kernel on fresh random inputs, and its minimum bytes."""
    import rlhf_ext

    gen = torch.Generator().manual_seed(rows * 7 + cols)
    x = torch.randn(rows, cols, generator=gen)
    mask = torch.rand(rows, cols, generator=gen) < 0.9
    if name == "gae":
        values = torch.randn(rows, cols, generator=gen)
        return lambda: rlhf_ext.gae(x, values, mask, gamma=1.0, lam=0.95), 4 * x.numel() * 4
    if name == "masked_whiten":
        return lambda: rlhf_ext.masked_whiten(x, mask), 2 * 4 * x.numel()
    if name == "token_logprobs":
        target = torch.randint(0, cols, (rows,), generator=gen)
        return (
            lambda: rlhf_ext.token_logprobs(x, target, return_entropy=True),
            4 * x.numel(),
        )
    if name == "policy_loss":
        logprobs = x.clone().requires_grad_()
        old = x + 0.1 * torch.randn(rows, cols, generator=gen)
        advantages = torch.randn(rows, cols, generator=gen)

        def call():
            logprobs.grad = None  # no accumulation: aten's add_ would time torch's threads
            loss, _ = rlhf_ext.policy_loss(logprobs, old, advantages, mask, kind="ppo")
            loss.backward()
            return loss

        return call, 4 * 4 * x.numel()
    raise ValueError(f"bench threads: unknown kernel {name!r}")


def impl_name(threads: int, condition: str) -> str:
    return f"rlhf_ext, {threads} thread(s), {condition}"


def median_ms(call: Callable[[], object], budget: dict) -> float:
    timing = harness.time_fn(lambda _: call(), [None], torch.device("cpu"), **budget)
    return timing.median_ms


def main(argv=None) -> int:
    def extra(parser):
        parser.add_argument(
            "--pairs",
            type=int,
            default=None,
            help="quiet/contended timing pairs per case, alternated; the table shows the "
            "medians (default 3, 1 with --quick)",
        )
        parser.add_argument(
            "--kernels",
            default=None,
            help=f"comma-separated subset of {','.join(SIZES)} (default: all)",
        )

    args = harness.parse_args(OP, argv, __doc__.splitlines()[0], extra=extra)
    if args.device == "cuda":
        print("bench threads: a CPU benchmark; --device cuda has nothing to time")
        return 2
    device = torch.device("cpu")
    threads = torch.get_num_threads()  # --threads, else torch's default
    if len(os.sched_getaffinity(0)) < 2:
        print("bench threads: needs at least 2 cores (one for the competitor)")
        return 2
    runner = harness.start_runner(OP, device, args.quick)
    sizes = QUICK_SIZES if args.quick else SIZES
    kernels = args.kernels.split(",") if args.kernels else list(SIZES)
    counts = sorted({threads, 1}, reverse=True)
    pairs = args.pairs or (1 if args.quick else 3)
    table = []
    for name in kernels:
        for rows, cols in sizes[name]:
            call, nbytes = kernel_call(name, rows, cols)
            base_quiet = None  # the first count's (the most threads) quiet time: the baseline
            for count in counts:
                torch.set_num_threads(count)
                quiet_runs, contended_runs = [], []
                for _ in range(pairs):  # alternated: a drift in the machine hits both
                    quiet_runs.append(median_ms(call, runner.budget))
                    with Competitor():
                        contended_runs.append(median_ms(call, runner.budget))
                quiet, contended = statistics.median(quiet_runs), statistics.median(contended_runs)
                slowdown = contended / quiet
                base_quiet = base_quiet or quiet
                table.append((name, f"{rows}x{cols}", count, quiet, contended, slowdown))
                for condition, ms in (("quiet", quiet), ("contended", contended)):
                    runner.rows.append(
                        harness.Row(
                            date=runner.date,
                            op=f"{OP}:{name}",
                            impl=impl_name(count, condition),
                            device=runner.device_name,
                            shape=f"{rows}x{cols}",
                            dtype="float32",
                            median_ms=ms,
                            min_ms=ms,
                            repeats=pairs,
                            bytes=nbytes,
                            gbps=nbytes / 1e9 / (ms / 1e3),
                            copy_gbps=runner.copy_gbps,
                            frac_copy_bw=nbytes / 1e9 / (ms / 1e3) / runner.copy_gbps,
                            peak_mem_mib="",
                            baseline=impl_name(counts[0], "quiet"),
                            speedup=base_quiet / ms,
                            threads=count,
                            note=f"slowdown {slowdown:.2f}x (target <= {TARGET_SLOWDOWN:g}x)",
                            **runner.versions,
                        )
                    )
                mark = "!" if slowdown > TARGET_SLOWDOWN else ""
                print(
                    f"  {name} {rows}x{cols}, {count} thread(s): quiet {quiet:.4g} ms, "
                    f"contended {contended:.4g} ms, slowdown {slowdown:.2f}x{mark}",
                    flush=True,
                )
    torch.set_num_threads(threads)
    print()
    print(runner.header())
    print()
    heading = ("kernel", "shape", "threads", "quiet ms", "contended", "slowdown")
    print(f"{heading[0]:<16}{heading[1]:<12}" + "".join(f"{h:>11}" for h in heading[2:]))
    for name, shape, count, quiet, contended, slowdown in table:
        mark = " !" if slowdown > TARGET_SLOWDOWN else ""
        print(
            f"{name:<16}{shape:<12}{count:>11}{quiet:>11.4g}{contended:>11.4g}"
            f"{slowdown:>10.2f}x{mark}"
        )
    over = [row for row in table if row[5] > TARGET_SLOWDOWN]
    print(
        f"\n{len(over)} of {len(table)} cases slower than {TARGET_SLOWDOWN:g}x under contention"
        + (": " + ", ".join(f"{r[0]} {r[1]} ({r[2]} threads)" for r in over) if over else "")
    )
    runner.print_notes()
    if not args.no_save:
        path = runner.save(args.csv, args.results_dir)
        print(f"rows appended to {path}")
    return 0
