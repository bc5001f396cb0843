"""Shared fixtures and helpers for the rlhf_ext test suite (docs/design.md §5).

* Without a CUDA GPU the Triton kernels run under the Triton interpreter: the
  environment variable is set here, before anything imports triton (triton
  decides at ``@triton.jit`` time whether a kernel is interpreted).
* Every test gets fresh random inputs from a generator seeded by its node id,
  so a failure reproduces by re-running the same test.
* The ops allocate their own outputs, so "poisoning" cannot pre-fill them;
  instead ``assert_written`` checks that every element is finite and that the
  positions the reference says are zero are exactly zero (an element a kernel
  forgot to write holds whatever ``torch.empty`` gave it).
"""

from __future__ import annotations

import os
import sys
import zlib


def _has_cuda_gpu() -> bool:
    # Decided without importing triton; torch.cuda.is_available() does not import it.
    import torch

    return torch.cuda.is_available()


HAS_CUDA = _has_cuda_gpu()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
assert HAS_CUDA or "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1", (
    "triton was imported before conftest could set TRITON_INTERPRET=1"
)

import pytest  # noqa: E402
import torch  # noqa: E402

try:  # hypothesis is a test extra; the property tests skip without it
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    settings.register_profile(
        "rlhf_ext",
        deadline=None,
        max_examples=25,
        derandomize=True,  # reproducible examples (the suite's inputs are seeded too)
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "rlhf_ext"))
except ImportError:  # pragma: no cover

    class _NoStrategies:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    st = _NoStrategies()

    def given(*args, **kwargs):
        import pytest

        return lambda fn: pytest.mark.skip(reason="hypothesis is not installed")(fn)


import rlhf_ext  # noqa: E402
from rlhf_ext import _backend  # noqa: E402

# -- what this machine can run ------------------------------------------------

COMPILED = _backend.compiled_available()
TRITON_CPU = _backend.triton_available("cpu")  # interpreter on CPU tensors
TRITON_CUDA = HAS_CUDA and _backend.triton_available("cuda")

# Backends that run on CPU tensors here (the compiled op, pure torch, Triton
# under the interpreter).
CPU_BACKENDS = [b for b in ("cpu", "torch", "triton") if b in rlhf_ext.available_backends("cpu")]

requires_compiled = pytest.mark.skipif(not COMPILED, reason="rlhf_ext._C is not built")
requires_triton_cpu = pytest.mark.skipif(
    not TRITON_CPU, reason="triton is not importable or TRITON_INTERPRET is not 1"
)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_triton = pytest.mark.skip(reason="compiled Triton needs a CUDA GPU (docs/design.md §5)")
    for item in items:
        if item.get_closest_marker("cuda") is not None and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if item.get_closest_marker("triton_gpu") is not None and not TRITON_CUDA:
            item.add_marker(skip_triton)


def pytest_report_header(config):
    return (
        f"rlhf_ext {rlhf_ext.__version__}: compiled={COMPILED} cuda_gpu={HAS_CUDA} "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')} "
        f"cpu backends={CPU_BACKENDS}"
    )


# -- fresh, reproducible random inputs ----------------------------------------


def _shape(shape) -> tuple:
    """randn(2, 3), randn((2, 3)) and randn(()) all work."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        return tuple(shape[0])
    return tuple(shape)


class Inputs:
    """Random tensors from one torch.Generator seeded by the test's node id."""

    def __init__(self, seed: int):
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape, dtype=torch.float32, device="cpu", scale=1.0, offset=0.0):
        """Normal values, never exactly zero (an all-zero output must mean something)."""
        x = torch.randn(_shape(shape), generator=self.gen, dtype=torch.float64) * scale + offset
        x = torch.where(x == 0, torch.full_like(x, 0.5), x)
        return x.to(dtype=dtype, device=device)

    def uniform(self, *shape, low=0.0, high=1.0, dtype=torch.float32, device="cpu"):
        x = torch.rand(_shape(shape), generator=self.gen, dtype=torch.float64) * (high - low) + low
        return x.to(dtype=dtype, device=device)

    def mask(self, *shape, p=0.7, device="cpu"):
        """Random holes: each position valid with probability p."""
        return (torch.rand(_shape(shape), generator=self.gen) < p).to(device)

    def prefix_mask(self, rows, cols, device="cpu", min_len=0):
        """Right padding: row b is valid on [0, len_b)."""
        lengths = torch.randint(min_len, cols + 1, (rows,), generator=self.gen)
        return (torch.arange(cols)[None, :] < lengths[:, None]).to(device)

    def randint(self, low, high, shape=()):
        return torch.randint(low, high, shape, generator=self.gen)

    def scalar(self, low=0.0, high=1.0) -> float:
        return float(torch.rand((), generator=self.gen, dtype=torch.float64) * (high - low) + low)


