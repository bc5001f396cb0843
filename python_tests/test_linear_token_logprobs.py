"""rlhf_ext.linear_token_logprobs against reference.py (float64) on every backend here."""

from __future__ import annotations

import ctypes
import functools
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
from rlhf_ext.ops import linear_token_logprobs as linear_op

OP = "rlhf_ext.linear_token_logprobs"
IGNORE = -100
# The raw ops' (temperature, temperatures, logit_scale, softcap) with no transform.
NO_TRANSFORM = (1.0, None, 1.0, 0.0)
NO_EXTRA_GRADS = (None, None, None, None)  # log_sum_sq, grad_lse, grad_log_sum_sq, grad_mean
COMPILED_BACKENDS = [b for b in CPU_BACKENDS if b != "torch"]


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(inputs, lead, size, vocab, dtype=torch.float32, bias=True, ignore_frac=0.25):
    """(hidden, weight, bias, target): logits of std ~2, some targets ignored."""
    hidden = inputs.randn(*lead, size, dtype=dtype)
    weight = inputs.randn(vocab, size, dtype=dtype, scale=2.0 / size**0.5)
    b = inputs.randn(vocab, dtype=dtype, scale=0.5) if bias else None
    target = inputs.randint(0, vocab, lead)
    if ignore_frac > 0 and target.numel() > 1:
        ignored = torch.rand(lead, generator=inputs.gen) < ignore_frac
        target = torch.where(ignored, IGNORE, target)
    return hidden, weight, b, target


def run(hidden, weight, target, backend, bias=None, **kwargs):
    return rlhf_ext.linear_token_logprobs(
        hidden, weight, target, bias=bias, ignore_index=IGNORE, backend=backend, **kwargs
    )


