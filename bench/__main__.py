"""``python -m bench <op> | list | all | plot [options]``: run the benchmark of one op, or all.

Options after the op name go to that op's script (``bench_<op>.py``), e.g.
``python -m bench gae --quick --device cpu --no-save``; ``<op> --help`` lists them. ``plot``
draws the results (``plot.py``). An installed rlhf_ext runs the same code as
``python -m rlhf_ext bench ...`` (the package ``rlhf_ext.bench``); the usage lines name the
command that was typed.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
OPTIONS = "[--quick] [--device cpu|cuda] [--results-dir DIR | --csv PATH] [--no-save]"


def default_prog() -> str:
    """The command that runs this package: ``python -m bench`` in a checkout, ``python -m
    rlhf_ext bench`` where it is the installed ``rlhf_ext.bench``."""
    return "python -m rlhf_ext bench" if __package__ == "rlhf_ext.bench" else "python -m bench"


def usage(prog: str) -> str:
    return f"usage: {prog} {{list | all | plot | <op>}} {OPTIONS}"


def available_ops() -> list[str]:
    """Ops that have a benchmark script ``bench_<op>.py`` in this folder, sorted."""
    return sorted(p.stem[len("bench_") :] for p in BENCH_DIR.glob("bench_*.py"))


def _module(name: str):
    """A module of this package (``bench`` or ``rlhf_ext.bench``), by its short name."""
    return importlib.import_module(f".{name}", __package__)


def run_op(op: str, argv: list[str], prog: str | None = None) -> int:
    """Import this package's ``bench_<op>`` and call its ``main(argv)``; its exit status."""
    module = _module(f"bench_{op}")
    _module("harness").PROG = prog or default_prog()
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``python -m bench``; callable from other code with an argv list.
    `prog` is the command named in usage lines (default :func:`default_prog`)."""
    prog = prog or default_prog()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog))
        print("ops:", ", ".join(available_ops()) or "(none)")
        print(f"plot: {prog} plot --help")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    ops = available_ops()
    if command == "list":
        for op in ops:
            print(op)
        return 0
    if command == "plot":
        return int(_module("plot").main(rest, prog=f"{prog} plot") or 0)
    if command == "all":
        status = 0
        for op in ops:
            print(f"\n=== bench {op} ===")
            status = max(status, run_op(op, rest, prog))
        return status
    if command not in ops:
        print(
            f"bench: unknown op {command!r}; available: {', '.join(ops) or '(none)'} "
            "(or list, all, plot)",
            file=sys.stderr,
        )
        return 2
    return run_op(command, rest, prog)


if __name__ == "__main__":
    sys.exit(main())
