"""ppo_policy_loss, value_loss, kl_penalty and kl_loss against reference.py (float64)
and verl's eager code (peers.py), on every backend here: values, statistics, gradients."""

from __future__ import annotations

import functools

import conftest
import pytest
import torch
from conftest import (
    CPU_BACKENDS,
    assert_close_ref,
    assert_within_eager_error,
    given,
    requires_compiled,
    st,
)

import rlhf_ext
from bench import peers
from rlhf_ext import reference

AGGS = list(reference.AGG_MODES)
KINDS = ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "k3+"]
POLICY_STATS = ["clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_max"]
# (clip_eps, clip_eps_high, dual_clip)
CLIPS = [(0.2, None, None), (0.2, 0.28, None), (0.1, None, 3.0), (0.2, 0.3, 1.5)]


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def up(t):
    return None if t is None else t.detach().cpu().double()


def with_grad(op, first, *rest, **kwargs):
    """(outputs, d loss / d first) of op(first, *rest, **kwargs); outputs[0] is the loss."""
    x = first.detach().clone().requires_grad_()
    out = op(x, *rest, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    return out, torch.zeros_like(x) if grad is None else grad


def check_stats(stats, expected, names, device="cpu"):
    assert list(stats) == list(names)
    for name in names:
        got = stats[name]
        assert got.dim() == 0 and got.dtype == torch.float32 and got.device.type == device, name
        assert not got.requires_grad, name
        torch.testing.assert_close(got.cpu(), expected[name].float(), rtol=1e-5, atol=1e-6)


def policy_inputs(inputs, B, T, dtype=torch.float32, spread=0.3):
    lp = -inputs.uniform(B, T, low=0.01, high=4.0)
    old = lp + inputs.randn(B, T, scale=spread)
    adv = inputs.randn(B, T)
    return lp.to(dtype), old.to(dtype), adv.to(dtype)


def sample_masks(inputs, B, T):
    """(name, mask) pairs covering holes, padding, empty rows, all-masked and dtypes."""
    yield "none", None
    yield "holes", inputs.mask(B, T, p=0.6)
    holes = inputs.mask(B, T, p=0.6)
    holes[1] = False  # an empty row: left out of the seq-mean modes
    yield "empty_row", holes
    yield "prefix", inputs.prefix_mask(B, T)
    yield "all_masked", torch.zeros(B, T, dtype=torch.bool)
    yield "float", inputs.mask(B, T).float()
    yield "uint8", inputs.mask(B, T).to(torch.uint8)


# -- ppo_policy_loss ----------------------------------------------------------------


def ref_policy(lp, old, adv, mask, **kw):
    return with_grad(reference.ppo_policy_loss, up(lp), up(old), up(adv), up(mask), **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", CLIPS, ids=str)
def test_policy_loss_matches_reference(inputs, backend, agg, clip):
    clip_eps, high, dual = clip
    B, T = 5, 23
    lp, old, adv = policy_inputs(inputs, B, T, spread=0.4)
    for name, mask in sample_masks(inputs, B, T):
        kw = dict(clip_eps=clip_eps, clip_eps_high=high, dual_clip=dual, agg=agg)
        (loss, stats), grad = with_grad(
            rlhf_ext.ppo_policy_loss, lp, old, adv, mask, backend=backend, **kw
        )
        (ref_loss, ref_stats), ref_grad = ref_policy(lp, old, adv, mask, **kw)
        assert loss.dim() == 0 and loss.dtype == torch.float32, name
        assert_close_ref(loss.detach(), ref_loss.detach(), torch.float32)
        assert_close_ref(grad, ref_grad, torch.float32)
        check_stats(stats, ref_stats, POLICY_STATS)
        if name == "all_masked":
            assert loss.item() == 0 and not grad.any(), name
            assert all(v.item() == 0 for v in stats.values()), name
        if mask is not None:
            assert not grad[mask == 0].any(), f"{name}: gradient at masked tokens"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_policy_loss_float64_and_loss_scale_factor(inputs, backend):
    B, T = 4, 19
    lp, old, adv = policy_inputs(inputs, B, T, dtype=torch.float64, spread=0.5)
    mask = inputs.mask(B, T)
    kw = dict(clip_eps=0.15, dual_clip=2.5, agg="seq-mean-token-sum-norm", loss_scale_factor=7.5)
    (loss, stats), grad = with_grad(
        rlhf_ext.ppo_policy_loss, lp, old, adv, mask, backend=backend, **kw
    )
    (ref_loss, ref_stats), ref_grad = ref_policy(lp, old, adv, mask, **kw)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    assert_close_ref(loss.detach(), ref_loss.detach(), torch.float64)
    assert_close_ref(grad, ref_grad, torch.float64)
    check_stats(stats, ref_stats, POLICY_STATS)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_matches_verl(inputs, backend, agg):
    """verl's compute_policy_loss (dual clip c = 3 always on); every row has a valid token."""
    B, T = 6, 31
    lp, old, adv = policy_inputs(inputs, B, T, spread=0.5)
    mask = inputs.prefix_mask(B, T, min_len=1)
    (loss, stats), grad = with_grad(
        rlhf_ext.ppo_policy_loss,
        lp,
        old,
        adv,
        mask,
        clip_eps=0.2,
        clip_eps_high=0.28,
        dual_clip=3.0,
        agg=agg,
        backend=backend,
    )
    lp64 = up(lp).requires_grad_()
    v_loss, v_clipfrac, v_kl, v_lower = peers.verl_policy_loss(
        up(old), lp64, up(adv), mask.double(), 0.2, 0.28, 3.0, agg
    )
    (v_grad,) = torch.autograd.grad(v_loss, lp64)
    assert_close_ref(loss.detach(), v_loss.detach(), torch.float32)
    assert_close_ref(grad, v_grad, torch.float32)
    for got, want in [("clipfrac", v_clipfrac), ("approx_kl", v_kl), ("clipfrac_lower", v_lower)]:
        torch.testing.assert_close(stats[got].double(), want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_policy_loss_far_outside_clip_range(inputs, backend):
    """Log-ratios past +-20 (ratio clamped, zero gradient), both advantage signs, dual clip."""
    B, T = 4, 16
    lp, old, adv = policy_inputs(inputs, B, T, spread=3.0)
    old[0, :4] = lp[0, :4] - 30  # ratio = e^20
    old[1, :4] = lp[1, :4] + 30  # ratio = e^-20
    adv[:, ::2] = -adv[:, ::2].abs()
    adv[:, 1::2] = adv[:, 1::2].abs()
    mask = inputs.mask(B, T, p=0.8)
    for dual in (None, 3.0):
        kw = dict(clip_eps=0.2, dual_clip=dual)
        (loss, stats), grad = with_grad(
            rlhf_ext.ppo_policy_loss, lp, old, adv, mask, backend=backend, **kw
        )
        (ref_loss, ref_stats), ref_grad = ref_policy(lp, old, adv, mask, **kw)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert_close_ref(loss.detach(), ref_loss.detach(), torch.float32)
        assert_close_ref(grad, ref_grad, torch.float32)
        check_stats(stats, ref_stats, POLICY_STATS)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_policy_loss_low_precision(inputs, backend, dtype):
    B, T = 4, 40
    lp, old, adv = policy_inputs(inputs, B, T, dtype=dtype)
    mask = inputs.mask(B, T)
    (loss, _), grad = with_grad(rlhf_ext.ppo_policy_loss, lp, old, adv, mask, backend=backend)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    (ref_loss, _), ref_grad = ref_policy(lp, old, adv, mask)
    (eager_loss, _), eager_grad = with_grad(reference.ppo_policy_loss, lp.float(), old, adv, mask)
    assert_within_eager_error(loss.detach(), ref_loss.detach(), eager_loss.detach())
    # The gradient is rounded to `dtype` (as eager's is): allow one rounding step more.
    err = (grad.double() - ref_grad).abs().max().item()
    eager_err = (eager_grad.to(dtype).double() - ref_grad).abs().max().item()
    assert err <= 2 * eager_err + torch.finfo(dtype).eps * ref_grad.abs().max().item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_policy_loss_mixed_dtypes_and_strides(inputs, backend):
    B, T = 3, 12
    lp = (-inputs.uniform(T, B, low=0.1, high=2.0)).t()  # transposed
    old = (lp.detach() + inputs.randn(B, T, scale=0.3)).to(torch.bfloat16)
    adv = inputs.randn(B, 2 * T)[:, ::2]  # strided
    mask = inputs.mask(T, B).t()
    (loss, stats), grad = with_grad(
        rlhf_ext.ppo_policy_loss, lp, old, adv, mask, agg="seq-mean-token-mean", backend=backend
    )
    (ref_loss, ref_stats), ref_grad = ref_policy(lp, old, adv, mask, agg="seq-mean-token-mean")
    assert_close_ref(loss.detach(), ref_loss.detach(), torch.float32)
    assert_close_ref(grad, ref_grad, torch.float32)
    check_stats(stats, ref_stats, POLICY_STATS)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 7), (3, 0), (0, 0)], ids=str)
