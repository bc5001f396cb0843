"""rlhf_ext.token_logprobs against reference.py (float64) on every backend here."""

from __future__ import annotations

import functools
import math
import types

import conftest
import pytest
import torch
from conftest import (
    CPU_BACKENDS,
    assert_close_ref,
    assert_within_eager_error,
    given,
    requires_compiled,
    settings,
    st,
)

import rlhf_ext
from rlhf_ext import reference

OP = "rlhf_ext.token_logprobs"
IGNORE = -100
# The raw ops' (temperature, temperatures, logit_scale, softcap) with no transform.
NO_TRANSFORM = (1.0, None, 1.0, 0.0)
# The raw backward's (log_sum_sq, grad_lse, grad_log_sum_sq, grad_mean_logits) unused.
NO_EXTRA = (None, None, None, None)


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def ref_outputs(logits, target, temperature=1.0, ignore_index=IGNORE):
    """float64 reference (logprobs, entropy) of the same (rounded) inputs."""
    return reference.token_logprobs(
        logits.detach().cpu().double(),
        target.cpu(),
        temperature=temperature,
        ignore_index=ignore_index,
        return_entropy=True,
    )


def random_logits(inputs, *shape, dtype=torch.float32, scale=3.0):
    return inputs.randn(*shape, scale=scale).to(dtype)


def random_target(inputs, lead, vocab, ignore_frac=0.2):
    target = inputs.randint(0, vocab, lead)
    if ignore_frac > 0 and target.numel() > 1:
        ignored = torch.rand(lead, generator=inputs.gen) < ignore_frac
        target = torch.where(ignored, IGNORE, target)
    return target


def sample_inputs(inputs, dtype=torch.float32):
    """(name, logits, target, temperature)."""
    yield "2d", random_logits(inputs, 6, 33, dtype=dtype), random_target(inputs, (6,), 33), 1.0
    logits = random_logits(inputs, 3, 5, 17, dtype=dtype)
    yield "3d_temperature", logits, random_target(inputs, (3, 5), 17), 0.7
    full = random_logits(inputs, 2, 6, 40, dtype=dtype)
    # A sliced view: rows of stride 40 in two leading dims, read without a copy.
    yield "strided_view", full[:, :-1], random_target(inputs, (2, 5), 40), 1.3
    yield "v1", random_logits(inputs, 4, 1, dtype=dtype), torch.zeros(4, dtype=torch.long), 1.0
    yield "1d", random_logits(inputs, 9, dtype=dtype), torch.tensor(4), 2.0
    yield (
        "int32_target",
        random_logits(inputs, 5, 8, dtype=dtype),
        inputs.randint(0, 8, (5,)).int(),
        1.0,
    )
    masked = random_logits(inputs, 4, 12, dtype=dtype)
    masked[:, ::3] = float("-inf")  # a masked vocabulary
    target = torch.tensor([1, 2, 4, IGNORE])
    yield "neg_inf_vocab", masked, target, 1.0
    yield (
        "empty_rows",
        random_logits(inputs, 0, 7, dtype=dtype),
        torch.zeros(0, dtype=torch.long),
        1.0,
    )
    yield (
        "crosses_chunks",
        random_logits(inputs, 3, 5000, dtype=dtype),
        random_target(inputs, (3,), 5000),
        0.9,
    )


def run(logits, target, backend, temperature=1.0, **kwargs):
    return rlhf_ext.token_logprobs(
        logits, target, temperature=temperature, ignore_index=IGNORE, backend=backend, **kwargs
    )


