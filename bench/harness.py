"""Timing, verification and reporting shared by the ``bench/bench_<op>.py`` scripts.

One :class:`Runner` is one run of one op on one device. Per shape, a script hands it the
implementations (:class:`Impl`), several input sets and the expected outputs;
:meth:`Runner.run_case` checks every implementation's output against the expected one
(a wrong implementation is reported and never timed), then times each (median of many
repeats after warm-up, rotating among the input sets), measures its peak extra memory,
and computes GB/s, the fraction of the copy bandwidth measured in the same run, and the
speedup over a named baseline. :meth:`Runner.finish` prints the table and appends the
rows to ``<results dir>/<device-slug>.csv`` (``--results-dir``, default ``./bench-results``
under the current directory; ``--csv`` names the file itself). :func:`sweep` is the loop
every script runs:
over shapes x dtypes x modes, it builds each point's inputs and implementations from the
script's factories and hands them to the runner, then prints (and saves) the results.
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import add_results_dir_option, default_results_dir

# The command that runs these scripts, for their usage lines: bench/__main__.py sets it to
# what the user typed (python -m bench, python -m rlhf_ext bench, rlhf-ext bench).
PROG = "python -m rlhf_ext bench" if __package__ == "rlhf_ext.bench" else "python -m bench"

# CSV columns, in order (bench/README.md explains each).
COLUMNS = [
    "date",
    "op",
    "impl",
    "device",
    "shape",
    "dtype",
    "median_ms",
    "min_ms",
    "graph_ms",
    "repeats",
    "bytes",
    "gbps",
    "copy_gbps",
    "frac_copy_bw",
    "peak_mem_mib",
    "baseline",
    "speedup",
    "threads",
    "torch",
    "triton",
    "rlhf_ext",
    "cuda",
    "note",
]


@dataclass
class Impl:
    """One implementation under test.

    ``fn(inputs)`` takes one input set (a dict the bench script builds) and returns the
    outputs, a tensor or a tuple of tensors compared with the expected ones.
    ``rtol``/``atol`` are the tolerances of that comparison (against a float64 reference).
    ``optional``: a peer that may fail to run here (torch.compile, an optional library);
    if it raises, it is skipped with a note instead of failing the run (a wrong result
    still fails). ``meta``: whatever the bench script needs (e.g. for bytes_moved).
    ``check``: what verification calls instead of ``fn``, where the timed call computes
    more than the outputs compared (e.g. a backward after the checked forward).
    """

    name: str
    fn: Callable[[dict], Any]
    note: str = ""
    rtol: float = 1e-4
    atol: float = 1e-4
    optional: bool = False
    meta: dict = field(default_factory=dict)
    check: Callable[[dict], Any] | None = None


@dataclass
class Row:
    """One result row (one implementation, one shape, one dtype); fields = COLUMNS."""

    date: str
    op: str
    impl: str
    device: str
    shape: str
    dtype: str
    median_ms: float
    min_ms: float
    repeats: int
    bytes: int
    gbps: float
    copy_gbps: float
    frac_copy_bw: float
    peak_mem_mib: float | str
    graph_ms: float | str = ""
    baseline: str = ""
    speedup: float | str = ""
    threads: int = 0
    torch: str = ""
    triton: str = ""
    rlhf_ext: str = ""
    cuda: str = ""
    note: str = ""


@dataclass
class Timing:
    """Per-call times of one implementation, in milliseconds."""

    times_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)


# --------------------------------------------------------------------------- CLI


def parse_args(
    op: str,
    argv: Sequence[str] | None,
    description: str = "",
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The options every ``bench_<op>.py`` takes (see bench/README.md); `extra` may add
    the script's own."""
    # A script's first docstring line names its command (``python -m bench gae``: ...); the
    # usage line already shows the command as typed, so the description drops it.
    description = re.sub(r"^``python -m bench [^`]*``:\s*", "", description)
    parser = argparse.ArgumentParser(prog=f"{PROG} {op}", description=description)
    parser.add_argument("--quick", action="store_true", help="small shapes and a short time budget")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cuda when available, else cpu",
    )
    where = parser.add_mutually_exclusive_group()
    add_results_dir_option(where, "append rows to DIR/<device-slug>.csv")
    where.add_argument(
        "--csv",
        type=Path,
        default=None,
        metavar="PATH",
        help="append rows to this file instead",
    )
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    parser.add_argument(
        "--shapes",
        default=None,
        help="comma-separated shapes overriding the defaults, e.g. 64x256,256x1024",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated substrings; time only implementations whose name "
        "contains one (the baseline always runs)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads (torch.set_num_threads) for the run; default torch's, one per "
        "core. On a machine shared with other work, the number of idle cores "
        "(docs/trainer.md, CPU threads)",
    )
    if extra is not None:
        extra(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return args


def add_mode_dtype_args(parser: argparse.ArgumentParser, modes: Sequence[str]) -> None:
    """--modes and --dtypes, for benchmarks that time several modes and dtypes."""
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {modes}")
    parser.add_argument(
        "--dtypes", default=None, help="comma-separated, e.g. bfloat16,float32 (default per device)"
    )


def chosen_shapes(args: argparse.Namespace, shapes, quick_shapes, device: torch.device) -> list:
    """--shapes, else the quick or default shapes; each default is a list, or a dict of
    lists keyed by device type."""
    if args.shapes:
        return parse_shapes(args.shapes)
    chosen = quick_shapes if args.quick else shapes
    return chosen[device.type] if isinstance(chosen, dict) else list(chosen)


def start_runner(op: str, device: torch.device, quick: bool) -> Runner:
    """A Runner for `op` (it measures the copy bandwidth), announced on stdout."""
    runner = Runner(op, device, quick=quick)
    print(f"bench {op} on {runner.device_name}: copy bandwidth {runner.copy_gbps:.1f} GB/s",
          flush=True)  # fmt: skip
    return runner


def chosen_modes_and_dtypes(
    args: argparse.Namespace, modes: Sequence[str], default_dtypes: Sequence[str]
) -> tuple[list[str], list[torch.dtype]]:
    """The --modes and --dtypes given (see add_mode_dtype_args), else the defaults."""
    chosen_modes = args.modes.split(",") if args.modes else list(modes)
    names = args.dtypes.split(",") if args.dtypes else default_dtypes
    return chosen_modes, [getattr(torch, name) for name in names]


def with_mode(impl: Impl, mode: str) -> Impl:
    """A copy of the implementation renamed "<name> <mode>", for a table that holds several
    modes; the name is kept for mode "" (an op timed in one mode). A copy, so that an Impl
    a script reuses across points is not renamed twice."""
    return replace(impl, name=mode_name(impl.name, mode))


def mode_name(name: str, mode: str) -> str:
    """``"<name> <mode>"``, or `name` for mode "" (the name an implementation has in a
    table of several modes)."""
    return f"{name} {mode}" if mode else name


def select(impls: Sequence[Impl], only: str | None, keep: str) -> list[Impl]:
    """The implementations whose name contains one of the comma-separated substrings in
    `only` (all when None), plus the one named `keep` (the baseline)."""
    if not only:
        return list(impls)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    return [i for i in impls if i.name == keep or any(w in i.name for w in wanted)]


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"64x256,256x1024"`` -> ``[(64, 256), (256, 1024)]``."""
    return [
        tuple(int(d) for d in item.lower().split("x")) for item in text.split(",") if item.strip()
    ]


def resolve_device(name: str | None) -> torch.device:
    """``--device`` as a torch.device; cuda without a GPU exits with a clear message."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("bench: --device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


# ------------------------------------------------------------------ environment


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """A human-readable device name: the GPU's name, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """A file-name-safe key for the device, used to name the results CSV."""
    if device.type == "cuda":
        text = torch.cuda.get_device_name(device)
    else:
        text = f"cpu-{cpu_model()}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def versions() -> dict[str, str]:
    """Versions of torch, triton, rlhf_ext and CUDA ('' where absent)."""
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "triton": "",
        "rlhf_ext": "",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # triton is optional
        pass
    try:
        import rlhf_ext

        info["rlhf_ext"] = rlhf_ext.__version__
    except Exception as error:  # the bench still times the peers without it
        info["rlhf_ext"] = f"unavailable ({type(error).__name__})"
    return info


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on `device` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(device: torch.device) -> int:
    """The last-level cache size (GPU L2, CPU L3), or a 32 MiB guess when unknown."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    for index in (3, 2):
        path = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size")
        try:
            text = path.read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        return int(text.rstrip("KMG")) * scale
    return 32 << 20


def busy_cores() -> float | None:
    """The 1-minute load average (None where the OS does not report it)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def nbytes(inputs: Any) -> int:
    """Total size of the tensors in an input set (a dict, list or tuple of tensors)."""
    items = inputs.values() if isinstance(inputs, dict) else inputs
    return sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))


def input_set_count(bytes_per_set: int, device: torch.device, limit: int = 64) -> int:
    """How many input sets to rotate among so that together they overflow the cache twice
    over (at least 2, at most `limit`): a timed call then never finds its inputs cached
    by the previous one."""
    wanted = math.ceil(2 * cache_bytes(device) / max(bytes_per_set, 1))
    return max(2, min(limit, wanted))


# ----------------------------------------------------------------------- timing


def time_fn(
    fn: Callable[[Any], Any],
    input_sets: Sequence[Any],
    device: torch.device,
    *,
    min_time_s: float,
    min_repeats: int,
    max_repeats: int,
    warmup: int = 2,
) -> Timing:
    """Time ``fn(input_sets[i % n])`` per call, after `warmup` calls.

    The number of repeats is chosen from one timed call so that the total is about
    `min_time_s`, within [min_repeats, max_repeats]. CUDA: a pair of torch.cuda.Event
    per call, one synchronize at the end; CPU: time.perf_counter around each call.
    """
    n = len(input_sets)
    for i in range(warmup):
        fn(input_sets[i % n])
    synchronize(device)
    start = time.perf_counter()
    fn(input_sets[warmup % n])
    synchronize(device)
    estimate = max(time.perf_counter() - start, 1e-7)
    repeats = int(min(max_repeats, max(min_repeats, min_time_s / estimate)))
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        for i, (begin, end) in enumerate(events):
            begin.record()
            fn(input_sets[i % n])
            end.record()
        torch.cuda.synchronize(device)
        return Timing([begin.elapsed_time(end) for begin, end in events])
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(input_sets[i % n])
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(times)


def time_graph(
    fn: Callable[[Any], Any], input_sets: Sequence[Any], device: torch.device, repeats: int = 20
) -> float | None:
    """Per-call device time (ms) from replays of a CUDA graph holding one call per input set.

    Per-call event timing of a short kernel also measures the host's launch path (Python,
    dispatcher); graph replay removes it, leaving the kernels' own time. None off CUDA or
    when `fn` cannot be captured (e.g. it synchronises with the host).
    """
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for inputs in input_sets:
                fn(inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for inputs in input_sets:
                fn(inputs)
        graph.replay()
        torch.cuda.synchronize(device)
    except Exception:  # not capturable: report eager timing only
        return None
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / len(input_sets))
    return statistics.median(times)


def measure_copy_bandwidth(device: torch.device) -> float:
    """The device's copy bandwidth in GB/s: a clone of a 256 MiB float32 tensor, counting
    the bytes read plus the bytes written (2 x 256 MiB), median of repeats.

    The clone is done as ``out.copy_(x)`` into a destination allocated (and touched)
    once: on CPU a real ``x.clone()`` of that size gets fresh pages from the OS every
    time and measures page faults (about 4x slower here), not memory bandwidth.
    """
    nbytes = 256 << 20
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    destination = torch.empty_like(source).uniform_()
    timing = time_fn(
        destination.copy_, [source], device, min_time_s=0.2, min_repeats=5, max_repeats=200
    )
    return 2 * nbytes / 1e9 / (timing.median_ms / 1e3)


def peak_extra_memory_mib(
    fn: Callable[[Any], Any], inputs: Any, device: torch.device
) -> float | str:
    """Memory the call allocates beyond what was allocated before it, outputs included,
    in MiB. CUDA: the torch.cuda.max_memory_allocated delta. CPU (Linux): the growth of
    the resident set's peak (VmHWM, reset through /proc/self/clear_refs), which sees
    every large buffer the call touches; 'n/a' where that interface is missing."""
    if device.type != "cuda":
        return _cpu_peak_rss_growth_mib(fn, inputs)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn(inputs)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak / (1 << 20)


def _proc_status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _set_mmap_threshold(nbytes: int) -> None:
    """glibc: serve allocations of at least `nbytes` with fresh mmaps (no-op elsewhere).
    Setting it freezes glibc's adaptive thresholds, so the trim threshold is set to
    twice it, as glibc's own adaptation would: a lower one hands freed heap memory back
    to the OS after every call, and every implementation then pays page faults on the
    next one that a training process does not see."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, nbytes)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * nbytes)
    except (OSError, AttributeError):
        pass