def test_losses_empty_batch(inputs, backend, shape):
    lp, old, adv = (inputs.randn(shape) for _ in range(3))
    for agg in AGGS:
        (loss, stats), grad = with_grad(
            rlhf_ext.ppo_policy_loss, lp, old, adv, agg=agg, backend=backend
        )
        assert loss.item() == 0 and grad.shape == lp.shape
        assert all(v.item() == 0 for v in stats.values())
        (loss, stats), grad = with_grad(
            rlhf_ext.value_loss, lp, old, adv, clip_eps=0.2, agg=agg, backend=backend
        )
        assert loss.item() == 0 and stats["clipfrac"].item() == 0 and grad.shape == lp.shape
        loss, grad = with_grad(rlhf_ext.kl_loss, lp, old, agg=agg, backend=backend)
        assert loss.item() == 0 and grad.shape == lp.shape
    assert rlhf_ext.kl_penalty(lp, old, backend=backend).shape == lp.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_policy_loss_deterministic(inputs, backend):
    B, T = (16, 300) if backend != "triton" else (4, 64)
    lp, old, adv = policy_inputs(inputs, B, T)
    mask = inputs.mask(B, T)
    first = with_grad(rlhf_ext.ppo_policy_loss, lp, old, adv, mask, dual_clip=3.0, backend=backend)
    again = with_grad(rlhf_ext.ppo_policy_loss, lp, old, adv, mask, dual_clip=3.0, backend=backend)
    assert torch.equal(first[0][0], again[0][0]) and torch.equal(first[1], again[1])
    for name in POLICY_STATS:
        assert torch.equal(first[0][1][name], again[0][1][name])


