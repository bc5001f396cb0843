"""rlhf_ext.gae against reference.gae (float64), on every backend this machine has.

Backends on CPU tensors: "cpu" (compiled C++), "torch" (the reference itself),
"triton" (under TRITON_INTERPRET=1 without a GPU: small shapes only). CUDA tests
are marked and run wherever a GPU exists.
"""

from __future__ import annotations

import functools

import conftest
import pytest
import torch
from conftest import (
    COMPILED,
    CPU_BACKENDS,
    TRITON_CPU,
    Inputs,
    assert_close_ref,
    assert_within_eager_error,
    assert_written,
    given,
    requires_compiled,
    requires_triton_cpu,
    st,
)

import rlhf_ext
from bench import peers
from rlhf_ext import reference

OP = "rlhf_ext.gae"


# -- helpers ------------------------------------------------------------------


def out_dtype(*tensors):
    common = tensors[0].dtype
    for t in tensors[1:]:
        common = torch.promote_types(common, t.dtype)
    return torch.float64 if common == torch.float64 else torch.float32


def ref_gae(rewards, values, mask=None, *, gamma=1.0, lam=0.95, last_value=None, cu_seqlens=None):
    """The oracle: reference.gae on the (already rounded) inputs upcast to float64."""
    up = lambda t: t.detach().cpu().double() if isinstance(t, torch.Tensor) else t  # noqa: E731
    return reference.gae(
        up(rewards),
        up(values),
        None if mask is None else mask.cpu(),
        gamma=up(gamma),
        lam=up(lam),
        last_value=up(last_value),
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.cpu(),
    )


def check_against_reference(backend, rewards, values, mask=None, **kwargs):
    """Run the op, check dtype / shape / written-ness, compare with the oracle."""
    adv, ret = rlhf_ext.gae(rewards, values, mask, backend=backend, **kwargs)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, **kwargs)
    expected_dtype = out_dtype(rewards, values)
    for out, ref in ((adv, ref_adv), (ret, ref_ret)):
        assert out.dtype == expected_dtype
        assert out.shape == rewards.shape
        assert out.device == rewards.device
        invalid = None if mask is None else (mask == 0)
        assert_written(out, invalid)
        assert_close_ref(
            out, ref, torch.float64 if expected_dtype == torch.float64 else torch.float32
        )
    return adv, ret


def sample_inputs(inputs, device="cpu", dtype=torch.float32, *, long_rows=False):
    """(name, rewards, values, mask, kwargs) covering the padded form's cases."""
    mk = lambda *s: inputs.randn(*s, dtype=dtype, device=device)  # noqa: E731
    B, T = 4, 37
    yield (
        "prefix",
        mk(B, T),
        mk(B, T),
        inputs.prefix_mask(B, T, device=device),
        dict(gamma=inputs.scalar(0.8, 1.0), lam=inputs.scalar(0.8, 1.0)),
    )
    B, T = 5, 64
    yield (
        "holes",
        mk(B, T),
        mk(B, T),
        inputs.mask(B, T, p=0.6, device=device),
        dict(
            gamma=inputs.scalar(0.8, 1.0),
            lam=inputs.scalar(0.5, 1.0),
            last_value=inputs.randn(B, device=device),
        ),
    )
    mask = inputs.mask(3, 20, device=device)
    mask[1] = False
    yield "all_masked_row", mk(3, 20), mk(3, 20), mask, dict(gamma=0.99, lam=0.95)
    yield (
        "no_mask_last_value",
        mk(3, 17),
        mk(3, 17),
        None,
        dict(gamma=0.97, lam=0.9, last_value=inputs.randn(3, device=device)),
    )
    B, T = 6, 29
    yield (
        "per_row_rates",
        mk(B, T),
        mk(B, T),
        inputs.mask(B, T, device=device),
        dict(
            gamma=inputs.uniform(B, low=0.8, high=1.0, device=device),
            lam=inputs.uniform(B, low=0.5, high=1.0, device=device),
            last_value=inputs.randn(B, device=device),
        ),
    )
    yield (
        "per_row_gamma_scalar_lam",
        mk(3, 11),
        mk(3, 11),
        None,
        dict(gamma=inputs.uniform(3, low=0.8, high=1.0, device=device), lam=0.7),
    )
    yield (
        "gamma_lam_1",
        mk(3, 25),
        mk(3, 25),
        inputs.mask(3, 25, device=device),
        dict(gamma=1.0, lam=1.0),
    )
    yield (
        "T1",
        mk(4, 1),
        mk(4, 1),
        inputs.mask(4, 1, device=device),
        dict(gamma=0.9, lam=0.9, last_value=inputs.randn(4, device=device)),
    )
    yield "B0", mk(0, 10), mk(0, 10), inputs.mask(0, 10, device=device), dict(gamma=0.9, lam=0.9)
    yield (
        "T0",
        mk(3, 0),
        mk(3, 0),
        None,
        dict(gamma=0.9, lam=0.9, last_value=inputs.randn(3, device=device)),
    )
    yield "B0_T0", mk(0, 0), mk(0, 0), None, dict()
    if long_rows:
        B, T = 3, 5000
        yield (
            "long_rows",
            mk(B, T),
            mk(B, T),
            inputs.mask(B, T, p=0.9, device=device),
            dict(gamma=0.999, lam=0.95, last_value=inputs.randn(B, device=device)),
        )


