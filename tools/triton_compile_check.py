"""Compile every Triton kernel of rlhf_ext for a GPU architecture, without a GPU.

The tests run the Triton kernels under the interpreter on a machine without a
GPU; the interpreter checks values, not whether a kernel compiles: a global
that is not constexpr, an operation the backend lacks, or a tile that spills
registers shows up only on a GPU. This tool runs tools/sanitize_ops.py's
coverage (every op, dtype and code path) with the Triton backend on CPU
tensors, with Triton's driver replaced by one that reports the requested
architecture and each launch replaced by compilation alone; ptxas -v then
reports each compiled kernel's registers and spills.

    python tools/triton_compile_check.py                # sm_90
    python tools/triton_compile_check.py --arch 80 --arch 90 --max-spill-bytes 0

Exit status 1 when a kernel fails to compile or spills more than allowed.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent


# -- phase 1 (interpreter): record every launch's argument types --------------------


def describe(value):
    """What the JIT's specialization sees of one argument: a tensor's dtype and
    16-byte alignment, a scalar itself."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.data_ptr() % 16 == 0)
    return ("value", value)


def record_launches(path: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import InterpretedFunction

    sys.path.insert(0, str(TOOLS))
    import sanitize_ops

    from rlhf_ext.triton import linear_token_logprobs

    # Launch parameters chosen for the GPU, not the interpreter's small tiles.
    linear_token_logprobs.triton_interpreting = lambda: False

    launches = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        key = (fn.__module__, fn.__name__, tuple(map(describe, args)),
               tuple(sorted((k, describe(v)) for k, v in kwargs.items())))  # fmt: skip
        launches.setdefault(repr(key), key)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    sanitize_ops.run_all("cpu", "triton")
    run_policy_losses()
    run_group_advantages()
    with open(path, "wb") as f:
        pickle.dump(list(launches.values()), f)


def run_policy_losses() -> None:
    """policy_loss's kernel variants beyond sanitize_ops' (kind "ppo", [B, T] advantages):
    every kind (its POLICY_KIND constexpr branch, the row prologue of the row-mean kinds)
    with [B, T] and [B] advantages, float32, bfloat16 and float64, with a mask (and
    without one in float32), ppo with and without the dual clip, and the row-coupled
    and row-level kinds' level 2 (their row-weight factors) under every agg mode. 600
    tokens a row: the largest BLOCK, the one that could spill."""
    from rlhf_ext.ops._vocab import (
        AGG_MODES,
        POLICY_KINDS,
        POLICY_ROW_COUPLED_KINDS,
        POLICY_ROW_LEVEL_KINDS,
    )
    from rlhf_ext.ops.ppo_losses import policy_loss

    torch.manual_seed(0)
    lp = -torch.rand(3, 600) * 3
    old, adv = lp + 0.3 * torch.randn_like(lp), torch.randn_like(lp)
    mask = torch.rand(3, 600) > 0.3
    for kind in POLICY_KINDS:
        settings = [{"dual_clip": None}, {"dual_clip": 3.0}] if kind == "ppo" else [{}]
        if kind == "dro":
            settings = [{"beta": 0.1}]
        row_kinds = POLICY_ROW_COUPLED_KINDS + POLICY_ROW_LEVEL_KINDS
        aggs = AGG_MODES if kind in row_kinds else ("token-mean",)
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            masks = (mask, None) if dtype == torch.float32 else (mask,)
            cases = itertools.product((adv, adv[:, 0]), masks, settings, aggs)
            for advantages, m, kw, agg in cases:
                x = lp.to(dtype).requires_grad_()
                loss, _ = policy_loss(x, old.to(dtype), advantages.to(dtype), m, kind=kind,
                                      agg=agg, backend="triton", **kw)  # fmt: skip
                loss.backward()


def run_group_advantages() -> None:
    """group_advantages' kernel variants beyond sanitize_ops' (float32, default flags):
    every baseline and scale, each flag both ways, float32 and float64 scores."""
    import rlhf_ext
    from rlhf_ext.ops._vocab import GROUP_BASELINES, GROUP_SCALES

    nan = float("nan")
    scores = torch.tensor([[0.5, 1.0], [1.0, nan], [nan, 2.0], [2.0, 0.0], [-1.0, 1.0],
                           [3.0, 0.5], [0.0, -2.0], [1.5, 1.5]])  # fmt: skip
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3])  # two groups of 3, two singletons
    for i, baseline in enumerate(GROUP_BASELINES):
        for scale in GROUP_SCALES:
            for dtype in (torch.float32, torch.float64):
                flip = (i + len(scale) + (dtype == torch.float64)) % 2 == 1
                rlhf_ext.group_advantages(
                    scores.to(dtype),
                    groups,
                    baseline=baseline,
                    scale=scale,
                    unbiased=flip,
                    eps_mode="clamp" if flip else "add",
                    singleton="raw" if i % 2 else "zero",
                    nan_scores="ignore" if (i // 2) % 2 else "propagate",
                    lengths=torch.arange(1.0, 9.0),
                    baselines=torch.linspace(-1.0, 1.0, 8),
                    nonzero_rescale=not flip,
                    validate=False,
                    backend="triton",
                )


# -- phase 2 (no interpreter): compile each recorded launch for the architecture -----


class CompileOnlyDriver:
    """What JITFunction.run asks of the driver before it compiles. The device id
    is the architecture, so each architecture gets its own kernel cache."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return self.arch

    def get_current_stream(self, device=None) -> int:
        return 0


def rebuild(desc):
    """An argument with the recorded specialization: a small CPU tensor of the
    dtype (offset by one element when the original was not 16-byte aligned)."""
    if desc[0] == "value":
        return desc[1]
    _, dtype, aligned = desc
    buffer = torch.empty(64, dtype=dtype)
    return buffer if aligned else buffer[1:]


def compile_launches(launches, arch: int) -> list:
    from triton.runtime.driver import driver

    driver.set_active(CompileOnlyDriver(arch))  # for the rest of this process
    compiled = {}
    for module, name, args, kwargs in launches:
        fn = getattr(importlib.import_module(module), name)
        kernel = fn.run(*map(rebuild, args), grid=(1,), warmup=True,
                        **{k: rebuild(v) for k, v in kwargs})  # fmt: skip
        compiled[id(kernel)] = (name, kernel)
    return list(compiled.values())


def ptxas_report(kernel, arch: int) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) of one compiled kernel."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    suffix = "a" if arch >= 90 else ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        out = subprocess.run(
            [str(ptxas), f"-arch=sm_{arch}{suffix}", "-v", ptx.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return registers, spills


def report_arch(path: str, arch: int) -> int:
    """Compile the launches recorded in ``path`` for ``arch``; print a line per kernel
    (variants, registers, spills, shared memory). Returns the worst spill in bytes."""
    with open(path, "rb") as f:
        launches = pickle.load(f)
    start = time.perf_counter()
    kernels = compile_launches(launches, arch)
    seconds = time.perf_counter() - start
    print(f"sm_{arch}: {len(kernels)} kernel variants compiled in {seconds:.0f} s")
    per_name: dict[str, list[tuple[int, int, int]]] = {}
    for name, kernel in kernels:
        regs, spills = ptxas_report(kernel, arch)
        per_name.setdefault(name, []).append((regs, spills, kernel.metadata.shared))
    worst = 0
    for name, rows in sorted(per_name.items()):
        regs = max(r for r, _, _ in rows)
        spills = max(s for _, s, _ in rows)
        shared = max(m for _, _, m in rows)
        worst = max(worst, spills)
        print(f"  {name:34s} variants {len(rows):3d}  max registers {regs:3d}  "
              f"max spill bytes {spills:5d}  max shared {shared:6d} B")  # fmt: skip
    print(f"worst spill bytes {worst}")
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="SM version (default 90)")
    parser.add_argument("--max-spill-bytes", type=int, default=None,
                        help="fail when a kernel spills more (default: report only)")  # fmt: skip
    parser.add_argument("--record", help=argparse.SUPPRESS)  # phase 1, in a subprocess
    parser.add_argument("--compile", help=argparse.SUPPRESS)  # phase 2, one per architecture
    args = parser.parse_args()
    if args.record:
        record_launches(args.record)
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    if args.compile:
        report_arch(args.compile, args.arch[0])
        return 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.pkl")
        subprocess.run([sys.executable, __file__, "--record", path], check=True)
        with open(path, "rb") as f:
            count = len(pickle.load(f))
        print(f"{count} distinct launches recorded in {time.perf_counter() - start:.0f} s")
        # One process per architecture (the driver is replaced for a whole process), all
        # at once: each is one core's work.
        compiles = [subprocess.Popen([sys.executable, __file__, "--compile", path, "--arch",
                                      str(arch)], stdout=subprocess.PIPE, text=True)
                    for arch in args.arch or [90]]  # fmt: skip
        outputs = [process.communicate()[0] for process in compiles]
    worst = 0
    for process, output in zip(compiles, outputs, strict=True):
        print(output, end="")
        if process.returncode != 0:
            print(f"FAIL: a compile process exited with {process.returncode}")
            return 1
        worst = max(worst, int(re.search(r"worst spill bytes (\d+)", output).group(1)))
    if args.max_spill_bytes is not None and worst > args.max_spill_bytes:
        print(f"FAIL: a kernel spills {worst} bytes (allowed {args.max_spill_bytes})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