@requires_compiled
def test_policy_loss_cpu_large(inputs):
    B, T = 8, 5000
    lp, old, adv = policy_inputs(inputs, B, T)
    mask = inputs.prefix_mask(B, T)
    for agg in AGGS:
        (loss, stats), grad = with_grad(
            rlhf_ext.ppo_policy_loss, lp, old, adv, mask, agg=agg, backend="cpu"
        )
        (ref_loss, ref_stats), ref_grad = ref_policy(lp, old, adv, mask, agg=agg)
        assert_close_ref(loss.detach(), ref_loss.detach(), torch.float32)
        assert_close_ref(grad, ref_grad, torch.float32)
        check_stats(stats, ref_stats, POLICY_STATS)


# -- value_loss ----------------------------------------------------------------------


def value_inputs(inputs, B, T, dtype=torch.float32):
    values = inputs.randn(B, T)
    old = values + inputs.randn(B, T, scale=0.3)
    returns = values + inputs.randn(B, T, scale=0.5)
    return values.to(dtype), old.to(dtype), returns.to(dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip_eps", [None, 0.2, 0.05])
def test_value_loss_matches_reference(inputs, backend, agg, clip_eps):
    B, T = 5, 21
    v, old, ret = value_inputs(inputs, B, T)
    for name, mask in sample_masks(inputs, B, T):
        (loss, stats), grad = with_grad(
            rlhf_ext.value_loss, v, old, ret, mask, clip_eps=clip_eps, agg=agg, backend=backend
        )
        (ref_loss, ref_stats), ref_grad = with_grad(
            reference.value_loss, up(v), up(old), up(ret), up(mask), clip_eps=clip_eps, agg=agg
        )
        assert loss.dim() == 0 and loss.dtype == torch.float32, name
        assert_close_ref(loss.detach(), ref_loss.detach(), torch.float32)
        assert_close_ref(grad, ref_grad, torch.float32)
        check_stats(stats, ref_stats, ["clipfrac"])
        if name == "all_masked":
            assert loss.item() == 0 and not grad.any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_value_loss_matches_verl(inputs, backend, agg):
    B, T = 4, 17
    v, old, ret = value_inputs(inputs, B, T)
    mask = inputs.prefix_mask(B, T, min_len=1)
    (loss, stats), grad = with_grad(
        rlhf_ext.value_loss, v, old, ret, mask, clip_eps=0.1, agg=agg, backend=backend
    )
    v64 = up(v).requires_grad_()
    v_loss, v_clipfrac = peers.verl_value_loss(v64, up(ret), up(old), mask.double(), 0.1, agg)
    (v_grad,) = torch.autograd.grad(v_loss, v64)
    assert_close_ref(loss.detach(), v_loss.detach(), torch.float32)
    assert_close_ref(grad, v_grad, torch.float32)
    torch.testing.assert_close(stats["clipfrac"].double(), v_clipfrac, rtol=1e-5, atol=1e-6)


# -- kl_penalty / kl_loss -----------------------------------------------------------


def kl_inputs(inputs, shape, dtype=torch.float32):
    lp = -inputs.uniform(shape, low=0.01, high=4.0)
    ref = lp + inputs.randn(shape, scale=0.5)
    ref.view(-1)[:2] = lp.view(-1)[:2] + 30  # past the k3 clamps
    if lp.numel() > 4:
        ref.view(-1)[2:4] = lp.view(-1)[2:4] - 30
    return lp.to(dtype), ref.to(dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(5, 13), (2, 3, 7), (11,)], ids=str)
