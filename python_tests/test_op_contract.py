"""The contract every op keeps (docs/design.md §2), checked over (op x device x backend)
from one sample generator per op:

* opcheck on every dispatcher op the public function calls (forward and backward),
  with the arguments it really calls them with (recorded through a TorchFunctionMode in
  the forward, with the inputs' requires_grad, and a TorchDispatchMode in the backward);
* torch.compile(fullgraph=True) gives the eager bits, outputs and gradients;
* an unknown or unavailable backend is an error that names the op;
* the Python vocabularies and chunk-loop constants equal the C++ ones
  (rlhf_ext._C.build_info()), and the Triton chunk loop sizes its tiles as the C++ one.

Adding an op: add its sample generator to SAMPLES (docs/adding-an-op.md).
"""

from __future__ import annotations

import contextlib
import zlib

import pytest
import torch
from conftest import COMPILED, HAS_CUDA, TRITON_CPU, TRITON_CUDA, Inputs, requires_compiled
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_ext
from rlhf_ext.ops import _vocab

IGNORE = -100
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


# -- one sample generator per op: (positional args, keyword args, differentiable args) --
# Differentiable args are named by position (int) or keyword (str).


def gae_samples(inp: Inputs, device):
    B, T = 3, 11
    r, v = inp.randn(B, T, device=device), inp.randn(B, T, device=device)
    mask = inp.mask(B, T, device=device)
    yield (r, v), dict(gamma=0.99, lam=0.95), ()  # no mask, no bootstrap, scalar rates
    yield (
        (r, v, mask),
        dict(gamma=0.99, lam=0.95, last_value=inp.randn(B, device=device)),
        (),
    )
    rates = dict(gamma=inp.uniform(B, device=device), lam=inp.uniform(B, device=device))
    yield (r, v, mask), dict(**rates, last_value=inp.randn(B, device=device)), ()  # per-row
    cu = torch.tensor([0, 5, 5, B * T], dtype=torch.int32, device=device)  # an empty segment
    yield (
        (r.flatten(), v.flatten(), inp.mask(B * T, device=device)),
        dict(cu_seqlens=cu, gamma=inp.uniform(3, device=device), lam=0.9,
             last_value=inp.randn(3, device=device)),
        (),
    )  # fmt: skip
    one = torch.tensor([0, B * T], device=device)  # int64 offsets, one segment
    yield (r.flatten(), v.flatten()), dict(cu_seqlens=one, gamma=0.9, lam=0.8), ()
    yield (r.bfloat16(), v.bfloat16(), mask.to(torch.uint8)), dict(gamma=0.9, lam=0.8), ()
    last64 = inp.randn(B, dtype=torch.float64, device=device)
    yield (r.bfloat16(), v.double(), mask), dict(gamma=0.9, lam=0.8, last_value=last64), ()
    yield (inp.randn(0, T, device=device), inp.randn(0, T, device=device)), {}, ()
    empty_rows = (inp.randn(B, 0, device=device), inp.randn(B, 0, device=device))
    yield empty_rows, dict(last_value=inp.randn(B, device=device)), ()


def masked_mean_samples(inp: Inputs, device):
    x, mask = inp.randn(4, 9, device=device), inp.mask(4, 9, device=device)
    yield (x, mask), {}, (0,)
    yield (x, mask, 1), {}, (0,)
    yield (x.bfloat16(), None, -2), {}, (0,)
    yield (x.bfloat16(), mask), {}, (0,)
    yield (x.double(), mask.to(torch.uint8)), {}, (0,)
    x3 = inp.randn(2, 3, 5, device=device)
    yield (x3, None, -2), {}, (0,)  # a middle dimension
    yield (x3.double(), inp.mask(2, 3, 5, device=device).to(torch.uint8), 0), {}, (0,)
    yield (inp.randn(0, 6, device=device), None, 1), {}, (0,)  # an empty batch


def masked_whiten_samples(inp: Inputs, device):
    x, mask = inp.randn(4, 9, device=device), inp.mask(4, 9, device=device)
    yield (x, mask), dict(eps=1e-6), ()
    yield (x.double(),), dict(shift_mean=False, unbiased=False, eps=0.1), ()
    yield (x.bfloat16(), mask.float()), dict(unbiased=False, eps=1e-5), ()


