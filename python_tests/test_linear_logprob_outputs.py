"""linear_token_logprobs' extra outputs (issue 17 item 3): `outputs=` any subset of
logprobs, entropy, lse, log_sum_sq_probs, mean_logits and is_top1, from the same logits
tiles (the Triton forward: its GEMM epilogue and span merge), on every backend here
against reference.py in float64, with the gradients of hidden, weight and bias."""

from __future__ import annotations

import functools

import conftest
import pytest
import torch
from conftest import CPU_BACKENDS, assert_close_ref, assert_within_eager_error

import rlhf_ext
from rlhf_ext import reference
from rlhf_ext.ops._vocab import LOGPROB_OUTPUTS

IGNORE = -100
DIFFERENTIABLE = LOGPROB_OUTPUTS[:-1]  # every output but is_top1


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def exact_inputs(inputs, rows: int, size: int, vocab: int, dtype):
    """(hidden, weight, bias) of small multiples of 1/2: every logit is exact in any
    summation order, so the ties below are ties on every backend."""

    def halves(*shape):
        return (inputs.randint(-4, 5, shape).to(dtype)) / 2

    return halves(rows, size), halves(vocab, size) / 2, halves(vocab)


def cases(inputs, dtype):
    """(name, hidden, weight, bias, target, kwargs): ties across vocabulary spans (the
    interpreter's spans are 64 columns), targets at the argmax, ignored rows, the logit
    transforms, a vocabulary the backward splits into tiles (V > 1024 with more rows than
    a chunk)."""
    hidden, weight, bias = exact_inputs(inputs, 12, 8, 150, dtype)
    weight[130] = weight[5]  # columns 5 and 130: the same logit in every row, and in rows
    hidden[2:4] = 0  # 2 and 3 (logits = bias there) the top one
    bias[5] = bias[130] = 8.0
    logits = hidden.double() @ weight.double().T + bias.double()
    target = inputs.randint(0, 150, (12,))
    target[0] = IGNORE
    target[1] = logits[1].argmax()
    target[2] = 130  # tied with 5, the first argmax: not the top token
    target[3] = 5
    target[7] = IGNORE
    temps = inputs.uniform(12, low=0.5, high=2.0)
    for name, kwargs in (
        ("plain", {}),
        ("transforms", dict(temperature=temps, softcap=4.0, logit_scale=1.5)),
        ("chunked", dict(temperature=0.8, chunk_size=5)),
    ):
        yield name, hidden, weight, bias, target, kwargs
    h, w, b = (inputs.randn(*shape).to(dtype) for shape in ((40, 8), (2100, 8), (2100,)))
    t = inputs.randint(0, 2100, (40,))
    t[::7] = IGNORE
    yield "tiled-backward", h, w * 0.7, b, t, dict(chunk_size=16)


def run(hidden, weight, target, backend, bias=None, outputs=LOGPROB_OUTPUTS, **kwargs):
    return rlhf_ext.linear_token_logprobs(
        hidden, weight, target, bias=bias, ignore_index=IGNORE, outputs=outputs,
        backend=backend, **kwargs,
    )  # fmt: skip


def _weighted_sum(out, upstream, want):
    """sum over the differentiable outputs of output * upstream, where the reference is
    finite (a -inf mean or lse has no gradient to compare)."""
    total = 0
    for k in DIFFERENTIABLE:
        finite = torch.isfinite(getattr(want, k))
        total = total + (getattr(out, k) * upstream[k].to(getattr(out, k).dtype))[finite].sum()
    return total


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_outputs_match_reference(inputs, backend, dtype):
    for name, hidden, weight, bias, target, kwargs in cases(inputs, dtype):
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        out = run(leaves[0], leaves[1], target, backend, bias=leaves[2], **kwargs)
        leaves64 = [t.detach().double().clone().requires_grad_() for t in (hidden, weight, bias)]
        ref_kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
        want = reference.linear_token_logprobs(
            leaves64[0], leaves64[1], target, bias=leaves64[2], ignore_index=IGNORE,
            outputs=LOGPROB_OUTPUTS, **ref_kwargs,
        )  # fmt: skip
        for k in DIFFERENTIABLE:
            got, expected = getattr(out, k), getattr(want, k)
            assert got.dtype == acc(dtype) and got.shape == target.shape, (name, k)
            finite = torch.isfinite(expected)
            assert torch.equal(torch.isfinite(got), finite), (name, k)
            assert_close_ref(got[finite], expected.detach()[finite], acc(dtype))
        assert out.is_top1.dtype == torch.bool and out.is_top1.shape == target.shape
        assert torch.equal(out.is_top1, want.is_top1), name
        upstream = {k: inputs.randn(*target.shape) for k in DIFFERENTIABLE}
        _weighted_sum(out, upstream, want).backward()
        _weighted_sum(want, {k: u.double() for k, u in upstream.items()}, want).backward()
        for leaf, leaf64 in zip(leaves, leaves64, strict=True):
            assert_close_ref(leaf.grad, leaf64.grad, acc(dtype))