def test_kl_penalty_matches_reference_and_verl(inputs, backend, kind, shape):
    lp, ref = kl_inputs(inputs, shape)
    up_grad = inputs.randn(shape)

    def value_and_grad(fn, lp, ref):
        x = lp.detach().clone().requires_grad_()
        out = fn(x, ref)
        (g,) = torch.autograd.grad(out, x, up_grad.to(out.dtype))
        return out, g

    out, grad = value_and_grad(
        lambda x, r: rlhf_ext.kl_penalty(x, r, kind=kind, backend=backend), lp, ref
    )
    assert out.dtype == torch.float32 and out.shape == lp.shape
    want, want_grad = value_and_grad(lambda x, r: reference.kl_penalty(x, r, kind), up(lp), up(ref))
    assert_close_ref(out.detach(), want.detach(), torch.float32)
    assert_close_ref(grad, want_grad, torch.float32)
    verl, verl_grad = value_and_grad(
        lambda x, r: peers.verl_kl_penalty(x, r, kind), up(lp), up(ref)
    )
    assert_close_ref(out.detach(), verl.detach(), torch.float32)
    assert_close_ref(grad, verl_grad, torch.float32)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_k3_keeps_float32_relative_accuracy_near_zero(backend):
    """k3 = expm1(d) - d, not exp(d) - d - 1 (issue 24, item 6): the direct form cancels
    near d = 0 (float32: 100% relative error below |d| ~ 3e-4, 5% at 1e-3, as in verl and
    OpenRLHF); the kernels keep float32's relative accuracy there, value and gradient."""
    d = torch.cat([torch.logspace(-6, 0.3, 40), -torch.logspace(-6, 0.3, 40)])
    lp = torch.zeros_like(d).requires_grad_()
    value = rlhf_ext.kl_penalty(lp, d, kind="k3", backend=backend)
    (grad,) = torch.autograd.grad(value.sum(), lp)
    exact = torch.expm1(d.double()) - d.double()
    relative = ((value.double() - exact) / exact).abs().max()
    assert relative < 3e-7, float(relative)
    exact_grad = -torch.expm1(d.double())
    assert ((grad.double() - exact_grad) / exact_grad).abs().max() < 3e-7
    naive = torch.exp(d) - d - 1  # what the peers compute, for scale
    assert ((naive.double() - exact) / exact).abs().max() > 0.5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["k1", "abs", "k2", "k3", "k3+", "low_var_kl"])
