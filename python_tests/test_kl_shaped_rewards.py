"""rlhf_ext.kl_shaped_rewards against reference.py (float64) on every backend here."""

from __future__ import annotations

import functools
import math

import conftest
import pytest
import torch
from conftest import (
    CPU_BACKENDS,
    assert_close_ref,
    assert_within_eager_error,
    assert_written,
    requires_compiled,
)

import rlhf_ext
from rlhf_ext import reference

OP = "rlhf_ext.kl_shaped_rewards"
KINDS = ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"]


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def ref_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kl):
    up = lambda t: t.detach().cpu().double()  # noqa: E731
    return reference.kl_shaped_rewards(
        up(scores),
        up(logprobs),
        up(ref_logprobs),
        None if mask is None else mask.cpu(),
        kl_coef=kl_coef,
        kl=kl,
    )


def expected_by_hand(scores, logprobs, ref_logprobs, mask, kl_coef, kl):
    """Independent of reference.py: the estimators written out, the score placed by a loop."""
    lp, ref = logprobs.double(), ref_logprobs.double()
    diff = lp - ref
    base = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}.get(kl.rstrip("+"), kl.rstrip("+"))
    if base == "k1":
        est = diff
    elif base == "abs":
        est = diff.abs()
    elif base == "k2":
        est = 0.5 * diff**2
    else:
        d = (ref - lp).clamp(-20, 20)
        est = (d.exp() - d - 1).clamp(-10, 10)
    B, T = lp.shape
    valid = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
    out = torch.where(valid, -kl_coef * est, torch.zeros_like(est))
    for b in range(B):
        idx = valid[b].nonzero()
        if len(idx):
            out[b, int(idx[-1])] += float(scores[b])
    return out


