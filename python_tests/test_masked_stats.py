"""rlhf_ext.masked_mean / rlhf_ext.masked_whiten against reference.py (float64)
and against TRL's formulas, on every backend this machine has."""

from __future__ import annotations

import conftest
import pytest
import torch
from conftest import (
    COMPILED,
    CPU_BACKENDS,
    assert_close_ref,
    assert_within_eager_error,
    assert_written,
    given,
    requires_compiled,
    requires_triton_cpu,
    st,
)

import rlhf_ext
from rlhf_ext import reference

MEAN_OP = "rlhf_ext.masked_mean"
WHITEN_OP = "rlhf_ext.masked_whiten"
BACKEND = "cpu" if COMPILED else "torch"


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def ref_mean(x, mask, dim):
    return reference.masked_mean(x.detach().double(), None if mask is None else mask, dim)


def ref_whiten(x, mask, shift_mean=True, unbiased=True, eps=1e-8):
    return reference.masked_whiten(x.detach().double(), mask, shift_mean, unbiased, eps)


# TRL's own code (trl/core.py, trl/trainer/utils.py), copied verbatim in spirit.
def trl_masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def trl_masked_var(values, mask, unbiased=True):
    mean = trl_masked_mean(values, mask)
    centered_values = values - mean
    variance = trl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError("The sum of the mask is zero")
        if mask_sum == 1:
            raise ValueError("The sum of the mask is one, which can cause a division by zero.")
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def sample_inputs(inputs, dtype=torch.float32):
    """(name, x, mask) cases for both ops (every mask keeps >= 2 elements)."""
    mk = lambda *s, **k: inputs.randn(*s, dtype=dtype, **k)  # noqa: E731
    yield "2d_holes", mk(5, 33), inputs.mask(5, 33)
    yield "2d_no_mask", mk(4, 17), None
    yield "3d", mk(3, 6, 7, offset=3.0), inputs.mask(3, 6, 7)
    yield "1d", mk(50, scale=10.0), inputs.mask(50)
    yield "prefix", mk(6, 40), inputs.prefix_mask(6, 40, min_len=1)
    yield "uint8_mask", mk(4, 9), inputs.mask(4, 9).to(torch.uint8)
    yield "float_mask", mk(4, 9), inputs.mask(4, 9).float()
    yield "non_contiguous", mk(20, 6).t()[:, ::2], inputs.mask(6, 10)