@pytest.mark.parametrize("agg", AGGS)
def test_kl_loss_matches_reference(inputs, backend, kind, agg):
    B, T = 5, 19
    lp, ref = kl_inputs(inputs, (B, T))
    for name, mask in sample_masks(inputs, B, T):
        loss, grad = with_grad(rlhf_ext.kl_loss, lp, ref, mask, kind=kind, agg=agg, backend=backend)
        ref_loss, ref_grad = with_grad(
            reference.kl_loss, up(lp), up(ref), up(mask), kind=kind, agg=agg
        )
        assert loss.dim() == 0 and loss.dtype == torch.float32, name
        assert_close_ref(loss.detach(), ref_loss.detach(), torch.float32)
        assert_close_ref(grad, ref_grad, torch.float32)
        if name == "prefix" and not (mask.sum(-1) == 0).any():
            verl = peers.verl_kl_loss(up(lp), up(ref), mask.double(), kind, agg)
            assert_close_ref(loss.detach(), verl, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kl_low_precision(inputs, backend):
    lp, ref = kl_inputs(inputs, (4, 40), dtype=torch.bfloat16)
    mask = inputs.mask(4, 40)
    for kind in ("k1", "k3"):
        out = rlhf_ext.kl_penalty(lp, ref, kind=kind, backend=backend)
        want = reference.kl_penalty(up(lp), up(ref), kind)
        assert_within_eager_error(out, want, reference.kl_penalty(lp, ref, kind))
        loss = rlhf_ext.kl_loss(lp, ref, mask, kind=kind, backend=backend)
        want = reference.kl_loss(up(lp), up(ref), mask, kind=kind)
        assert_within_eager_error(loss, want, reference.kl_loss(lp, ref, mask, kind=kind))


# -- gradcheck (opcheck and torch.compile parity: test_op_contract.py) --------------


GRADCHECK_BACKENDS = [b for b in CPU_BACKENDS if b != "torch"]


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_gradcheck(inputs, backend):
    B, T = 3, 6
    lp, old, adv = policy_inputs(inputs, B, T, dtype=torch.float64, spread=0.4)
    mask = inputs.mask(B, T)
    mask[0, 0] = True
    x = lp.clone().requires_grad_()
    for agg in ("token-mean", "seq-mean-token-mean"):
        kw = dict(agg=agg, backend=backend)

        def policy(x, kw=kw):
            return rlhf_ext.ppo_policy_loss(x, old, adv, mask, clip_eps=0.2, dual_clip=3.0, **kw)[0]

        def value(x, kw=kw):
            return rlhf_ext.value_loss(x, old, adv, mask, clip_eps=0.1, **kw)[0]

        assert torch.autograd.gradcheck(policy, (x,))
        assert torch.autograd.gradcheck(value, (x,))
    for kind in ("k1", "abs", "k2", "k3"):
        kw = dict(kind=kind, backend=backend)

        def loss(x, kw=kw):
            return rlhf_ext.kl_loss(x, old, mask, **kw)

        def penalty(x, kw=kw):
            return rlhf_ext.kl_penalty(x, old, **kw)

        assert torch.autograd.gradcheck(loss, (x,))
        assert torch.autograd.gradcheck(penalty, (x,))


# -- property tests -----------------------------------------------------------------


@given(
    B=st.integers(0, 6),
    T=st.integers(0, 40),
    p=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    spread=st.sampled_from([0.05, 1.0, 25.0]),
    clip=st.sampled_from(CLIPS),
    agg=st.sampled_from(AGGS),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**16),
)
def test_losses_property(B, T, p, spread, clip, agg, kind, seed):
    from conftest import Inputs

    inputs = Inputs(seed)
    lp, old, adv = policy_inputs(inputs, B, T, spread=spread)
    adv = adv * 3
    mask = inputs.mask(B, T, p=p)
    clip_eps, high, dual = clip
    kw = dict(clip_eps=clip_eps, clip_eps_high=high, dual_clip=dual, agg=agg)
    (ref_loss, ref_stats), ref_grad = ref_policy(lp, old, adv, mask, **kw)
    (ref_vloss, ref_vstats), ref_vgrad = with_grad(
        reference.value_loss, up(lp), up(old), up(adv), mask, clip_eps=clip_eps, agg=agg
    )
    ref_kl, ref_kgrad = with_grad(reference.kl_loss, up(lp), up(old), mask, kind=kind, agg=agg)
    for backend in GRADCHECK_BACKENDS:
        (loss, stats), grad = with_grad(
            rlhf_ext.ppo_policy_loss, lp, old, adv, mask, backend=backend, **kw
        )
        assert_close_ref(loss.detach(), ref_loss.detach(), torch.float32)
        assert_close_ref(grad, ref_grad, torch.float32)
        check_stats(stats, ref_stats, POLICY_STATS)
        (vloss, vstats), vgrad = with_grad(
            rlhf_ext.value_loss, lp, old, adv, mask, clip_eps=clip_eps, agg=agg, backend=backend
        )
        assert_close_ref(vloss.detach(), ref_vloss.detach(), torch.float32)
        assert_close_ref(vgrad, ref_vgrad, torch.float32)
        check_stats(vstats, ref_vstats, ["clipfrac"])
        kl, kgrad = with_grad(rlhf_ext.kl_loss, lp, old, mask, kind=kind, agg=agg, backend=backend)
        assert_close_ref(kl.detach(), ref_kl.detach(), torch.float32)
        assert_close_ref(kgrad, ref_kgrad, torch.float32)