def kl_shaped_rewards_samples(inp: Inputs, device):
    B, T = 3, 7
    lp, ref = inp.randn(B, T, device=device), inp.randn(B, T, device=device)
    scores, mask = inp.randn(B, device=device), inp.mask(B, T, device=device)
    yield (scores, lp, ref, mask), dict(kl_coef=0.1, kl="k3"), ()
    yield (scores, lp, ref, mask), dict(kl_coef=0.1), ()  # k1, the default
    yield (scores, lp, ref, None), dict(kl_coef=0.05, kl="k3"), ()
    yield (scores, lp.double(), ref.double(), mask.float()), dict(kl_coef=0.2, kl="abs"), ()
    yield (
        (scores.bfloat16(), lp.bfloat16(), ref.bfloat16(), mask),
        dict(kl_coef=0.2, kl="mse"),
        (),
    )
    empty = inp.randn(0, T, device=device)
    yield (inp.randn(0, device=device), empty, empty), dict(kl_coef=0.1, kl="k2"), ()
    no_tokens = inp.randn(B, 0, device=device)
    yield (scores, no_tokens, no_tokens), dict(kl_coef=0.1, kl="low_var_kl"), ()


def token_logprobs_samples(inp: Inputs, device):
    logits = inp.randn(3, 4, 21, device=device)
    target = inp.randint(0, 21, (3, 4)).to(device)
    target[0, 1] = IGNORE
    yield (logits, target), dict(temperature=0.9, return_entropy=True), (0,)
    yield (logits[:, :-1], target[:, :-1]), {}, (0,)  # strided rows, read in place
    yield (logits.bfloat16(), target.int()), dict(return_entropy=True), (0,)
    yield (logits.double(), target), dict(temperature=1.3), (0,)
    # The backward writes the gradient into the logits buffer (a fresh leaf each run).
    yield (logits, target), dict(return_entropy=True, inplace_backward=True), (0,)
    # The logit transforms (issue 17): a softcap and a scale, per-token and per-sequence
    # temperatures (a tensor argument of the dispatcher op).
    per_token = inp.uniform(3, 4, low=0.5, high=1.5, device=device)
    kwargs = dict(temperature=per_token, softcap=8.0, logit_scale=1.5, return_entropy=True)
    yield (logits, target), kwargs, (0,)
    yield (logits.double(), target), dict(temperature=per_token[:, 0].double()), (0,)
    yield (logits.bfloat16(), target), dict(softcap=4.0, temperature=0.8), (0,)
    # Every extra output (issue 17 item 3), and a subset without the entropy.
    yield (logits, target), dict(outputs=_vocab.LOGPROB_OUTPUTS, softcap=6.0), (0,)
    yield (logits.double(), target), dict(outputs=("lse", "log_sum_sq_probs")), (0,)
    yield (logits, target), dict(outputs=("mean_logits", "is_top1"), inplace_backward=True), (0,)


def linear_token_logprobs_samples(inp: Inputs, device):
    hidden, weight = inp.randn(2, 5, 8, device=device), inp.randn(37, 8, scale=0.5, device=device)
    target = inp.randint(0, 37, (2, 5)).to(device)
    target[1, 2] = IGNORE
    bias = inp.randn(37, device=device)
    kwargs = dict(bias=bias, temperature=0.7, return_entropy=True, chunk_size=4)
    yield (hidden, weight, target), kwargs, (0, 1, "bias")
    yield (hidden[:, 1:], weight, target[:, 1:]), dict(chunk_size=16), (0, 1)
    yield (hidden.double(), weight.double(), target), dict(bias=bias.double()), (0, "bias")
    yield (hidden, weight, target), dict(chunk_size=2), (1,)  # grad_weight only
    # The extra outputs (issue 17 item 3), with a softcap and per-token temperatures.
    temps = inp.uniform(2, 5, low=0.5, high=1.5, device=device)
    every = dict(bias=bias, outputs=_vocab.LOGPROB_OUTPUTS, temperature=temps, softcap=5.0)
    yield (hidden, weight, target), dict(every, chunk_size=4), (0, 1, "bias")
    yield (hidden.double(), weight.double(), target), dict(outputs=("log_sum_sq_probs",)), (0, 1)
    yield (hidden, weight, target), dict(outputs=("mean_logits", "is_top1")), (0,)


def _loss_inputs(inp: Inputs, device, count: int):
    B, T = 3, 10
    return [inp.randn(B, T, device=device) for _ in range(count)], inp.mask(B, T, device=device)


