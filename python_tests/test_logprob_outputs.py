"""token_logprobs' extra outputs (issue 17 item 3): `outputs=` any subset of logprobs,
entropy, lse, log_sum_sq_probs, mean_logits and is_top1, from one read of the logits, on
every backend here against reference.py in float64, with their gradients."""

from __future__ import annotations

import functools
import math

import conftest
import pytest
import torch
from conftest import CPU_BACKENDS, assert_close_ref, assert_within_eager_error, given, settings, st

import rlhf_ext
from rlhf_ext import reference
from rlhf_ext.ops._vocab import LOGPROB_OUTPUTS

IGNORE = -100
DIFFERENTIABLE = LOGPROB_OUTPUTS[:-1]  # every output but is_top1


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def cases(inputs, dtype):
    """(name, logits [3, 4, V], target, kwargs): ties, a masked vocabulary, ignored rows,
    targets at the argmax, the logit transforms."""
    logits = inputs.randn(3, 4, 41, scale=3.0).to(dtype)
    target = inputs.randint(0, 41, (3, 4))
    target[0, 1] = IGNORE
    target[1, 0] = logits[1, 0].argmax()  # the top token
    logits[1, 1, 5] = logits[1, 1, 30] = logits[1, 1].max() + 1  # a tie: index 5 wins
    target[1, 1] = 30
    target[1, 2] = 5
    logits[1, 2, 5] = logits[1, 2].max() + 1
    logits[2, 3, ::3] = float("-inf")
    target[2, 3] = 1
    yield "plain", logits, target, {}
    temps = inputs.uniform(3, 4, low=0.5, high=2.0)
    yield "transforms", logits, target, dict(temperature=temps, softcap=4.0, logit_scale=1.5)
    wide = inputs.randn(2, 5000, scale=2.0).to(dtype)
    yield "wide", wide, torch.tensor([wide[0].argmax(), 17]), dict(temperature=0.8)