# -- bad input ----------------------------------------------------------------------


def _loss_cases(op, *rows):
    """bad_inputs rows of rlhf_ext.<op>: each case gets `op` as its first value and the id
    "<op>-<id>", and its pattern the prefix "rlhf_ext.<op>: " the message must start with."""
    return [
        pytest.param(op, *case.values, id=f"{op}-{case.id}")
        for case in conftest.bad_inputs(rf"rlhf_ext\.{op}: ", *rows)
    ]


# (id, error, pattern after the prefix, fn) rows: fn(lp, old, adv, op) with lp, old, adv
# float32 [3, 5] and op = rlhf_ext.<op> on the test's backend.
LOSSES_BAD_INPUT = (
    _loss_cases(
        "ppo_policy_loss",
        (
            "old_logprobs-shape",
            ValueError,
            r"`old_logprobs` must have the shape of `logprobs` \(3, 5\), got \(3, 4\)",
        ),
        lambda lp, old, adv, op: op(lp, old[:, :4], adv),
        ("advantages-shape", ValueError, r"`advantages` must have the shape"),
        lambda lp, old, adv, op: op(lp, old, adv[:2]),
        ("logprobs-1d", ValueError, r"`logprobs` must be 2-D \[B, T\], got shape \(15,\)"),
        lambda lp, old, adv, op: op(lp.flatten(), old.flatten(), adv.flatten()),
        (
            "logprobs-int64",
            TypeError,
            r"`logprobs` must be float32, float64, bfloat16 or float16, got torch.int64",
        ),
        lambda lp, old, adv, op: op(lp.long(), old, adv),
        ("advantages-int32", TypeError, r"`advantages` must be float"),
        lambda lp, old, adv, op: op(lp, old, adv.int()),
        ("old_logprobs-list", TypeError, r"`old_logprobs` must be a torch.Tensor, got list"),
        lambda lp, old, adv, op: op(lp, [1.0], adv),
        ("mask-shape", ValueError, r"`mask` must have the shape of `logprobs`"),
        lambda lp, old, adv, op: op(lp, old, adv, torch.ones(3, 6, dtype=torch.bool)),
        ("agg-mean", ValueError, r"`agg` must be one of .*got 'mean'"),
        lambda lp, old, adv, op: op(lp, old, adv, agg="mean"),
        ("clip_eps-0", ValueError, r"`clip_eps` must be > 0, got 0.0"),
        lambda lp, old, adv, op: op(lp, old, adv, clip_eps=0.0),
        ("clip_eps-negative", ValueError, r"`clip_eps` must be > 0, got -0.1"),
        lambda lp, old, adv, op: op(lp, old, adv, clip_eps=-0.1),
        ("clip_eps-none", TypeError, r"`clip_eps` must be a float, got NoneType"),
        lambda lp, old, adv, op: op(lp, old, adv, clip_eps=None),
        ("clip_eps_high-0", ValueError, r"`clip_eps_high` must be > 0, got 0"),
        lambda lp, old, adv, op: op(lp, old, adv, clip_eps_high=0),
        ("dual_clip-1", ValueError, r"`dual_clip` must be > 1, got 1.0"),
        lambda lp, old, adv, op: op(lp, old, adv, dual_clip=1.0),
        ("dual_clip-0.5", ValueError, r"`dual_clip` must be > 1, got 0.5"),
        lambda lp, old, adv, op: op(lp, old, adv, dual_clip=0.5),
        ("dual_clip-str", TypeError, r"`dual_clip` must be None or a float, got str"),
        lambda lp, old, adv, op: op(lp, old, adv, dual_clip="3"),
        ("loss_scale_factor-0", ValueError, r"`loss_scale_factor` must be > 0, got 0"),
        lambda lp, old, adv, op: op(
            lp, old, adv, agg="seq-mean-token-sum-norm", loss_scale_factor=0
        ),
        (
            "loss_scale_factor-other-agg",
            ValueError,
            r"`loss_scale_factor` is used by agg='seq-mean-token-sum-norm' only",
        ),
        lambda lp, old, adv, op: op(lp, old, adv, loss_scale_factor=2.0),
    )
    + _loss_cases(
        "value_loss",
        ("returns-shape", ValueError, r"`returns` must have the shape of `values`"),
        lambda lp, old, adv, op: op(lp, old, adv[:, :2]),
        ("clip_eps-0", ValueError, r"`clip_eps` must be None or > 0, got 0.0"),
        lambda lp, old, adv, op: op(lp, old, adv, clip_eps=0.0),
        ("agg-sum", ValueError, r"`agg` must be one of"),
        lambda lp, old, adv, op: op(lp, old, adv, agg="sum"),
        ("values-bool", TypeError, r"`values` must be float"),
        lambda lp, old, adv, op: op(lp.bool(), old, adv),
    )
    + _loss_cases(
        "kl_loss",
        ("kind-k4", ValueError, r"`kind` must be one of .*got 'k4'"),
        lambda lp, old, adv, op: op(lp, old, kind="k4"),
        ("agg-token-sum", ValueError, r"`agg` must be one of"),
        lambda lp, old, adv, op: op(lp, old, agg="token-sum"),
        (
            "ref_logprobs-transposed",
            ValueError,
            r"`ref_logprobs` must have the shape of `logprobs`",
        ),
        lambda lp, old, adv, op: op(lp, old.t()),
    )
    + _loss_cases(
        "kl_penalty",
        ("kind-k1++", ValueError, r"`kind` must be one of .*got 'k1\+\+'"),
        lambda lp, old, adv, op: op(lp, old, kind="k1++"),
        ("ref_logprobs-1d", ValueError, r"`ref_logprobs` must have the shape of `logprobs`"),
        lambda lp, old, adv, op: op(lp, old[0]),
        ("ref_logprobs-int64", TypeError, r"`ref_logprobs` must be float"),
        lambda lp, old, adv, op: op(lp, old.long()),
    )
)


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
@pytest.mark.parametrize("op, error, pattern, fn", LOSSES_BAD_INPUT)
def test_bad_input(inputs, backend, op, error, pattern, fn):
    lp, old, adv = inputs.randn(3, 5), inputs.randn(3, 5), inputs.randn(3, 5)
    with pytest.raises(error, match=pattern):
        fn(lp, old, adv, functools.partial(getattr(rlhf_ext, op), backend=backend))