def ppo_policy_loss_samples(inp: Inputs, device):
    (lp, old, adv), mask = _loss_inputs(inp, device, 3)
    old = lp + 0.3 * old  # ratios near 1: some clipped, some not
    yield (lp, old, adv, mask), dict(clip_eps_high=0.28, dual_clip=3.0), (0,)
    yield (lp, old, adv, mask), dict(agg="seq-mean-token-sum-norm", loss_scale_factor=4.0), (0,)
    yield (lp.double(), old.double(), adv.double(), None), dict(agg="seq-mean-token-sum"), (0,)
    yield (lp.bfloat16(), old, adv, mask.to(torch.uint8)), {}, (0,)  # promoted to float32
    yield (
        (lp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask.float()),
        dict(clip_eps=0.1, agg="seq-mean-token-mean"),
        (0,),
    )  # bfloat16 kernels, loss_backward to bfloat16
    empty = inp.randn(0, 4, device=device)
    yield (empty, empty, empty, None), {}, (0,)


def policy_loss_samples(inp: Inputs, device):
    (lp, old, adv), mask = _loss_inputs(inp, device, 3)
    old = lp + 0.3 * old
    rows = adv[:, 0].contiguous()
    yield (lp, old, rows, mask), dict(kind="gspo", clip_eps=0.1), (0,)  # gradient via the mean
    yield (lp, old, adv, mask), dict(kind="gspo_token", agg="seq-mean-token-mean"), (0,)
    yield (lp, old, rows, mask), dict(kind="cispo", clip_eps_high=0.3), (0,)
    yield (lp.double(), old.double(), adv.double(), None), dict(kind="sapo"), (0,)
    yield (lp, old, adv, mask.float()), dict(kind="dppo_kl", clip_eps=0.01), (0,)
    yield (lp, old, rows, mask), dict(kind="dppo_tv", agg="seq-mean-token-sum"), (0,)
    yield (lp, old, adv, mask), dict(kind="dro", beta=0.1), (0,)
    yield (lp.bfloat16(), old.bfloat16(), rows.bfloat16(), mask), dict(kind="reinforce"), (0,)
    # a row-level kind: level 2 computes the row loss from the row's sums
    yield (lp, old, adv, mask), dict(kind="geo_mean", clip_eps=0.05, agg="seq-mean-token-sum"), (0,)


def value_loss_samples(inp: Inputs, device):
    (v, old, ret), mask = _loss_inputs(inp, device, 3)
    yield (v, old, ret, mask), dict(clip_eps=0.2, agg="seq-mean-token-mean"), (0,)
    yield (v, old, ret, mask), dict(clip_eps=0.2, agg="seq-mean-token-sum"), (0,)
    yield (v.double(), old.double(), ret.double(), None), {}, (0,)


def kl_penalty_samples(inp: Inputs, device):
    (lp, ref), _ = _loss_inputs(inp, device, 2)
    yield (lp, ref), dict(kind="k3"), (0,)
    yield (lp, ref), dict(kind="k1+"), (0,)
    yield (lp, ref), dict(kind="low_var_kl"), (0,)
    yield (lp, ref), dict(kind="k2"), (0,)
    yield (lp.double()[:, ::2], ref.double()[:, ::2]), dict(kind="abs"), (0,)


def kl_loss_samples(inp: Inputs, device):
    (lp, ref), mask = _loss_inputs(inp, device, 2)
    yield (lp, ref, mask), dict(kind="low_var_kl", agg="seq-mean-token-sum"), (0,)
    yield (lp, ref, mask), {}, (0,)  # k3, token-mean: the defaults
    yield (lp, ref, mask), dict(kind="k3+"), (0,)
    yield (lp.double(), ref.double(), None), dict(kind="k2+"), (0,)
    yield (lp.double(), ref.double(), None), dict(kind="k1+", agg="seq-mean-token-mean"), (0,)