def sample_inputs(inputs, dtype=torch.float32):
    """(name, scores, logprobs, ref_logprobs, mask)."""

    def lps(B, T):
        # Log-probs: negative, with policy/reference close but not equal.
        lp = -inputs.uniform(B, T, low=0.01, high=5.0)
        return lp.to(dtype), (lp + inputs.randn(B, T, scale=0.3)).to(dtype)

    B, T = 5, 23
    yield ("holes", inputs.randn(B, dtype=dtype), *lps(B, T), inputs.mask(B, T, p=0.6))
    holes = inputs.mask(B, T, p=0.6)
    holes[:, -1] = False  # the last valid token is before the end
    holes[2] = False  # all masked: no score
    yield ("holes_all_masked_row", inputs.randn(B, dtype=dtype), *lps(B, T), holes)
    yield ("prefix", inputs.randn(6, dtype=dtype), *lps(6, 30), inputs.prefix_mask(6, 30))
    yield ("no_mask", inputs.randn(4, dtype=dtype), *lps(4, 9), None)
    yield (
        "uint8_mask",
        inputs.randn(3, dtype=dtype),
        *lps(3, 8),
        inputs.mask(3, 8).to(torch.uint8),
    )
    yield ("float_mask", inputs.randn(3, dtype=dtype), *lps(3, 8), inputs.mask(3, 8).float())
    yield ("T1", inputs.randn(4, dtype=dtype), *lps(4, 1), inputs.mask(4, 1))
    yield ("T0", inputs.randn(3, dtype=dtype), *lps(3, 0), None)
    yield ("B0", inputs.randn(0, dtype=dtype), *lps(0, 7), inputs.mask(0, 7))
    lp, ref = lps(2, 6)
    ref[0, :3] = lp[0, :3] - 40  # log-ratio past the k3 clamps
    ref[1, :3] = lp[1, :3] + 40
    yield ("extreme_log_ratio", inputs.randn(2, dtype=dtype), lp, ref, None)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS + ["k1+", "k3+"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_kl_shaped_rewards_matches_reference(inputs, backend, kind, dtype):
    kl_coef = inputs.scalar(0.01, 0.5)
    for name, scores, lp, ref, mask in sample_inputs(inputs, dtype):
        out = rlhf_ext.kl_shaped_rewards(
            scores, lp, ref, mask, kl_coef=kl_coef, kl=kind, backend=backend
        )
        assert out.dtype == acc(dtype) and out.shape == lp.shape, name
        assert_written(out, None if mask is None else mask == 0)
        expected = ref_rewards(scores, lp, ref, mask, kl_coef, kind)
        assert_close_ref(out, expected, acc(dtype))
        assert_close_ref(out, expected_by_hand(scores, lp, ref, mask, kl_coef, kind), acc(dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_score_lands_at_last_valid_token(inputs, backend):
    B, T = 4, 10
    lp = -inputs.uniform(B, T, low=0.1, high=2.0)
    scores = inputs.randn(B, offset=5.0)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, [1, 4, 6]] = True  # holes: last valid token is 6
    mask[1] = True  # full row: last column
    mask[3, 0] = True  # one token
    # row 2: all masked -> no score anywhere
    out = rlhf_ext.kl_shaped_rewards(
        scores, lp, lp.clone(), mask, kl_coef=0.1, kl="k1", backend=backend
    )
    expected = torch.zeros(B, T)
    expected[0, 6], expected[1, T - 1], expected[3, 0] = scores[0], scores[1], scores[3]
    assert torch.equal(out, expected)  # lp == ref: the KL part is exactly 0
    # mask None: the score goes to the last column.
    out = rlhf_ext.kl_shaped_rewards(scores, lp, lp.clone(), None, kl_coef=0.1, backend=backend)
    expected = torch.zeros(B, T)
    expected[:, -1] = scores
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_kl_shaped_rewards_low_precision(inputs, backend, dtype):
    B, T = 4, 40
    lp = (-inputs.uniform(B, T, low=0.1, high=3.0)).to(dtype)
    ref = (lp.float() + inputs.randn(B, T, scale=0.2)).to(dtype)
    scores, mask = inputs.randn(B, dtype=dtype), inputs.mask(B, T)
    for kind in ("k1", "k3"):
        out = rlhf_ext.kl_shaped_rewards(
            scores, lp, ref, mask, kl_coef=0.05, kl=kind, backend=backend
        )
        assert out.dtype == torch.float32
        expected = ref_rewards(scores, lp, ref, mask, 0.05, kind)
        assert_close_ref(out, expected, torch.float32)
        eager = reference.kl_shaped_rewards(
            scores, lp, ref, mask, kl_coef=0.05, kl=kind
        )  # float32 eager
        assert_within_eager_error(out, expected, eager)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kl_shaped_rewards_mixed_and_strided(inputs, backend):
    B, T = 3, 12
    lp = -inputs.uniform(T, B, low=0.1, high=2.0).t()  # transposed
    ref = (-inputs.uniform(B, 2 * T, low=0.1, high=2.0))[:, ::2].to(torch.bfloat16)  # strided bf16
    scores = inputs.randn(2 * B)[::2]
    mask = inputs.mask(T, B).t()
    out = rlhf_ext.kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.2, kl="k2", backend=backend)
    assert out.dtype == torch.float32
    assert_close_ref(out, ref_rewards(scores, lp, ref, mask, 0.2, "k2"), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kl_shaped_rewards_int_kl_coef_and_no_grad(inputs, backend):
    lp = (-inputs.uniform(2, 5, low=0.1, high=2.0)).requires_grad_()
    ref, scores = -inputs.uniform(2, 5, low=0.1, high=2.0), inputs.randn(2).requires_grad_()
    out = rlhf_ext.kl_shaped_rewards(scores, lp, ref, kl_coef=1, backend=backend)
    assert not out.requires_grad
    assert_close_ref(out, ref_rewards(scores, lp, ref, None, 1.0, "k1"), torch.float32)


@requires_compiled
def test_kl_shaped_rewards_cpu_large(inputs):
    B, T = 8, 5000
    lp = -inputs.uniform(B, T, low=0.01, high=4.0)
    ref = lp + inputs.randn(B, T, scale=0.5)
    scores, mask = inputs.randn(B), inputs.prefix_mask(B, T)
    out = rlhf_ext.kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.1, kl="k3", backend="cpu")
    assert_close_ref(out, ref_rewards(scores, lp, ref, mask, 0.1, "k3"), torch.float32)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs triton under the interpreter")
def test_kl_shaped_rewards_triton_crosses_block(inputs):
    """Triton sweeps rows in 1024-wide blocks: the last valid token in the first
    block, in the second block, at the very end, and no valid token."""
    B, T = 4, 1100
    lp = -inputs.uniform(B, T, low=0.01, high=4.0)
    ref = lp + inputs.randn(B, T, scale=0.5)
    scores = inputs.randn(B, offset=3.0)
    mask = inputs.mask(B, T)
    mask[0, 1000:] = False
    mask[1, 1050:] = False
    mask[2, -1] = True
    mask[3] = False
    for kind in ("k1", "k3"):
        out = rlhf_ext.kl_shaped_rewards(
            scores, lp, ref, mask, kl_coef=0.1, kl=kind, backend="triton"
        )
        assert_written(out, ~mask)
        assert_close_ref(out, ref_rewards(scores, lp, ref, mask, 0.1, kind), torch.float32)
    out = rlhf_ext.kl_shaped_rewards(scores, lp, ref, None, kl_coef=0.1, backend="triton")
    assert_close_ref(out, ref_rewards(scores, lp, ref, None, 0.1, "k1"), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kl_shaped_rewards_batch_invariant(inputs, backend):
    B, T = (16, 200) if backend != "triton" else (4, 64)
    lp = -inputs.uniform(B, T, low=0.01, high=4.0)
    ref = lp + inputs.randn(B, T, scale=0.5)
    scores, mask = inputs.randn(B), inputs.mask(B, T)
    full = rlhf_ext.kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.1, kl="k3", backend=backend)
    assert torch.equal(
        full,
        rlhf_ext.kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.1, kl="k3", backend=backend),
    )
    for row in (0, B - 1):
        sl = slice(row, row + 1)
        alone = rlhf_ext.kl_shaped_rewards(
            scores[sl], lp[sl], ref[sl], mask[sl], kl_coef=0.1, kl="k3", backend=backend
        )
        assert torch.equal(alone, full[sl])