# -- masked_mean -----------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_masked_mean_matches_reference(inputs, backend, dtype):
    for name, x, mask in sample_inputs(inputs, dtype):
        for dim in [None, *range(x.dim()), *range(-x.dim(), 0)]:
            out = rlhf_ext.masked_mean(x, mask, dim, backend=backend)
            ref = ref_mean(x, mask, dim)
            assert out.dtype == acc(dtype), (name, dim)
            assert out.shape == ref.shape, (name, dim)
            assert_written(out)
            assert_close_ref(out, ref, acc(dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_mean_empty_rows_give_zero(inputs, backend):
    x = inputs.randn(4, 6)
    mask = inputs.mask(4, 6)
    mask[1] = False
    mask[:, 2] = False
    for dim in (1, -1):
        out = rlhf_ext.masked_mean(x, mask, dim, backend=backend)
        assert out[1].item() == 0.0
        assert_close_ref(out, ref_mean(x, mask, dim), torch.float32)
    out = rlhf_ext.masked_mean(x, mask, 0, backend=backend)
    assert out[2].item() == 0.0
    assert_written(out)
    # Zero-size tensors along the reduced and the kept dims.
    x3 = inputs.randn(3, 0, 4)
    assert torch.equal(rlhf_ext.masked_mean(x3, None, 1, backend=backend), torch.zeros(3, 4))
    assert rlhf_ext.masked_mean(x3, None, 0, backend=backend).shape == (0, 4)
    assert rlhf_ext.masked_mean(x3, None, -1, backend=backend).shape == (3, 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_mean_scalar_input(inputs, backend):
    x = inputs.randn(())
    torch.testing.assert_close(rlhf_ext.masked_mean(x, None, backend=backend), x)
    torch.testing.assert_close(rlhf_ext.masked_mean(x, torch.tensor(True), backend=backend), x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_mean_empty_mask_raises(inputs, backend):
    x = inputs.randn(3, 4)
    with pytest.raises(ValueError, match=r"rlhf_ext\.masked_mean: the mask keeps no valid element"):
        rlhf_ext.masked_mean(x, torch.zeros(3, 4, dtype=torch.bool), backend=backend)
    with pytest.raises(ValueError, match=r"rlhf_ext\.masked_mean: the mask keeps no valid element"):
        rlhf_ext.masked_mean(inputs.randn(0, 4), None, backend=backend)


@requires_compiled
def test_masked_mean_cpu_large_crosses_chunks(inputs):
    """N > 3 * 4096: several fixed-size chunks merged in order."""
    n = 4096 * 3 + 1234
    x = inputs.randn(n, scale=3.0, offset=10.0)
    mask = inputs.mask(n)
    assert_close_ref(
        rlhf_ext.masked_mean(x, mask, backend="cpu"), ref_mean(x, mask, None), torch.float32
    )
    rows = inputs.randn(3, n, offset=-5.0)
    rmask = inputs.mask(3, n)
    assert_close_ref(
        rlhf_ext.masked_mean(rows, rmask, 1, backend="cpu"), ref_mean(rows, rmask, 1), torch.float32
    )
    assert_close_ref(
        rlhf_ext.masked_mean(rows, rmask, 0, backend="cpu"), ref_mean(rows, rmask, 0), torch.float32
    )


@requires_triton_cpu
def test_masked_mean_triton_crosses_chunk(inputs):
    n = 4096 + 300
    x, mask = inputs.randn(2, n, offset=1.0), inputs.mask(2, n)
    assert_close_ref(
        rlhf_ext.masked_mean(x, mask, backend="triton"), ref_mean(x, mask, None), torch.float32
    )
    assert_close_ref(
        rlhf_ext.masked_mean(x, mask, -1, backend="triton"), ref_mean(x, mask, -1), torch.float32
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_mean_bf16_within_eager_error(inputs, backend):
    x = inputs.randn(8, 300, dtype=torch.bfloat16, offset=2.0)
    mask = inputs.mask(8, 300)
    for dim in (None, 1):
        out = rlhf_ext.masked_mean(x, mask, dim, backend=backend)
        eager = (
            (x * mask).sum(dim) / mask.sum(dim)
            if dim is not None
            else (x * mask).sum() / mask.sum()
        )
        assert_within_eager_error(out, ref_mean(x, mask, dim), eager)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_mean_matches_trl(inputs, backend):
    x, mask = inputs.randn(6, 20, dtype=torch.float64), inputs.mask(6, 20, p=0.9)
    mask[:, 0] = True  # TRL divides by zero on empty rows
    fmask = mask.double()
    torch.testing.assert_close(
        rlhf_ext.masked_mean(x, mask, backend=backend), trl_masked_mean(x, fmask)
    )
    torch.testing.assert_close(
        rlhf_ext.masked_mean(x, mask, 1, backend=backend), trl_masked_mean(x, fmask, 1)
    )


# -- masked_mean gradient --------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dim", [None, 0, 1, -1])
def test_masked_mean_gradcheck(inputs, backend, dim):
    if backend not in CPU_BACKENDS:
        pytest.skip(f"backend {backend!r} unavailable")
    x = inputs.randn(4, 7, dtype=torch.float64).requires_grad_()
    mask = inputs.mask(4, 7)
    mask[2] = False  # an empty row along dim=1
    assert torch.autograd.gradcheck(
        lambda t: rlhf_ext.masked_mean(t, mask, dim, backend=backend), (x,)
    )
    assert torch.autograd.gradcheck(
        lambda t: rlhf_ext.masked_mean(t, None, dim, backend=backend), (x,)
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_mean_grad_matches_reference(inputs, backend, dtype):
    x = inputs.randn(3, 5, 6, dtype=dtype)
    mask = inputs.mask(3, 5, 6)
    mask[:, 1] = False
    for dim in (None, 0, 1, 2, -2):
        weights = inputs.randn(*ref_mean(x, mask, dim).shape)
        xg = x.clone().requires_grad_()
        (rlhf_ext.masked_mean(xg, mask, dim, backend=backend) * weights).sum().backward()
        xr = x.double().requires_grad_()
        (reference.masked_mean(xr, mask, dim) * weights.double()).sum().backward()
        assert xg.grad.dtype == dtype
        assert_written(xg.grad, ~mask)
        torch.testing.assert_close(
            xg.grad.double(),
            xr.grad,
            **(
                dict(rtol=1e-2, atol=1e-3)
                if dtype == torch.bfloat16
                else dict(rtol=1e-5, atol=1e-6)
            ),
        )


# -- masked_whiten ----------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_whiten_matches_reference(inputs, backend, dtype, shift_mean, unbiased):
    for name, x, mask in sample_inputs(inputs, dtype):
        for eps in (1e-8, 0.5):
            out = rlhf_ext.masked_whiten(x, mask, shift_mean, unbiased, eps, backend=backend)
            ref = ref_whiten(x, mask, shift_mean, unbiased, eps)
            assert out.dtype == acc(dtype) and out.shape == x.shape, name
            assert_written(out)
            assert_close_ref(out, ref, acc(dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_whiten_matches_trl(inputs, backend):
    x = inputs.randn(5, 30, dtype=torch.float64, scale=4.0, offset=-2.0)
    mask = inputs.mask(5, 30)
    for shift_mean in (True, False):
        expected = trl_masked_whiten(x, mask.double(), shift_mean)
        got = rlhf_ext.masked_whiten(x, mask, shift_mean=shift_mean, backend=backend)
        torch.testing.assert_close(got, expected)
    got = rlhf_ext.masked_whiten(x, None, backend=backend)
    torch.testing.assert_close(got, trl_masked_whiten(x, torch.ones_like(x)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_whiten_count_checks(inputs, backend):
    x = inputs.randn(3, 4)
    none = torch.zeros(3, 4, dtype=torch.bool)
    one = none.clone()
    one[1, 2] = True
    for unbiased in (True, False):
        with pytest.raises(
            ValueError, match=r"rlhf_ext\.masked_whiten: the mask keeps no valid element"
        ):
            rlhf_ext.masked_whiten(x, none, unbiased=unbiased, backend=backend)
    with pytest.raises(
        ValueError, match=r"rlhf_ext\.masked_whiten: the mask keeps 1 valid element"
    ):
        rlhf_ext.masked_whiten(x, one, unbiased=True, backend=backend)
    # One element with the biased variance is well defined: (x - x) / sqrt(eps) = 0 there.
    out = rlhf_ext.masked_whiten(x, one, unbiased=False, backend=backend)
    assert_written(out)
    assert out[1, 2].item() == 0.0
    assert_close_ref(out, ref_whiten(x, one, unbiased=False), torch.float32, scale=1.0 / 1e-4)
    # Two elements with unbiased=True are enough.
    two = one.clone()
    two[0, 0] = True
    assert_close_ref(
        rlhf_ext.masked_whiten(x, two, backend=backend), ref_whiten(x, two), torch.float32
    )
    with pytest.raises(ValueError, match=r"rlhf_ext\.masked_whiten"):
        rlhf_ext.masked_whiten(inputs.randn(0), None, backend=backend)


@requires_compiled
def test_masked_whiten_cpu_large(inputs):
    n = 4096 * 3 + 77
    x = inputs.randn(2, n, scale=2.0, offset=5.0)
    mask = inputs.mask(2, n)
    for shift_mean in (True, False):
        assert_close_ref(
            rlhf_ext.masked_whiten(x, mask, shift_mean, backend="cpu"),
            ref_whiten(x, mask, shift_mean),
            torch.float32,
        )


@requires_triton_cpu
def test_masked_whiten_triton_crosses_chunk(inputs):
    n = 4096 + 500
    x = inputs.randn(n, offset=3.0)
    mask = inputs.mask(n)
    assert_close_ref(
        rlhf_ext.masked_whiten(x, mask, False, False, backend="triton"),
        ref_whiten(x, mask, False, False),
        torch.float32,
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_whiten_no_grad(inputs, backend):
    x = inputs.randn(3, 4).requires_grad_()
    assert not rlhf_ext.masked_whiten(x, None, backend=backend).requires_grad


# -- properties --------------------------------------------------------------------


@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    p=st.floats(0.05, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_property_masked_mean_and_whiten(shape, seed, p, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen) * 3 + 1).to(dtype)
    mask = torch.rand(*shape, generator=gen) < p
    mask.view(-1)[0] = True
    mask.view(-1)[-1] = True
    for dim in [None, *range(-len(shape), len(shape))]:
        assert_close_ref(
            rlhf_ext.masked_mean(x, mask, dim, backend=BACKEND), ref_mean(x, mask, dim), dtype
        )
    if int(mask.sum()) >= 2:
        assert_close_ref(
            rlhf_ext.masked_whiten(x, mask, backend=BACKEND), ref_whiten(x, mask), dtype
        )


# -- batch invariance / determinism ---------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_masked_mean_batch_invariant(inputs, backend):
    if backend not in CPU_BACKENDS:
        pytest.skip(f"backend {backend!r} unavailable")
    B, N = (32, 5000) if backend == "cpu" else (4, 700)
    x, mask = inputs.randn(B, N, offset=0.3), inputs.mask(B, N)
    full = rlhf_ext.masked_mean(x, mask, 1, backend=backend)
    assert torch.equal(full, rlhf_ext.masked_mean(x, mask, 1, backend=backend))
    for row in (0, B // 3, B - 1):
        alone = rlhf_ext.masked_mean(x[row : row + 1], mask[row : row + 1], 1, backend=backend)
        assert torch.equal(alone, full[row : row + 1]), row
        # The same row reduced as a whole tensor (dim=None) gives the same bits too.
        assert torch.equal(rlhf_ext.masked_mean(x[row], mask[row], backend=backend), full[row])
    # Along dim 0 (a transposed layout) the same values still give the same bits.
    assert torch.equal(rlhf_ext.masked_mean(x.t(), mask.t(), 0, backend=backend), full)


# -- bad input ----------------------------------------------------------------------


# bad_inputs rows (id, error, pattern after the prefix, fn): fn(x, mean, whiten) with x a
# float32 [3, 4] tensor and mean / whiten = rlhf_ext.masked_mean / masked_whiten on the
# test's backend.
MASKED_STATS_BAD_INPUT = conftest.bad_inputs(
    r"rlhf_ext\.masked_mean: ",
    ("mean-x-int64", TypeError, r"`x` must be float", lambda x, mean, whiten: mean(x.long(), None)),
    ("mean-x-list", TypeError, r"`x` must be a torch\.Tensor"),
    lambda x, mean, whiten: mean([1.0], None),
    ("mean-mask-shape", ValueError, r"`mask` must have the shape of `x`"),
    lambda x, mean, whiten: mean(x, torch.ones(3, 5, dtype=torch.bool)),
    ("mean-dim-2", ValueError, r"`dim` must be in \[-2, 1\]"),
    lambda x, mean, whiten: mean(x, None, 2),
    ("mean-dim-minus-3", ValueError, r"`dim` must be in \[-2, 1\]"),
    lambda x, mean, whiten: mean(x, None, -3),
    ("mean-dim-float", TypeError, r"`dim` must be an int or None"),
    lambda x, mean, whiten: mean(x, None, 1.0),
    ("mean-dim-tuple", TypeError, r"`dim` must be an int or None"),
    lambda x, mean, whiten: mean(x, None, (0, 1)),
    ("mean-dim-of-0d", ValueError, r"`dim`", lambda x, mean, whiten: mean(torch.ones(()), None, 0)),
) + conftest.bad_inputs(
    r"rlhf_ext\.masked_whiten: ",
    ("whiten-x-int32", TypeError, r"`x` must be float"),
    lambda x, mean, whiten: whiten(x.int(), None),
    ("whiten-mask-shape", ValueError, r"`mask` must have the shape of `x`"),
    lambda x, mean, whiten: whiten(x, torch.ones(4, 3, dtype=torch.bool)),
    ("whiten-eps-negative", ValueError, r"`eps` must be a float > 0"),
    lambda x, mean, whiten: whiten(x, None, eps=-1.0),
)


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
@pytest.mark.parametrize("error, pattern, fn", MASKED_STATS_BAD_INPUT)
def test_masked_stats_bad_input(inputs, backend, error, pattern, fn):
    x = inputs.randn(3, 4)
    mean = lambda *a, **k: rlhf_ext.masked_mean(*a, backend=backend, **k)  # noqa: E731
    whiten = lambda *a, **k: rlhf_ext.masked_whiten(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(error, match=pattern):
        fn(x, mean, whiten)


def test_masked_stats_unknown_backend(inputs):
    x = inputs.randn(3, 4)
    with pytest.raises(ValueError, match=r"rlhf_ext\.masked_mean: `backend` must be one of"):
        rlhf_ext.masked_mean(x, None, backend="gpu")


def test_masked_stats_cuda_backend_on_cpu_tensors(inputs):
    x = inputs.randn(3, 4)
    with pytest.raises(
        rlhf_ext.BackendUnavailableError, match=r"rlhf_ext\.masked_whiten: backend='cuda'"
    ):
        rlhf_ext.masked_whiten(x, None, backend="cuda")


# bad_inputs rows (id, error, pattern after the prefix, fn): fn(x, ops) calls the raw op,
# ops = torch.ops.rlhf_ext.
MASKED_STATS_RAW_OP_BAD_INPUT = conftest.bad_inputs(
    r"rlhf_ext\.masked_mean: ",
    ("mean-mask-shape", ValueError, r"`mask` must have the shape of `x`"),
    lambda x, ops: ops.masked_mean(x, torch.ones(2, 4, dtype=torch.bool), None),
    ("mean-dim-5", ValueError, r"`dim` must be in \[-2, 1\]"),
    lambda x, ops: ops.masked_mean(x, None, 5),
    ("mean-x-int64", TypeError, r"`x` must be float"),
    lambda x, ops: ops.masked_mean(x.long(), None, None),
) + conftest.bad_inputs(
    r"rlhf_ext\.masked_whiten: ",
    ("whiten-x-int64", TypeError, r"`x` must be float"),
    lambda x, ops: ops.masked_whiten(x.long(), None, True, True, 1e-8),
    ("whiten-mask-shape", ValueError, r"`mask` must have the shape of `x`"),
    lambda x, ops: ops.masked_whiten(x, torch.ones(4, dtype=torch.bool), True, True, 1e-8),
)


@requires_compiled
@pytest.mark.parametrize("error, pattern, fn", MASKED_STATS_RAW_OP_BAD_INPUT)
def test_masked_stats_raw_op_checks(inputs, error, pattern, fn):
    x = inputs.randn(3, 4)
    with pytest.raises(error, match=pattern):
        fn(x, torch.ops.rlhf_ext)


# -- CUDA -------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_masked_stats_cuda(inputs, backend, dtype):
    if backend not in rlhf_ext.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} unavailable on CUDA tensors")
    for shape in [(5, 33), (3, 6, 7), (64, 70000), (1, 4096 * 5 + 3)]:
        x = inputs.randn(*shape, dtype=dtype, offset=1.0, device="cuda")
        mask = inputs.mask(*shape, device="cuda")
        for dim in (None, 0, -1):
            out = rlhf_ext.masked_mean(x, mask, dim, backend=backend)
            assert_close_ref(out, ref_mean(x.cpu(), mask.cpu(), dim), acc(dtype))
        for shift_mean, unbiased in ((True, True), (False, False)):
            out = rlhf_ext.masked_whiten(x, mask, shift_mean, unbiased, backend=backend)
            assert_written(out)
            assert_close_ref(out, ref_whiten(x.cpu(), mask.cpu(), shift_mean, unbiased), acc(dtype))
        # Deterministic and batch-invariant.
        full = rlhf_ext.masked_mean(x, mask, -1, backend=backend)
        for _ in range(3):
            assert torch.equal(full, rlhf_ext.masked_mean(x, mask, -1, backend=backend))
        assert torch.equal(rlhf_ext.masked_mean(x[:1], mask[:1], -1, backend=backend), full[:1])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_masked_mean_cuda_grad(inputs, backend):
    if backend not in rlhf_ext.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} unavailable on CUDA tensors")
    x = inputs.randn(4, 7, dtype=torch.float64, device="cuda").requires_grad_()
    mask = inputs.mask(4, 7, device="cuda")
    for dim in (None, 1):
        assert torch.autograd.gradcheck(
            lambda t, dim=dim: rlhf_ext.masked_mean(t, mask, dim, backend=backend), (x,)
        )


@pytest.mark.triton_gpu
def test_masked_stats_triton_inductor_parity(inputs):
    """torch.compile with Inductor (the default backend), which compiles the Triton
    kernels into its own generated code, gives the eager bits. test_op_contract.py
    compiles with aot_eager only."""
    torch._dynamo.reset()
    x, mask = inputs.randn(3, 40, device="cuda"), inputs.mask(3, 40, device="cuda")
    mask[:, 0] = True

    def fn(x, mask):
        return (
            rlhf_ext.masked_mean(x, mask, 1, backend="triton"),
            rlhf_ext.masked_whiten(x, mask, backend="triton"),
        )

    compiled = torch.compile(fn, fullgraph=True)
    for e, g in zip(fn(x, mask), compiled(x, mask), strict=True):
        torch.testing.assert_close(e, g, rtol=0, atol=0)


# -- masked-out values and mask semantics (all backends agree) ------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("poison_value", [float("nan"), float("inf"), float("-inf")])
def test_masked_out_non_finite_values_are_ignored(inputs, backend, poison_value):
    x, mask = inputs.randn(4, 300), inputs.mask(4, 300)
    mask[:, :2] = True
    expected_mean = reference.masked_mean(x.double(), mask)
    expected_rows = reference.masked_mean(x.double(), mask, 1)
    expected_white = reference.masked_whiten(x.double(), mask)
    x[~mask] = poison_value
    torch.testing.assert_close(
        rlhf_ext.masked_mean(x, mask, backend=backend).double(), expected_mean, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        rlhf_ext.masked_mean(x, mask, 1, backend=backend).double(),
        expected_rows,
        rtol=1e-5,
        atol=1e-6,
    )
    white = rlhf_ext.masked_whiten(x, mask, backend=backend).double()
    torch.testing.assert_close(white[mask], expected_white[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_integer_mask_selects_not_weights(inputs, backend):
    x = inputs.randn(3, 50)
    mask = torch.randint(0, 3, (3, 50), generator=None)
    mask[:, 0] = 2
    expected = x[mask != 0].double().mean()
    torch.testing.assert_close(
        rlhf_ext.masked_mean(x, mask, backend=backend).double(), expected, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("eps", [0.0, -1e-8, float("nan"), True])
def test_masked_whiten_rejects_eps_that_is_not_positive(inputs, eps):
    with pytest.raises(ValueError, match=r"rlhf_ext\.masked_whiten: `eps` must be a float > 0"):
        rlhf_ext.masked_whiten(inputs.randn(5), eps=eps)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_validate_false_skips_the_empty_check(inputs, backend):
    x = inputs.randn(6)
    empty = torch.zeros(6, dtype=torch.bool)
    assert rlhf_ext.masked_mean(x, empty, validate=False, backend=backend).item() == 0.0
    out = rlhf_ext.masked_whiten(x, empty, validate=False, backend=backend)
    assert torch.isfinite(out).all()


# numpy (the Triton interpreter) warns on inf - inf; the result is what is checked.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_mean_of_infinite_elements_matches_torch(backend):
    """inf among the valid elements gives an infinite mean, as torch.mean and TRL give it
    (issue 16: the C++ Welford step gave NaN, inf - inf); opposite infinities give NaN;
    a masked inf is not read."""
    inf = float("inf")
    x = torch.tensor([[inf, 1.0, 2.0], [-inf, 1.0, 0.5], [inf, -inf, 1.0], [inf, 3.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    got = rlhf_ext.masked_mean(x, mask, 1, backend=backend)
    torch.testing.assert_close(got, torch.tensor([inf, -inf, float("nan"), 4.0]), equal_nan=True)
    assert rlhf_ext.masked_mean(x[0], backend=backend) == inf