def group_advantages_samples(inp: Inputs, device):
    B = 12
    scores = inp.randn(B, device=device)
    ids = torch.tensor([4, 0, 4, 2, 0, 4, 2, 2, 0, 9, 4, 0], device=device)
    yield (scores, ids), {}, ()  # GRPO: the group's mean and std
    yield (scores.double(), None), dict(group_size=3, baseline="leave_one_out", scale="none"), ()
    lengths = inp.randint(1, 30, (B,)).to(device)
    yield (
        (scores.bfloat16(), ids.int()),
        dict(baseline="length_weighted", lengths=lengths, scale="batch", eps_mode="clamp",
             singleton="raw", nonzero_rescale=True),
        (),
    )  # fmt: skip
    yield (scores, ids[:B]), dict(baseline="given", baselines=inp.randn(B, device=device)), ()
    yield (
        (inp.randn(B, 2, device=device), ids),
        dict(weights=torch.tensor([1.0, 0.5], device=device)),
        (),
    )
    yield (inp.randn(0, device=device), ids[:0]), {}, ()


SAMPLES = {
    "gae": gae_samples,
    "group_advantages": group_advantages_samples,
    "masked_mean": masked_mean_samples,
    "masked_whiten": masked_whiten_samples,
    "kl_shaped_rewards": kl_shaped_rewards_samples,
    "token_logprobs": token_logprobs_samples,
    "linear_token_logprobs": linear_token_logprobs_samples,
    "policy_loss": policy_loss_samples,
    "ppo_policy_loss": ppo_policy_loss_samples,
    "value_loss": value_loss_samples,
    "kl_penalty": kl_penalty_samples,
    "kl_loss": kl_loss_samples,
}

# The vocabulary-parallel ops run the ops above on each rank's shard and merge over a
# process group: they call no dispatcher op of their own, and their contract (every
# backend's results, gradients, invariance, errors on every rank) is checked on 2 and 4
# processes in python_tests/test_vocab_parallel.py.
DISTRIBUTED_OPS = {"vocab_parallel_token_logprobs", "vocab_parallel_linear_token_logprobs"}
# The public ops that are not helpers (rlhf_ext.__all__ minus the backend / version API).
PUBLIC_OPS = sorted(
    set(rlhf_ext.__all__) - {"__version__", "BackendUnavailableError", "available_backends",
                             "build_info"} - DISTRIBUTED_OPS
)  # fmt: skip


def test_every_public_op_has_samples():
    assert sorted(SAMPLES) == PUBLIC_OPS
    assert DISTRIBUTED_OPS <= set(rlhf_ext.__all__)


# -- the (op, device, backend) grid ---------------------------------------------------


def _kernel_backends(device: str) -> list[str]:
    """The kernel backends (not the torch reference) that run on `device` here."""
    found = [b for b in ("cpu", "cuda", "triton") if b in rlhf_ext.available_backends(device)]
    return found


GRID = [
    pytest.param(op, device, backend, id=f"{op}-{device}-{backend}",
                 marks=[pytest.mark.cuda] if device == "cuda" else [])
    for op in SAMPLES
    for device in DEVICES
    for backend in _kernel_backends(device)
]  # fmt: skip


def _inputs(request) -> Inputs:
    return Inputs(zlib.crc32(request.node.nodeid.encode()))


def _call(op: str, args, kwargs, backend: str):
    return getattr(rlhf_ext, op)(*args, **kwargs, backend=backend)


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of an op's result: a tensor, a tuple (None entries: outputs not asked
    for), or (loss, stats dict)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if out is None:
        return []
    found = []
    for item in out:
        found += list(item.values()) if isinstance(item, dict) else _tensors(item)
    return found


def _with_grad(args, kwargs, differentiable):
    """Fresh leaf copies of the differentiable arguments (the rest shared)."""
    args, kwargs = list(args), dict(kwargs)
    leaves = []
    for key in differentiable:
        holder = args if isinstance(key, int) else kwargs
        leaf = _strided_copy(holder[key]).requires_grad_()  # strided inputs stay strided
        holder[key] = leaf
        leaves.append(leaf)
    return args, kwargs, leaves


def _run(fn, args, kwargs, differentiable, recorder=None):
    """Outputs and the gradients of sum(outputs) w.r.t. the differentiable args; with a
    RecordRlhfOps, the dispatcher ops of both passes are recorded."""
    forward = recorder if recorder is not None else contextlib.nullcontext()
    backward = recorder.backward() if recorder is not None else contextlib.nullcontext()
    args, kwargs, leaves = _with_grad(args, kwargs, differentiable)
    with forward:
        outputs = _tensors(fn(*args, **kwargs))
    if leaves:
        total = sum(o.sum() for o in outputs if o.requires_grad)
        with backward:
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
        outputs += [g for g in grads if g is not None]
    return [o.detach() for o in outputs]