# -- bad input --------------------------------------------------------------------------


# bad_inputs rows (id, error, pattern after the prefix, fn): fn(s, lp, ref, op) with scores s
# [3] and lp, ref [3, 5]; op = rlhf_ext.kl_shaped_rewards on the test's backend.
KL_SHAPED_REWARDS_BAD_INPUT = conftest.bad_inputs(
    r"rlhf_ext\.kl_shaped_rewards: ",
    ("kl_coef-nan", ValueError, r"`kl_coef` must be finite, got nan"),
    lambda s, lp, ref, op: op(s, lp, ref, kl_coef=float("nan")),
    ("kl_coef-inf", ValueError, r"`kl_coef` must be finite, got inf"),
    lambda s, lp, ref, op: op(s, lp, ref, kl_coef=float("inf")),
    ("kl-k4", ValueError, r"`kl` must be one of .*'k4'"),
    lambda s, lp, ref, op: op(s, lp, ref, kl_coef=0.1, kl="k4"),
    ("kl-k1++", ValueError, r"`kl` must be one of"),
    lambda s, lp, ref, op: op(s, lp, ref, kl_coef=0.1, kl="k1++"),
    ("kl-int", ValueError, r"`kl` must be one of"),
    lambda s, lp, ref, op: op(s, lp, ref, kl_coef=0.1, kl=3),
    ("scores-shape", ValueError, r"`scores` must have shape \[3\]"),
    lambda s, lp, ref, op: op(torch.ones(4), lp, ref, kl_coef=0.1),
    ("scores-2d", ValueError, r"`scores` must have shape \[3\]"),
    lambda s, lp, ref, op: op(torch.ones(3, 1), lp, ref, kl_coef=0.1),
    ("scores-int64", TypeError, r"`scores` must be float"),
    lambda s, lp, ref, op: op(s.long(), lp, ref, kl_coef=0.1),
    ("kl_coef-str", TypeError, r"`kl_coef` must be a float"),
    lambda s, lp, ref, op: op(s, lp, ref, kl_coef="0.1"),
    ("kl_coef-none", TypeError, r"`kl_coef` must be a float"),
    lambda s, lp, ref, op: op(s, lp, ref, kl_coef=None),
    ("kl_coef-bool", TypeError, r"`kl_coef` must be a float"),
    lambda s, lp, ref, op: op(s, lp, ref, kl_coef=True),
    ("kl_coef-tensor", TypeError, r"`kl_coef` must be a float"),
    lambda s, lp, ref, op: op(s, lp, ref, kl_coef=torch.tensor([0.1])),
    ("ref_logprobs-shape", ValueError, r"`ref_logprobs` must have the shape of `logprobs`"),
    lambda s, lp, ref, op: op(s, lp, ref[:, :4], kl_coef=0.1),
    ("logprobs-3d", ValueError, r"`logprobs` must be 2-D"),
    lambda s, lp, ref, op: op(s, lp[None], ref[None], kl_coef=0.1),
    ("mask-shape", ValueError, r"`mask` must have the shape of `logprobs`"),
    lambda s, lp, ref, op: op(s, lp, ref, torch.ones(3, 6, dtype=torch.bool), kl_coef=0.1),
    ("logprobs-int32", TypeError, r"`logprobs` must be float"),
    lambda s, lp, ref, op: op(s, lp.int(), ref, kl_coef=0.1),
    ("ref_logprobs-int32", TypeError, r"`ref_logprobs` must be float"),
    lambda s, lp, ref, op: op(s, lp, ref.int(), kl_coef=0.1),
)