def _cpu_peak_rss_growth_mib(fn: Callable[[Any], Any], inputs: Any) -> float | str:
    try:
        before = _proc_status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    except (OSError, KeyError):
        return "n/a"
    # Heap memory freed by an earlier call would be reused without growing the resident
    # set; fresh mmaps for every buffer above 64 KiB make the growth count them.
    _set_mmap_threshold(64 << 10)
    try:
        out = fn(inputs)
        peak = _proc_status_kib("VmHWM")
        del out
    finally:
        _set_mmap_threshold(32 << 20)  # the ceiling glibc's own adaptive threshold reaches
    return max(0, peak - before) / 1024


def rlhf_ext_backends(device: torch.device, runner: Runner) -> list[str]:
    """The rlhf_ext backends to time on `device` (the compiled one, and Triton on CUDA) that
    this install can run; a note for each one it cannot, or when rlhf_ext does not import."""
    try:
        import rlhf_ext

        available = rlhf_ext.available_backends(device)
    except Exception as error:
        runner.note(f"rlhf_ext does not import ({type(error).__name__}: {error}); peers only")
        return []
    wanted = [device.type] + (["triton"] if device.type == "cuda" else [])
    for backend in wanted:
        if backend not in available:
            runner.note(f"rlhf_ext backend {backend!r} unavailable here (available: {available})")
    if device.type == "cpu":
        runner.note(
            "triton not timed on CPU (Triton kernels need CUDA; its CPU interpreter is for tests)"
        )
    return [b for b in wanted if b in available]