# -- opcheck on the dispatcher ops the public function calls ------------------------


def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of `t` with its strides (clone() makes a sliced view contiguous)."""
    copy = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return copy.copy_(t.detach())


class RecordRlhfOps(TorchFunctionMode):
    """Records every torch.ops.rlhf_ext.* call (op, args, kwargs) made inside it, with
    the inputs' requires_grad (so opcheck tests the autograd registration), and, inside
    its backward() mode, the ops the backward pass calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        overload = _rlhf_overload(func)
        if overload is not None:
            self.calls.append((overload, _snapshot(args), _snapshot(kwargs)))
        return func(*args, **kwargs)

    def backward(self):
        """A dispatch mode for the backward pass: torch.autograd.grad runs with this
        function mode switched off, but dispatch modes reach the backward's ops."""
        return _RecordBackwardOps(self.calls)


class _RecordBackwardOps(TorchDispatchMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        overload = _rlhf_overload(func)
        if overload is not None:  # below autograd: the backward's inputs need no grad
            self.calls.append((overload, _snapshot(args, grad=False), _snapshot(kwargs, False)))
        return func(*args, **kwargs)


def _rlhf_overload(func):
    """The OpOverload of an rlhf_ext dispatcher op (called as torch.ops.rlhf_ext.x, an
    OpOverloadPacket, or through a Triton op's own object), else None."""
    if isinstance(func, torch._ops.OpOverloadPacket):
        func = getattr(func, func.overloads()[0])
    if isinstance(func, torch._ops.OpOverload) and func._schema.name.startswith("rlhf_ext::"):
        return func
    return None


def _snapshot(value, grad: bool = True):
    """A copy of the tensors in `value` with their strides (later calls may mutate
    or free the originals: the in-place backward writes into the logits), requiring
    grad as the originals do (with `grad`)."""
    if isinstance(value, torch.Tensor):
        copy = _strided_copy(value) if _is_dense(value) else value.detach().clone()
        return copy.requires_grad_(grad and value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v, grad) for v in value)
    if isinstance(value, dict):
        return {k: _snapshot(v, grad) for k, v in value.items()}
    return value


def _is_dense(t: torch.Tensor) -> bool:
    """No element shared by two indices (an expanded, stride-0 gradient shares them:
    it is copied compact, with its values)."""
    return all(stride > 0 or size <= 1 for size, stride in zip(t.shape, t.stride(), strict=True))


# Triton ops that are triton_ops cannot go through opcheck's fake tracing under the
# interpreter (it enters the interpreter); linear_token_logprobs' pair are custom_ops
# with fake kernels and can.
INTERPRETER_OPCHECK = {
    "rlhf_ext::linear_token_logprobs_fwd_triton",
    "rlhf_ext::linear_token_logprobs_bwd_triton",
}


def _opcheck_here(func, device: str) -> bool:
    name = func._schema.name
    if not name.endswith("_triton") or device == "cuda":
        return True
    return name in INTERPRETER_OPCHECK


@pytest.mark.parametrize("op, device, backend", GRID)
def test_opcheck_every_dispatcher_op(request, op, device, backend):
    inp = _inputs(request)
    recorded = 0
    for args, kwargs, differentiable in SAMPLES[op](inp, device):
        recorder = RecordRlhfOps()
        _run(lambda *a, **k: _call(op, a, k, backend), args, kwargs, differentiable, recorder)
        for func, op_args, op_kwargs in recorder.calls:
            if _opcheck_here(func, device):
                torch.library.opcheck(func, op_args, op_kwargs)
                recorded += 1
    if backend != "triton" or device == "cuda":  # under the interpreter: the linear pair only
        assert recorded, f"{op}: no dispatcher op was called on backend={backend!r}"


# -- torch.compile parity --------------------------------------------------------------


@pytest.mark.parametrize("op, device, backend", GRID)
def test_compile_parity(request, op, device, backend):
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile over triton_ops enters the interpreter (docs/design.md §5)")
    inp = _inputs(request)
    for args, kwargs, differentiable in SAMPLES[op](inp, device):
        # Python scalars are the op's settings: constants of the graph, as in a training
        # step (passed as arguments, Dynamo would make floats symbolic).
        settings = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}

        def fn(*a, _settings=settings, **k):
            return _call(op, a, {**k, **_settings}, backend)

        torch._dynamo.reset()  # each sample compiles afresh (no automatic-dynamic floats)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        eager_out = _run(fn, args, tensors, differentiable)
        compiled_out = _run(compiled, args, tensors, differentiable)
        assert len(eager_out) == len(compiled_out)
        for e, c in zip(eager_out, compiled_out, strict=True):
            torch.testing.assert_close(c, e, rtol=0, atol=0, equal_nan=True)


