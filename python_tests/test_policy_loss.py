"""rlhf_ext.policy_loss, every kind, against reference.py (float64) and the peers' own
formulas, on every backend here: values, statistics, gradients, [B] and [B, T]
advantages, the sequence kinds' row prologue, and the errors."""

from __future__ import annotations

import conftest
import pytest
import torch
from conftest import CPU_BACKENDS, assert_close_ref
from test_ppo_losses import POLICY_STATS, check_stats, policy_inputs, sample_masks, up, with_grad

import rlhf_ext
from bench import peers
from rlhf_ext.ops import _vocab

AGGS = list(_vocab.AGG_MODES)
# Each kind's parameters: thresholds where some tokens clip (or are masked out), some not.
KIND_SETTINGS = {
    "ppo": dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, ratio_cap=1.25),
    "reinforce": {},
    "cispo": dict(clip_eps=0.1, clip_eps_high=0.3),
    "sapo": dict(tau_pos=1.0, tau_neg=1.05),
    "dppo_tv": dict(clip_eps=0.03, clip_eps_high=0.05, ratio_cap=1.3),
    "dppo_kl": dict(clip_eps=0.005, clip_eps_high=0.01, ratio_cap=1.3),
    "dro": dict(beta=0.1),
    "gspo": dict(clip_eps=0.05, clip_eps_high=0.08),
    "gspo_token": dict(clip_eps=0.05, clip_eps_high=0.08),
    "geo_mean": dict(clip_eps=0.05, clip_eps_high=0.08),
}
KINDS = list(_vocab.POLICY_KINDS)


def test_every_kind_is_tested():
    assert sorted(KIND_SETTINGS) == sorted(KINDS)


def _inputs(inputs, B, T, dtype=torch.float32, per_row=False):
    lp, old, adv = policy_inputs(inputs, B, T, dtype=dtype, spread=0.3)
    if per_row:
        adv = adv[:, 0].contiguous()
    return lp, old, adv


def _ours(lp, old, adv, mask, kind, backend, **kw):
    return with_grad(rlhf_ext.policy_loss, lp, old, adv, mask, kind=kind, backend=backend, **kw)