def test_ties_and_spans_pick_the_first_argmax(inputs):
    """Rows 2 and 3 of the cases: columns 5 and 130 (in different spans and chunks) hold
    the same top logit; only the target 5 is the top token."""
    _, hidden, weight, bias, target, _ = next(cases(inputs, torch.float32))
    for backend in CPU_BACKENDS:
        top1 = run(hidden, weight, target, backend, bias=bias, outputs=("is_top1",)).is_top1
        assert top1[2:4].tolist() == [False, True], backend
        assert top1[1] and not top1[0] and not top1[7], backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_subsets_equal_the_full_call(inputs, backend):
    """Asking for fewer outputs gives the same bits for those (one code path per output),
    and return_entropy stays the short form of outputs=("logprobs", "entropy")."""
    _, hidden, weight, bias, target, _ = next(cases(inputs, torch.float32))
    every = run(hidden, weight, target, backend, bias=bias)
    for subset in (("lse",), ("is_top1", "mean_logits"), ("log_sum_sq_probs", "entropy")):
        some = run(hidden, weight, target, backend, bias=bias, outputs=subset)
        assert isinstance(some, reference.LogprobOutputs)
        for k in LOGPROB_OUTPUTS:
            if k in subset:
                assert torch.equal(getattr(some, k), getattr(every, k)), (subset, k)
            else:
                assert getattr(some, k) is None, (subset, k)
    lp, ent = rlhf_ext.linear_token_logprobs(
        hidden, weight, target, bias=bias, ignore_index=IGNORE, return_entropy=True,
        backend=backend,
    )  # fmt: skip
    assert torch.equal(lp, every.logprobs) and torch.equal(ent, every.entropy)


# Not the Triton interpreter: its tl.dot is numpy's matmul, whose rounding of a row depends
# on the row's position in the tile on some CPUs (seen 2026-12-04: logprobs, lse and the
# mean differing by an ulp between a batch and its permutation), so the compiled Triton
# kernel's invariance is checked on a GPU. Nor the reference's plain matmul.
@pytest.mark.parametrize("backend", [
    *(b for b in CPU_BACKENDS if b not in ("torch", "triton")),
    *(pytest.param(b, marks=pytest.mark.cuda) for b in ("cuda", "triton")),
])  # fmt: skip
def test_outputs_batch_invariant(inputs, backend):
    device = "cpu" if backend == "cpu" else "cuda"
    if backend not in rlhf_ext.available_backends(device):
        pytest.skip(f"backend {backend} unavailable on {device}")
    hidden, weight, bias = (inputs.randn(9, 16), inputs.randn(300, 16) * 0.5, inputs.randn(300))
    hidden, weight, bias = (t.to(device) for t in (hidden, weight, bias))
    target = inputs.randint(0, 300, (9,)).to(device)
    batch = run(hidden, weight, target, backend, bias=bias, softcap=10.0)
    order = torch.tensor([3, 6, 0, 1, 2, 4, 5, 8, 7], device=device)
    shuffled = run(hidden[order], weight, target[order], backend, bias=bias, softcap=10.0)
    alone = run(hidden[3:4], weight, target[3:4], backend, bias=bias, softcap=10.0)
    for k in LOGPROB_OUTPUTS:
        assert torch.equal(getattr(shuffled, k), getattr(batch, k)[order]), k
        assert torch.equal(getattr(alone, k)[0], getattr(batch, k)[3]), k


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_only_extras_reach_the_gradient(inputs, backend):
    """A gradient through mean_logits alone (no softmax terms) or log_sum_sq_probs alone."""
    hidden, weight, bias = inputs.randn(6, 8), inputs.randn(70, 8) * 0.5, inputs.randn(70)
    target = inputs.randint(0, 70, (6,))
    target[2] = IGNORE
    for name in ("mean_logits", "log_sum_sq_probs", "lse"):
        h = hidden.clone().requires_grad_()
        getattr(run(h, weight, target, backend, bias=bias, outputs=(name,)), name).sum().backward()
        h64 = hidden.double().requires_grad_()
        want = reference.linear_token_logprobs(
            h64, weight.double(), target, bias=bias.double(), ignore_index=IGNORE, outputs=(name,)
        )
        getattr(want, name).sum().backward()
        assert_close_ref(h.grad, h64.grad, torch.float32)
        assert torch.equal(h.grad[2], torch.zeros(8)), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_log_sum_sq_low_precision_within_eager_error(inputs, backend):
    """bf16 hidden and head: the outputs within 2x of eager's error (eager: the logits in
    bf16, then verl's exp(logsumexp(2 z) - 2 logsumexp(z)) in log form)."""
    hidden, weight = inputs.randn(16, 32).bfloat16(), (inputs.randn(300, 32) * 0.4).bfloat16()
    target = inputs.randint(0, 300, (16,))
    out = run(hidden, weight, target, backend, outputs=("lse", "log_sum_sq_probs", "mean_logits"))
    want = reference.linear_token_logprobs(
        hidden.double(), weight.double(), target, outputs=LOGPROB_OUTPUTS
    )
    logits = hidden @ weight.T
    lse_eager = torch.logsumexp(logits, -1)
    assert_within_eager_error(out.lse, want.lse, lse_eager)
    sq_eager = torch.logsumexp(2 * logits, -1) - 2 * lse_eager
    assert_within_eager_error(out.log_sum_sq_probs, want.log_sum_sq_probs, sq_eager)
    assert_within_eager_error(out.mean_logits, want.mean_logits, logits.mean(-1))