# -- backend errors ---------------------------------------------------------------------


BACKEND_ERRORS = [
    pytest.param("cpu", "nope", ValueError, r"`backend` must be one of .*'nope'", id="unknown"),
    pytest.param("cpu", "cuda", rlhf_ext.BackendUnavailableError,
                 r"backend='cuda' is unavailable: .*cpu", id="cuda-on-cpu-tensors"),
    pytest.param("cpu", "triton", rlhf_ext.BackendUnavailableError, r"backend='triton' is "
                 r"unavailable", id="triton-unavailable",
                 marks=pytest.mark.skipif(TRITON_CPU, reason="triton runs here")),
    pytest.param("cuda", "cpu", rlhf_ext.BackendUnavailableError,
                 r"backend='cpu' is unavailable: .*cuda", id="cpu-on-cuda-tensors",
                 marks=pytest.mark.cuda),
]  # fmt: skip


@pytest.mark.parametrize("device, backend, error, pattern", BACKEND_ERRORS)
@pytest.mark.parametrize("op", sorted(SAMPLES))
def test_backend_errors_name_the_op_and_why(request, op, device, backend, error, pattern):
    args, kwargs, _ = next(SAMPLES[op](_inputs(request), device))
    with pytest.raises(error, match=rf"^rlhf_ext\.{op}: {pattern}"):
        _call(op, args, kwargs, backend)


# -- non-finite inputs and second derivatives: the same answer on every backend ---------

# The ops whose backward kernels have no derivative: a second-order gradient is an error
# naming the op. masked_mean's backward is plain torch arithmetic (its second derivative,
# zero, is right) and the torch backend differentiates through autograd.
FIRST_ORDER_ONLY = {
    "token_logprobs",
    "linear_token_logprobs",
    "policy_loss",
    "ppo_policy_loss",
    "value_loss",
    "kl_penalty",
    "kl_loss",
}
# The op whose backward an op's error names: ppo_policy_loss is policy_loss(kind="ppo").
BACKWARD_NAME = {"ppo_policy_loss": "policy_loss"}
# Where an op is told which tokens it does not read: the position of its `mask`
# argument, or of the target whose ignore_index marks a row as unread.
MASK_ARG = {"gae": 2, "masked_mean": 1, "masked_whiten": 1, "kl_shaped_rewards": 3,
            "policy_loss": 3, "ppo_policy_loss": 3, "value_loss": 3, "kl_loss": 2}  # fmt: skip
TARGET_ARG = {"token_logprobs": 1, "linear_token_logprobs": 2}
NON_FINITE = [float("nan"), float("inf"), float("-inf")]


def _unread_tokens(op, args) -> torch.Tensor | None:
    """True over the token shape where the op must not read its inputs (None: all read)."""
    if op in TARGET_ARG:
        return args[TARGET_ARG[op]] == IGNORE
    at = MASK_ARG.get(op)
    mask = args[at] if at is not None and len(args) > at else None
    return None if mask is None else mask == 0


def _poisoned(op, args, value, *, unread: bool):
    """(position, index, args) with `value` written into one floating tensor input: at
    its first read token (unread=False: every such input), or at its first unread token
    (unread=True: the inputs laid out over the tokens). Inputs without a token layout
    (an LM head's weight, per-row scores) are poisoned at their first element when read."""
    skip = _unread_tokens(op, args)
    for position, arg in enumerate(args):
        if not (isinstance(arg, torch.Tensor) and arg.is_floating_point() and arg.numel()):
            continue
        if position == MASK_ARG.get(op):  # a float mask selects; it is not data
            continue
        token_shaped = skip is not None and arg.shape[: skip.dim()] == skip.shape
        if token_shaped:
            chosen = (skip if unread else ~skip).nonzero()
            if not len(chosen):
                continue
            index = (*chosen[0].tolist(), *[0] * (arg.dim() - skip.dim()))
        elif unread:
            continue
        else:
            index = (0,) * arg.dim()
        poisoned = list(args)
        poisoned[position] = _strided_copy(arg)
        poisoned[position][index] = value
        yield position, index, poisoned


