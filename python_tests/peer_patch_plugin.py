"""A pytest plugin that runs ``rlhf_ext.integrations.<peer>.patch()`` before collection, so
that a peer's own test modules import the patched functions (``-p peer_patch_plugin`` with
``RLHF_EXT_PATCH_PEER=verl``; python_tests/test_peer_own_tests.py uses it). It prints the
number of names replaced, which the caller checks."""

from __future__ import annotations

import importlib
import os


def pytest_configure(config):
    peer = os.environ["RLHF_EXT_PATCH_PEER"]
    names = importlib.import_module(f"rlhf_ext.integrations.{peer}").patch()
    print(f"rlhf_ext patched {len(names)} {peer} names", flush=True)