def grads_of(hidden, weight, bias, target, g_lp, g_ent, fn):
    """(logprobs, entropy, grad_hidden, grad_weight, grad_bias) of
    sum(g_lp * logprobs + g_ent * entropy) through fn."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    lp, ent = fn(leaves[0], leaves[1], b, target)
    (lp * g_lp.to(lp.dtype)).sum().add((ent * g_ent.to(ent.dtype)).sum()).backward()
    grad_bias = b.grad if b is not None else None
    return lp.detach(), ent.detach(), leaves[0].grad, leaves[1].grad, grad_bias


def reference64(hidden, weight, bias, target, g_lp, g_ent, temperature=1.0):
    def fn(h, w, b, t):
        return reference.linear_token_logprobs(
            h, w, t, bias=b, temperature=temperature, ignore_index=IGNORE, return_entropy=True
        )

    b64 = bias.double() if bias is not None else None
    return grads_of(hidden.double(), weight.double(), b64, target, g_lp, g_ent, fn)


def op_fn(backend, temperature=1.0, chunk_size=None):
    def fn(h, w, b, t):
        return run(h, w, t, backend, bias=b, temperature=temperature, return_entropy=True,
                   chunk_size=chunk_size)  # fmt: skip

    return fn


# Shapes that take every path of the chunk loops: one chunk, chunks that do not
# divide N, a backward split over the vocabulary, and one split over rows too.
CASES = [
    # (name, lead, H, V, chunk_size, bias, temperature)
    ("one_chunk", (6,), 8, 33, None, True, 1.0),
    ("3d_uneven_chunks", (3, 7), 12, 50, 5, False, 0.7),
    ("vocab_split", (20,), 16, 2048, 16, True, 1.0),  # tiles of 20 rows x 1600 columns
    ("row_and_vocab_split", (40,), 8, 1100, 16, True, 1.3),  # tiles of 17 rows x 1024 columns
    ("1d", (), 5, 9, None, True, 2.0),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_linear_token_logprobs_matches_reference(inputs, backend, dtype, case):
    name, lead, size, vocab, chunk, with_bias, temperature = case
    if backend == "triton" and vocab * max(1, torch.Size(lead).numel()) > 50_000:
        pytest.skip("kept small under the Triton interpreter")
    hidden, weight, bias, target = make_inputs(inputs, lead, size, vocab, dtype, with_bias)
    g_lp, g_ent = inputs.randn(lead), inputs.randn(lead)
    got = grads_of(hidden, weight, bias, target, g_lp, g_ent, op_fn(backend, temperature, chunk))
    want = reference64(hidden, weight, bias, target, g_lp, g_ent, temperature)
    lp, ent = got[0], got[1]
    assert lp.dtype == acc(dtype) and lp.shape == target.shape and ent.shape == target.shape
    assert got[2].dtype == dtype and got[2].shape == hidden.shape
    assert got[3].dtype == dtype and got[3].shape == weight.shape
    for out, ref in zip(got, want, strict=True):
        if ref is not None:
            assert_close_ref(out, ref, acc(dtype))
    ignored = target == IGNORE
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (got[2][ignored] == 0).all()
    alone = run(hidden, weight, target, backend, bias=bias, temperature=temperature,
                chunk_size=chunk)  # fmt: skip
    assert torch.equal(alone, lp)  # entropy does not change the logprobs


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_linear_token_logprobs_logprobs_only_and_frozen_weight(inputs, backend):
    """Gradients flow through logprobs alone, and only to the inputs that ask."""
    hidden, weight, bias, target = make_inputs(inputs, (9,), 6, 40, bias=True)
    h = hidden.clone().requires_grad_()
    lp = run(h, weight, target, backend, bias=bias, chunk_size=4)
    g = inputs.randn(9)
    (lp * g).sum().backward()
    h64 = hidden.double().requires_grad_()
    want = reference.linear_token_logprobs(h64, weight.double(), target, bias=bias.double())
    (want * g.double()).sum().backward()
    assert_close_ref(lp.detach(), want.detach(), torch.float32)
    assert_close_ref(h.grad, h64.grad, torch.float32)


@requires_compiled
def test_linear_token_logprobs_gradcheck(inputs):
    hidden, weight, bias, target = make_inputs(inputs, (5,), 4, 7, torch.float64)
    target[1] = IGNORE

    def both(h, w, b):
        return rlhf_ext.linear_token_logprobs(
            h, w, target, bias=b, temperature=0.8, return_entropy=True, chunk_size=2
        )

    args = tuple(t.requires_grad_() for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(both, args)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs triton under the interpreter")
def test_linear_token_logprobs_triton_gradcheck(inputs):
    hidden, weight, bias, target = make_inputs(inputs, (3,), 4, 5, torch.float64)
    target[0] = IGNORE

    def both(h, w, b):
        return rlhf_ext.linear_token_logprobs(
            h, w, target, bias=b, return_entropy=True, chunk_size=2, backend="triton"
        )

    args = tuple(t.requires_grad_() for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(both, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_token_logprobs_low_precision_within_eager_error(inputs, backend, dtype):
    hidden, weight, bias, target = make_inputs(inputs, (24,), 32, 200, dtype, ignore_frac=0.0)
    g_lp, g_ent = inputs.randn(24), torch.zeros(24)
    got = grads_of(hidden, weight, bias, target, g_lp, g_ent, op_fn(backend, chunk_size=16))
    want = reference64(hidden, weight, bias, target, g_lp, g_ent)

    def eager(h, w, b, t):  # PyTorch in the input dtype: matmul, log_softmax, gather
        logp = torch.log_softmax(h @ w.T + b, -1)
        return logp.gather(-1, t[:, None]).squeeze(-1).float(), torch.zeros(24)

    eager_out = grads_of(hidden, weight, bias, target, g_lp, g_ent, eager)
    for k in (0, 2, 3, 4):  # logprobs, grad_hidden, grad_weight, grad_bias
        assert_within_eager_error(got[k], want[k], eager_out[k])
    assert got[2].dtype == dtype and got[3].dtype == dtype and got[4].dtype == dtype


# -- chunking, empty input, ignored tokens ----------------------------------------------


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_linear_token_logprobs_chunk_size_does_not_change_values(inputs, backend):
    hidden, weight, bias, target = make_inputs(inputs, (37,), 8, 64)
    results = [
        run(hidden, weight, target, backend, bias=bias, return_entropy=True, chunk_size=c)
        for c in (1, 7, 16, 37, 1000)
    ]
    # A row's forward sums depend only on V: the same bits with any chunking.
    for lp, ent in results[1:]:
        assert torch.equal(lp, results[0][0]) and torch.equal(ent, results[0][1])


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)  # not the reference's plain matmul
def test_linear_token_logprobs_batch_invariant_and_deterministic(inputs, backend):
    hidden, weight, bias, target = make_inputs(inputs, (21,), 16, 300, ignore_frac=0.0)
    batch = run(hidden, weight, target, backend, bias=bias, return_entropy=True, chunk_size=8)
    for i in (0, 13, 20):
        alone = run(hidden[i : i + 1], weight, target[i : i + 1], backend, bias=bias,
                    return_entropy=True, chunk_size=8)  # fmt: skip
        assert torch.equal(alone[0][0], batch[0][i]) and torch.equal(alone[1][0], batch[1][i])
    again = run(hidden, weight, target, backend, bias=bias, return_entropy=True, chunk_size=8)
    assert torch.equal(again[0], batch[0]) and torch.equal(again[1], batch[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_token_logprobs_empty_and_all_ignored(inputs, backend):
    hidden, weight, bias, _ = make_inputs(inputs, (0,), 4, 10)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = run(h, w, torch.zeros(0, dtype=torch.long), backend, return_entropy=True)
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert h.grad.shape == (0, 4) and (w.grad == 0).all()
    hidden, weight, bias, _ = make_inputs(inputs, (2, 3), 4, 10)
    target = torch.full((2, 3), IGNORE)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    lp, ent = run(h, w, target, backend, bias=b, return_entropy=True)
    assert (lp == 0).all() and (ent == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (h.grad == 0).all() and (w.grad == 0).all() and (b.grad == 0).all()


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_linear_token_logprobs_ignored_rows_not_computed(inputs, backend):
    """A NaN hidden row whose target is ignored never reaches any output."""
    hidden, weight, bias, target = make_inputs(inputs, (6,), 5, 20, ignore_frac=0.0)
    hidden[2] = float("nan")
    target[2] = IGNORE
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    lp, ent = run(h, w, target, backend, bias=b, return_entropy=True, chunk_size=4)
    (lp.sum() + ent.sum()).backward()
    for t in (lp, ent, h.grad, w.grad, b.grad):
        assert torch.isfinite(t).all()
    assert lp[2] == 0 and (h.grad[2] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_token_logprobs_validate(inputs, backend):
    hidden, weight, _, target = make_inputs(inputs, (2, 3), 4, 10, ignore_frac=0.0)
    target[1, 2] = 10
    with pytest.raises(ValueError, match=r"linear_token_logprobs: `target` at position \(1, 2\)"):
        run(hidden, weight, target, backend)
    lp = run(hidden, weight, target, backend, validate=False)
    assert torch.isnan(lp[1, 2]) and torch.isfinite(lp.flatten()[:5]).all()


@requires_compiled
@settings(max_examples=15)
@given(
    rows=st.integers(0, 40),
    size=st.integers(1, 12),
    vocab=st.integers(1, 1200),
    chunk=st.integers(1, 40),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**31),
)
def test_linear_token_logprobs_properties(rows, size, vocab, chunk, ignore_frac, seed):
    """Any shape, chunk and ignore pattern: values and grad_hidden / grad_weight as the
    float64 reference (every path of the tile geometry, one tile to split rows)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, size, generator=gen, dtype=torch.float64)
    target = torch.randint(0, vocab, (rows,), generator=gen)
    target[torch.rand(rows, generator=gen) < ignore_frac] = IGNORE
    g_lp, g_ent = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
    got = grads_of(hidden, weight, None, target, g_lp, g_ent, op_fn("cpu", chunk_size=chunk))
    want = reference64(hidden, weight, None, target, g_lp, g_ent)
    for out, ref in zip(got[:4], want[:4], strict=True):
        assert_close_ref(out, ref, torch.float64)