def _non_finite_classes(t: torch.Tensor) -> list[torch.Tensor]:
    t = t.cpu()
    return [torch.isnan(t), torch.isposinf(t), torch.isneginf(t)]


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("op, device, backend", GRID)
def test_non_finite_input_gives_the_torch_backends_non_finites(request, op, device, backend, value):
    """A NaN or inf in any input at a read token reaches the outputs, the statistics and
    the gradients exactly where the torch reference puts NaN / +inf / -inf, so that a
    trainer's non-finite guard fires on every backend (tl.minimum / tl.maximum / tl.max
    and a comparison-based clamp drop NaN unless told otherwise)."""
    for args, kwargs, differentiable in SAMPLES[op](_inputs(request), device):
        for position, index, poisoned in _poisoned(op, args, value, unread=False):
            want = _run(lambda *a, **k: _call(op, a, k, "torch"), poisoned, kwargs, differentiable)
            got = _run(lambda *a, **k: _call(op, a, k, backend), poisoned, kwargs, differentiable)
            for w, g in zip(want, got, strict=True):
                classes = zip(_non_finite_classes(w), _non_finite_classes(g), strict=True)
                for w_class, g_class in classes:
                    assert torch.equal(g_class, w_class), (position, index, w, g)


# masked_whiten maps every element, a masked one too, through the valid tokens' affine
# transform: only the poisoned element itself changes.
MAPS_UNREAD_ELEMENTS = {"masked_whiten"}
UNREAD_OPS = [*MASK_ARG, *TARGET_ARG]


@pytest.mark.parametrize("value", NON_FINITE[:2], ids=["nan", "inf"])
@pytest.mark.parametrize(
    "op, device, backend",
    [*[p for p in GRID if p.values[0] in UNREAD_OPS],
     *[pytest.param(op, "cpu", "torch", id=f"{op}-cpu-torch") for op in UNREAD_OPS]],
)  # fmt: skip
def test_non_finite_at_an_unread_token_changes_nothing(request, op, device, backend, value):
    """A masked token (or an ignored row) is not read: a NaN or inf there, in any input,
    leaves the outputs, the statistics and every gradient as they are (0 at that token),
    the torch reference included."""
    for args, kwargs, differentiable in SAMPLES[op](_inputs(request), device):
        want = _run(lambda *a, **k: _call(op, a, k, backend), args, kwargs, differentiable)
        for position, index, poisoned in _poisoned(op, args, value, unread=True):
            got = _run(lambda *a, **k: _call(op, a, k, backend), poisoned, kwargs, differentiable)
            for k, (w, g) in enumerate(zip(want, got, strict=True)):
                if op in MAPS_UNREAD_ELEMENTS and k == 0:
                    w, g = w.clone(), g.clone()
                    w[index] = g[index] = 0
                where = f"input {position} at {index}"
                torch.testing.assert_close(
                    g, w, rtol=0, atol=0, msg=lambda m, at=where: f"{at}: {m}"
                )


# The Triton interpreter (TRITON_INTERPRET=1, Triton on the CPU here) is not
# thread-safe (docs/api.md "Threads"); compiled Triton on a GPU is in the grid.
THREADED_GRID = [p for p in GRID if not (p.values[1] == "cpu" and p.values[2] == "triton")]


@pytest.mark.parametrize("op, device, backend", THREADED_GRID)
def test_ops_from_several_threads_give_the_serial_bits(request, op, device, backend):
    """The launchers keep no mutable state: every sample run from 4 threads at once
    (outputs and gradients) gives the bits of a serial run (docs/api.md "Threads")."""
    import threading

    samples = list(SAMPLES[op](_inputs(request), device))
    serial = [_run(lambda *a, **k: _call(op, a, k, backend), *s) for s in samples]
    start, results, errors = threading.Barrier(4), [None] * 4, []

    def worker(slot):
        try:
            start.wait(timeout=60)
            results[slot] = [_run(lambda *a, **k: _call(op, a, k, backend), *s)
                             for s in samples]  # fmt: skip
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001  (reported below, in the main thread)
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for threaded in results:
        for want, got in zip(serial, threaded, strict=True):
            for w, g in zip(want, got, strict=True):
                torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("op, device, backend", GRID)