@pytest.fixture
def inputs(request) -> Inputs:
    return Inputs(zlib.crc32(request.node.nodeid.encode()))


# -- checks -------------------------------------------------------------------


def assert_written(out: torch.Tensor, zero_where: torch.Tensor | None = None) -> None:
    """Every element of `out` is finite, and exactly 0 where `zero_where` is true.

    The stand-in for NaN-poisoning outputs: the ops allocate their outputs with
    torch.empty, so a position a kernel skipped shows up as garbage / NaN / a
    value where the reference has an exact 0.
    """
    assert torch.isfinite(out).all(), (
        f"non-finite output at {(~torch.isfinite(out)).nonzero()[:5].tolist()}"
    )
    if zero_where is not None:
        zero_where = zero_where.to(device=out.device, dtype=torch.bool)
        leaked = (out != 0) & zero_where
        assert not leaked.any(), (
            f"non-zero output at masked positions {leaked.nonzero()[:5].tolist()}"
        )


def tolerances(dtype: torch.dtype) -> dict:
    """Comparison against a float64 reference of the same (rounded) inputs.

    The kernels upcast low-precision inputs and accumulate in float32, so the
    only error left is float32 rounding: float32-level tolerances for every
    input dtype but float64.
    """
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-12)
    return dict(rtol=1e-5, atol=1e-5)


def assert_close_ref(
    out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, *, scale=None
) -> None:
    """`out` equals the float64 reference `ref` within `dtype`'s tolerance.

    Absolute tolerance grows with the magnitude of the reference (`scale`,
    default its max-abs), because float32 rounding is relative to the
    values being summed, not to each (possibly tiny) result.
    """
    tol = tolerances(dtype)
    ref = ref.to(device=out.device)
    if scale is None:
        scale = float(ref.abs().max()) if ref.numel() else 1.0
    atol = tol["atol"] * max(1.0, scale)
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol["rtol"], atol=atol)


def assert_within_eager_error(out, ref64, eager, factor=2.0, slack=1e-6):
    """docs/design.md §5 criterion for low-precision inputs: the op's error against the
    float64 reference is at most `factor` times PyTorch's own eager error."""
    err = (out.double().cpu() - ref64.double().cpu()).abs().max().item() if out.numel() else 0.0
    eager_err = (
        (eager.double().cpu() - ref64.double().cpu()).abs().max().item() if out.numel() else 0.0
    )
    scale = ref64.abs().max().item() if ref64.numel() else 1.0
    assert err <= factor * eager_err + slack * max(1.0, scale), (err, eager_err)


# -- bad-input case tables ----------------------------------------------------


def bad_input(id, error, pattern, build, *, prefix=""):
    """One bad-input case: pytest.param(error, prefix + pattern, build, id=id).

    `build` makes the bad call (or the raw op's bad arguments) from inputs the
    consuming test prepares; the test checks it raises `error` matching the regex.
    """
    return pytest.param(error, prefix + pattern, build, id=id)


def bad_inputs(prefix, *rows):
    """A table of bad_input cases whose patterns all start with `prefix`, the op's name
    (e.g. r"rlhf_ext\\.gae: "; "" for none).

    A case is one row (id, error, pattern, build), or, where that does not fit on a line,
    a row (id, error, pattern) followed by its build as the next argument.
    """
    cases, rows = [], iter(rows)
    for row in rows:
        assert isinstance(row, tuple), f"expected a bad-input row, got {row!r}"
        if len(row) == 3:
            build = next(rows, None)
            assert callable(build), f"bad-input case {row[0]!r} has no build"
            row = (*row, build)
        cases.append(bad_input(*row, prefix=prefix))
    return cases