def _kl_ok(inputs, B=3, T=5):
    """(scores, logprobs, ref_logprobs) of a valid [B, T] call."""
    return inputs.randn(B), inputs.randn(B, T), inputs.randn(B, T)


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
@pytest.mark.parametrize("error, pattern, fn", KL_SHAPED_REWARDS_BAD_INPUT)
def test_kl_shaped_rewards_bad_input(inputs, backend, error, pattern, fn):
    scores, lp, ref = _kl_ok(inputs)
    with pytest.raises(error, match=pattern):
        fn(scores, lp, ref, functools.partial(rlhf_ext.kl_shaped_rewards, backend=backend))


def test_kl_shaped_rewards_kl_coef_is_keyword_only(inputs):
    scores, lp, ref = _kl_ok(inputs)
    with pytest.raises(TypeError):  # kl_coef is keyword-only and required
        rlhf_ext.kl_shaped_rewards(scores, lp, ref, None, 0.1)


# bad_inputs rows (id, error, pattern after the prefix, args): args(s, lp, ref) gives the raw
# op's arguments.
KL_SHAPED_REWARDS_RAW_OP_BAD_INPUT = conftest.bad_inputs(
    r"rlhf_ext\.kl_shaped_rewards: ",
    ("kl-unknown", ValueError, r"`kl` must be one of .*'nope'"),
    lambda s, lp, ref: (s, lp, ref, None, 0.1, "nope"),
    ("scores-shape", ValueError, r"`scores` must have shape \[3\]"),
    lambda s, lp, ref: (torch.ones(2), lp, ref, None, 0.1, "k1"),
    ("ref_logprobs-shape", ValueError, r"`ref_logprobs` must have the shape"),
    lambda s, lp, ref: (s, lp, ref[:2], None, 0.1, "k1"),
    ("ref_logprobs-dtype", TypeError, r"`ref_logprobs` must have the dtype"),
    lambda s, lp, ref: (s, lp, ref.double(), None, 0.1, "k1"),
)


@requires_compiled
@pytest.mark.parametrize("error, pattern, args", KL_SHAPED_REWARDS_RAW_OP_BAD_INPUT)
def test_kl_shaped_rewards_raw_op_checks(inputs, error, pattern, args):
    scores, lp, ref = _kl_ok(inputs)
    with pytest.raises(error, match=pattern):
        torch.ops.rlhf_ext.kl_shaped_rewards(*args(scores, lp, ref))