# (id, error, pattern after the prefix, args) rows: args(lp, old, adv) gives the arguments
# of the raw op torch.ops.rlhf_ext.<op>.
LOSSES_RAW_OP_BAD_INPUT = (
    _loss_cases(
        "policy_loss",
        ("agg", ValueError, r"`agg` must be one of .*'x'"),
        lambda lp, old, adv: (
            lp,
            old,
            adv,
            None,
            "ppo",
            0.8,
            1.2,
            0.0,
            0.0,
            1.0,
            1.0,
            0.0,
            "x",
            0.0,
        ),  # fmt: skip
        ("advantages-dtype", TypeError, r"`advantages` must have the dtype"),
        lambda lp, old, adv: (
            lp,
            old,
            adv.double(),
            None,
            "ppo",
            0.8,
            1.2,
            0.0,
            0.0,
            1.0,
            1.0,
            0.0,
            "token-mean",
            0.0,
        ),  # fmt: skip
    )
    + _loss_cases(
        "value_loss",
        ("old_values-shape", ValueError, r"`old_values` must have the shape"),
        lambda lp, old, adv: (lp, old[:2], adv, None, 0.2, "token-mean"),
    )
    + _loss_cases(
        "kl_loss",
        ("kind", ValueError, r"`kind` must be one of .*'nope'"),
        lambda lp, old, adv: (lp, old, None, "nope", "token-mean"),
    )
    + _loss_cases(
        "kl_penalty",
        ("kind", ValueError, r"`kind` must be one of", lambda lp, old, adv: (lp, old, "k9")),
    )
    + _loss_cases(
        "loss_backward",
        ("row_weight-shape", ValueError, r"`row_weight` must have shape \[3\]"),
        lambda lp, old, adv: (torch.tensor(1.0), lp, adv[0], torch.float32),
    )
)


