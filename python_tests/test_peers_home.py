"""python_tests/peers.py is imported under one name, ``python_tests.peers``, by the tests
and the benchmarks alike: under a second one (a bare ``import peers``) Python would load
it twice, and the tests and the benchmarks would hold different module objects."""

from __future__ import annotations

import importlib
import sys

from bench.__main__ import available_ops
from python_tests import peers


def test_peers_has_one_module_name():
    for op in available_ops():
        script = importlib.import_module(f"bench.bench_{op}")
        assert getattr(script, "peers", peers) is peers, op
    assert "peers" not in sys.modules, "python_tests/peers.py imported as `peers` too"