def test_kl_values_are_finite_for_extreme_inputs(inputs):
    """k3's clamps keep the reward finite even for log-probs of -1e4 vs 0."""
    lp = torch.tensor([[-1e4, 0.0, -50.0, 0.0]])
    ref = torch.tensor([[0.0, -1e4, -50.0, -2.0]])
    for backend in CPU_BACKENDS:
        out = rlhf_ext.kl_shaped_rewards(
            torch.zeros(1), lp, ref, kl_coef=1.0, kl="k3", backend=backend
        )
        assert_written(out)
        assert out[0, 0].item() == -10.0  # d = 20: clamp(exp(20) - 21, -10, 10) = 10
        assert out[0, 1].item() == -10.0  # d = -20: clamp(exp(-20) + 19, -10, 10) = 10
        assert out[0, 2].item() == 0.0
        assert math.isclose(out[0, 3].item(), -(math.exp(-2) + 1), rel_tol=1e-6)  # d = -2


# -- CUDA ---------------------------------------------------------------------------------


CUDA_BACKEND_DTYPES = [
    pytest.param(
        backend,
        dtype,
        id=f"{backend}-{str(dtype).split('.')[-1]}",
    )
    for backend in ("cuda", "triton")
    for dtype in (torch.float32, torch.bfloat16, torch.float64)
]


@pytest.mark.cuda
@pytest.mark.parametrize("backend, dtype", CUDA_BACKEND_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_kl_shaped_rewards_cuda(inputs, backend, dtype, kind):
    if backend not in rlhf_ext.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} unavailable on CUDA tensors")
    cu = lambda t: None if t is None else t.cuda()  # noqa: E731
    for name, scores, lp, ref, mask in sample_inputs(inputs, dtype):
        out = rlhf_ext.kl_shaped_rewards(
            cu(scores), cu(lp), cu(ref), cu(mask), kl_coef=0.1, kl=kind, backend=backend
        )
        assert out.is_cuda and out.dtype == acc(dtype), name
        assert_written(out, None if mask is None else cu(mask) == 0)
        assert_close_ref(out, ref_rewards(scores, lp, ref, mask, 0.1, kind), acc(dtype))
    B, T = 64, 70000
    lp = -inputs.uniform(B, T, low=0.01, high=4.0, device="cuda")
    ref = (lp + inputs.randn(B, T, scale=0.5, device="cuda")).to(dtype)
    lp = lp.to(dtype)
    scores, mask = (
        inputs.randn(B, device="cuda", dtype=dtype),
        inputs.prefix_mask(B, T, device="cuda"),
    )
    out = rlhf_ext.kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.1, kl=kind, backend=backend)
    assert_close_ref(out, ref_rewards(scores, lp, ref, mask, 0.1, kind), acc(dtype))
    assert torch.equal(
        out,
        rlhf_ext.kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.1, kl=kind, backend=backend),
    )


@pytest.mark.triton_gpu
def test_kl_shaped_rewards_triton_inductor_parity(inputs):
    """torch.compile with Inductor (the default backend), which compiles the Triton
    kernels into its own generated code, gives the eager bits. test_op_contract.py
    compiles with aot_eager only."""
    torch._dynamo.reset()
    lp, ref = (
        -inputs.uniform(4, 30, low=0.1, high=2.0, device="cuda"),
        -inputs.uniform(4, 30, low=0.1, high=2.0, device="cuda"),
    )
    scores, mask = inputs.randn(4, device="cuda"), inputs.mask(4, 30, device="cuda")

    def fn(scores, lp, ref, mask):
        return rlhf_ext.kl_shaped_rewards(
            scores, lp, ref, mask, kl_coef=0.05, kl="k3", backend="triton"
        )

    torch.testing.assert_close(
        fn(scores, lp, ref, mask),
        torch.compile(fn, fullgraph=True)(scores, lp, ref, mask),
        rtol=0,
        atol=0,
    )


@pytest.mark.triton_gpu
def test_kl_shaped_rewards_triton_float64_kl_coef(inputs):
    """kl_coef = 0.1 is not a float32 number: float64 results must use the double."""
    lp = -inputs.uniform(3, 50, low=0.1, high=2.0, dtype=torch.float64, device="cuda")
    ref = -inputs.uniform(3, 50, low=0.1, high=2.0, dtype=torch.float64, device="cuda")
    scores = torch.zeros(3, dtype=torch.float64, device="cuda")
    out = rlhf_ext.kl_shaped_rewards(scores, lp, ref, kl_coef=0.1, kl="k1", backend="triton")
    torch.testing.assert_close(out, -0.1 * (lp - ref), rtol=1e-12, atol=0)
