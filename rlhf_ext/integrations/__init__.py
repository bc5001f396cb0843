"""Drop-in adapters for TRL, verl and OpenRLHF (docs/design.md §7).

``rlhf_ext.integrations.trl``, ``.verl`` and ``.openrlhf`` each hold functions with the peer's
own names, signatures and semantics, backed by rlhf_ext's kernels, and ``patch()`` /
``unpatch()`` that swap them into the installed peer. Importing them never imports the peer.
See docs/integrations.md.
"""

PEERS = ("trl", "verl", "openrlhf")

__all__ = ["PEERS"]