# -- memory: the logits are never held whole -----------------------------------------------


def _fresh_pages_for_large_buffers() -> bool:
    """glibc: serve every allocation above 64 KiB with a fresh mmap and give the freed
    heap back, so that the resident set grows by every large buffer a call touches
    (memory freed by earlier calls would otherwise be reused unseen). False elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def _peak_extra_mib(rows, size, vocab, chunk, inputs, backend="auto"):
    from bench.harness import peak_extra_memory_mib

    hidden, weight, bias, target = make_inputs(inputs, (rows,), size, vocab, ignore_frac=0.0)
    hidden.requires_grad_()
    weight.requires_grad_()

    def step(_):
        lp = rlhf_ext.linear_token_logprobs(
            hidden, weight, target, bias=bias, chunk_size=chunk, backend=backend
        )
        lp.sum().backward()
        hidden.grad = weight.grad = None

    step(None)  # warm-up: one-time allocations (thread pools, GEMM workspaces)
    peaks = []
    for _ in range(3):  # the least of three: other heap activity only ever adds
        if not _fresh_pages_for_large_buffers():
            return "n/a"
        peaks.append(peak_extra_memory_mib(step, None, torch.device("cpu")))
    return "n/a" if any(isinstance(p, str) for p in peaks) else min(peaks)


@requires_compiled
def test_linear_token_logprobs_peak_memory_bounded_by_chunk(inputs):
    size, vocab, chunk = 16, 16384, 32
    tile_mib = chunk * vocab * 4 / 2**20  # 2 MiB of float32 logits
    weight_mib = vocab * size * 4 / 2**20  # grad_weight, an output
    full_logits_mib = 4096 * vocab * 4 / 2**20  # 256 MiB: what eager holds
    peaks = {rows: _peak_extra_mib(rows, size, vocab, chunk, inputs) for rows in (1024, 4096)}
    if any(isinstance(p, str) for p in peaks.values()):
        pytest.skip("no /proc/self/clear_refs or glibc here")
    # Resident-set accounting also sees small-allocation heap growth (index tensors,
    # per-chunk outputs, thread arenas): a few MiB of slack, far below the logits.
    slack_mib = 8
    for rows, peak in peaks.items():
        # The tile and its gradient in place, the GEMM's packing buffers; grad_weight
        # and grad_hidden (outputs); O(N) per-row tensors.
        bound = 2 * tile_mib + weight_mib + rows * size * 4 * 2 / 2**20 + slack_mib
        assert 0 < peak < bound, (rows, peak, bound)
    # Does not grow with N (the logits of 3072 more rows would be 192 MiB).
    assert peaks[4096] - peaks[1024] < slack_mib, peaks
    # The measurement sees the memory of an op that holds the logits.
    reference_peak = _peak_extra_mib(4096, size, vocab, chunk, inputs, backend="torch")
    assert reference_peak > full_logits_mib, reference_peak


# -- the backward ops: opcheck ----------------------------------------------------------

# (device, backend): the compiled ops on CPU and CUDA tensors, the Triton custom_ops under
# the interpreter and on a GPU.
# -- bad input ---------------------------------------------------------------------------


# bad_inputs rows (id, error, pattern, fn): fn(h, w, b, t, op) with hidden h [3, 4], weight
# w [5, 4], bias b [5], target t [3] and op = rlhf_ext.linear_token_logprobs on the test's
# backend (a `backend=` overrides it).
LINEAR_TOKEN_LOGPROBS_BAD_INPUT = conftest.bad_inputs(
    "",
    (
        "weight-H",
        ValueError,
        r"linear_token_logprobs: `weight` must have shape \[V, 4\] \(H of `hidden`\)",
    ),
    lambda h, w, b, t, op: op(h, w[:, :3], t),
    ("weight-device", ValueError, r"`weight` must be on cpu like `hidden`, got meta"),
    lambda h, w, b, t, op: op(h, w.to("meta"), t),
    ("weight-dtype", TypeError, r"`weight` must have the dtype of `hidden` \(torch.float32\)"),
    lambda h, w, b, t, op: op(h, w.double(), t),
    ("hidden-int64", TypeError, r"`hidden` must be float32"),
    lambda h, w, b, t, op: op(h.long(), w, t),
    ("weight-1d", ValueError, r"`weight` must have shape \[V, H\] with V >= 1"),
    lambda h, w, b, t, op: op(h, w[0], t),
    ("bias-shape", ValueError, r"`bias` must have shape \(5,\)"),
    lambda h, w, b, t, op: op(h, w, t, bias=b[:4]),
    ("target-shape", ValueError, r"`target` must have shape \(3,\)"),
    lambda h, w, b, t, op: op(h, w, t[:2]),
    ("target-float32", TypeError, r"`target` must be int64 or int32"),
    lambda h, w, b, t, op: op(h, w, t.float()),
    (
        "temperature-0",
        ValueError,
        r"linear_token_logprobs: `temperature` must be a finite float > 0",
    ),
    lambda h, w, b, t, op: op(h, w, t, temperature=0.0),
    ("chunk_size-0", ValueError, r"`chunk_size` must be an int >= 1, got 0"),
    lambda h, w, b, t, op: op(h, w, t, chunk_size=0),
    ("chunk_size-float", TypeError, r"`chunk_size` must be an int or None, got float"),
    lambda h, w, b, t, op: op(h, w, t, chunk_size=2.0),
    ("backend-unknown", ValueError, r"`backend` must be one of"),
    lambda h, w, b, t, op: op(h, w, t, backend="gpu"),
)


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
@pytest.mark.parametrize("error, pattern, fn", LINEAR_TOKEN_LOGPROBS_BAD_INPUT)
def test_linear_token_logprobs_bad_input(inputs, backend, error, pattern, fn):
    hidden, weight, bias, target = make_inputs(inputs, (3,), 4, 5, ignore_frac=0.0)
    op = functools.partial(rlhf_ext.linear_token_logprobs, backend=backend)
    with pytest.raises(error, match=pattern):
        fn(hidden, weight, bias, target, op)


# bad_inputs rows (id, error, pattern, fn): fn(h, w, b, t, out, raw) calls a raw op, raw.fwd /
# raw.bwd = torch.ops.rlhf_ext.linear_token_logprobs_fwd / _bwd, with h, w, b, t as above and
# out = (logprobs, entropy, lse, ...) of a valid raw.fwd(h, w, None, t) with entropy.
LINEAR_TOKEN_LOGPROBS_RAW_OP_BAD_INPUT = conftest.bad_inputs(
    "",
    ("fwd-weight-H", ValueError, r"linear_token_logprobs: `weight` must have shape \[V, 4\]"),
    lambda h, w, b, t, out, raw: raw.fwd(h, w[:, :2], None, t, *NO_TRANSFORM, IGNORE, False, 4),
    ("fwd-chunk_size-0", ValueError, r"`chunk_size` must be an int >= 1, got 0"),
    lambda h, w, b, t, out, raw: raw.fwd(h, w, None, t, *NO_TRANSFORM, IGNORE, False, 0),
    ("fwd-bias-shape", ValueError, r"`bias` must have shape \[5\]"),
    lambda h, w, b, t, out, raw: raw.fwd(h, w, b[:3], t, *NO_TRANSFORM, IGNORE, False, 4),
    ("bwd-grad_entropy-without-entropy", ValueError, r"`entropy` is needed with `grad_entropy`"),
    lambda h, w, b, t, out, raw: raw.bwd(
        h, w, None, t, out[2], None, out[0], out[0], *NO_EXTRA_GRADS, *NO_TRANSFORM, IGNORE, 4,
        True, True,
    ),
    ("bwd-grad_log_sum_sq-without-log_sum_sq", ValueError,
     r"`log_sum_sq` is needed with `grad_log_sum_sq`"),
    lambda h, w, b, t, out, raw: raw.bwd(
        h, w, None, t, out[2], None, out[0], None, None, None, out[0], None, *NO_TRANSFORM,
        IGNORE, 4, True, True,
    ),
    ("fwd-extras-unknown-bit", ValueError, r"`extras` must be a combination of the bits 7, got 8"),
    lambda h, w, b, t, out, raw: raw.fwd(h, w, None, t, *NO_TRANSFORM, IGNORE, False, 4, 8),
)  # fmt: skip


@requires_compiled
@pytest.mark.parametrize("error, pattern, fn", LINEAR_TOKEN_LOGPROBS_RAW_OP_BAD_INPUT)
def test_linear_token_logprobs_raw_op_checks(inputs, error, pattern, fn):
    """The compiled ops check their arguments too (they are public via torch.ops)."""
    ops = torch.ops.rlhf_ext
    raw = types.SimpleNamespace(
        fwd=ops.linear_token_logprobs_fwd, bwd=ops.linear_token_logprobs_bwd
    )
    hidden, weight, bias, target = make_inputs(inputs, (3,), 4, 5)
    out = raw.fwd(hidden, weight, None, target, *NO_TRANSFORM, IGNORE, True, 4)
    with pytest.raises(error, match=pattern):
        fn(hidden, weight, bias, target, out, raw)


def test_linear_token_logprobs_auto_chunk_size_ignores_n():
    hidden = torch.empty(3, 64)
    rows = linear_op.resolve_chunk_size(None, 32000, hidden)
    assert rows == linear_op.CPU_BUDGET_BYTES // (32000 * 4) // 16 * 16
    assert linear_op.resolve_chunk_size(None, 32000, torch.empty(10**4, 64)) == rows
    assert linear_op.resolve_chunk_size(None, 10**9, hidden) == 16  # never fewer than 16 rows
    assert linear_op.resolve_chunk_size(7, 32000, hidden) == 7  # honoured


# -- CUDA ------------------------------------------------------------------------------

GPU_BACKENDS = ["cuda", "triton"]


def _need(backend):
    if backend not in rlhf_ext.available_backends("cuda"):
        pytest.skip(f"backend {backend} unavailable on CUDA")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_linear_token_logprobs_cuda(inputs, backend, dtype, case):
    _need(backend)
    name, lead, size, vocab, chunk, with_bias, temperature = case
    cpu = make_inputs(inputs, lead, size, vocab, dtype, with_bias)
    hidden, weight, bias, target = (t.cuda() if t is not None else None for t in cpu)
    g_lp, g_ent = inputs.randn(lead).cuda(), inputs.randn(lead).cuda()
    got = grads_of(hidden, weight, bias, target, g_lp, g_ent, op_fn(backend, temperature, chunk))
    want = reference64(*cpu, g_lp.cpu(), g_ent.cpu(), temperature)
    if dtype == torch.float32:
        for out, ref in zip(got, want, strict=True):
            if ref is not None:
                assert_close_ref(out.cpu(), ref, torch.float32)
    else:

        def eager(h, w, b, t):
            logits = h @ w.T + (b if b is not None else 0)
            return reference.token_logprobs(
                logits, t, temperature=temperature, ignore_index=IGNORE, return_entropy=True
            )

        ref_eager = grads_of(hidden, weight, bias, target, g_lp, g_ent, eager)
        for k in range(5):
            if want[k] is not None:
                assert_within_eager_error(got[k], want[k], ref_eager[k])


@pytest.mark.cuda
def test_linear_token_logprobs_cuda_peak_memory(inputs):
    _need("cuda")
    rows, size, vocab, chunk = 8192, 1024, 32000, 256
    hidden, weight, _, target = (
        t.cuda() if t is not None else None
        for t in make_inputs(inputs, (rows,), size, vocab, torch.bfloat16, bias=False)
    )
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    lp = rlhf_ext.linear_token_logprobs(hidden, weight, target, chunk_size=chunk, backend="cuda")
    lp.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    tile = chunk * vocab * 4  # float32 logits for bf16 inputs on CUDA
    full_logits = rows * vocab * 2
    grads = (rows + vocab) * size * 2
    accumulator = rows * size * 4
    assert extra < 3 * tile + grads + accumulator + rows * size * 2 + (16 << 20), extra
    assert extra < full_logits, extra


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_linear_token_logprobs_double_backward_raises(inputs, backend):
    """The backward kernels have no derivative: asking for a graph of the gradient
    (create_graph=True, as a gradient penalty does) fails loudly, naming the op, never
    comes out silently wrong (test_op_contract.py checks every op and backend)."""
    hidden, weight, bias, target = make_inputs(inputs, (3,), 4, 5, dtype=torch.float64)
    h = hidden.clone().requires_grad_()
    lp = run(h, weight, target, backend, bias=bias)
    with pytest.raises(RuntimeError, match=r"^rlhf_ext\.linear_token_logprobs: second-order"):
        torch.autograd.grad(lp.sum(), h, create_graph=True)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs triton under the interpreter")
def test_linear_token_logprobs_triton_backward_checks_and_layout(inputs):
    """Like the C++ op: grad_entropy without entropy is an error, and grad_weight is
    contiguous whatever the layout of weight (the fake kernel says so)."""
    kernels = linear_op.triton_kernels()  # the Triton ops, with their registrations

    hidden, _, _, target = make_inputs(inputs, (6,), 8, 5)
    weight = inputs.randn(8, 5, scale=0.5).t()  # [V, H] with strides (1, V)
    lp, ent, lse, *_ = kernels.linear_token_logprobs_fwd_triton(
        hidden, weight, None, target, *NO_TRANSFORM, IGNORE, True, 4
    )
    with pytest.raises(ValueError, match=r"^rlhf_ext.linear_token_logprobs: `entropy` is needed"):
        kernels.linear_token_logprobs_bwd_triton(
            hidden, weight, None, target, lse, None, lp, lp, *NO_EXTRA_GRADS, *NO_TRANSFORM,
            IGNORE, 4, True, True,
        )  # fmt: skip
    _, grad_weight, _ = kernels.linear_token_logprobs_bwd_triton(
        hidden, weight, None, target, lse, ent, lp, None, *NO_EXTRA_GRADS, *NO_TRANSFORM, IGNORE,
        4, True, True,
    )  # fmt: skip
    assert grad_weight.is_contiguous()
    want = reference64(hidden, weight, None, target, lp.double(), torch.zeros_like(lp.double()))
    torch.testing.assert_close(grad_weight.double(), want[3], rtol=1e-5, atol=1e-6)


# -- the fused Triton forward ------------------------------------------------------------

FUSED_CASES = [  # (lead, H, V): the interpreter's tiles are 16 rows x 32 columns x 16 of H,
    ((37,), 24, 300),  # spans of 64 columns, row blocks in groups of 2
    ((2, 9), 32, 64),  # H a whole number of k-steps (no k mask), one span
    ((1,), 7, 1),  # one column
    ((50,), 16, 129),  # a span of one column at the end
]


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs triton under the interpreter")
@pytest.mark.parametrize("case", FUSED_CASES, ids=str)
def test_linear_token_logprobs_triton_fused_forward_tiles(inputs, case):
    """Rows, columns and H not multiples of the tiles; spans and groups cut anywhere."""
    lead, size, vocab = case
    hidden, weight, bias, target = make_inputs(inputs, lead, size, vocab)
    got = run(hidden, weight, target, "triton", bias=bias, return_entropy=True, temperature=0.7)
    want = reference.linear_token_logprobs(
        hidden.double(), weight.double(), target, bias=bias.double(), temperature=0.7,
        ignore_index=IGNORE, return_entropy=True,
    )  # fmt: skip
    for out, ref in zip(got, want, strict=True):
        assert_close_ref(out, ref, torch.float32)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs triton under the interpreter")
def test_linear_token_logprobs_triton_fused_forward_masked_vocabulary(inputs):
    """-inf logits (a bias masking columns): a span with no finite logit adds nothing."""
    hidden, weight, bias, target = make_inputs(inputs, (20,), 16, 300, ignore_frac=0.2)
    bias[64:128] = float("-inf")  # one whole span of the interpreter's 64 columns
    bias[::7] = float("-inf")
    finite = torch.nonzero(torch.isfinite(bias)).flatten()
    target = torch.where(target == IGNORE, IGNORE, finite[target % finite.numel()])
    g_lp, g_ent = inputs.randn(20), inputs.randn(20)
    got = grads_of(hidden, weight, bias, target, g_lp, g_ent, op_fn("triton"))
    want = reference64(hidden, weight, bias, target, g_lp, g_ent)
    for out, ref in zip(got, want, strict=True):
        assert torch.isfinite(out).all()
        assert_close_ref(out, ref, torch.float32)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs triton under the interpreter")
def test_linear_token_logprobs_triton_strided_bias_and_weight(inputs):
    """Inputs of any strides: a bias of stride 2, a weight transposed in memory."""
    hidden, weight, bias, target = make_inputs(inputs, (20,), 24, 300)
    strided_bias = torch.stack([bias, -bias], 1)[:, 0]
    weight_t = weight.T.contiguous().T  # column-major [V, H]
    got = run(hidden, weight_t, target, "triton", bias=strided_bias, return_entropy=True)
    want = reference.linear_token_logprobs(
        hidden.double(), weight.double(), target, bias=bias.double(), ignore_index=IGNORE,
        return_entropy=True,
    )  # fmt: skip
    for out, ref in zip(got, want, strict=True):
        assert_close_ref(out, ref, torch.float32)


def _confident_rows_within_eager_error(inputs, backend, dtype, device="cpu"):
    """Rows whose target has p ~ 1 (logit ~30 over ~22: a bf16 step there is 0.125): the
    gradient 1 - p is tiny next to p times the logits' rounding, so the backward must
    see the logits its forward saw: float32 logits on both sides (the Triton backend
    everywhere, the CUDA backend). The CPU backend's bf16 tiles are left out: its
    forward and backward GEMMs differ in shape and may round a logit differently
    (seen: up to 6x eager's error on grad_weight; docs/performance.md)."""
    rows, size, vocab = 8, 16, 64
    hidden = torch.cat([torch.ones(rows, 1), inputs.randn(rows, size - 1, scale=0.05)], 1)
    weight = inputs.randn(vocab, size, scale=0.05)
    weight[:, 0] = 22.0
    weight[0, 0] = 30.3
    target = torch.zeros(rows, dtype=torch.long)
    cpu = hidden.to(dtype), weight.to(dtype), target
    hidden, weight, target = (t.to(device) for t in cpu)
    g_lp, g_ent = inputs.randn(rows).to(device), torch.zeros(rows, device=device)
    got = grads_of(hidden, weight, None, target, g_lp, g_ent, op_fn(backend))
    want = reference64(*cpu[:2], None, target.cpu(), g_lp.cpu(), g_ent.cpu())

    def eager(h, w, b, t):
        logp = torch.log_softmax(h @ w.T, -1)
        return logp.gather(-1, t[:, None]).squeeze(-1).float(), torch.zeros_like(g_ent)

    eager_out = grads_of(hidden, weight, None, target, g_lp, g_ent, eager)
    # With bf16 logits in the backward the Triton error here was ~50x eager's.
    for k in (0, 2, 3):  # logprobs, grad_hidden, grad_weight
        assert_within_eager_error(got[k], want[k], eager_out[k])


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs triton under the interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_token_logprobs_confident_rows_low_precision(inputs, dtype):
    _confident_rows_within_eager_error(inputs, "triton", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_token_logprobs_cuda_confident_rows_low_precision(inputs, backend, dtype):
    if backend not in rlhf_ext.available_backends("cuda"):
        pytest.skip(f"backend {backend} unavailable on CUDA")
    _confident_rows_within_eager_error(inputs, backend, dtype, device="cuda")


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs triton under the interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("size", [128, 96], ids=["H128", "H96"])
def test_linear_token_logprobs_triton_gpu_tiles_under_interpreter(inputs, monkeypatch, dtype,
                                                                  size):  # fmt: skip
    """The GPU's launch parameters (128x128 tiles, 4096-column spans, k-steps of 64 or 32),
    run by the interpreter: the tests above use its small tiles. (bf16 needs the GPU: the
    interpreter's dot reads bf16's raw bits, which the small-tile path converts.)"""
    kernels = linear_op.triton_kernels()  # the Triton ops, with their registrations

    monkeypatch.setattr(kernels, "triton_interpreting", lambda: False)
    hidden, weight, bias, target = make_inputs(inputs, (48,), size, 4500, dtype)
    lp, ent, *_ = kernels.linear_token_logprobs_fwd_triton(
        hidden, weight, bias, target, 0.9, None, 1.0, 0.0, IGNORE, True, 16
    )
    want = reference.linear_token_logprobs(
        hidden.double(), weight.double(), target, bias=bias.double(), temperature=0.9,
        ignore_index=IGNORE, return_entropy=True,
    )  # fmt: skip
    assert_close_ref(lp, want[0], torch.float32)
    assert_close_ref(ent, want[1], torch.float32)
    alone = kernels.linear_token_logprobs_fwd_triton(
        hidden[5:6], weight, bias, target[5:6], 0.9, None, 1.0, 0.0, IGNORE, True, 16
    )
    assert torch.equal(alone[0][0], lp[5]) and torch.equal(alone[1][0], ent[5])


@pytest.mark.cuda
@pytest.mark.triton_gpu
def test_linear_token_logprobs_triton_forward_holds_no_logits(inputs):
    """The fused forward's extra memory is per-row statistics, not logits."""
    rows, size, vocab = 4096, 1024, 32000
    hidden, weight, _, target = (
        t.cuda() if t is not None else None
        for t in make_inputs(inputs, (rows,), size, vocab, torch.bfloat16, bias=False)
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    rlhf_ext.linear_token_logprobs(hidden, weight, target, return_entropy=True, backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 64 * rows * (vocab // 4096 + 2) + (4 << 20), extra  # one logits row: 64 KB