# -- values and gradients against the reference --------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_token_logprobs_matches_reference(inputs, backend, dtype):
    for name, logits, target, temperature in sample_inputs(inputs, dtype):
        lp, ent = run(logits, target, backend, temperature, return_entropy=True)
        assert lp.dtype == acc(dtype) and lp.shape == target.shape, name
        assert ent.dtype == acc(dtype) and ent.shape == target.shape, name
        want_lp, want_ent = ref_outputs(logits, target, temperature)
        assert_close_ref(lp, want_lp, acc(dtype))
        assert_close_ref(ent, want_ent, acc(dtype))
        ignored = target == IGNORE
        assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all(), name
        alone = run(logits, target, backend, temperature)
        assert torch.equal(alone, lp), name  # entropy does not change the logprobs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_token_logprobs_gradients(inputs, backend, dtype):
    for name, logits, target, temperature in sample_inputs(inputs, dtype):
        if not torch.isfinite(logits).all():
            continue  # the reference's -inf gradient is covered separately
        x = logits.detach().clone().requires_grad_()
        lp, ent = run(x, target, backend, temperature, return_entropy=True)
        g_lp, g_ent = inputs.randn(lp.shape), inputs.randn(ent.shape)
        (lp * g_lp.to(lp.dtype)).sum().add((ent * g_ent.to(ent.dtype)).sum()).backward()
        x64 = logits.detach().double().requires_grad_()
        want_lp, want_ent = reference.token_logprobs(
            x64, target, temperature=temperature, ignore_index=IGNORE, return_entropy=True
        )
        (want_lp * g_lp.double()).sum().add((want_ent * g_ent.double()).sum()).backward()
        assert x.grad.dtype == dtype and x.grad.shape == logits.shape, name
        assert_close_ref(x.grad, x64.grad, acc(dtype))
        assert (x.grad[target == IGNORE] == 0).all(), name


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_token_logprobs_gradient_at_masked_vocab(inputs, backend):
    logits = random_logits(inputs, 3, 10)
    logits[:, 1::2] = float("-inf")
    target = torch.tensor([0, 2, 4])
    x = logits.clone().requires_grad_()
    lp, ent = run(x, target, backend, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[:, 1::2] == 0).all()
    finite = logits[:, ::2].clone().requires_grad_()
    lp2, ent2 = reference.token_logprobs(finite, target // 2, return_entropy=True)
    (lp2.sum() + ent2.sum()).backward()
    torch.testing.assert_close(x.grad[:, ::2], finite.grad, rtol=1e-5, atol=1e-6)


@requires_compiled
def test_token_logprobs_gradcheck(inputs):
    logits = inputs.randn(4, 7, dtype=torch.float64).requires_grad_()
    target = torch.tensor([0, 6, IGNORE, 3])

    def both(x):
        return rlhf_ext.token_logprobs(x, target, temperature=0.8, return_entropy=True)

    assert torch.autograd.gradcheck(both, (logits,))


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs triton under the interpreter")
def test_token_logprobs_triton_gradcheck(inputs):
    logits = inputs.randn(3, 5, dtype=torch.float64).requires_grad_()
    target = torch.tensor([1, IGNORE, 4])

    def both(x):
        return rlhf_ext.token_logprobs(x, target, return_entropy=True, backend="triton")

    assert torch.autograd.gradcheck(both, (logits,))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_token_logprobs_low_precision_within_eager_error(inputs, backend, dtype):
    logits = random_logits(inputs, 16, 300, dtype=dtype)
    target = random_target(inputs, (16,), 300, ignore_frac=0.0)
    x = logits.clone().requires_grad_()
    lp = run(x, target, backend)
    g = inputs.randn(16)
    (lp * g).sum().backward()
    want = ref_outputs(logits, target)[0]
    # PyTorch eager in the input dtype: log_softmax + gather.
    xe = logits.clone().requires_grad_()
    eager = torch.log_softmax(xe, -1).gather(-1, target[:, None]).squeeze(-1)
    (eager.float() * g).sum().backward()
    assert_within_eager_error(lp, want, eager)
    x64 = logits.double().requires_grad_()
    (reference.token_logprobs(x64, target) * g.double()).sum().backward()
    assert x.grad.dtype == dtype
    assert_within_eager_error(x.grad, x64.grad, xe.grad)


# -- layout, vocab sizes, ignore_index, in-place backward ------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("vocab", [1, 3, 4097, 50257, 151936])
def test_token_logprobs_odd_vocab_sizes(inputs, backend, vocab):
    rows = 2 if vocab > 5000 else 5
    logits = random_logits(inputs, rows, vocab, scale=4.0)
    target = inputs.randint(0, vocab, (rows,))
    lp, ent = run(logits, target, backend, return_entropy=True)
    want_lp, want_ent = ref_outputs(logits, target)
    assert_close_ref(lp, want_lp, torch.float32, scale=max(1.0, math.log(vocab)))
    assert_close_ref(ent, want_ent, torch.float32, scale=max(1.0, math.log(vocab)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logprobs_strided_rows_read_in_place(inputs, backend):
    full = random_logits(inputs, 3, 7, 64)
    view = full[:, :-1]  # [3, 6, 64], row strides (448, 64)
    target = random_target(inputs, (3, 6), 64)
    got = run(view, target, backend, return_entropy=True)
    want = run(view.contiguous(), target, backend, return_entropy=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # Transposed leading dims and an odd row stride (unaligned rows).
    odd = random_logits(inputs, 5, 4, 33)[:, :, :31].transpose(0, 1)
    target = random_target(inputs, (4, 5), 31)
    got = run(odd, target, backend)
    assert torch.equal(got, run(odd.contiguous(), target, backend))
    # A non-unit last stride is copied, with the same result.
    cols = random_logits(inputs, 20, 6).t()
    target = random_target(inputs, (6,), 20)
    assert torch.equal(run(cols, target, backend), run(cols.contiguous(), target, backend))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_token_logprobs_inplace_backward(inputs, backend):
    logits = random_logits(inputs, 4, 9, 50)
    target = random_target(inputs, (4, 9), 50)
    g_lp, g_ent = inputs.randn(4, 9), inputs.randn(4, 9)

    def grad_of(inplace, base):
        x = base.clone().requires_grad_()
        h = x * 1.0  # a non-leaf, as the LM head's output is
        lp, ent = run(h[:, :-1], target[:, :-1], backend, return_entropy=True,
                      inplace_backward=inplace)  # fmt: skip
        (lp * g_lp[:, :-1]).sum().add((ent * g_ent[:, :-1]).sum()).backward()
        return x.grad

    torch.testing.assert_close(grad_of(True, logits), grad_of(False, logits), rtol=0, atol=0)
    # The buffer itself holds the gradient afterwards.
    leaf = logits.detach().clone().requires_grad_()
    out = run(leaf, target, backend, inplace_backward=True)
    out.sum().backward()
    assert leaf.grad.data_ptr() == leaf.data_ptr() or torch.equal(leaf.grad, leaf.detach())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logprobs_ignore_index(inputs, backend):
    logits = random_logits(inputs, 6, 20)
    target = torch.tensor([3, -1, 7, -1, -1, 19])
    x = logits.clone().requires_grad_()
    lp, ent = rlhf_ext.token_logprobs(x, target, ignore_index=-1, return_entropy=True,
                                      backend=backend)  # fmt: skip
    (lp.sum() + ent.sum()).backward()
    ignored = target == -1
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (x.grad[ignored] == 0).all() and (x.grad[~ignored] != 0).any()
    want = reference.token_logprobs(logits.double(), target, ignore_index=-1)
    assert_close_ref(lp, want, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logprobs_ignored_rows_may_hold_garbage(inputs, backend):
    """Ignored rows are never read: NaN there must not leak."""
    logits = random_logits(inputs, 3, 11)
    logits[1] = float("nan")
    target = torch.tensor([2, IGNORE, 5])
    x = logits.clone().requires_grad_()
    lp, ent = run(x, target, backend, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    if backend != "torch":  # the reference reads every row
        assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all()
    assert lp[1] == 0 and ent[1] == 0 and torch.isfinite(lp).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logprobs_all_neg_inf_row_is_nan(inputs, backend):
    logits = random_logits(inputs, 3, 8)
    logits[1] = float("-inf")
    lp, ent = run(logits, torch.tensor([1, 2, 3]), backend, return_entropy=True)
    assert torch.isnan(lp[1]) and torch.isnan(ent[1])
    assert torch.isfinite(lp[[0, 2]]).all() and torch.isfinite(ent[[0, 2]]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logprobs_validate(inputs, backend):
    logits = random_logits(inputs, 2, 3, 10)
    target = inputs.randint(0, 10, (2, 3))
    target[1, 2] = 10
    with pytest.raises(ValueError, match=r"token_logprobs: `target` at position \(1, 2\) is 10"):
        run(logits, target, backend)
    target[1, 2] = -5
    with pytest.raises(ValueError, match=r"outside \[0, 10\) and not ignore_index \(-100\)"):
        run(logits, target, backend)
    # validate=False: no check, NaN for that row, nothing read out of bounds.
    x = logits.clone().requires_grad_()
    lp = run(x, target, backend, validate=False)
    assert torch.isnan(lp[1, 2]) and torch.isfinite(lp.flatten()[:5]).all()
    if backend != "torch":
        lp.sum().backward()
        assert torch.isnan(x.grad[1, 2]).all() and torch.isfinite(x.grad[0]).all()


# -- invariance and determinism ----------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logprobs_batch_invariant_and_deterministic(inputs, backend):
    vocab = 3000
    rows = random_logits(inputs, 9, vocab)
    target = inputs.randint(0, vocab, (9,))
    alone = [run(rows[i : i + 1], target[i : i + 1], backend, return_entropy=True) for i in (0, 4)]
    batch = run(rows, target, backend, return_entropy=True)
    shuffled_order = torch.tensor([4, 8, 0, 1, 2, 3, 5, 6, 7])
    shuffled = run(rows[shuffled_order], target[shuffled_order], backend, return_entropy=True)
    for k in range(2):
        assert torch.equal(batch[k][0], alone[0][k][0])
        assert torch.equal(batch[k][4], alone[1][k][0])
        assert torch.equal(shuffled[k][0], batch[k][4]) and torch.equal(shuffled[k][2], batch[k][0])
    again = run(rows, target, backend, return_entropy=True)
    assert torch.equal(again[0], batch[0]) and torch.equal(again[1], batch[1])


# -- properties ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
@settings(max_examples=15)
@given(
    rows=st.integers(1, 6),
    vocab=st.integers(1, 300),
    temperature=st.floats(0.25, 4.0),
    shift=st.floats(-50.0, 50.0),
    seed=st.integers(0, 2**31),
)
def test_token_logprobs_properties(backend, rows, vocab, temperature, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 4
    target = torch.randint(0, vocab, (rows,), generator=gen)
    lp, ent = run(logits, target, backend, temperature, return_entropy=True)
    tol = 1e-5 * max(1.0, math.log(vocab) + 1)
    assert (lp <= tol).all()
    assert (ent >= -tol).all() and (ent <= math.log(vocab) + tol).all()
    # Adding a constant to a row changes nothing.
    lp_s, ent_s = run(logits + shift, target, backend, temperature, return_entropy=True)
    torch.testing.assert_close(lp_s, lp, rtol=0, atol=tol * (1 + abs(shift) / temperature / 10))
    torch.testing.assert_close(ent_s, ent, rtol=0, atol=tol * (1 + abs(shift) / temperature / 10))
    # Temperature is logits / T.
    lp_t, ent_t = run(logits / temperature, target, backend, return_entropy=True)
    torch.testing.assert_close(lp_t, lp, rtol=1e-5, atol=tol)
    torch.testing.assert_close(ent_t, ent, rtol=1e-5, atol=tol)


# -- the backward ops: opcheck ----------------------------------------------------------

# -- bad input ---------------------------------------------------------------------------


# bad_inputs rows (id, error, pattern, fn): fn(x, t, op) with x float32 logits [3, 5], t int64
# targets [3] and op = rlhf_ext.token_logprobs on the test's backend (a `backend=` overrides it).
TOKEN_LOGPROBS_BAD_INPUT = conftest.bad_inputs(
    "",
    ("logits-int64", TypeError, r"token_logprobs: `logits` must be float32"),
    lambda x, t, op: op(x.long(), t),
    ("logits-list", TypeError, r"`logits` must be a torch.Tensor, got list"),
    lambda x, t, op: op([1.0], t),
    ("logits-empty-vocab", ValueError, r"`logits` must have shape \[\.\.\., V\] with V >= 1"),
    lambda x, t, op: op(x[:, :0], t),
    ("target-float32", TypeError, r"`target` must be int64 or int32, got torch.float32"),
    lambda x, t, op: op(x, t.float()),
    ("target-shape", ValueError, r"`target` must have shape \(3,\)", lambda x, t, op: op(x, t[:2])),
    ("temperature-0", ValueError, r"`temperature` must be a finite float > 0, got 0.0"),
    lambda x, t, op: op(x, t, temperature=0.0),
    ("temperature-nan", ValueError, r"`temperature` must be a finite float > 0, got nan"),
    lambda x, t, op: op(x, t, temperature=float("nan")),
    ("temperature-str", TypeError, r"`temperature` must be a float, got str"),
    lambda x, t, op: op(x, t, temperature="1"),
    ("ignore_index-float", TypeError, r"`ignore_index` must be an int"),
    lambda x, t, op: op(x, t, ignore_index=1.5),
    # Scalars outside what the kernels can hold (issue 16: 1e-39 gave NaN log-probs,
    # 2**63 a confusing "Expected a value of type 'int'").
    ("temperature-1e-39", ValueError, r"`temperature` must be in \[.*float32.*got 1e-39"),
    lambda x, t, op: op(x, t, temperature=1e-39),
    ("temperature-1e300", ValueError, r"`temperature` must be in \[.*got 1e\+300"),
    lambda x, t, op: op(x, t, temperature=1e300),
    (
        "ignore_index-2**63",
        ValueError,
        r"`ignore_index` must fit in int64 .*got 9223372036854775808",
    ),
    lambda x, t, op: op(x, t, ignore_index=2**63),
    ("ignore_index--2**63-1", ValueError, r"`ignore_index` must fit in int64"),
    lambda x, t, op: op(x, t, ignore_index=-(2**63) - 1),
    ("backend-unknown", ValueError, r"`backend` must be one of"),
    lambda x, t, op: op(x, t, backend="gpu"),
)


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
@pytest.mark.parametrize("error, pattern, fn", TOKEN_LOGPROBS_BAD_INPUT)
def test_token_logprobs_bad_input(inputs, backend, error, pattern, fn):
    logits = random_logits(inputs, 3, 5)
    target = inputs.randint(0, 5, (3,))
    with pytest.raises(error, match=pattern):
        fn(logits, target, functools.partial(rlhf_ext.token_logprobs, backend=backend))


# bad_inputs rows (id, error, pattern, fn): fn(x, t, out, raw) calls a raw op, raw.fwd / raw.bwd
# = torch.ops.rlhf_ext.token_logprobs_fwd / _bwd, with x, t as above and out = (logprobs,
# entropy, lse) of a valid raw.fwd(x, t).
TOKEN_LOGPROBS_RAW_OP_BAD_INPUT = conftest.bad_inputs(
    "",
    ("fwd-target-shape", ValueError, r"token_logprobs: `target` must have shape \[3\]"),
    lambda x, t, out, raw: raw.fwd(x, t[:2], *NO_TRANSFORM, IGNORE, False),
    ("fwd-target-float32", TypeError, r"token_logprobs: `target` must be int64 or int32"),
    lambda x, t, out, raw: raw.fwd(x, t.float(), *NO_TRANSFORM, IGNORE, False),
    ("fwd-temperature-negative", ValueError, r"`temperature` must be a finite float > 0"),
    lambda x, t, out, raw: raw.fwd(x, t, -1.0, None, 1.0, 0.0, IGNORE, False),
    ("fwd-logit_scale-0", ValueError, r"`logit_scale` must be a finite float > 0, got 0"),
    lambda x, t, out, raw: raw.fwd(x, t, 1.0, None, 0.0, 0.0, IGNORE, False),
    ("fwd-softcap-negative", ValueError, r"`softcap` must be a finite float >= 0"),
    lambda x, t, out, raw: raw.fwd(x, t, 1.0, None, 1.0, -1.0, IGNORE, False),
    ("fwd-temperatures-shape", ValueError, r"`temperatures` must have shape \[3\]"),
    lambda x, t, out, raw: raw.fwd(x, t, 1.0, x[:2, 0], 1.0, 0.0, IGNORE, False),
    ("fwd-temperatures-int", TypeError, r"token_logprobs: `temperatures` must be float"),
    lambda x, t, out, raw: raw.fwd(x, t, 1.0, t, 1.0, 0.0, IGNORE, False),
    ("bwd-lse-shape", ValueError, r"token_logprobs: `lse` must have shape \[3\]"),
    lambda x, t, out, raw: raw.bwd(
        x, t, out[2][:2], None, out[0], None, *NO_EXTRA, *NO_TRANSFORM, IGNORE
    ),  # fmt: skip
    ("bwd-grad_entropy-without-entropy", ValueError, r"`entropy` is needed with `grad_entropy`"),
    lambda x, t, out, raw: raw.bwd(
        x, t, out[2], None, out[0], out[0], *NO_EXTRA, *NO_TRANSFORM, IGNORE
    ),  # fmt: skip
    ("bwd-grad_log_sum_sq-without", ValueError, r"`log_sum_sq` is needed with `grad_log_sum_sq`"),
    lambda x, t, out, raw: raw.bwd(
        x, t, out[2], None, out[0], None, None, None, out[0], None, *NO_TRANSFORM, IGNORE
    ),  # fmt: skip
    ("fwd-extras-unknown-bit", ValueError, r"token_logprobs: `extras` must be a combination"),
    lambda x, t, out, raw: raw.fwd(x, t, *NO_TRANSFORM, IGNORE, False, False, 8),
)


@requires_compiled
@pytest.mark.parametrize("error, pattern, fn", TOKEN_LOGPROBS_RAW_OP_BAD_INPUT)
def test_token_logprobs_raw_op_checks(inputs, error, pattern, fn):
    """The compiled ops check their arguments too (they are public via torch.ops)."""
    ops = torch.ops.rlhf_ext
    raw = types.SimpleNamespace(fwd=ops.token_logprobs_fwd, bwd=ops.token_logprobs_bwd)
    logits = random_logits(inputs, 3, 5)
    target = inputs.randint(0, 5, (3,))
    out = raw.fwd(logits, target, *NO_TRANSFORM, IGNORE, True)
    with pytest.raises(error, match=pattern):
        fn(logits, target, out, raw)


# -- CUDA ------------------------------------------------------------------------------

GPU_BACKENDS = ["cuda", "triton"]


def _need(backend):
    if backend not in rlhf_ext.available_backends("cuda"):
        pytest.skip(f"backend {backend} unavailable on CUDA")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_token_logprobs_cuda(inputs, backend, dtype):
    _need(backend)
    for _name, logits, target, temperature in sample_inputs(inputs, torch.float32):
        logits = logits.to(dtype)
        x = logits.cuda().requires_grad_()
        lp, ent = run(x, target.cuda(), backend, temperature, return_entropy=True)
        g_lp, g_ent = inputs.randn(lp.shape), inputs.randn(ent.shape)
        (lp * g_lp.cuda()).sum().add((ent * g_ent.cuda()).sum()).backward()
        want_lp, want_ent = ref_outputs(logits, target, temperature)
        assert_close_ref(lp, want_lp, torch.float32)
        assert_close_ref(ent, want_ent, torch.float32)
        if torch.isfinite(logits).all():
            x64 = logits.double().requires_grad_()
            wl, we = reference.token_logprobs(x64, target, temperature=temperature,
                                              return_entropy=True)  # fmt: skip
            (wl * g_lp.double()).sum().add((we * g_ent.double()).sum()).backward()
            tol = (
                dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
            )
            torch.testing.assert_close(x.grad.double().cpu(), x64.grad, **tol)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("vocab", [1, 3, 4097, 50257, 151936, 262144])
def test_token_logprobs_cuda_vocab_sizes_and_invariance(inputs, backend, vocab):
    _need(backend)
    rows = 6
    logits = random_logits(inputs, rows, vocab, dtype=torch.bfloat16).cuda()
    target = inputs.randint(0, vocab, (rows,)).cuda()
    lp, ent = run(logits, target, backend, return_entropy=True)
    want_lp, want_ent = ref_outputs(logits, target)
    assert_close_ref(lp, want_lp, torch.float32, scale=max(1.0, math.log(vocab)))
    assert_close_ref(ent, want_ent, torch.float32, scale=max(1.0, math.log(vocab)))
    big = torch.cat([random_logits(inputs, 5, vocab, dtype=torch.bfloat16).cuda(), logits])
    big_target = torch.cat([inputs.randint(0, vocab, (5,)).cuda(), target])
    lp_big, ent_big = run(big, big_target, backend, return_entropy=True)
    assert torch.equal(lp_big[5:], lp) and torch.equal(ent_big[5:], ent)
    # An unaligned view of the same rows gives the same bits.
    if vocab > 1:
        padded = torch.empty(rows, vocab + 1, dtype=torch.bfloat16, device="cuda")
        padded[:, 1:] = logits
        assert torch.equal(run(padded[:, 1:], target, backend), lp)


@pytest.mark.triton_gpu
def test_token_logprobs_triton_inductor_parity(inputs):
    """torch.compile with Inductor (the default backend), which compiles the Triton
    kernels into its own generated code, gives the eager gradient. test_op_contract.py
    compiles with aot_eager only."""
    logits = random_logits(inputs, 4, 300, dtype=torch.bfloat16).cuda()
    target = random_target(inputs, (4,), 300).cuda()

    def loss(x):
        lp, ent = rlhf_ext.token_logprobs(x, target, return_entropy=True, backend="triton")
        return lp.sum() + ent.sum()

    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss(x1).backward()
    torch.compile(loss, fullgraph=True)(x2).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.slow
def test_token_logprobs_cuda_beyond_int32_elements(inputs):
    _need("cuda")
    rows, vocab = 16400, 131072  # 2.15e9 elements > 2^31
    logits = torch.randn(rows, vocab, dtype=torch.bfloat16, device="cuda")
    target = torch.randint(0, vocab, (rows,), device="cuda")
    lp = rlhf_ext.token_logprobs(logits, target, backend="cuda")
    last = slice(rows - 3, rows)
    want = ref_outputs(logits[last], target[last])[0]
    assert_close_ref(lp[last], want, torch.float32, scale=math.log(vocab))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logprobs_nan_logit_propagates(inputs, backend):
    logits = random_logits(inputs, 3, 40)
    logits[0, 17] = float("nan")
    logits[2, :] = float("-inf")
    logits[2, 5] = float("nan")  # a NaN among masked entries
    lp, ent = run(logits, torch.tensor([3, 3, 3]), backend, return_entropy=True)
    assert torch.isnan(lp[0]) and torch.isnan(ent[0])
    assert torch.isfinite(lp[1]) and torch.isfinite(ent[1])
    assert torch.isnan(lp[2]) and torch.isnan(ent[2])


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda x: x[:1].expand(4, 9, 50), id="expanded-rows"),
        pytest.param(lambda x: x[:, :, :1].expand(4, 9, 50), id="expanded-vocab"),
        pytest.param(lambda x: x.flatten().as_strided((4, 9, 50), (50, 25, 1)), id="overlapping"),
    ],
)
def test_token_logprobs_inplace_backward_refuses_shared_elements(inputs, backend, make):
    """Writing the gradient in place into logits whose elements share memory would mix
    the rows' gradients (issue 16: up to 1.26 off, silently): refused up front."""
    base = random_logits(inputs, 4, 9, 50).requires_grad_()
    logits = make(base * 1.0)
    target = random_target(inputs, (4, 9), 50)
    with pytest.raises(ValueError, match=r"^rlhf_ext\.token_logprobs: `inplace_backward=True`"):
        run(logits, target, backend, inplace_backward=True)
    lp = run(logits, target, backend)  # out of place is fine
    lp.sum().backward()
    assert torch.isfinite(base.grad).all()


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_token_logprobs_inplace_backward_fails_an_op_that_saved_the_logits(inputs, backend):
    """The in-place backward bumps the logits' version: an op that saved them (here
    ``probs * logits``, taken before the log-probs, so its backward runs after ours)
    raises autograd's error instead of reading the overwritten buffer."""
    logits = random_logits(inputs, 3, 5, 30)
    target = random_target(inputs, (3, 5), 30)
    x = logits.clone().requires_grad_()
    h = x * 1.0
    saved = (h.softmax(-1) * h).sum()
    lp = run(h, target, backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + saved).backward()


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_token_logprobs_second_backward(inputs, backend):
    """retain_graph=True and a second backward: the out-of-place backward gives the same
    gradient twice; the in-place one, whose first backward overwrote the logits, raises."""
    logits = random_logits(inputs, 3, 7, 40)
    target = random_target(inputs, (3, 7), 40)
    x = logits.clone().requires_grad_()
    lp = run(x * 1.0, target, backend)
    (first,) = torch.autograd.grad(lp.sum(), x, retain_graph=True)
    (second,) = torch.autograd.grad(lp.sum(), x)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    lp = run(x * 1.0, target, backend, inplace_backward=True)
    torch.autograd.grad(lp.sum(), x, retain_graph=True)
    with pytest.raises(RuntimeError, match=r"^rlhf_ext\.token_logprobs: a second backward"):
        torch.autograd.grad(lp.sum(), x)
