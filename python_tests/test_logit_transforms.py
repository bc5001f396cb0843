"""token_logprobs with the logit transforms of issue 17 (items 1, 2): per-token and
per-sequence temperature tensors, Gemma's softcap and the heads' logit_scale, on every
backend here, against reference.py in float64."""

from __future__ import annotations

import functools
import math

import conftest
import pytest
import torch
from conftest import CPU_BACKENDS, assert_close_ref, assert_within_eager_error, given, settings, st

import rlhf_ext
from rlhf_ext import reference

IGNORE = -100
KERNEL_BACKENDS = [b for b in CPU_BACKENDS if b != "torch"]


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def transform_cases(inputs, dtype):
    """(name, logits [B, T, V], target [B, T], transform kwargs)."""
    logits = inputs.randn(3, 4, 37, scale=6.0).to(dtype)
    target = inputs.randint(0, 37, (3, 4))
    target[1, 2] = IGNORE
    per_token = inputs.uniform(3, 4, low=0.3, high=2.0, dtype=torch.float64)
    yield "softcap", logits, target, dict(softcap=5.0)
    yield "logit_scale", logits, target, dict(logit_scale=0.25)
    yield "all_scalars", logits, target, dict(temperature=0.7, logit_scale=2.0, softcap=9.0)
    yield "per_token", logits, target, dict(temperature=per_token.float())
    yield "per_sequence", logits, target, dict(temperature=per_token[:, 0].float())
    yield "zero_dim", logits, target, dict(temperature=per_token[0, 0].float())
    yield "float64_temps", logits, target, dict(temperature=per_token)
    kwargs = dict(temperature=per_token.float(), logit_scale=1.5, softcap=4.0)
    yield "per_token_softcap_scale", logits, target, kwargs
    # A softcap crossing the kernels' block boundaries and the series / exp switch.
    wide = inputs.randn(2, 5000, scale=2.0).to(dtype)
    yield "wide_softcap", wide, inputs.randint(0, 5000, (2,)), dict(softcap=3.0)


def run(logits, target, backend, **kwargs):
    return rlhf_ext.token_logprobs(
        logits, target, ignore_index=IGNORE, return_entropy=True, backend=backend, **kwargs
    )


