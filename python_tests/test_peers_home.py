"""bench/peers.py is imported under one name in the checkout, ``bench.peers``, by the tests
and the benchmarks alike (the benchmarks import it relatively, ``from . import peers``, so
the same file is rlhf_ext.bench.peers in an installed wheel). Under a second name (a bare
``import peers``, or the former ``python_tests.peers``) Python would load it twice, and the
tests and the benchmarks would hold different module objects."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from bench import peers
from bench.__main__ import available_ops

ROOT = Path(__file__).resolve().parents[1]


def test_peers_has_one_module_name():
    assert peers.__name__ == "bench.peers"
    for op in available_ops():
        script = importlib.import_module(f"bench.bench_{op}")
        assert getattr(script, "peers", peers) is peers, op
    assert "peers" not in sys.modules, "bench/peers.py imported as `peers` too"
    assert "python_tests.peers" not in sys.modules, "imported as `python_tests.peers` too"


def test_peers_has_one_home():
    """The baselines live in bench/ only (the wheel ships the benchmarks, not the tests)."""
    assert (ROOT / "bench" / "peers.py").is_file()
    assert not (ROOT / "python_tests" / "peers.py").exists()