SAMPLE_NAMES = [s[0] for s in sample_inputs(Inputs(0))]


# -- reference comparisons ----------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gae_matches_reference(inputs, backend, dtype):
    for name, rewards, values, mask, kwargs in sample_inputs(inputs, dtype=dtype):
        try:
            check_against_reference(backend, rewards, values, mask, **kwargs)
        except AssertionError as error:
            raise AssertionError(f"sample {name!r}: {error}") from error


@requires_compiled
def test_gae_cpu_long_rows(inputs):
    """Rows of 5000 tokens with holes and bootstrapping, compiled CPU kernel."""
    B, T = 3, 5000
    rewards, values = inputs.randn(B, T), inputs.randn(B, T)
    mask = inputs.mask(B, T, p=0.9)
    check_against_reference(
        "cpu", rewards, values, mask, gamma=0.999, lam=0.95, last_value=inputs.randn(B)
    )


@requires_triton_cpu
@pytest.mark.parametrize("T", [1023, 1024, 1025, 1100])
def test_gae_triton_crosses_block(inputs, T):
    """The Triton block is 1024: rows just under, at and over it (carry between chunks)."""
    B = 2
    rewards, values = inputs.randn(B, T), inputs.randn(B, T)
    mask = inputs.mask(B, T, p=0.8)
    mask[:, 1024 - 3 : 1024 + 3] = torch.tensor([True, False, True, False, False, True])[
        : min(6, T - 1021)
    ]
    check_against_reference(
        "triton", rewards, values, mask, gamma=0.99, lam=0.9, last_value=inputs.randn(B)
    )