def _oracle(lp, old, adv, mask, kind, **kw):
    """The float64 reference through the public function (its checks and parameter map)."""
    return with_grad(
        rlhf_ext.policy_loss, up(lp), up(old), up(adv), up(mask), kind=kind, backend="torch", **kw
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("per_row", [False, True], ids=["adv_BT", "adv_B"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("kind", KINDS)
def test_kinds_match_reference(inputs, backend, kind, agg, per_row):
    B, T = 5, 23
    lp, old, adv = _inputs(inputs, B, T, per_row=per_row)
    kw = dict(KIND_SETTINGS[kind], agg=agg)
    for name, mask in sample_masks(inputs, B, T):
        (loss, stats), grad = _ours(lp, old, adv, mask, kind, backend, **kw)
        (ref_loss, ref_stats), ref_grad = _oracle(lp, old, adv, mask, kind, **kw)
        assert loss.dim() == 0 and loss.dtype == torch.float32, name
        assert_close_ref(loss.detach(), ref_loss.detach(), torch.float32)
        assert_close_ref(grad, ref_grad, torch.float32)
        check_stats(stats, ref_stats, POLICY_STATS)
        if name == "all_masked":
            assert loss.item() == 0 and not grad.any(), name
        if mask is not None:
            assert not grad[mask == 0].any(), f"{name}: gradient at masked tokens"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_kinds_float64_long_rows(inputs, backend, kind):
    """float64 and rows longer than the CPU kernel's 512-token block (the row prologue
    and the lanes cross block boundaries)."""
    B, T = 3, 1300
    lp, old, adv = _inputs(inputs, B, T, dtype=torch.float64)
    mask = inputs.mask(B, T, p=0.8)
    kw = dict(KIND_SETTINGS[kind], agg="seq-mean-token-mean")
    (loss, stats), grad = _ours(lp, old, adv, mask, kind, backend, **kw)
    (ref_loss, ref_stats), ref_grad = _oracle(lp, old, adv, mask, kind, **kw)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    assert_close_ref(loss.detach(), ref_loss.detach(), torch.float64)
    assert_close_ref(grad, ref_grad, torch.float64)
    check_stats(stats, ref_stats, POLICY_STATS)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_row_advantages_give_the_bits_of_their_broadcast(inputs, backend, kind):
    B, T = 4, 37
    lp, old, adv = _inputs(inputs, B, T, per_row=True)
    mask = inputs.mask(B, T)
    kw = dict(KIND_SETTINGS[kind], agg="token-mean")
    (loss, stats), grad = _ours(lp, old, adv, mask, kind, backend, **kw)
    wide = adv.unsqueeze(1).expand(B, T)
    (loss_wide, stats_wide), grad_wide = _ours(lp, old, wide, mask, kind, backend, **kw)
    assert torch.equal(loss, loss_wide) and torch.equal(grad, grad_wide)
    for name in POLICY_STATS:
        assert torch.equal(stats[name], stats_wide[name]), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gspo_forms_agree_for_row_advantages_and_differ_for_token_ones(inputs, backend):
    """With one advantage per row and no clip or clamp binding, the gradient through the
    row mean (gspo) equals verl's token-local one (gspo_token); with per-token
    advantages it is the row's mean of them, not each token's own."""
    B, T = 4, 19
    lp, old, adv = _inputs(inputs, B, T, per_row=True)
    mask = inputs.mask(B, T, p=0.8)
    wide = dict(clip_eps=0.9, clip_eps_high=50.0, agg="seq-mean-token-sum")
    _, g_mean = _ours(lp, old, adv, mask, "gspo", backend, **wide)
    _, g_token = _ours(lp, old, adv, mask, "gspo_token", backend, **wide)
    torch.testing.assert_close(g_mean, g_token, rtol=1e-5, atol=1e-7)
    per_token = inputs.randn(B, T)
    _, g_mean = _ours(lp, old, per_token, mask, "gspo", backend, **wide)
    _, g_token = _ours(lp, old, per_token, mask, "gspo_token", backend, **wide)
    assert not torch.allclose(g_mean, g_token)
    for b in range(B):  # one gradient value per row
        row = g_mean[b][mask[b].bool()]
        assert (row.max() - row.min()).abs() < 1e-6, b


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gspo_matches_trls_sequence_level_grpo_loss(inputs, backend):
    B, T = 6, 29
    lp, old, adv = _inputs(inputs, B, T, per_row=True)
    mask = inputs.prefix_mask(B, T, min_len=1)  # TRL's rows are never empty
    (loss, _), grad = _ours(
        lp, old, adv, mask, "gspo", backend, clip_eps=0.05, clip_eps_high=0.08,
        agg="seq-mean-token-mean",
    )  # fmt: skip
    lp64 = up(lp).requires_grad_()
    theirs = peers.trl_grpo_loss(
        lp64, up(old), up(adv), mask.double(), 0.05, 0.08, importance_sampling_level="sequence"
    )
    (their_grad,) = torch.autograd.grad(theirs, lp64)
    assert_close_ref(loss.detach(), theirs.detach(), torch.float32)
    assert_close_ref(grad, their_grad, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ppo_ratio_cap_is_trls_two_sided_delta_clip(inputs, backend):
    B, T = 6, 29
    lp, old, adv = _inputs(inputs, B, T, per_row=True)
    old = lp + inputs.randn(B, T, scale=0.6)  # ratios well above delta
    mask = inputs.prefix_mask(B, T, min_len=1)
    (loss, _), grad = _ours(
        lp, old, adv, mask, "ppo", backend, clip_eps=0.2, clip_eps_high=0.28, ratio_cap=1.6,
    )  # fmt: skip
    lp64 = up(lp).requires_grad_()
    theirs = peers.trl_grpo_loss(
        lp64, up(old), up(adv), mask.double(), 0.2, 0.28, delta=1.6, loss_type="bnpo"
    )
    (their_grad,) = torch.autograd.grad(theirs, lp64)
    assert_close_ref(loss.detach(), theirs.detach(), torch.float32)
    assert_close_ref(grad, their_grad, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_kinds_nan_follows_the_torch_backend(inputs, backend, kind):
    B, T = 3, 11
    lp, old, adv = _inputs(inputs, B, T)
    lp[1, 4] = float("nan")
    mask = inputs.mask(B, T, p=1.0)
    kw = dict(KIND_SETTINGS[kind])
    (loss, stats), grad = _ours(lp, old, adv, mask, kind, backend, **kw)
    (ref_loss, ref_stats), ref_grad = _ours(lp, old, adv, mask, kind, "torch", **kw)
    assert torch.equal(loss.isnan(), ref_loss.isnan())
    assert torch.equal(grad.isnan(), ref_grad.isnan())
    for name in POLICY_STATS:
        assert torch.equal(stats[name].isnan(), ref_stats[name].isnan()), name


def _bad(*rows):
    return [pytest.param(*case.values, id=case.id)
            for case in conftest.bad_inputs(r"rlhf_ext\.policy_loss: ", *rows)]  # fmt: skip


POLICY_BAD_INPUT = _bad(
    ("kind-unknown", ValueError, r"`kind` must be one of \('ppo', .*got 'grpo'"),
    lambda lp, old, adv, op: op(lp, old, adv, kind="grpo"),
    ("dual_clip-cispo", ValueError, r"`dual_clip` is not used by kind='cispo' \(it reads "),
    lambda lp, old, adv, op: op(lp, old, adv, kind="cispo", dual_clip=3.0),
    ("clip_eps-reinforce", ValueError, r"`clip_eps` is not used by kind='reinforce' .*no param"),
    lambda lp, old, adv, op: op(lp, old, adv, kind="reinforce", clip_eps=0.2),
    ("beta-missing", ValueError, r"`beta` \(> 0\) is required by kind='dro'"),
    lambda lp, old, adv, op: op(lp, old, adv, kind="dro"),
    ("beta-0", ValueError, r"`beta` must be > 0, got 0.0"),
    lambda lp, old, adv, op: op(lp, old, adv, kind="dro", beta=0.0),
    ("tau_neg-nan", ValueError, r"`tau_neg` must be > 0, got nan"),
    lambda lp, old, adv, op: op(lp, old, adv, kind="sapo", tau_neg=float("nan")),
    ("ratio_cap-0", ValueError, r"`ratio_cap` must be None or > 0, got 0"),
    lambda lp, old, adv, op: op(lp, old, adv, kind="dppo_tv", ratio_cap=0),
    ("advantages-rows", ValueError, r"`advantages` must have the shape of `logprobs` \(3, 5\) "
     r"or \[3\] \(one per row\), got \(4,\)"),
    lambda lp, old, adv, op: op(lp, old, adv[:, 0].repeat(2)[:4]),
    ("advantages-device", ValueError, r"`advantages` must be on cpu like `logprobs`, got meta"),
    lambda lp, old, adv, op: op(lp, old, adv[:, 0].to("meta")),
)  # fmt: skip


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
@pytest.mark.parametrize("error, pattern, fn", POLICY_BAD_INPUT)
def test_bad_input(inputs, backend, error, pattern, fn):
    import functools

    lp, old, adv = inputs.randn(3, 5), inputs.randn(3, 5), inputs.randn(3, 5)
    with pytest.raises(error, match=pattern):
        fn(lp, old, adv, functools.partial(rlhf_ext.policy_loss, backend=backend))


@conftest.requires_compiled
def test_raw_op_names_the_kind():
    lp = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"rlhf_ext\.policy_loss: `kind` must be one of .*'x'"):
        torch.ops.rlhf_ext.policy_loss(
            lp, lp, lp, None, "x", 0.8, 1.2, 0.0, 20.0, 1.0, 1.0, 0.0, "token-mean", 0.0
        )
    with pytest.raises(ValueError, match=r"rlhf_ext\.policy_loss: `advantages` must have shape"):
        torch.ops.rlhf_ext.policy_loss(
            lp, lp, lp[0], None, "ppo", 0.8, 1.2, 0.0, 20.0, 1.0, 1.0, 0.0, "token-mean", 0.0
        )
