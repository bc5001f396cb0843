"""``python -m bench <op> | list | all [options]``: run the benchmark of one op, or all.

Options after the op name go to that op's script (``bench/bench_<op>.py``), e.g.
``python -m bench gae --quick --device cpu --no-save``. ``python -m bench <op> --help``
lists them.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
USAGE = (
    "usage: python -m bench {list | all | <op>} "
    "[--quick] [--device cpu|cuda] [--csv PATH] [--no-save]"
)


def available_ops() -> list[str]:
    """Ops that have a benchmark script ``bench/bench_<op>.py``, sorted."""
    return sorted(p.stem[len("bench_") :] for p in BENCH_DIR.glob("bench_*.py"))


def run_op(op: str, argv: list[str]) -> int:
    """Import ``bench.bench_<op>`` and call its ``main(argv)``; returns its exit status."""
    module = importlib.import_module(f"bench.bench_{op}")
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench``; callable from other code with an argv list."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("ops:", ", ".join(available_ops()) or "(none)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    ops = available_ops()
    if command == "list":
        for op in ops:
            print(op)
        return 0
    if command == "all":
        status = 0
        for op in ops:
            print(f"\n=== bench {op} ===")
            status = max(status, run_op(op, rest))
        return status
    if command not in ops:
        print(
            f"bench: unknown op {command!r}; available: {', '.join(ops) or '(none)'}",
            file=sys.stderr,
        )
        return 2
    return run_op(command, rest)


if __name__ == "__main__":
    sys.exit(main())