@requires_triton_cpu
def test_gae_triton_crosses_block_unmasked_per_row(inputs):
    B, T = 2, 1100
    check_against_reference(
        "triton",
        inputs.randn(B, T),
        inputs.randn(B, T),
        None,
        gamma=inputs.uniform(B, low=0.9, high=1.0),
        lam=inputs.uniform(B, low=0.9, high=1.0),
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gae_low_precision(inputs, backend, dtype):
    """bf16/fp16 inputs: float32 outputs, float32-level error against the float64
    reference of the rounded inputs, and within 2x PyTorch eager's own error."""
    B, T = 4, 48
    rewards, values = inputs.randn(B, T, dtype=dtype), inputs.randn(B, T, dtype=dtype)
    mask = inputs.mask(B, T)
    last_value = inputs.randn(B, dtype=dtype)
    kwargs = dict(gamma=0.99, lam=0.95, last_value=last_value)
    adv, ret = check_against_reference(backend, rewards, values, mask, **kwargs)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, **kwargs)
    eager_adv, eager_ret = reference.gae(rewards, values, mask, **kwargs)  # float32 eager
    assert_within_eager_error(adv, ref_adv, eager_adv)
    assert_within_eager_error(ret, ref_ret, eager_ret)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gae_mixed_dtypes(inputs, backend):
    """bf16 values with fp32 rewards (and the reverse): promoted, float32 out."""
    B, T = 3, 33
    mask = inputs.mask(B, T)
    r32, v16 = inputs.randn(B, T), inputs.randn(B, T, dtype=torch.bfloat16)
    check_against_reference(backend, r32, v16, mask, gamma=0.95, lam=0.9)
    check_against_reference(backend, v16, r32, mask, gamma=0.95, lam=0.9)
    # float64 with float32 promotes to float64.
    check_against_reference(backend, r32.double(), inputs.randn(B, T), mask, gamma=0.95, lam=0.9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gae_non_contiguous(inputs, backend):
    B, T = 5, 40
    rewards = inputs.randn(T, B).t()  # transposed
    values = inputs.randn(B, T + 7)[:, 3 : 3 + T]  # sliced
    mask = inputs.mask(T, B).t()
    last_value = inputs.randn(2 * B)[::2]
    gamma = inputs.uniform(B, 2, low=0.9, high=1.0)[:, 1]
    assert not rewards.is_contiguous() and not values.is_contiguous() and not mask.is_contiguous()
    check_against_reference(
        backend, rewards, values, mask, gamma=gamma, lam=0.9, last_value=last_value
    )
    # Strided rows (every other column).
    wide_r, wide_v = inputs.randn(B, 2 * T), inputs.randn(B, 2 * T)
    check_against_reference(
        backend, wide_r[:, ::2], wide_v[:, ::2], mask.contiguous(), gamma=0.9, lam=0.8
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "mask_dtype", [torch.bool, torch.uint8, torch.int64, torch.float32, torch.bfloat16], ids=str
)
def test_gae_mask_dtypes(inputs, backend, mask_dtype):
    B, T = 3, 30
    rewards, values = inputs.randn(B, T), inputs.randn(B, T)
    mask = inputs.mask(B, T)
    expected = rlhf_ext.gae(rewards, values, mask, gamma=0.9, lam=0.9, backend=backend)
    got = check_against_reference(backend, rewards, values, mask.to(mask_dtype), gamma=0.9, lam=0.9)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gae_scalar_last_value(inputs, backend):
    """A Python float last_value bootstraps every row with that value."""
    B, T = 3, 12
    rewards, values = inputs.randn(B, T), inputs.randn(B, T)
    a = rlhf_ext.gae(rewards, values, gamma=0.9, lam=0.9, last_value=0.5, backend=backend)
    b = rlhf_ext.gae(
        rewards, values, gamma=0.9, lam=0.9, last_value=torch.full((B,), 0.5), backend=backend
    )
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gae_no_grad(inputs, backend):
    rewards = inputs.randn(2, 9).requires_grad_()
    values = inputs.randn(2, 9).requires_grad_()
    adv, ret = rlhf_ext.gae(rewards, values, backend=backend)
    assert not adv.requires_grad and not ret.requires_grad


# -- packed (varlen) form -------------------------------------------------------


def packed_case(inputs, lengths, *, dtype=torch.float32, holes=True):
    """Padded [B, Tmax] inputs with right padding, and the same rows packed."""
    B, T = len(lengths), max(lengths, default=0)
    rewards, values = inputs.randn(B, T, dtype=dtype), inputs.randn(B, T, dtype=dtype)
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    valid = torch.arange(T)[None, :] < lengths_t[:, None]
    holes_mask = inputs.mask(B, T, p=0.8) if holes else torch.ones(B, T, dtype=torch.bool)
    padded_mask = valid & holes_mask
    cu = torch.zeros(B + 1, dtype=torch.int64)
    cu[1:] = lengths_t.cumsum(0)
    return rewards, values, padded_mask, valid, cu


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=str)
def test_gae_packed_equals_padded(inputs, backend, cu_dtype):
    lengths = [7, 0, 19, 1, 0, 33, 12]  # empty segments included
    rewards, values, mask, valid, cu = packed_case(inputs, lengths)
    B = len(lengths)
    kwargs = dict(gamma=inputs.uniform(B, low=0.9, high=1.0), lam=0.93, last_value=inputs.randn(B))
    pad_adv, pad_ret = rlhf_ext.gae(rewards, values, mask, backend=backend, **kwargs)
    flat = lambda t: t[valid]  # noqa: E731  (row-major: rows concatenated)
    adv, ret = rlhf_ext.gae(
        flat(rewards),
        flat(values),
        flat(mask),
        cu_seqlens=cu.to(cu_dtype),
        backend=backend,
        **kwargs,
    )
    assert adv.shape == (int(cu[-1]),) and adv.dtype == torch.float32
    assert_written(adv, ~flat(mask))
    assert_written(ret, ~flat(mask))
    torch.testing.assert_close(adv, flat(pad_adv), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ret, flat(pad_ret), rtol=1e-6, atol=1e-6)
    ref_adv, ref_ret = ref_gae(flat(rewards), flat(values), flat(mask), cu_seqlens=cu, **kwargs)
    assert_close_ref(adv, ref_adv, torch.float32)
    assert_close_ref(ret, ref_ret, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gae_packed_edge_cases(inputs, backend):
    # No segment at all.
    empty = torch.empty(0)
    adv, ret = rlhf_ext.gae(
        empty, empty, cu_seqlens=torch.zeros(1, dtype=torch.int32), backend=backend
    )
    assert adv.shape == (0,) and ret.shape == (0,)
    # Only empty segments.
    adv, ret = rlhf_ext.gae(
        empty, empty, cu_seqlens=torch.zeros(4, dtype=torch.int64), backend=backend
    )
    assert adv.shape == (0,)
    # One segment, no mask, float64.
    r, v = inputs.randn(9, dtype=torch.float64), inputs.randn(9, dtype=torch.float64)
    cu = torch.tensor([0, 9])
    adv, ret = rlhf_ext.gae(r, v, cu_seqlens=cu, gamma=0.9, lam=0.8, backend=backend)
    ref_adv, ref_ret = ref_gae(r[None], v[None], gamma=0.9, lam=0.8)
    assert adv.dtype == torch.float64
    assert_close_ref(adv, ref_adv[0], torch.float64)
    assert_close_ref(ret, ref_ret[0], torch.float64)


@requires_triton_cpu
def test_gae_triton_packed_long_segment(inputs):
    """Packed rows always use 1024-wide blocks in Triton: a 1100-token segment crosses one."""
    lengths = [1100, 5, 0, 300]
    rewards, values, mask, valid, cu = packed_case(inputs, lengths)
    flat = lambda t: t[valid]  # noqa: E731
    kwargs = dict(gamma=0.995, lam=0.97, last_value=inputs.randn(len(lengths)))
    adv, ret = rlhf_ext.gae(
        flat(rewards), flat(values), flat(mask), cu_seqlens=cu, backend="triton", **kwargs
    )
    ref_adv, ref_ret = ref_gae(flat(rewards), flat(values), flat(mask), cu_seqlens=cu, **kwargs)
    assert_written(adv, ~flat(mask))
    assert_close_ref(adv, ref_adv, torch.float32)
    assert_close_ref(ret, ref_ret, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gae_packed_unvalidated_bad_offsets_never_crash(inputs, backend):
    """validate=False with malformed offsets: an error or a finite result, never
    an out-of-bounds read (the kernels clamp or check)."""
    r, v = inputs.randn(10), inputs.randn(10)
    for bad in ([0, 4, 2, 10], [0, 4, 25], [-3, 4, 10], [0, 4, 7]):
        cu = torch.tensor(bad, dtype=torch.int32)
        try:
            adv, ret = rlhf_ext.gae(r, v, cu_seqlens=cu, validate=False, backend=backend)
        except (ValueError, IndexError, RuntimeError) as error:
            assert backend == "torch" or OP in str(error)
            continue
        assert adv.shape == (10,)


# -- properties ----------------------------------------------------------------

PROPERTY_BACKEND = "cpu" if COMPILED else "torch"


@given(
    B=st.integers(1, 4),
    T=st.integers(1, 60),
    seed=st.integers(0, 2**31 - 1),
    bootstrap=st.booleans(),
)
def test_property_gamma_lam_one_is_reversed_cumsum(B, T, seed, bootstrap):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    last_value = torch.randn(B, generator=gen, dtype=torch.float64) if bootstrap else None
    adv, ret = rlhf_ext.gae(
        rewards, values, gamma=1.0, lam=1.0, last_value=last_value, backend=PROPERTY_BACKEND
    )
    next_values = torch.cat(
        [
            values[:, 1:],
            (last_value if bootstrap else torch.zeros(B, dtype=torch.float64))[:, None],
        ],
        1,
    )
    deltas = rewards + next_values - values
    expected = deltas.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, expected + values, rtol=1e-10, atol=1e-10)


@given(
    layout=st.lists(st.booleans(), min_size=0, max_size=50),
    seed=st.integers(0, 2**31 - 1),
    gamma=st.floats(0.5, 1.0),
    lam=st.floats(0.0, 1.0),
    bootstrap=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_property_masked_positions_are_skipped(layout, seed, gamma, lam, bootstrap, dtype):
    """Inserting masked (garbage) positions into a row leaves the valid outputs
    unchanged, and the masked positions give exactly 0."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.tensor(layout, dtype=torch.bool)
    T, n = len(layout), int(mask.sum())
    compact_r = torch.randn(1, n, generator=gen, dtype=dtype)
    compact_v = torch.randn(1, n, generator=gen, dtype=dtype)
    rewards = torch.randn(1, T, generator=gen, dtype=dtype) * 100 + 7  # garbage where masked
    values = torch.randn(1, T, generator=gen, dtype=dtype) * 100 - 7
    rewards[0, mask], values[0, mask] = compact_r[0], compact_v[0]
    last_value = torch.randn(1, generator=gen, dtype=dtype) if bootstrap else None
    kwargs = dict(gamma=gamma, lam=lam, last_value=last_value, backend=PROPERTY_BACKEND)
    adv, ret = rlhf_ext.gae(rewards, values, mask[None], **kwargs)
    c_adv, c_ret = rlhf_ext.gae(compact_r, compact_v, **kwargs)
    assert torch.equal(adv[0, ~mask], torch.zeros(T - n, dtype=adv.dtype))
    assert torch.equal(ret[0, ~mask], torch.zeros(T - n, dtype=ret.dtype))
    # The sequential kernel performs the very same operations: bitwise equal.
    assert torch.equal(adv[0, mask], c_adv[0])
    assert torch.equal(ret[0, mask], c_ret[0])


@given(
    B=st.integers(0, 4),
    T=st.integers(0, 40),
    seed=st.integers(0, 2**31 - 1),
    p=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
)
def test_property_advantages_plus_values_is_returns(B, T, seed, p, dtype):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=gen).to(dtype)
    values = torch.randn(B, T, generator=gen).to(dtype)
    mask = torch.rand(B, T, generator=gen) < p
    adv, ret = rlhf_ext.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend=PROPERTY_BACKEND)
    acc = adv.dtype
    torch.testing.assert_close(ret[mask], adv[mask] + values.to(acc)[mask], rtol=1e-6, atol=1e-6)
    assert torch.equal(ret[~mask], torch.zeros_like(ret[~mask]))


@given(
    B=st.integers(1, 3), T=st.integers(1, 30), seed=st.integers(0, 2**31 - 1), p=st.floats(0.0, 1.0)
)
def test_property_matches_reference(B, T, seed, p):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=gen)
    values = torch.randn(B, T, generator=gen)
    mask = torch.rand(B, T, generator=gen) < p
    gamma = torch.rand(B, generator=gen) * 0.5 + 0.5
    check_against_reference(PROPERTY_BACKEND, rewards, values, mask, gamma=gamma, lam=0.9)


# -- batch invariance and determinism -----------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gae_batch_invariant_and_deterministic(inputs, backend):
    if backend not in CPU_BACKENDS:
        pytest.skip(f"backend {backend!r} unavailable")
    B, T = (16, 300) if backend == "cpu" else (4, 100)
    rewards, values = inputs.randn(B, T), inputs.randn(B, T)
    mask = inputs.mask(B, T)
    gamma = inputs.uniform(B, low=0.9, high=1.0)
    last_value = inputs.randn(B)

    def run(r, v, m, g, lv):
        return rlhf_ext.gae(r, v, m, gamma=g, lam=0.95, last_value=lv, backend=backend)

    adv, ret = run(rewards, values, mask, gamma, last_value)
    for _ in range(2):
        adv2, ret2 = run(rewards, values, mask, gamma, last_value)
        assert torch.equal(adv, adv2) and torch.equal(ret, ret2)
    for row in (0, B // 2, B - 1):
        sl = slice(row, row + 1)
        a, r = run(rewards[sl], values[sl], mask[sl], gamma[sl], last_value[sl])
        assert torch.equal(a, adv[sl]) and torch.equal(r, ret[sl]), f"row {row} differs alone"
    # The same row in a larger batch at another position.
    perm = torch.randperm(B, generator=inputs.gen)
    a, r = run(rewards[perm], values[perm], mask[perm], gamma[perm], last_value[perm])
    assert torch.equal(a, adv[perm]) and torch.equal(r, ret[perm])


@requires_compiled
def test_gae_cpu_batch_invariant_packed(inputs):
    lengths = [40, 0, 3000, 17]
    rewards, values, mask, valid, cu = packed_case(inputs, lengths)
    flat = lambda t: t[valid]  # noqa: E731
    adv, ret = rlhf_ext.gae(flat(rewards), flat(values), flat(mask), cu_seqlens=cu, backend="cpu")
    lo, hi = int(cu[2]), int(cu[3])
    a, r = rlhf_ext.gae(
        flat(rewards)[lo:hi],
        flat(values)[lo:hi],
        flat(mask)[lo:hi],
        cu_seqlens=torch.tensor([0, hi - lo]),
        backend="cpu",
    )
    assert torch.equal(a, adv[lo:hi]) and torch.equal(r, ret[lo:hi])


# -- peers: TRL / verl / TorchRL, the same baselines bench/ times ----------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("peer", ["trl_gae", "verl_gae", "torchrl_gae"])
def test_gae_matches_peers(inputs, backend, peer):
    """The peers' GAE as they write it (bench/peers.py), unmasked, then verl masked."""
    if peer == "torchrl_gae" and not peers.torchrl_available():
        pytest.skip("torchrl is not installed")
    B, T = 3, 40
    rewards, values = (
        inputs.randn(B, T, dtype=torch.float64),
        inputs.randn(B, T, dtype=torch.float64),
    )
    adv, ret = rlhf_ext.gae(rewards, values, gamma=0.99, lam=0.95, backend=backend)
    if peer == "verl_gae":
        p_adv, p_ret = peers.verl_gae(
            rewards, values, torch.ones(B, T, dtype=torch.float64), gamma=0.99, lam=0.95
        )
    else:
        p_adv, p_ret = getattr(peers, peer)(rewards, values, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv, p_adv.double())
    torch.testing.assert_close(ret, p_ret.double())
    if peer == "verl_gae":  # with holes: equal at the valid positions
        mask = inputs.mask(B, T)
        adv, ret = rlhf_ext.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend=backend)
        p_adv, p_ret = peers.verl_gae(rewards, values, mask.double(), gamma=0.99, lam=0.95)
        torch.testing.assert_close(adv[mask], p_adv[mask])
        torch.testing.assert_close(ret[mask], p_ret[mask])


# -- torch.compile beyond the op contract ----------------------------------------------


@requires_compiled
def test_gae_compile_second_shape(inputs):
    """A second shape through the same compiled function (Dynamo's dynamic recompile)
    gives the eager bits. test_op_contract.py compiles every sample afresh, so it
    never exercises a recompile."""
    torch._dynamo.reset()

    def fn(r, v, m, lv, g):
        return rlhf_ext.gae(r, v, m, gamma=g, lam=0.95, last_value=lv, backend="cpu")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for B, T in ((4, 23), (2, 31)):
        args = (
            inputs.randn(B, T),
            inputs.randn(B, T),
            inputs.mask(B, T),
            inputs.randn(B),
            inputs.uniform(B, low=0.9, high=1.0),
        )
        for e, g in zip(fn(*args), compiled(*args), strict=True):
            assert torch.equal(e, g), (B, T)


# -- bad input -----------------------------------------------------------------


def _gae_ok(inputs, B=3, T=5):
    return inputs.randn(B, T), inputs.randn(B, T)


# bad_inputs rows (id, error, pattern after the prefix, fn), fn(r, v, op) with r, v the [3, 5]
# rewards / values of _gae_ok and op = rlhf_ext.gae on the test's backend.
GAE_BAD_INPUT = conftest.bad_inputs(
    r"rlhf_ext\.gae: ",
    ("rewards-3d", ValueError, r"`rewards` must be 2-D", lambda r, v, op: op(r[None], v[None])),
    ("rewards-1d", ValueError, r"`rewards` must be 2-D", lambda r, v, op: op(r[0], v[0])),
    ("values-shape", ValueError, r"`values` must have the shape of `rewards`"),
    lambda r, v, op: op(r, v[:, :4]),
    ("mask-shape", ValueError, r"`mask` must have the shape of `rewards`"),
    lambda r, v, op: op(r, v, torch.ones(3, 4, dtype=torch.bool)),
    ("rewards-int32", TypeError, r"`rewards` must be float", lambda r, v, op: op(r.int(), v)),
    ("values-int64", TypeError, r"`values` must be float", lambda r, v, op: op(r, v.long())),
    ("rewards-list", TypeError, r"`rewards` must be a torch\.Tensor"),
    lambda r, v, op: op(r.tolist(), v),
    ("mask-list", TypeError, r"`mask` must be a torch\.Tensor"),
    lambda r, v, op: op(r, v, [[True] * 5] * 3),
    ("gamma-shape", ValueError, r"`gamma` must be a float or have shape \[3\]"),
    lambda r, v, op: op(r, v, gamma=torch.ones(4)),
    ("lam-2d", ValueError, r"`lam` must be a float or have shape \[3\]"),
    lambda r, v, op: op(r, v, lam=torch.ones(3, 1)),
    ("gamma-str", TypeError, r"`gamma`", lambda r, v, op: op(r, v, gamma="0.99")),
    ("gamma-nan", ValueError, r"`gamma` must be finite, got nan"),
    lambda r, v, op: op(r, v, gamma=float("nan")),
    ("lam-inf", ValueError, r"`lam` must be finite, got inf"),
    lambda r, v, op: op(r, v, lam=float("inf")),
    ("gamma-int64", TypeError, r"`gamma`"),
    lambda r, v, op: op(r, v, gamma=torch.ones(3, dtype=torch.int64)),
    ("last_value-2d", ValueError, r"`last_value` must be a float or have shape \[3\]"),
    lambda r, v, op: op(r, v, last_value=torch.zeros(3, 1)),
    ("last_value-short", ValueError, r"`last_value` must be a float or have shape \[3\]"),
    lambda r, v, op: op(r, v, last_value=torch.zeros(2)),
    ("last_value-int64", TypeError, r"`last_value`"),
    lambda r, v, op: op(r, v, last_value=torch.zeros(3, dtype=torch.int64)),
    ("cu_seqlens-with-2d-rewards", ValueError, r"with `cu_seqlens`, `rewards` must be 1-D"),
    lambda r, v, op: op(r, v, cu_seqlens=torch.tensor([0, 15])),
)


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
@pytest.mark.parametrize("error, pattern, fn", GAE_BAD_INPUT)
def test_gae_bad_input(inputs, backend, error, pattern, fn):
    r, v = _gae_ok(inputs)
    with pytest.raises(error, match=pattern):
        fn(r, v, functools.partial(rlhf_ext.gae, backend=backend))


# The packed form: fn(op) with op = rlhf_ext.gae(r, v, ...) on the test's backend and r, v
# the 15 tokens of _gae_ok flattened.
GAE_PACKED_BAD_INPUT = conftest.bad_inputs(
    r"rlhf_ext\.gae: ",
    ("cu_seqlens-not-monotone", ValueError, r"`cu_seqlens` must be non-decreasing"),
    lambda op: op(cu_seqlens=torch.tensor([0, 9, 4, 15])),
    ("cu_seqlens-start-not-0", ValueError, r"`cu_seqlens` must start at 0"),
    lambda op: op(cu_seqlens=torch.tensor([1, 4, 15])),
    ("cu_seqlens-int32-end-short", ValueError, r"`cu_seqlens` must end at the number of tokens 15"),
    lambda op: op(cu_seqlens=torch.tensor([0, 4, 14], dtype=torch.int32)),
    ("cu_seqlens-end-long", ValueError, r"`cu_seqlens` must end at the number of tokens 15"),
    lambda op: op(cu_seqlens=torch.tensor([0, 4, 16])),
    ("cu_seqlens-float", TypeError, r"`cu_seqlens` must be int32 or int64"),
    lambda op: op(cu_seqlens=torch.tensor([0.0, 15.0])),
    ("cu_seqlens-int16", TypeError, r"`cu_seqlens` must be int32 or int64"),
    lambda op: op(cu_seqlens=torch.tensor([0, 15], dtype=torch.int16)),
    ("cu_seqlens-2d", ValueError, r"`cu_seqlens` must have shape \[B \+ 1\]"),
    lambda op: op(cu_seqlens=torch.tensor([[0, 15]])),
    ("cu_seqlens-empty", ValueError, r"`cu_seqlens` must have shape \[B \+ 1\]"),
    lambda op: op(cu_seqlens=torch.tensor([], dtype=torch.int64)),
    ("cu_seqlens-list", TypeError, r"`cu_seqlens` must be a torch\.Tensor"),
    lambda op: op(cu_seqlens=[0, 15]),
    ("gamma-shape", ValueError, r"`gamma` must be a float or have shape \[2\]"),
    lambda op: op(cu_seqlens=torch.tensor([0, 4, 15]), gamma=torch.ones(3)),
    ("last_value-shape", ValueError, r"`last_value` must be a float or have shape \[2\]"),
    lambda op: op(cu_seqlens=torch.tensor([0, 4, 15]), last_value=torch.ones(3)),
    ("mask-shape", ValueError, r"`mask` must have the shape of `rewards`"),
    lambda op: op(torch.ones(14, dtype=torch.bool), cu_seqlens=torch.tensor([0, 15])),
)


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
@pytest.mark.parametrize("error, pattern, fn", GAE_PACKED_BAD_INPUT)
def test_gae_packed_bad_input(inputs, backend, error, pattern, fn):
    r, v = _gae_ok(inputs)
    with pytest.raises(error, match=pattern):
        fn(functools.partial(rlhf_ext.gae, r.flatten(), v.flatten(), backend=backend))


def test_gae_unknown_backend(inputs):
    r, v = _gae_ok(inputs)
    with pytest.raises(ValueError, match=r"rlhf_ext\.gae: `backend` must be one of .*'nope'"):
        rlhf_ext.gae(r, v, backend="nope")


def test_gae_cuda_backend_on_cpu_tensors(inputs):
    r, v = _gae_ok(inputs)
    with pytest.raises(
        rlhf_ext.BackendUnavailableError,
        match=r"rlhf_ext\.gae: backend='cuda' is unavailable: .*cpu",
    ):
        rlhf_ext.gae(r, v, backend="cuda")


def _raw_gae_args(
    rewards, values, mask=None, cu_seqlens=None, last_value=None, gamma_rows=None, lam_rows=None
):
    """torch.ops.rlhf_ext.gae's positional arguments, with gamma = lam = 0.9."""
    return (rewards, values, mask, cu_seqlens, last_value, gamma_rows, lam_rows, 0.9, 0.9)


# bad_inputs rows (id, error, pattern after the prefix, args): args(r, v) gives the raw op's
# arguments from _gae_ok's r, v.
GAE_RAW_OP_BAD_INPUT = conftest.bad_inputs(
    r"rlhf_ext\.gae: ",
    ("values-shape", ValueError, r"`values` must have the shape of `rewards`"),
    lambda r, v: _raw_gae_args(r, v[:, :4]),
    ("values-dtype", TypeError, r"`values` must have the dtype of `rewards`"),
    lambda r, v: _raw_gae_args(r, v.double()),
    ("rewards-int32", TypeError, r"`rewards` must be float"),
    lambda r, v: _raw_gae_args(r.int(), v.int()),
    ("rewards-3d", ValueError, r"`rewards` must be 2-D"),
    lambda r, v: _raw_gae_args(r[None], v[None]),
    ("mask-shape", ValueError, r"`mask` must have the shape of `rewards`"),
    lambda r, v: _raw_gae_args(r, v, mask=torch.ones(3, 4, dtype=torch.bool)),
    ("last_value-shape", ValueError, r"`last_value` must have shape \[3\]"),
    lambda r, v: _raw_gae_args(r, v, last_value=torch.ones(4)),
    ("gamma_rows-shape", ValueError, r"`gamma` must have shape \[3\]"),
    lambda r, v: _raw_gae_args(r, v, gamma_rows=torch.ones(2)),
    ("lam_rows-int64", TypeError, r"`lam` must be float"),
    lambda r, v: _raw_gae_args(r, v, lam_rows=torch.ones(3, dtype=torch.int64)),
    ("cu_seqlens-with-2d-rewards", ValueError, r"`rewards` must be 1-D"),
    lambda r, v: _raw_gae_args(r, v, cu_seqlens=torch.tensor([0, 15])),
    ("cu_seqlens-float", TypeError, r"`cu_seqlens` must be int32 or int64"),
    lambda r, v: _raw_gae_args(r.flatten(), v.flatten(), cu_seqlens=torch.tensor([0.0, 15.0])),
    ("cu_seqlens-end-short", ValueError, r"`cu_seqlens` must end at the number of tokens 15"),
    lambda r, v: _raw_gae_args(r.flatten(), v.flatten(), cu_seqlens=torch.tensor([0, 10])),
    ("cu_seqlens-not-monotone", ValueError, r"`cu_seqlens` must be non-decreasing"),
    lambda r, v: _raw_gae_args(r.flatten(), v.flatten(), cu_seqlens=torch.tensor([0, 10, 5, 15])),
    ("cu_seqlens-start-not-0", ValueError, r"`cu_seqlens` must start at 0"),
    lambda r, v: _raw_gae_args(r.flatten(), v.flatten(), cu_seqlens=torch.tensor([2, 15])),
)


@requires_compiled
@pytest.mark.parametrize("error, pattern, args", GAE_RAW_OP_BAD_INPUT)
def test_gae_raw_op_checks(inputs, error, pattern, args):
    """The C++ entry point checks its arguments too (ValueError / TypeError naming the op)."""
    r, v = _gae_ok(inputs)
    with pytest.raises(error, match=pattern):
        torch.ops.rlhf_ext.gae(*args(r, v))


# -- CUDA ------------------------------------------------------------------------

CUDA_BACKENDS = ["cuda", "triton"]


def _cuda_backend_or_skip(backend):
    if backend not in rlhf_ext.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} unavailable on CUDA tensors")


