"""Patch verl in every process that imports it, through verl's own hook.

Set ``VERL_USE_EXTERNAL_MODULES=rlhf_ext.integrations.verl_plugin`` in the environment of
the driver and of the Ray workers: ``import verl`` then imports this module in each of
them, and importing it runs :func:`rlhf_ext.integrations.verl.patch`. A ``patch()`` in
the driver alone does not reach verl's workers, which are separate Ray processes.

Opt-in by design: rlhf_ext registers no ``verl.plugins`` entry point, which verl would
load in every process by default (``VERL_USE_EXTERNAL_PLUGINS=auto``): installing rlhf_ext
must not change verl's numerics by itself. docs/integrations.md ("verl: every worker").
"""

from __future__ import annotations

import logging
import os

from rlhf_ext.integrations import verl as _verl

ENV = "VERL_USE_EXTERNAL_MODULES"
MODULE = __name__

PATCHED: list[str] = _verl.patch()
logging.getLogger(__name__).info(
    "rlhf_ext: patched %d verl functions in process %d (%s=%s)",
    len(PATCHED),
    os.getpid(),
    ENV,
    os.environ.get(ENV, ""),
)