def ref64(logits, target, **kwargs):
    return reference.token_logprobs(
        logits.double(), target, ignore_index=IGNORE, return_entropy=True, **kwargs
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_transforms_match_reference(inputs, backend, dtype):
    for name, logits, target, kwargs in transform_cases(inputs, dtype):
        x = logits.detach().clone().requires_grad_()
        lp, ent = run(x, target, backend, **kwargs)
        assert lp.dtype == acc(dtype) and lp.shape == target.shape, name
        g_lp, g_ent = inputs.randn(*lp.shape), inputs.randn(*ent.shape)
        (lp * g_lp.to(lp.dtype)).sum().add((ent * g_ent.to(ent.dtype)).sum()).backward()
        x64 = logits.detach().double().clone().requires_grad_()
        want_lp, want_ent = ref64(x64, target, **kwargs)
        (want_lp * g_lp.double()).sum().add((want_ent * g_ent.double()).sum()).backward()
        assert_close_ref(lp, want_lp.detach(), acc(dtype))
        assert_close_ref(ent, want_ent.detach(), acc(dtype))
        assert_close_ref(x.grad, x64.grad, acc(dtype))
        ignored = target == IGNORE
        assert (lp[ignored] == 0).all() and (x.grad[ignored] == 0).all(), name


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_transforms_gradcheck(inputs, backend):
    logits = inputs.randn(3, 6, dtype=torch.float64, scale=4.0).requires_grad_()
    target = torch.tensor([0, IGNORE, 5])
    temps = inputs.uniform(3, low=0.5, high=1.5, dtype=torch.float64)

    def both(x):
        return rlhf_ext.token_logprobs(
            x, target, temperature=temps, logit_scale=1.7, softcap=3.0, return_entropy=True,
            backend=backend,
        )  # fmt: skip

    assert torch.autograd.gradcheck(both, (logits,))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_softcap_low_precision_within_eager_error(inputs, backend, dtype):
    """The softcap is applied to the float32 upcast: no worse than the model's eager
    softcap in the logits' dtype followed by log_softmax (what TRL / HF compute)."""
    logits = inputs.randn(16, 300, scale=8.0).to(dtype)
    target = inputs.randint(0, 300, (16,))
    cap, scale, temperature = 10.0, 1.25, 0.9
    x = logits.clone().requires_grad_()
    lp, _ = run(x, target, backend, softcap=cap, logit_scale=scale, temperature=temperature)
    g = inputs.randn(16)
    (lp * g).sum().backward()
    xe = logits.clone().requires_grad_()
    capped = torch.tanh(xe * scale / cap) * cap / temperature  # in the logits' dtype
    eager = torch.log_softmax(capped, -1).gather(-1, target[:, None]).squeeze(-1)
    (eager.float() * g).sum().backward()
    x64 = logits.detach().double().requires_grad_()
    want, _ = ref64(x64, target, softcap=cap, logit_scale=scale, temperature=temperature)
    (want * g.double()).sum().backward()
    assert_within_eager_error(lp, want, eager)
    assert_within_eager_error(x.grad, x64.grad, xe.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tensor_temperature_equals_the_scalar(inputs, backend):
    logits = inputs.randn(4, 5, 50, scale=3.0)
    target = inputs.randint(0, 50, (4, 5))
    scalar = run(logits, target, backend, temperature=0.6, softcap=7.0)
    for temps in (torch.tensor(0.6), torch.full((4,), 0.6), torch.full((4, 5), 0.6)):
        tensor = run(logits, target, backend, temperature=temps, softcap=7.0)
        for a, b in zip(tensor, scalar, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # Rows with their own temperatures equal the scalar op on each row.
    temps = torch.tensor([0.5, 1.0, 2.0, 3.0])
    per_row = run(logits, target, backend, temperature=temps)
    for i, t in enumerate(temps.tolist()):
        one = run(logits[i], target[i], backend, temperature=t)
        torch.testing.assert_close(per_row[0][i], one[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(per_row[1][i], one[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softcap_limits(inputs, backend):
    logits = inputs.randn(3, 40, scale=4.0)
    target = inputs.randint(0, 40, (3,))
    plain = run(logits, target, backend)
    wide = run(logits, target, backend, softcap=1e5)  # tanh is the identity there
    for a, b in zip(wide, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    scaled = run(logits, target, backend, logit_scale=2.0)
    doubled = run(logits * 2, target, backend)
    for a, b in zip(scaled, doubled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # A tiny cap squeezes the logits towards 0: the distribution tends to uniform.
    lp, ent = run(logits, target, backend, softcap=1e-6)
    torch.testing.assert_close(lp, torch.full_like(lp, -math.log(40)), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, torch.full_like(ent, math.log(40)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softcap_of_masked_logits(inputs, backend):
    """With a softcap a -inf logit becomes -softcap (as in the model): a finite logit
    with a small probability, and a zero gradient (tanh is flat at -inf)."""
    logits = inputs.randn(3, 12, scale=3.0)
    logits[:, ::4] = float("-inf")
    target = torch.tensor([1, 2, 4])
    x = logits.clone().requires_grad_()
    lp, ent = run(x, target, backend, softcap=2.0)
    want_lp, want_ent = ref64(logits, target, softcap=2.0)
    assert_close_ref(lp, want_lp, torch.float32)
    assert_close_ref(ent, want_ent, torch.float32)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, ::4] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_logit_propagates_through_the_softcap(inputs, backend):
    logits = inputs.randn(3, 9)
    logits[1, 4] = float("nan")
    lp, ent = run(logits, torch.tensor([0, 1, 2]), backend, softcap=5.0)
    assert torch.isnan(lp[1]) and torch.isnan(ent[1])
    assert torch.isfinite(lp[[0, 2]]).all() and torch.isfinite(ent[[0, 2]]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 1e-300])
def test_bad_temperature_entry(inputs, backend, bad):
    logits = inputs.randn(2, 3, 10)
    target = inputs.randint(0, 10, (2, 3))
    temps = inputs.uniform(2, 3, low=0.5, high=1.5, dtype=torch.float64)
    temps[1, 2] = bad
    with pytest.raises(ValueError, match=r"token_logprobs: `temperature` at position \(1, 2\)"):
        run(logits, target, backend, temperature=temps)
    # validate=False: no check (no sync), NaN for that row only, and for its gradient.
    x = logits.clone().requires_grad_()
    lp, ent = run(x, target, backend, temperature=temps, validate=False)
    assert torch.isnan(lp[1, 2]) and torch.isnan(ent[1, 2])
    assert torch.isfinite(lp.flatten()[:5]).all() and torch.isfinite(ent.flatten()[:5]).all()
    if backend != "torch":
        lp.sum().backward()
        assert torch.isnan(x.grad[1, 2]).all() and torch.isfinite(x.grad.flatten(0, 1)[:5]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ignored_rows_ignore_their_temperature(inputs, backend):
    logits = inputs.randn(3, 10)
    target = torch.tensor([1, IGNORE, 3])
    temps = torch.tensor([0.8, 0.0, 1.2])  # a bad temperature where nothing is read
    x = logits.clone().requires_grad_()
    lp, ent = run(x, target, backend, temperature=temps, validate=False)
    (lp.sum() + ent.sum()).backward()
    assert lp[1] == 0 and ent[1] == 0 and (x.grad[1] == 0).all()
    assert torch.isfinite(lp).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_transforms_batch_invariant_and_deterministic(inputs, backend):
    vocab = 3000
    rows = inputs.randn(7, vocab, scale=5.0)
    target = inputs.randint(0, vocab, (7,))
    temps = inputs.uniform(7, low=0.5, high=2.0)
    kwargs = dict(softcap=6.0, logit_scale=1.3)
    batch = run(rows, target, backend, temperature=temps, **kwargs)
    order = torch.tensor([3, 6, 0, 1, 2, 4, 5])
    shuffled = run(rows[order], target[order], backend, temperature=temps[order], **kwargs)
    alone = run(rows[3:4], target[3:4], backend, temperature=temps[3:4], **kwargs)
    for k in range(2):
        assert torch.equal(shuffled[k][0], batch[k][3]) and torch.equal(alone[k][0], batch[k][3])
        assert torch.equal(shuffled[k], batch[k][order])
    again = run(rows, target, backend, temperature=temps, **kwargs)
    assert torch.equal(again[0], batch[0]) and torch.equal(again[1], batch[1])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inplace_backward_with_transforms(inputs, backend):
    logits = inputs.randn(4, 30, scale=4.0)
    target = inputs.randint(0, 30, (4,))
    kwargs = dict(temperature=inputs.uniform(4, low=0.5, high=2.0), softcap=5.0, logit_scale=0.8)
    x = logits.clone().requires_grad_()
    lp, ent = run(x, target, backend, **kwargs)
    (lp.sum() + ent.sum()).backward()
    y = logits.clone().requires_grad_()
    buffer = y * 1  # a non-leaf the in-place backward may overwrite
    lp2, ent2 = run(buffer, target, backend, inplace_backward=True, **kwargs)
    (lp2.sum() + ent2.sum()).backward()
    assert torch.equal(lp2, lp) and torch.equal(y.grad, x.grad)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@settings(max_examples=15)
@given(
    rows=st.integers(1, 5),
    vocab=st.integers(1, 300),
    softcap=st.floats(0.05, 50.0),
    logit_scale=st.floats(0.1, 10.0),
    temperature=st.floats(0.25, 4.0),
    seed=st.integers(0, 2**31),
)
def test_transform_properties(backend, rows, vocab, softcap, logit_scale, temperature, seed):
    """|z| <= softcap / T bounds every log-prob from below by -log V - 2 softcap / T; the
    scale and the temperature enter only as their ratio without a softcap; a per-row
    temperature tensor equals the scalar op on each row."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 8
    target = torch.randint(0, vocab, (rows,), generator=gen)
    tol = 1e-4 * max(1.0, math.log(vocab) + softcap / temperature)
    lp, ent = run(logits, target, backend, softcap=softcap, temperature=temperature)
    assert (lp <= tol).all() and (lp >= -math.log(vocab) - 2 * softcap / temperature - tol).all()
    assert (ent >= -tol).all() and (ent <= math.log(vocab) + tol).all()
    scaled = run(logits, target, backend, logit_scale=logit_scale, temperature=temperature)
    ratio = run(logits, target, backend, temperature=temperature / logit_scale)
    for a, b in zip(scaled, ratio, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4 * max(1.0, logit_scale / temperature))
    temps = torch.rand(rows, generator=gen) * 3 + 0.25
    per_row = run(logits, target, backend, temperature=temps, softcap=softcap)
    for i in range(rows):
        one = run(logits[i], target[i], backend, temperature=float(temps[i]), softcap=softcap)
        torch.testing.assert_close(per_row[0][i], one[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(per_row[1][i], one[1], rtol=1e-6, atol=1e-6)


# -- bad input --------------------------------------------------------------------------

# bad_inputs rows (id, error, pattern, fn): fn(x, t, op), x float32 logits [3, 5], t int64
# targets [3], op = rlhf_ext.token_logprobs on the test's backend.
TRANSFORM_BAD_INPUT = conftest.bad_inputs(
    r"rlhf_ext\.token_logprobs: ",
    ("temperature-tensor-shape", ValueError, r"`temperature` as a tensor must have the leading"),
    lambda x, t, op: op(x, t, temperature=torch.ones(2)),
    ("temperature-tensor-2d-on-1d-lead", ValueError, r"`temperature` as a tensor must have"),
    lambda x, t, op: op(x, t, temperature=torch.ones(3, 1)),
    ("temperature-tensor-bf16", TypeError, r"`temperature` as a tensor must be float32 or"),
    lambda x, t, op: op(x, t, temperature=torch.ones(3, dtype=torch.bfloat16)),
    ("temperature-tensor-int", TypeError, r"`temperature` as a tensor must be float32 or"),
    lambda x, t, op: op(x, t, temperature=torch.ones(3, dtype=torch.int64)),
    ("temperature-tensor-device", ValueError, r"`temperature` must be on cpu like `logits`"),
    lambda x, t, op: op(x, t, temperature=torch.ones(3, device="meta")),
    ("temperature-tensor-grad", ValueError, r"`temperature` must not require grad"),
    lambda x, t, op: op(x, t, temperature=torch.ones(3, requires_grad=True)),
    ("logit_scale-0", ValueError, r"`logit_scale` must be a float in \[.*got 0.0"),
    lambda x, t, op: op(x, t, logit_scale=0.0),
    ("logit_scale-negative", ValueError, r"`logit_scale` must be a float in"),
    lambda x, t, op: op(x, t, logit_scale=-2.0),
    ("logit_scale-nan", ValueError, r"`logit_scale` must be finite, got nan"),
    lambda x, t, op: op(x, t, logit_scale=float("nan")),
    ("logit_scale-1e39", ValueError, r"`logit_scale` must be a float in .*got 1e\+39"),
    lambda x, t, op: op(x, t, logit_scale=1e39),
    ("logit_scale-str", TypeError, r"`logit_scale` must be a float, got str"),
    lambda x, t, op: op(x, t, logit_scale="2"),
    ("softcap-0", ValueError, r"`softcap` must be None \(no softcap\) or > 0, got 0.0"),
    lambda x, t, op: op(x, t, softcap=0.0),
    ("softcap-negative", ValueError, r"`softcap` must be None \(no softcap\) or > 0"),
    lambda x, t, op: op(x, t, softcap=-30.0),
    ("softcap-inf", ValueError, r"`softcap` must be finite, got inf"),
    lambda x, t, op: op(x, t, softcap=float("inf")),
    ("softcap-tiny-for-scale", ValueError, r"`softcap` 1e-30 with `logit_scale` .* float32"),
    lambda x, t, op: op(x, t, softcap=1e-30, logit_scale=1e10),
    ("scale-over-temperature", ValueError, r"`logit_scale` / `temperature` = .* overflows"),
    lambda x, t, op: op(x, t, logit_scale=1e30, temperature=1e-10),
    ("temperature-tensor-overflow", ValueError, r"`temperature` at position \(1,\) is"),
    lambda x, t, op: op(x, t, logit_scale=1e30, temperature=torch.tensor([1.0, 1e-10, 1.0])),
)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("error, pattern, fn", TRANSFORM_BAD_INPUT)
def test_transform_bad_input(inputs, backend, error, pattern, fn):
    logits = inputs.randn(3, 5)
    target = inputs.randint(0, 5, (3,))
    with pytest.raises(error, match=pattern):
        fn(logits, target, functools.partial(rlhf_ext.token_logprobs, backend=backend))


# -- linear_token_logprobs: the same transform on the LM head's logits -----------------


def linear_inputs(inputs, lead, size, vocab, dtype=torch.float32):
    """(hidden, weight, bias, target) with logits of std ~4 (the softcap matters), some
    targets ignored."""
    hidden = inputs.randn(*lead, size).to(dtype)
    weight = inputs.randn(vocab, size, scale=4.0 / size**0.5).to(dtype)
    bias = inputs.randn(vocab, scale=0.5).to(dtype)
    target = inputs.randint(0, vocab, lead)
    target.view(-1)[::4] = IGNORE
    return hidden, weight, bias, target


def linear_grads(fn, hidden, weight, bias, target, g_lp, g_ent):
    """(logprobs, entropy, grad_hidden, grad_weight, grad_bias) through fn."""
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    lp, ent = fn(h, w, b, target)
    (lp * g_lp.to(lp.dtype)).sum().add((ent * g_ent.to(ent.dtype)).sum()).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad, b.grad


def linear_transform_cases(inputs, lead):
    per_token = inputs.uniform(*lead, low=0.4, high=2.0)
    yield "softcap_scale", dict(softcap=3.0, logit_scale=0.7, temperature=0.9)
    yield "per_token", dict(temperature=per_token)
    yield "per_sequence", dict(temperature=per_token[:, 0].contiguous())
    yield "per_token_softcap", dict(temperature=per_token, softcap=4.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("chunk_size", [None, 5], ids=["one_chunk", "chunks_of_5"])
def test_linear_transforms_match_reference(inputs, backend, dtype, chunk_size):
    """Chunks of 5 valid rows: the forward's chunk loop, and a backward split over rows
    and the vocabulary (V=300 over 3 x 4 tokens), each tile with its rows' temperatures."""
    lead = (3, 4)
    hidden, weight, bias, target = linear_inputs(inputs, lead, 16, 300, dtype)
    g_lp, g_ent = inputs.randn(*lead), inputs.randn(*lead)
    for _name, kwargs in linear_transform_cases(inputs, lead):

        def ours(h, w, b, t, kwargs=kwargs):
            return rlhf_ext.linear_token_logprobs(
                h, w, t, bias=b, ignore_index=IGNORE, return_entropy=True, chunk_size=chunk_size,
                backend=backend, **kwargs,
            )  # fmt: skip

        def ref(h, w, b, t, kwargs=kwargs):
            return reference.linear_token_logprobs(
                h, w, t, bias=b, ignore_index=IGNORE, return_entropy=True, **kwargs
            )

        got = linear_grads(ours, hidden, weight, bias, target, g_lp, g_ent)
        want = linear_grads(
            ref, hidden.double(), weight.double(), bias.double(), target, g_lp, g_ent
        )
        for a, b in zip(got, want, strict=True):
            assert_close_ref(a, b, acc(dtype))
        # The same as token_logprobs of the materialised logits.
        logits = hidden @ weight.T + bias
        lp, ent = run(logits, target, backend, **kwargs)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got[0], lp, **tol)
        torch.testing.assert_close(got[1], ent, **tol)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_linear_transforms_gradcheck(inputs, backend):
    # Small: every perturbation is a forward (a chunk loop under the Triton interpreter).
    hidden, weight, bias, target = linear_inputs(inputs, (3,), 3, 6, torch.float64)
    temps = inputs.uniform(3, low=0.5, high=1.5, dtype=torch.float64)

    def both(h, w, b):
        return rlhf_ext.linear_token_logprobs(
            h, w, target, bias=b, temperature=temps, softcap=2.5, logit_scale=1.3,
            ignore_index=IGNORE, return_entropy=True, chunk_size=2, backend=backend,
        )  # fmt: skip

    leaves = tuple(t.clone().requires_grad_() for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(both, leaves)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_linear_transforms_batch_invariant(inputs, backend):
    hidden, weight, bias, target = linear_inputs(inputs, (40,), 16, 200)
    temps = inputs.uniform(40, low=0.5, high=2.0)
    kwargs = dict(bias=bias, softcap=5.0, return_entropy=True, chunk_size=16)
    batch = rlhf_ext.linear_token_logprobs(
        hidden, weight, target, temperature=temps, backend=backend, **kwargs
    )
    alone = rlhf_ext.linear_token_logprobs(
        hidden[9:10], weight, target[9:10], temperature=temps[9:10], backend=backend, **kwargs
    )
    assert target[9] != IGNORE
    assert torch.equal(alone[0][0], batch[0][9]) and torch.equal(alone[1][0], batch[1][9])


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs triton under the interpreter")
def test_linear_transforms_triton_gpu_tiles_under_interpreter(inputs, monkeypatch):
    """The fused forward's GPU launch parameters (128-row tiles, 4096-column spans) with
    per-row temperatures and a softcap in its epilogue, run by the interpreter."""
    from rlhf_ext.ops import linear_token_logprobs as linear_op

    kernels = linear_op.triton_kernels()
    monkeypatch.setattr(kernels, "triton_interpreting", lambda: False)
    hidden, weight, bias, target = linear_inputs(inputs, (40,), 64, 4500)
    temps = inputs.uniform(40, low=0.5, high=2.0)
    lp, ent, *_ = kernels.linear_token_logprobs_fwd_triton(
        hidden, weight, bias, target, 1.0, temps, 1.5, 6.0, IGNORE, True, 16
    )
    want = reference.linear_token_logprobs(
        hidden.double(), weight.double(), target, bias=bias.double(), temperature=temps,
        logit_scale=1.5, softcap=6.0, ignore_index=IGNORE, return_entropy=True,
    )  # fmt: skip
    assert_close_ref(lp, want[0], torch.float32)
    assert_close_ref(ent, want[1], torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_bad_temperature_entry(inputs, backend):
    hidden, weight, bias, target = linear_inputs(inputs, (2, 3), 8, 20)
    target[1, 2] = 5
    temps = torch.ones(2, 3)
    temps[1, 2] = -1.0
    op = functools.partial(rlhf_ext.linear_token_logprobs, hidden, weight, target, bias=bias,
                           ignore_index=IGNORE, temperature=temps, backend=backend)  # fmt: skip
    with pytest.raises(ValueError, match=r"linear_token_logprobs: `temperature` at position"):
        op()
    lp = op(validate=False)
    assert torch.isnan(lp[1, 2]) and not torch.isnan(lp[0]).any()


LINEAR_TRANSFORM_BAD_INPUT = conftest.bad_inputs(
    r"rlhf_ext\.linear_token_logprobs: ",
    ("temperature-tensor-shape", ValueError, r"`temperature` as a tensor .* of `hidden` \(3,\)"),
    lambda h, w, t, op: op(h, w, t, temperature=torch.ones(4)),
    ("temperature-tensor-device", ValueError, r"`temperature` must be on cpu like `hidden`"),
    lambda h, w, t, op: op(h, w, t, temperature=torch.ones(3, device="meta")),
    ("softcap-negative", ValueError, r"`softcap` must be None \(no softcap\) or > 0"),
    lambda h, w, t, op: op(h, w, t, softcap=-1.0),
    ("logit_scale-inf", ValueError, r"`logit_scale` must be finite"),
    lambda h, w, t, op: op(h, w, t, logit_scale=float("inf")),
)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("error, pattern, fn", LINEAR_TRANSFORM_BAD_INPUT)
def test_linear_transform_bad_input(inputs, backend, error, pattern, fn):
    hidden, weight, _, target = linear_inputs(inputs, (3,), 4, 5)
    with pytest.raises(error, match=pattern):
        fn(hidden, weight, target,
           functools.partial(rlhf_ext.linear_token_logprobs, backend=backend))  # fmt: skip


# -- CUDA (a GPU session: tools/gpu_check.sh) --------------------------------------------


def _need_cuda(backend):
    if backend not in rlhf_ext.available_backends("cuda"):
        pytest.skip(f"backend {backend} unavailable on CUDA")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_transforms_cuda(inputs, backend, dtype):
    _need_cuda(backend)
    for name, logits, target, kwargs in transform_cases(inputs, torch.float32):
        logits = logits.to(dtype)
        kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        x = logits.cuda().requires_grad_()
        lp, ent = run(x, target.cuda(), backend, **kw)
        (lp.sum() + ent.sum()).backward()
        x64 = logits.double().requires_grad_()
        want_lp, want_ent = ref64(x64, target, **kwargs)
        (want_lp.sum() + want_ent.sum()).backward()
        assert_close_ref(lp, want_lp.detach(), torch.float32)
        assert_close_ref(ent, want_ent.detach(), torch.float32)
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(x.grad.double().cpu(), x64.grad, **tol, msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_transforms_cuda(inputs, backend, dtype):
    _need_cuda(backend)
    lead = (4, 50)
    hidden, weight, bias, target = linear_inputs(inputs, lead, 64, 5000, dtype)
    g_lp, g_ent = inputs.randn(*lead), inputs.randn(*lead)
    for _name, kwargs in linear_transform_cases(inputs, lead):
        kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}

        def ours(h, w, b, t, kw=kw):
            return rlhf_ext.linear_token_logprobs(
                h, w, t, bias=b, ignore_index=IGNORE, return_entropy=True, backend=backend, **kw
            )

        def ref(h, w, b, t, kwargs=kwargs):
            return reference.linear_token_logprobs(
                h, w, t, bias=b, ignore_index=IGNORE, return_entropy=True, **kwargs
            )

        got = linear_grads(ours, hidden.cuda(), weight.cuda(), bias.cuda(), target.cuda(),
                           g_lp.cuda(), g_ent.cuda())  # fmt: skip
        want = linear_grads(
            ref, hidden.double(), weight.double(), bias.double(), target, g_lp, g_ent
        )
        assert_close_ref(got[0], want[0], torch.float32)
        assert_close_ref(got[1], want[1], torch.float32)
        low = dtype == torch.bfloat16
        for a, b in zip(got[2:], want[2:], strict=True):
            scale = float(b.abs().max())
            tol = 2e-2 * scale if low else 1e-4 * scale
            torch.testing.assert_close(a.double().cpu(), b, rtol=0, atol=tol)