def test_second_order_gradients_are_right_or_an_error_naming_the_op(request, op, device, backend):
    """A gradient penalty (a second derivative) is either right, as the torch backend
    gives it, or an error naming the op: never torch's warning and a silent zero."""
    samples = [s for s in SAMPLES[op](_inputs(request), device) if s[2]]
    for args, kwargs, differentiable in samples[:1]:
        if op in FIRST_ORDER_ONLY:
            args, kwargs, leaves = _with_grad(args, kwargs, differentiable)
            total = sum(o.sum() for o in _tensors(_call(op, args, kwargs, backend)))
            name = BACKWARD_NAME.get(op, op)
            with pytest.raises(RuntimeError, match=rf"^rlhf_ext\.{name}: second-order gradients"):
                torch.autograd.grad(total, leaves, create_graph=True)
            continue
        want = _gradient_penalty_grads(op, args, kwargs, differentiable, "torch")
        got = _gradient_penalty_grads(op, args, kwargs, differentiable, backend)
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w)


def _gradient_penalty_grads(op, args, kwargs, differentiable, backend):
    """d/d inputs of sum(outputs) + sum(d sum(outputs) / d inputs)^2."""
    args, kwargs, leaves = _with_grad(args, kwargs, differentiable)
    total = sum(o.sum() for o in _tensors(_call(op, args, kwargs, backend)) if o.requires_grad)
    first = torch.autograd.grad(total, leaves, create_graph=True)
    penalty = total + sum((g**2).sum() for g in first)
    return [g.detach() for g in torch.autograd.grad(penalty, leaves)]


# -- one vocabulary, one set of constants: Python == C++ --------------------------------


@requires_compiled
def test_kl_kind_codes_equal_the_cpp_enum():
    assert rlhf_ext.build_info()["kl_kinds"] == _vocab.KL_KIND_CODES


@requires_compiled
@requires_compiled
def test_policy_kind_codes_equal_the_cpp_enum():
    assert rlhf_ext.build_info()["policy_kinds"] == _vocab.POLICY_KIND_CODES


@requires_compiled
def test_logprob_extra_codes_equal_the_cpp_constants():
    assert rlhf_ext.build_info()["logprob_extras"] == _vocab.LOGPROB_EXTRA_CODES


def test_loss_agg_codes_equal_the_cpp_enum():
    assert rlhf_ext.build_info()["loss_aggs"] == _vocab.AGG_CODES


@requires_compiled
def test_group_advantage_codes_equal_the_cpp_enums():
    info = rlhf_ext.build_info()
    assert info["group_baselines"] == _vocab.GROUP_BASELINE_CODES
    assert info["group_scales"] == _vocab.GROUP_SCALE_CODES


@requires_compiled
def test_linear_chunk_constants_equal_the_cpp_header():
    assert rlhf_ext.build_info()["linear_token_logprobs"] == {
        "row_quantum": _vocab.LINEAR_ROW_QUANTUM,
        "min_tile_vocab": _vocab.LINEAR_MIN_TILE_VOCAB,
        "vocab_quantum": _vocab.LINEAR_VOCAB_QUANTUM,
        "accumulate_rows": _vocab.LINEAR_ACCUMULATE_ROWS,
    }


@requires_compiled
@pytest.mark.skipif(not (TRITON_CPU or TRITON_CUDA), reason="triton is not importable")
def test_triton_tile_geometry_equals_the_cpp_one():
    """The Triton backend's chunk loop (Python) sizes its backward tiles as the C++
    loop does, over a grid of (valid rows, V, chunk rows) around every branch."""
    from rlhf_ext import _C
    from rlhf_ext.ops.linear_token_logprobs import triton_kernels

    tile_geometry = triton_kernels().tile_geometry
    rows = [0, 1, 15, 16, 17, 100, 1023, 4096, 16384, 100_000]
    vocabs = [1, 63, 64, 1000, 1024, 1025, 32000, 151_936]
    chunks = [1, 16, 48, 256, 1024, 4096]
    for valid_rows in rows:
        for vocab in vocabs:
            for chunk in chunks:
                want = tuple(_C.linear_tile_geometry(valid_rows, vocab, chunk))
                assert tile_geometry(valid_rows, vocab, chunk) == want, (valid_rows, vocab, chunk)


def test_compiled_state_is_reported():
    """The grid above covers the compiled backends exactly when the extension is built."""
    assert ("cpu" in _kernel_backends("cpu")) == COMPILED