# ----------------------------------------------------------------- verification


def _as_tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def verify(impl: Impl, inputs: Any, expected: Any) -> str | None:
    """None when ``impl.fn(inputs)`` (``impl.check`` where set) matches `expected` (each
    output, within the impl's tolerances, compared in float64), else a one-line
    description of what differs."""
    checked = impl.check or impl.fn
    try:
        got = _as_tuple(checked(inputs))
    except Exception as error:
        return f"raised {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    want = _as_tuple(expected)
    if len(got) != len(want):
        return f"returned {len(got)} outputs, expected {len(want)}"
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        if tuple(g.shape) != tuple(w.shape):
            return f"output {k}: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        g64, w64 = g.detach().double().cpu(), w.detach().double().cpu()
        if not torch.isfinite(g64).all():
            return f"output {k}: non-finite values"
        try:
            torch.testing.assert_close(g64, w64, rtol=impl.rtol, atol=impl.atol)
        except AssertionError:
            err = (g64 - w64).abs().max().item()
            return f"output {k}: max abs error {err:.3g} (rtol={impl.rtol}, atol={impl.atol})"
    return None


# ----------------------------------------------------------------------- runner


class Runner:
    """One benchmark run of one op on one device: collects rows, prints, saves."""

    def __init__(self, op: str, device: torch.device, *, quick: bool = False):
        self.op, self.device, self.quick = op, device, quick
        self.date = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.device_name = device_name(device)
        self.versions = versions()
        self.threads = torch.get_num_threads()
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.failures: list[str] = []
        self.copy_gbps = measure_copy_bandwidth(device)
        load = busy_cores()
        if device.type == "cpu" and load is not None and load > 0.25 * (os.cpu_count() or 1):
            self.note(
                f"load average {load:.1f} on {os.cpu_count()} cores at start: other processes "
                "share the CPU, CPU timings are noisy"
            )
        if device.type == "cuda":
            self.budget = dict(min_time_s=0.1 if quick else 0.5, min_repeats=10, max_repeats=2000)
        else:
            self.budget = dict(
                min_time_s=0.1 if quick else 0.5, min_repeats=3 if quick else 5, max_repeats=500
            )

    def note(self, message: str) -> None:
        """A line printed under the table (e.g. why a peer was skipped); once per text."""
        if message not in self.notes:
            self.notes.append(message)
            print(f"  note: {message}", flush=True)

    def run_case(
        self,
        impls: Sequence[Impl],
        input_sets: Sequence[Any],
        expected: Any,
        *,
        shape: Sequence[int],
        dtype: torch.dtype,
        bytes_moved: Callable[[Impl], int],
        baseline: str,
    ) -> list[Row]:
        """Verify, then time, every implementation on one shape; returns the new rows.

        `expected` is the correct output on ``input_sets[0]``. `bytes_moved(impl)` is the
        minimum traffic of that implementation (inputs read once, outputs written once).
        Speedups are ``baseline's median / impl's median`` within this case.
        """
        shape_text = "x".join(str(d) for d in shape)
        dtype_text = str(dtype).replace("torch.", "")
        rows = []
        for impl in impls:
            label = f"{impl.name} [{shape_text} {dtype_text}]"
            print(f"  {label}: verifying", end="", flush=True)
            start = time.perf_counter()
            problem = verify(impl, input_sets[0], expected)
            first_call_s = time.perf_counter() - start
            if problem is not None and impl.optional and problem.startswith("raised"):
                print(" -> skipped", flush=True)
                self.note(f"{label} skipped: {problem}")
                continue
            if problem is not None:
                print(f" -> FAILED ({problem}); not timed", flush=True)
                self.failures.append(f"{label}: {problem}")
                continue
            print(", timing", end="", flush=True)
            timing = time_fn(impl.fn, input_sets, self.device, **self.budget)
            # Graph replay only where launch overhead can matter (short calls).
            graph_ms = (
                time_graph(impl.fn, input_sets, self.device) if timing.median_ms < 2 else None
            )
            peak = peak_extra_memory_mib(impl.fn, input_sets[-1], self.device)
            nbytes = int(bytes_moved(impl))
            # Bandwidth from the kernels' own time when a graph measured it.
            gbps = nbytes / 1e9 / ((graph_ms or timing.median_ms) / 1e3)
            note = impl.note
            if first_call_s > 2.0:
                note = "; ".join(filter(None, [note, f"first call (compile) {first_call_s:.1f} s"]))
            row = Row(
                date=self.date,
                op=self.op,
                impl=impl.name,
                device=self.device_name,
                shape=shape_text,
                dtype=dtype_text,
                median_ms=timing.median_ms,
                min_ms=timing.min_ms,
                repeats=len(timing.times_ms),
                bytes=nbytes,
                gbps=gbps,
                copy_gbps=self.copy_gbps,
                frac_copy_bw=gbps / self.copy_gbps,
                peak_mem_mib=peak,
                graph_ms=graph_ms if graph_ms is not None else "",
                threads=self.threads,
                note=note,
                **self.versions,
            )
            print(f" -> {timing.median_ms:.4g} ms", flush=True)
            rows.append(row)
        base = next((r for r in rows if r.impl == baseline), None)
        for row in rows:
            row.baseline = baseline
            row.speedup = base.median_ms / row.median_ms if base is not None else ""
        if base is None:
            self.note(f"baseline {baseline!r} did not run for {shape_text}: no speedups")
        self.rows.extend(rows)
        return rows

    # ---------------------------------------------------------------- output

    def table(self) -> str:
        """The rows as an aligned text table."""
        headers = [
            "impl",
            "shape",
            "dtype",
            "median ms",
            "min ms",
            "graph ms",
            "GB/s",
            "% copy BW",
            "peak MiB",
            "speedup",
            "note",
        ]
        lines = []
        for r in self.rows:
            lines.append(
                [
                    r.impl,
                    r.shape,
                    r.dtype,
                    f"{r.median_ms:.4g}",
                    f"{r.min_ms:.4g}",
                    f"{r.graph_ms:.4g}" if isinstance(r.graph_ms, float) else "-",
                    f"{r.gbps:.3g}",
                    f"{100 * r.frac_copy_bw:.1f}%",
                    r.peak_mem_mib if isinstance(r.peak_mem_mib, str) else f"{r.peak_mem_mib:.1f}",
                    f"{r.speedup:.2f}x" if isinstance(r.speedup, float) else "-",
                    r.note,
                ]
            )
        widths = [
            max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
            for i, h in enumerate(headers)
        ]
        right = {3, 4, 5, 6, 7, 8, 9}

        def fmt(cells):
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        out = [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
        return "\n".join(out)

    def header(self) -> str:
        """Run metadata: op, device, copy bandwidth, versions, date."""
        v = self.versions
        return (
            f"op: {self.op}   device: {self.device_name}   threads: {self.threads}\n"
            f"copy bandwidth (clone, read+write): {self.copy_gbps:.1f} GB/s   "
            f"speedup baseline: {self.rows[-1].baseline if self.rows else '-'}\n"
            f"torch {v['torch']}  triton {v['triton'] or '-'}  rlhf_ext {v['rlhf_ext'] or '-'}  "
            f"CUDA {v['cuda'] or '-'}   {self.date}"
        )

    def csv_path(self, path: Path | None = None, results_dir: Path | None = None) -> Path:
        """The file rows go to: `path` when given, else ``<results_dir>/<device-slug>.csv``
        (`results_dir` defaulting to ``./bench-results`` under the current directory)."""
        if path is not None:
            return Path(path)
        folder = Path(results_dir) if results_dir is not None else default_results_dir()
        return folder / f"{device_slug(self.device)}.csv"

    def save(self, path: Path | None = None, results_dir: Path | None = None) -> Path:
        """Append the rows to :meth:`csv_path` (`path`, else the device's CSV in
        `results_dir`), writing the header when the file is new; returns the file."""
        path = self.csv_path(path, results_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = COLUMNS
        if path.exists() and path.stat().st_size > 0:
            with path.open(newline="") as handle:
                existing = next(csv.reader(handle), None)
            if existing and existing != COLUMNS:
                print(
                    f"bench: warning: {path} has other columns; writing its columns only",
                    file=sys.stderr,
                )
                columns = existing
        new = not path.exists() or path.stat().st_size == 0
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore", restval="")
            if new:
                writer.writeheader()
            for row in self.rows:
                record = asdict(row)
                for key, value in record.items():
                    if isinstance(value, float):
                        record[key] = f"{value:.6g}"
                writer.writerow(record)
        return path

    def finish(
        self, *, save: bool = True, csv_path: Path | None = None, results_dir: Path | None = None
    ) -> int:
        """Print the header, the table, the notes and failures; save (to `csv_path`, else
        the device's CSV in `results_dir`, see :meth:`csv_path`) unless told not to.
        Returns the exit status: 1 when an implementation failed verification."""
        print()
        print(self.header())
        print()
        print(self.table())
        status = self.print_notes()
        if save and self.rows:
            path = self.save(csv_path, results_dir)
            print(f"appended {len(self.rows)} rows to {path.resolve()}")
        return status

    def print_notes(self) -> int:
        """Print the notes and the verification failures; 1 when any failed, else 0."""
        for message in self.notes:
            print(f"note: {message}")
        for message in self.failures:
            print(f"FAILED verification (not timed): {message}")
        return 1 if self.failures else 0


# ------------------------------------------------------------------------ sweep


@dataclass(frozen=True)
class Point:
    """One point of a sweep: what a script's factories are called with. ``mode`` is ""
    for an op timed in one mode only."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    mode: str = ""


@dataclass
class Floor:
    """An implementation timed at every point before the others, in a section of its own
    with its own expected outputs: what no implementation can beat (e.g. the bare GEMMs
    of a fused linear op). Every row's note gives its time as a multiple of the floor's.
    ``impl(point)`` builds it; ``expected(point, inputs)`` is its correct output."""

    impl: Callable[[Point], Impl]
    expected: Callable[[Point, Any], Any]


def sweep(
    runner: Runner,
    *,
    shapes: Sequence[Sequence[int]],
    dtypes: Sequence[torch.dtype],
    modes: Sequence[str] = ("",),
    make_inputs: Callable[[Point, int], Any],
    implementations: Callable[[Point], Sequence[Impl]],
    expected: Callable[[Point, Any], Any],
    baseline: str,
    bytes_moved: Callable[[Point, Impl], int] | None = None,
    flops: Callable[[Point], int] | None = None,
    floor: Floor | None = None,
    only: str | None = None,
    set_count: Callable[[int], int] | None = None,
    save: bool = True,
    csv_path: Path | None = None,
    results_dir: Path | None = None,
    report: Callable[[Runner], int] | None = None,
) -> int:
    """Verify and time `implementations` at every point of shapes x dtypes x modes, then
    report; returns the exit status (1 when an implementation failed verification).

    Per point (a :class:`Point`): `make_inputs(point, seed)` builds one input set, and
    `set_count(bytes of one set)` says how many to rotate among (default
    :func:`input_set_count`); `implementations(point)` gives the Impls, filtered by
    `only` (see :func:`select`); `expected(point, inputs)` is the correct output on the
    first set. `baseline` names the implementation speedups are relative to (a peer's).
    `bytes_moved(point, impl)` is its minimum traffic (0 when None); `flops(point)`, where
    given, adds the model TFLOP/s to each row's note; `floor` is timed first (see
    :class:`Floor`). With several modes, each point starts a table section and every
    implementation is named "<name> <mode>". `report(runner)` prints the results and
    returns the status; by default :meth:`Runner.finish` prints the table and appends
    the rows to `csv_path` (when None, the device's CSV in `results_dir`, by default
    ``./bench-results``) unless `save` is False.
    """
    count_sets = set_count or functools.partial(input_set_count, device=runner.device)
    for shape, dtype, mode in itertools.product(shapes, dtypes, modes):
        point = Point(tuple(shape), dtype, mode)
        if mode:
            print(f"-- {mode} {point.shape} {dtype}", flush=True)
        sets = _input_sets(make_inputs, point, count_sets)
        count_bytes = _bytes_counter(bytes_moved, point)
        floor_rows, floor_label = _time_floor(runner, floor, point, sets, count_bytes)
        impls = select(implementations(point), only, keep=baseline)
        rows = runner.run_case(
            [with_mode(impl, mode) for impl in impls],
            sets,
            expected(point, sets[0]),
            shape=point.shape,
            dtype=dtype,
            bytes_moved=count_bytes,
            baseline=mode_name(baseline, mode),
        )
        model_flops = flops(point) if flops is not None else None
        _annotate(floor_rows + rows, model_flops, floor_rows, floor_label)
        # Freed before the next point's inputs are built: the largest sets hold GiBs.
        del sets
    if report is not None:
        return report(runner)
    return runner.finish(save=save, csv_path=csv_path, results_dir=results_dir)


def _input_sets(make_inputs: Callable[[Point, int], Any], point: Point, count_sets) -> list:
    """The point's input sets, seeds 0, 1, ...; the first one's size decides how many."""
    first = make_inputs(point, 0)
    count = count_sets(nbytes(first))
    return [first] + [make_inputs(point, seed) for seed in range(1, count)]


def _bytes_counter(bytes_moved, point: Point) -> Callable[[Impl], int]:
    """bytes_moved at this point, as Runner.run_case takes it (0 when not counted)."""
    if bytes_moved is None:
        return lambda impl: 0
    return functools.partial(bytes_moved, point)


def _time_floor(
    runner: Runner, floor: Floor | None, point: Point, sets: list, count_bytes
) -> tuple[list[Row], str]:
    """The floor's row at this point (none when there is no floor or it failed), and the
    floor's name without the mode, for the other rows' notes."""
    if floor is None:
        return [], ""
    impl = floor.impl(point)
    label = impl.name
    rows = runner.run_case(
        [with_mode(impl, point.mode)],
        sets,
        floor.expected(point, sets[0]),
        shape=point.shape,
        dtype=point.dtype,
        bytes_moved=count_bytes,
        baseline=mode_name(label, point.mode),
    )
    return rows, label


def _annotate(
    rows: Sequence[Row], model_flops: int | None, floor_rows: Sequence[Row], floor_label: str
) -> None:
    """Append the model TFLOP/s (where the op counts FLOPs) and the time as a multiple
    of the floor's (where one was timed) to each row's note."""
    floor_ms = floor_rows[0].median_ms if floor_rows else None
    for row in rows:
        parts = [row.note]
        if model_flops is not None:
            parts.append(f"{model_flops / (row.median_ms / 1e3) / 1e12:.2f} TFLOP/s")
        if floor_ms:
            parts.append(f"{row.median_ms / floor_ms:.2f}x {floor_label}")
        row.note = "; ".join(p for p in parts if p)
