"""rlhf_ext microbenchmarks.

In a source checkout this folder is the package ``bench``: ``python -m bench <op> [--quick]
[--device cpu|cuda] [--results-dir DIR | --csv PATH] [--no-save]`` runs
``bench/bench_<op>.py``, ``python -m bench list`` names the ops, ``python -m bench all`` runs
every one and ``python -m bench plot`` draws the results. The wheel ships the same files as
``rlhf_ext.bench`` (setup.py maps the folder into the package), so an installed rlhf_ext
runs them as ``python -m rlhf_ext bench <op>``; every import between them is relative, so
the files work under either name.

Results go to ``./bench-results/<device-slug>.csv`` under the current directory unless
``--results-dir`` or ``--csv`` says otherwise: never into the installed package or the
checkout's committed ``bench/results/`` (``make bench`` names that folder explicitly).

The timing and reporting machinery is in ``harness.py``; the peers' implementations (TRL /
verl / TorchRL) that the benchmarks time as baselines are in ``peers.py``, which the test
suite imports too (as ``bench.peers``). See bench/README.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

RESULTS_DIRNAME = "bench-results"


def default_results_dir() -> Path:
    """Where results go when no folder is named: ``./bench-results`` under the current
    directory (never inside the package, which may be an installed, read-only folder)."""
    return Path.cwd() / RESULTS_DIRNAME


def add_results_dir_option(group: argparse._ActionsContainer, what: str) -> None:
    """``--results-dir DIR`` on `group` (the benchmarks' and plot's one definition); `what`
    says what is done with DIR, e.g. "read DIR/*.csv"."""
    group.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"{what} (default: ./{RESULTS_DIRNAME} under the current directory)",
    )