def run(logits, target, backend, outputs=LOGPROB_OUTPUTS, **kwargs):
    return rlhf_ext.token_logprobs(
        logits, target, ignore_index=IGNORE, outputs=outputs, backend=backend, **kwargs
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_outputs_match_reference(inputs, backend, dtype):
    for name, logits, target, kwargs in cases(inputs, dtype):
        x = logits.detach().clone().requires_grad_()
        out = run(x, target, backend, **kwargs)
        x64 = logits.detach().double().clone().requires_grad_()
        want = reference.token_logprobs(
            x64, target, ignore_index=IGNORE, outputs=LOGPROB_OUTPUTS, **kwargs
        )
        upstream = {k: inputs.randn(*target.shape) for k in DIFFERENTIABLE}
        for k in DIFFERENTIABLE:
            got, expected = getattr(out, k), getattr(want, k)
            assert got.dtype == acc(dtype) and got.shape == target.shape, (name, k)
            finite = torch.isfinite(expected)
            assert torch.equal(torch.isfinite(got), finite), (name, k)
            assert_close_ref(got[finite], expected.detach()[finite], acc(dtype))
        assert out.is_top1.dtype == torch.bool
        assert torch.equal(out.is_top1, want.is_top1), name
        sum(((getattr(out, k) * upstream[k].to(x.dtype))[torch.isfinite(getattr(want, k))]).sum()
            for k in DIFFERENTIABLE).backward()  # fmt: skip
        sum(((getattr(want, k) * upstream[k].double())[torch.isfinite(getattr(want, k))]).sum()
            for k in DIFFERENTIABLE).backward()  # fmt: skip
        assert_close_ref(x.grad, x64.grad, acc(dtype))


def test_is_top1_is_the_first_argmax(inputs):
    logits = inputs.randn(6, 9)
    logits[1, 2] = logits[1, 7] = logits[1].max() + 1  # tie: 2 is the argmax
    logits[2, 4] = float("nan")  # no distribution: never top 1
    target = torch.tensor([int(logits[0].argmax()), 7, 4, IGNORE, 0, int(logits[5].argmax())])
    for backend in CPU_BACKENDS:
        got = run(logits, target, backend, outputs=("is_top1",)).is_top1
        assert got.tolist() == [True, False, False, False, bool(logits[4].argmax() == 0), True]
        tie = run(logits[1:2], torch.tensor([2]), backend, outputs=("is_top1",)).is_top1
        assert tie.tolist() == [True]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_named_tuple_and_return_entropy(inputs, backend):
    logits, target = inputs.randn(2, 3, 11), inputs.randint(0, 11, (2, 3))
    out = run(logits, target, backend, outputs=("lse", "is_top1"))
    assert isinstance(out, reference.LogprobOutputs)
    assert out.logprobs is None and out.entropy is None and out.lse.shape == (2, 3)
    lp, ent = rlhf_ext.token_logprobs(logits, target, return_entropy=True, backend=backend)
    both = run(logits, target, backend, outputs=("logprobs", "entropy"))
    assert torch.equal(both.logprobs, lp) and torch.equal(both.entropy, ent)
    alone = rlhf_ext.token_logprobs(logits, target, backend=backend)
    assert torch.equal(out.lse, run(logits, target, backend, outputs=("lse",)).lse)
    assert torch.equal(run(logits, target, backend).logprobs, alone)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_outputs_batch_invariant_and_inplace_backward(inputs, backend):
    rows = inputs.randn(7, 3000, scale=4.0)
    target = inputs.randint(0, 3000, (7,))
    batch = run(rows, target, backend, softcap=20.0)
    order = torch.tensor([3, 6, 0, 1, 2, 4, 5])
    shuffled = run(rows[order], target[order], backend, softcap=20.0)
    alone = run(rows[3:4], target[3:4], backend, softcap=20.0)
    for k in LOGPROB_OUTPUTS:
        assert torch.equal(getattr(shuffled, k), getattr(batch, k)[order]), k
        assert torch.equal(getattr(alone, k)[0], getattr(batch, k)[3]), k
    grads = []
    for inplace in (False, True):
        x = rows.clone().requires_grad_()
        work = x * 1
        out = run(work, target, backend, inplace_backward=inplace)
        sum(getattr(out, k).sum() for k in DIFFERENTIABLE).backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_log_sum_sq_low_precision_within_eager_error(inputs, backend, dtype):
    """verl computes sum_pi_squared as exp(logsumexp(2 logits) - 2 logsumexp(logits)); its
    log in the logits' dtype is eager's error to stay within."""
    logits = inputs.randn(16, 300, scale=3.0).to(dtype)
    target = inputs.randint(0, 300, (16,))
    out = run(logits, target, backend, outputs=("lse", "log_sum_sq_probs", "mean_logits"))
    want = reference.token_logprobs(logits.double(), target, outputs=LOGPROB_OUTPUTS)
    lse_eager = torch.logsumexp(logits, -1)
    assert_within_eager_error(out.lse, want.lse, lse_eager)
    sq_eager = torch.logsumexp(2 * logits, -1) - 2 * lse_eager
    assert_within_eager_error(out.log_sum_sq_probs, want.log_sum_sq_probs, sq_eager)
    assert_within_eager_error(out.mean_logits, want.mean_logits, logits.mean(-1))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
@settings(max_examples=15)
@given(
    rows=st.integers(1, 5),
    vocab=st.integers(1, 300),
    temperature=st.floats(0.25, 4.0),
    seed=st.integers(0, 2**31),
)
def test_output_properties(backend, rows, vocab, temperature, seed):
    """-log V <= log sum p^2 <= 0; lse >= max z and <= max z + log V; is_top1 is argmax;
    logprob = z_target - lse; mean z <= lse."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 4
    target = torch.randint(0, vocab, (rows,), generator=gen)
    out = run(logits, target, backend, temperature=temperature)
    tol = 1e-5 * max(1.0, math.log(vocab) + 1) * (1 + 16 / temperature)
    assert (out.log_sum_sq_probs <= tol).all()
    assert (out.log_sum_sq_probs >= -math.log(vocab) - tol).all()
    z = logits / temperature
    top = z.max(-1).values
    assert (out.lse >= top - tol).all() and (out.lse <= top + math.log(vocab) + tol).all()
    assert (out.mean_logits <= out.lse + tol).all()
    assert torch.equal(out.is_top1, z.argmax(-1) == target)
    picked = z.gather(-1, target[:, None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, picked - out.lse, rtol=0, atol=tol)


# bad_inputs rows (id, error, pattern, fn): fn(x, t, op) with x float32 logits [3, 5], t int64
# targets [3] and op = rlhf_ext.token_logprobs on the test's backend.
OUTPUTS_BAD_INPUT = conftest.bad_inputs(
    r"rlhf_ext\.token_logprobs: ",
    ("outputs-str", TypeError, r"`outputs` must be a tuple or list of names"),
    lambda x, t, op: op(x, t, outputs="entropy"),
    ("outputs-unknown", ValueError, r"`outputs` has unknown name 'logits'; the outputs are"),
    lambda x, t, op: op(x, t, outputs=("logprobs", "logits")),
    ("outputs-duplicate", ValueError, r"`outputs` must name each output once"),
    lambda x, t, op: op(x, t, outputs=("lse", "lse")),
    ("outputs-empty", ValueError, r"`outputs` must name each output once, got \(\)"),
    lambda x, t, op: op(x, t, outputs=()),
    ("outputs-and-return_entropy", ValueError, r"pass either `return_entropy=True` or `outputs`"),
    lambda x, t, op: op(x, t, outputs=("entropy",), return_entropy=True),
)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("error, pattern, fn", OUTPUTS_BAD_INPUT)
def test_outputs_bad_input(inputs, backend, error, pattern, fn):
    logits = inputs.randn(3, 5)
    target = inputs.randint(0, 5, (3,))
    with pytest.raises(error, match=pattern):
        fn(logits, target, functools.partial(rlhf_ext.token_logprobs, backend=backend))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_outputs_cuda(inputs, backend, dtype):
    if backend not in rlhf_ext.available_backends("cuda"):
        pytest.skip(f"backend {backend} unavailable on CUDA")
    for name, logits, target, kwargs in cases(inputs, torch.float32):
        logits = logits.to(dtype)
        kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        x = logits.cuda().requires_grad_()
        out = run(x, target.cuda(), backend, **kw)
        want = reference.token_logprobs(
            logits.double(), target, ignore_index=IGNORE, outputs=LOGPROB_OUTPUTS, **kwargs
        )
        for k in DIFFERENTIABLE:
            finite = torch.isfinite(getattr(want, k))
            assert torch.equal(torch.isfinite(getattr(out, k)).cpu(), finite), (name, k)
            assert_close_ref(getattr(out, k)[finite.cuda()], getattr(want, k)[finite],
                             torch.float32, scale=10.0)  # fmt: skip
        assert torch.equal(out.is_top1.cpu(), want.is_top1), name