def cuda_oracle(rewards, values, mask=None, **kwargs):
    """float64 oracle for large CUDA shapes: the compiled CPU kernel in float64
    (itself checked against reference.gae above), or the reference loop."""
    up = lambda t: t.detach().cpu().double() if isinstance(t, torch.Tensor) else t  # noqa: E731
    args = dict((k, up(v)) for k, v in kwargs.items())
    if "cu_seqlens" in kwargs:
        args["cu_seqlens"] = kwargs["cu_seqlens"].cpu()
    backend = "cpu" if COMPILED else "torch"
    return rlhf_ext.gae(
        up(rewards), up(values), None if mask is None else mask.cpu(), backend=backend, **args
    )


CUDA_BACKEND_DTYPES = [
    pytest.param(
        backend,
        dtype,
        id=f"{backend}-{str(dtype).split('.')[-1]}",
    )
    for backend in CUDA_BACKENDS
    for dtype in (torch.float32, torch.bfloat16, torch.float64)
]


@pytest.mark.cuda
@pytest.mark.parametrize("backend, dtype", CUDA_BACKEND_DTYPES)
def test_gae_cuda_samples(inputs, backend, dtype):
    _cuda_backend_or_skip(backend)
    for _name, rewards, values, mask, kwargs in sample_inputs(
        inputs, device="cuda", dtype=dtype, long_rows=True
    ):
        adv, ret = rlhf_ext.gae(rewards, values, mask, backend=backend, **kwargs)
        ref_adv, ref_ret = ref_gae(rewards, values, mask, **kwargs)
        invalid = None if mask is None else mask == 0
        for out, ref in ((adv, ref_adv), (ret, ref_ret)):
            assert out.is_cuda and out.dtype == out_dtype(rewards)
            assert_written(out, invalid)
            assert_close_ref(out, ref, torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("T", [1, 1000, 1025, 4097, 70000])
def test_gae_cuda_large(inputs, backend, T):
    """B=64 rows, up to 70,000 tokens (rows past 65,536), random holes, per-row rates."""
    _cuda_backend_or_skip(backend)
    B = 64
    rewards, values = inputs.randn(B, T, device="cuda"), inputs.randn(B, T, device="cuda")
    mask = inputs.mask(B, T, p=0.9, device="cuda")
    mask[3] = False
    kwargs = dict(
        gamma=inputs.uniform(B, low=0.95, high=1.0, device="cuda"),
        lam=0.95,
        last_value=inputs.randn(B, device="cuda"),
    )
    adv, ret = rlhf_ext.gae(rewards, values, mask, backend=backend, **kwargs)
    ref_adv, ref_ret = cuda_oracle(rewards, values, mask, **kwargs)
    assert_written(adv, ~mask)
    assert_written(ret, ~mask)
    assert_close_ref(adv, ref_adv, torch.float32)
    assert_close_ref(ret, ref_ret, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_gae_cuda_packed(inputs, backend):
    _cuda_backend_or_skip(backend)
    lengths = [70000, 0, 1, 4097, 123, 0, 2048]
    rewards, values, mask, valid, cu = packed_case(inputs, lengths)
    flat = lambda t: t[valid].cuda()  # noqa: E731
    kwargs = dict(gamma=0.999, lam=0.97, last_value=inputs.randn(len(lengths), device="cuda"))
    for cu_dtype in (torch.int32, torch.int64):
        adv, ret = rlhf_ext.gae(
            flat(rewards),
            flat(values),
            flat(mask),
            cu_seqlens=cu.to("cuda", cu_dtype),
            backend=backend,
            **kwargs,
        )
        ref_adv, ref_ret = cuda_oracle(
            flat(rewards), flat(values), flat(mask), cu_seqlens=cu, **kwargs
        )
        assert_written(adv, ~flat(mask))
        assert_close_ref(adv, ref_adv, torch.float32)
        assert_close_ref(ret, ref_ret, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_gae_cuda_deterministic_and_batch_invariant(inputs, backend):
    _cuda_backend_or_skip(backend)
    B, T = 64, 5000
    rewards, values = inputs.randn(B, T, device="cuda"), inputs.randn(B, T, device="cuda")
    mask = inputs.mask(B, T, device="cuda")
    run = lambda r, v, m: rlhf_ext.gae(r, v, m, gamma=0.99, lam=0.95, backend=backend)  # noqa: E731
    adv, ret = run(rewards, values, mask)
    for _ in range(3):
        a, r = run(rewards, values, mask)
        assert torch.equal(a, adv) and torch.equal(r, ret)
    for row in (0, 17, B - 1):
        a, r = run(rewards[row : row + 1], values[row : row + 1], mask[row : row + 1])
        assert torch.equal(a, adv[row : row + 1]) and torch.equal(r, ret[row : row + 1])


@pytest.mark.triton_gpu
def test_gae_triton_inductor_parity(inputs):
    """torch.compile with Inductor (the default backend), which compiles the Triton
    kernels into its own generated code, gives the eager bits. test_op_contract.py
    compiles with aot_eager only."""
    torch._dynamo.reset()
    r, v, m = (
        inputs.randn(4, 300, device="cuda"),
        inputs.randn(4, 300, device="cuda"),
        inputs.mask(4, 300, device="cuda"),
    )

    def fn(r, v, m):
        return rlhf_ext.gae(r, v, m, gamma=0.99, lam=0.95, backend="triton")

    expected = fn(r, v, m)
    got = torch.compile(fn, fullgraph=True)(r, v, m)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(e, g, rtol=0, atol=0)


@pytest.mark.triton_gpu
def test_gae_triton_float64_keeps_double_precision(inputs):
    """float64 in, float64 out: gamma / lam must not be rounded to float32 on the way."""
    B, T = 4, 200
    rewards = inputs.randn(B, T, dtype=torch.float64, device="cuda")
    values = inputs.randn(B, T, dtype=torch.float64, device="cuda")
    adv, ret = rlhf_ext.gae(rewards, values, gamma=0.99, lam=0.95, backend="triton")
    ref_adv, ref_ret = ref_gae(rewards, values, gamma=0.99, lam=0.95)
    assert adv.dtype == torch.float64
    torch.testing.assert_close(adv.cpu(), ref_adv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret.cpu(), ref_ret, rtol=1e-10, atol=1e-10)


def test_sample_inputs_cover_the_edge_cases():
    assert {"B0", "T0", "T1", "all_masked_row", "holes", "prefix"} <= set(SAMPLE_NAMES)
    assert TRITON_CPU == ("triton" in CPU_BACKENDS)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gae_zero_dim_tensor_discounts_apply_to_every_row(inputs, backend):
    rewards, values = inputs.randn(3, 20), inputs.randn(3, 20)
    expected = rlhf_ext.gae(rewards, values, gamma=0.97, lam=0.9, backend=backend)
    got = rlhf_ext.gae(
        rewards, values, gamma=torch.tensor(0.97), lam=torch.tensor(0.9), backend=backend
    )
    torch.testing.assert_close(got, expected)


def test_gae_rejects_bool_discount(inputs):
    with pytest.raises(TypeError, match=r"rlhf_ext\.gae: `gamma` must be a float"):
        rlhf_ext.gae(inputs.randn(2, 3), inputs.randn(2, 3), gamma=True)