# bad_inputs rows (id, error, pattern, fn): fn(h, w, t, op) with h [3, 4], w [5, 4], t [3]
# and op = rlhf_ext.linear_token_logprobs on the test's backend.
LINEAR_OUTPUTS_BAD_INPUT = conftest.bad_inputs(
    r"rlhf_ext\.linear_token_logprobs: ",
    ("outputs-str", TypeError, r"`outputs` must be a tuple or list of names"),
    lambda h, w, t, op: op(h, w, t, outputs="lse"),
    ("outputs-unknown", ValueError, r"`outputs` has unknown name 'logits'; the outputs are"),
    lambda h, w, t, op: op(h, w, t, outputs=("logits",)),
    ("outputs-duplicate", ValueError, r"`outputs` must name each output once"),
    lambda h, w, t, op: op(h, w, t, outputs=("lse", "lse")),
    ("outputs-and-return_entropy", ValueError, r"pass either `return_entropy=True` or `outputs`"),
    lambda h, w, t, op: op(h, w, t, outputs=("entropy",), return_entropy=True),
)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("error, pattern, fn", LINEAR_OUTPUTS_BAD_INPUT)
def test_outputs_bad_input(inputs, backend, error, pattern, fn):
    hidden, weight, target = inputs.randn(3, 4), inputs.randn(5, 4), inputs.randint(0, 5, (3,))
    with pytest.raises(error, match=pattern):
        fn(hidden, weight, target, functools.partial(rlhf_ext.linear_token_logprobs,
                                                     backend=backend))  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_outputs_cuda(inputs, backend, dtype):
    if backend not in rlhf_ext.available_backends("cuda"):
        pytest.skip(f"backend {backend} unavailable on CUDA")
    for name, hidden, weight, bias, target, kwargs in cases(inputs, torch.float32):
        kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        leaves = [t.to(dtype).cuda() for t in (hidden, weight, bias)]
        out = run(leaves[0], leaves[1], target.cuda(), backend, bias=leaves[2], **kw)
        want = reference.linear_token_logprobs(
            *(t.to(dtype).double() for t in (hidden, weight)), target,
            bias=bias.to(dtype).double(), ignore_index=IGNORE, outputs=LOGPROB_OUTPUTS,
            **{k: v for k, v in kwargs.items() if k != "chunk_size"},
        )  # fmt: skip
        for k in DIFFERENTIABLE:
            finite = torch.isfinite(getattr(want, k))
            assert torch.equal(torch.isfinite(getattr(out, k)).cpu(), finite), (name, k)
            assert_close_ref(getattr(out, k)[finite.cuda()], getattr(want, k)[finite],
                             torch.float32, scale=10.0)  # fmt: skip
        if name != "tiled-backward":  # exact logits: the ties hold in any GEMM
            assert torch.equal(out.is_top1.cpu(), want.is_top1), name
