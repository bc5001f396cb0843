"""Every Triton kernel compiles for a GPU, checked on a machine without one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TRITON_CPU

TOOL = Path(__file__).resolve().parents[1] / "tools" / "triton_compile_check.py"


@pytest.mark.slow
# recording the launches runs the whole coverage under the interpreter (90 s alone on a
# 2-core machine, 2026-12-04), then two architectures compile without a cache
@pytest.mark.timeout(1500)
@pytest.mark.skipif(not TRITON_CPU, reason="needs triton (its interpreter records the launches)")
def test_every_triton_kernel_compiles_for_sm80_and_sm90_without_spills():
    """The interpreter runs the kernels but never compiles them: a non-constexpr
    global or a tile that spills would only show on a GPU. The tool compiles every
    kernel variant that tools/sanitize_ops.py's coverage launches, for sm_80 and sm_90."""
    done = subprocess.run(
        [sys.executable, str(TOOL), "--arch", "80", "--arch", "90", "--max-spill-bytes", "0"],
        capture_output=True,
        text=True,
        timeout=1400,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for kernel in ("_linear_logprobs_fwd_kernel", "_token_logprobs_fwd_kernel", "_gae_fwd_kernel"):
        assert kernel in done.stdout