@requires_compiled
@pytest.mark.parametrize("op, error, pattern, args", LOSSES_RAW_OP_BAD_INPUT)
def test_raw_op_checks(inputs, op, error, pattern, args):
    lp, old, adv = inputs.randn(3, 5), inputs.randn(3, 5), inputs.randn(3, 5)
    with pytest.raises(error, match=pattern):
        getattr(torch.ops.rlhf_ext, op)(*args(lp, old, adv))


# -- CUDA / Triton on a GPU ---------------------------------------------------------


GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("agg", AGGS)
def test_losses_cuda(inputs, backend, dtype, agg):
    if backend not in rlhf_ext.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} unavailable on CUDA tensors")
    cu = lambda t: None if t is None else t.cuda()  # noqa: E731
    tol = acc(dtype)
    for B, T in [(5, 23), (3, 1500), (64, 5000)]:
        lp, old, adv = policy_inputs(inputs, B, T, dtype=dtype, spread=0.5)
        for name, mask in sample_masks(inputs, B, T):
            kw = dict(clip_eps_high=0.28, dual_clip=3.0, agg=agg)
            (loss, stats), grad = with_grad(
                rlhf_ext.ppo_policy_loss, cu(lp), cu(old), cu(adv), cu(mask), backend=backend, **kw
            )
            (ref_loss, ref_stats), ref_grad = ref_policy(lp, old, adv, mask, **kw)
            assert loss.is_cuda and grad.dtype == dtype, name
            assert_close_ref(loss.detach(), ref_loss.detach(), tol)
            if dtype == torch.bfloat16:  # the gradient is rounded to bfloat16
                scale = max(1.0, ref_grad.abs().max().item())
                torch.testing.assert_close(
                    grad.double().cpu(), ref_grad, rtol=1e-2, atol=1e-2 * scale
                )
            else:
                assert_close_ref(grad, ref_grad, tol)
            check_stats(stats, ref_stats, POLICY_STATS, device="cuda")
            (vloss, _), vgrad = with_grad(
                rlhf_ext.value_loss,
                cu(lp),
                cu(old),
                cu(adv),
                cu(mask),
                clip_eps=0.2,
                agg=agg,
                backend=backend,
            )
            (ref_vloss, _), _ = with_grad(
                reference.value_loss, up(lp), up(old), up(adv), up(mask), clip_eps=0.2, agg=agg
            )
            assert_close_ref(vloss.detach(), ref_vloss.detach(), tol)
            for kind in ("k1", "k3", "k3+"):
                kl = rlhf_ext.kl_loss(
                    cu(lp), cu(old), cu(mask), kind=kind, agg=agg, backend=backend
                )
                assert_close_ref(
                    kl, reference.kl_loss(up(lp), up(old), up(mask), kind=kind, agg=agg), tol
                )
                pen = rlhf_ext.kl_penalty(cu(lp), cu(old), kind=kind, backend=backend)
                assert_close_ref(pen, reference.kl_penalty(up(lp), up(old), kind), tol)
        # Bitwise reproducible.
        mask = cu(inputs.mask(B, T))
        a = with_grad(rlhf_ext.ppo_policy_loss, cu(lp), cu(old), cu(adv), mask, backend=backend)
        b = with_grad(rlhf_ext.ppo_policy_loss, cu(lp), cu(old), cu(adv), mask, backend=backend)
        assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[1], b[1])


@pytest.mark.triton_gpu
def test_triton_inductor_parity(inputs):
    """torch.compile with Inductor (the default backend), which compiles the Triton
    kernels into its own generated code, gives the eager bits, forward and backward.
    test_op_contract.py compiles with aot_eager only."""
    torch._dynamo.reset()
    lp, old, adv = (t.cuda() for t in policy_inputs(inputs, 4, 300))
    mask = inputs.mask(4, 300, device="cuda")

    def fn(lp, old, adv, mask):
        loss, stats = rlhf_ext.ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0, backend="triton")
        kl = rlhf_ext.kl_loss(lp, old, mask, backend="triton")
        vloss, _ = rlhf_ext.value_loss(lp, old, adv, mask, clip_eps=0.2, backend="triton")
        return loss + kl + vloss, stats["clipfrac"]

    x, y = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    want = fn(x, old, adv, mask)
    got = torch.compile(fn, fullgraph=True)(y, old, adv, mask)
    torch.testing.assert_close(want, got, rtol=0, atol=0)
    want[0].backward()
    got[0].backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)
