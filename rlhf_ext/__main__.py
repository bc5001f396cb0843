"""Command line: ``python -m rlhf_ext info | bench [args] | demo | train --config FILE |
export CHECKPOINT DIR`` (also installed as ``rlhf-ext``)."""

from __future__ import annotations

import argparse
import os
import platform
import sys


def info() -> int:
    import torch

    import rlhf_ext
    from rlhf_ext._backend import (
        compiled_available,
        compiled_cuda_available,
        triton_import_error,
    )

    build = rlhf_ext.build_info()
    rows = [
        ("rlhf_ext", rlhf_ext.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA", torch.version.cuda or "none (CPU build)"),
        ("GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
        ("compiled CPU kernels", "yes" if compiled_available() else "no"),
        ("compiled CUDA kernels", "yes" if compiled_cuda_available() else "no"),
        ("built against torch", build.get("torch_version", "-")),
        (
            "built CUDA / archs",
            f"{build.get('cuda_version') or '-'} / {build.get('cuda_archs') or '-'}",
        ),
        ("compiler", build.get("compiler", "-")),
        ("triton", _triton_version() if triton_import_error() is None else triton_import_error()),
        ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")),
        ("backends (cpu tensors)", ", ".join(rlhf_ext.available_backends("cpu"))),
    ]
    if torch.cuda.is_available():
        rows.append(("backends (cuda tensors)", ", ".join(rlhf_ext.available_backends("cuda"))))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _triton_version() -> str:
    import triton

    return triton.__version__


DESCRIPTION = (
    "rlhf_ext: fused RLHF ops for PyTorch. Subcommands: info (what this install can run), "
    "bench (the microbenchmarks), demo (the offline RLHF demo), train (the trainer from a "
    "config file), export (a trained policy for other tools)."
)
CONSOLE_SCRIPT = "rlhf-ext"  # pyproject.toml [project.scripts]


def _prog() -> str:
    """What the user typed: the console script's name, else ``python -m rlhf_ext``."""
    if os.path.basename(sys.argv[0] or "") == CONSOLE_SCRIPT:
        return CONSOLE_SCRIPT
    return "python -m rlhf_ext"


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) and run the subcommand; its exit status."""
    from rlhf_ext._version import __version__

    parser = argparse.ArgumentParser(prog=_prog(), description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"rlhf_ext {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, torch, CUDA, compiled archs, triton, backends")
    bench = sub.add_parser(
        "bench",
        help="the microbenchmarks: bench list | all | plot | <op> [options] (bench --help)",
        # Every argument, --help included, goes to the benchmarks (bench/__main__.py):
        # no options of its own, and no "-" prefix, so that REMAINDER takes a leading one.
        add_help=False,
        prefix_chars="+",
    )
    bench.add_argument("args", nargs=argparse.REMAINDER)
    from rlhf_ext.trainer.cli import (
        add_subcommands,
        run_demo_command,
        run_export_command,
        run_train_command,
    )

    add_subcommands(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo_command(args)
    if args.command == "train":
        return run_train_command(args)
    if args.command == "export":
        return run_export_command(args)
    if args.command == "info":
        return info()
    if args.command == "bench":
        # The benchmarks ship in the wheel as rlhf_ext.bench (setup.py maps bench/ there).
        try:
            from rlhf_ext.bench.__main__ import main as bench_main
        except ModuleNotFoundError as error:
            if error.name != "rlhf_ext.bench":
                raise
            print(
                "rlhf_ext bench: this install has no benchmarks (rlhf_ext.bench is missing: "
                "an install made before they shipped); reinstall rlhf_ext, or run "
                "python -m bench in a source checkout",
                file=sys.stderr,
            )
            return 2
        return bench_main(args.args, prog=f"{_prog()} bench")
    return 2


if __name__ == "__main__":
    sys.exit(main())
