"""rlhf_ext.integrations.verl against verl's own functions (verl 0.9.1 installed with
--no-deps plus a few light dependencies; see docs/integrations.md). Without verl the module
is skipped; docs/integrations.md says how to install it. Values and gradients within float32
tolerance on random inputs with masks with holes, every mode and kind."""

from __future__ import annotations

import uuid
import zlib

import numpy as np
import pytest
import torch

core = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_F = pytest.importorskip("verl.utils.torch_functional")
FusedLinearForPPO = pytest.importorskip(
    "verl.utils.experimental.torch_functional"
).FusedLinearForPPO

from rlhf_ext._backend import resolve_backend  # noqa: E402
from rlhf_ext.integrations import verl as adapter  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _seeded(request):
    """Each test's random inputs from its own seed: the same in any order and selection
    of tests (a draw that depended on the tests before it made a tolerance miss come and
    go with the test order)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _uid() -> str:
    """A uuid string as verl's uids are, drawn from torch's seeded generator (uuid4 is not
    seeded: the group order, and so the rounding, changed from run to run)."""
    return str(uuid.UUID(int=int(torch.randint(0, 2**62, (1,))) << 64 | 0x4000_8000_0000_0000))


MODES = sorted(adapter.AGG_MODES)
B, T = 6, 17


def _mask(rows=B, length=T):
    """Holes in the middle, ragged ends, one row fully masked."""
    mask = (torch.rand(rows, length) > 0.25).float()
    mask[:, 0] = 1.0
    mask[1, length // 2 :] = 0.0
    mask[2] = 0.0
    return mask


def _logprobs():
    return torch.randn(B, T) * 0.5 - 1.0


class Config(dict):
    """verl's actor config as core_algos reads it: attributes and ``get``."""

    __getattr__ = dict.__getitem__


def _grad(value, wrt):
    (grad,) = torch.autograd.grad(value, wrt)
    return grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "batch_info",
    [{}, {"dp_size": 2, "batch_num_tokens": 150, "global_batch_size": 11, "loss_scale_factor": 9}],
)
def test_agg_loss_matches_verl(mode, batch_info):
    loss_mat = torch.randn(B, T, requires_grad=True)
    mask = _mask()
    ours = adapter.agg_loss(loss_mat, mask, mode, **batch_info)
    theirs = core.agg_loss(loss_mat, mask, mode, **batch_info)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(_grad(ours, loss_mat), _grad(theirs, loss_mat), **TOL)


def test_agg_loss_errors_name_the_argument():
    with pytest.raises(ValueError, match="agg_loss: `loss_agg_mode` must be one of"):
        adapter.agg_loss(torch.randn(2, 3), torch.ones(2, 3), "mean")
    with pytest.raises(ValueError, match="agg_loss: .*`batch_num_tokens` is required"):
        adapter.agg_loss(torch.randn(2, 3), torch.ones(2, 3), "token-mean", dp_size=2)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_verl(gamma, lam):
    rewards, values, mask = torch.randn(B, T), torch.randn(B, T), _mask()
    mask[2, 3] = 1.0  # whitening needs the row-2 hole to hold something
    ours = adapter.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    theirs = core.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.dtype == reference.dtype
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-4)


def test_gae_tensor_discounts_match_verl():
    rewards, values, mask = torch.randn(B, T), torch.randn(B, T), _mask()
    gamma, lam = torch.tensor(0.99), torch.tensor(0.9)
    ours = adapter.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    theirs = core.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "settings",
    [
        {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": None},
        {"clip_ratio": 0.2, "clip_ratio_low": 0.1, "clip_ratio_high": 0.28, "clip_ratio_c": 2.0},
    ],
)
@pytest.mark.parametrize("weighted", [False, True])
def test_policy_loss_matches_verl(mode, settings, weighted):
    old = _logprobs()
    new = (old + torch.randn(B, T) * 0.3).requires_grad_(True)
    advantages = torch.randn(B, T)
    mask = _mask()
    config = Config(settings, global_batch_info={})
    weights = None
    if weighted:  # truncated importance weights, some exactly 0 (dropped tokens)
        weights = torch.rand(B, T) * 2 + 0.1
        weights[torch.rand(B, T) < 0.2] = 0.0
    ours, our_metrics = adapter.compute_policy_loss_vanilla(
        old, new, advantages, mask, mode, config, weights
    )
    theirs, their_metrics = core.compute_policy_loss_vanilla(
        old, new, advantages, mask, mode, config, weights
    )
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(_grad(ours, new), _grad(theirs, new), **TOL)
    assert our_metrics.keys() == their_metrics.keys()
    for key, value in their_metrics.items():
        assert our_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_policy_loss_global_batch_info_matches_verl():
    old = _logprobs()
    new = (old + torch.randn(B, T) * 0.3).requires_grad_(True)
    advantages, mask = torch.randn(B, T), _mask()
    info = {"dp_size": 4, "batch_num_tokens": 300, "global_batch_size": 20}
    config = Config(
        clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, global_batch_info=info
    )
    ours, _ = adapter.compute_policy_loss_vanilla(old, new, advantages, mask, config=config)
    theirs, _ = core.compute_policy_loss_vanilla(old, new, advantages, mask, config=config)
    torch.testing.assert_close(ours, theirs, **TOL)
    with pytest.raises(ValueError, match="compute_policy_loss_vanilla: `config.clip_ratio_c`"):
        bad = Config(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=1.0)
        adapter.compute_policy_loss_vanilla(old, new, advantages, mask, config=bad)


@pytest.mark.parametrize("mode", MODES)
def test_value_loss_matches_verl(mode):
    returns, old_values = torch.randn(B, T), torch.randn(B, T)
    vpreds = (old_values + torch.randn(B, T) * 0.5).requires_grad_(True)
    mask = _mask()
    ours, our_clipfrac = adapter.compute_value_loss(vpreds, returns, old_values, mask, 0.2, mode)
    theirs, their_clipfrac = core.compute_value_loss(vpreds, returns, old_values, mask, 0.2, mode)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(our_clipfrac, their_clipfrac, **TOL)
    torch.testing.assert_close(_grad(ours, vpreds), _grad(theirs, vpreds), **TOL)


KINDS = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"]


@pytest.mark.parametrize("kind", KINDS + [k + "+" for k in KINDS])
def test_kl_penalty_matches_verl(kind):
    ref = _logprobs()
    logprob = (ref + torch.randn(B, T) * 0.7).requires_grad_(True)
    ours = adapter.kl_penalty(logprob, ref, kind)
    theirs = core.kl_penalty(logprob, ref, kind)
    torch.testing.assert_close(ours, theirs, **TOL)
    upstream = torch.randn(B, T)
    our_grad = _grad((ours * upstream).sum(), logprob)
    torch.testing.assert_close(our_grad, _grad((theirs * upstream).sum(), logprob), **TOL)


@pytest.mark.parametrize("kind", ["full", "k4"])
def test_kl_penalty_unknown_kinds_raise_like_verl(kind):
    with pytest.raises(NotImplementedError):
        core.kl_penalty(torch.randn(3), torch.randn(3), kind)
    with pytest.raises(NotImplementedError, match="kl_penalty: `kl_penalty` kind"):
        adapter.kl_penalty(torch.randn(3), torch.randn(3), kind)


def test_compute_rewards_matches_verl():
    scores, old, ref = torch.randn(B, T), _logprobs(), _logprobs()
    torch.testing.assert_close(
        adapter.compute_rewards(scores, old, ref, 0.05),
        core.compute_rewards(scores, old, ref, 0.05),
        **TOL,
    )


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_verl(shift_mean):
    values, mask = torch.randn(B, T) * 3 + 1, _mask()
    torch.testing.assert_close(
        adapter.masked_whiten(values, mask, shift_mean),
        verl_F.masked_whiten(values, mask, shift_mean),
        **TOL,
    )


def _logits_pair(dtype, vocab=41):
    logits = (torch.randn(3, 5, vocab) * 3).to(dtype)
    return logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)


FUNCTIONS = ["logprobs_from_logits", "entropy_from_logits", "calculate_sum_pi_squared_from_logits"]


def _call(name, module, logits, labels):
    if name != "logprobs_from_logits":
        return getattr(module, name)(logits)
    if module is verl_F:  # verl's path on a machine without flash-attn
        return verl_F.logprobs_from_logits_v2(logits, labels)
    return adapter.logprobs_from_logits(logits, labels, inplace_backward=False)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_logprobs_and_entropy_match_verl(name):
    mine, reference = _logits_pair(torch.float32)
    labels = torch.randint(0, 41, (3, 5))
    ours, theirs = _call(name, adapter, mine, labels), _call(name, verl_F, reference, labels)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, **TOL)
    upstream = torch.randn(3, 5)
    our_grad = _grad((ours * upstream).sum(), mine)
    torch.testing.assert_close(our_grad, _grad((theirs * upstream).sum(), reference), **TOL)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_logprobs_and_entropy_bf16_dtype_and_accuracy(name):
    """bf16 logits: verl computes in bf16, the adapter in float32 and casts; the adapter's
    error against float64 is at most twice verl's (docs/design.md §5)."""
    mine, _ = _logits_pair(torch.bfloat16)
    labels = torch.randint(0, 41, (3, 5))
    with torch.no_grad():
        ours, theirs = _call(name, adapter, mine, labels), _call(name, verl_F, mine, labels)
        exact = _call(name, verl_F, mine.double(), labels)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    our_error = (ours.double() - exact).abs().max()
    assert our_error <= 2 * (theirs.double() - exact).abs().max() + 1e-2


def test_sum_pi_squared_edge_rows_match_verl():
    """A masked (-inf) vocabulary entry, a NaN logit, a one-hot row; within sum p^2's bounds
    1/V <= . <= 1."""
    logits = torch.randn(5, 37) * 4
    logits[0, ::3] = float("-inf")
    logits[1, 4] = float("nan")
    logits[2, 7] = 200.0  # p ~ 1
    ours = adapter.calculate_sum_pi_squared_from_logits(logits)
    theirs = verl_F.calculate_sum_pi_squared_from_logits(logits)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isnan(ours[1]) and torch.isclose(ours[2], torch.tensor(1.0))
    finite = ours[~torch.isnan(ours)]
    assert (finite <= 1 + 1e-6).all() and (finite >= 1 / 37 - 1e-6).all()


def test_logprobs_inplace_backward_gives_the_same_gradient():
    logits = torch.randn(4, 6, 29)
    labels = torch.randint(0, 29, (4, 6))
    upstream = torch.randn(4, 6)
    grads = []
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_(True)
        work = leaf * 1.0  # inplace_backward overwrites this buffer, not the leaf
        logprobs = adapter.logprobs_from_logits(work, labels, inplace_backward=inplace)
        grads.append(_grad((logprobs * upstream).sum(), leaf))
    torch.testing.assert_close(grads[1], grads[0], **TOL)


def test_inplace_backward_after_an_entropy_of_the_same_logits_is_an_error():
    """verl's entropy_from_logits saves the logits (``pd * logits``); an in-place log-prob
    backward taken after it overwrites them first. That was a silently wrong gradient
    (0.21 relative); now autograd's version check refuses it. The log-probs first, or
    inplace_backward=False, give the right gradient."""
    logits = torch.randn(4, 6, 29)
    labels = torch.randint(0, 29, (4, 6))

    def grad(inplace, entropy_first):
        leaf = logits.clone().requires_grad_(True)
        work = leaf * 1.0
        if entropy_first:
            entropy = verl_F.entropy_from_logits(work)
        logprobs = adapter.logprobs_from_logits(work, labels, inplace_backward=inplace)
        if not entropy_first:
            entropy = verl_F.entropy_from_logits(work)
        return _grad(logprobs.sum() + entropy.sum(), leaf)

    expected = grad(False, True)
    torch.testing.assert_close(grad(True, False), expected, **TOL)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        grad(True, True)


def _fused_head_inputs(dtype=torch.float32):
    hidden = torch.randn(3, 7, 16).to(dtype)
    weight = (torch.randn(50, 16) * 0.5).to(dtype)
    return hidden, weight, torch.randint(0, 50, (3, 7))


def _fused_head(impl, hidden, weight, ids, temperature):
    """(log_probs, entropy, grad_hidden, grad_weight) of impl's forward."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    log_probs, entropy = impl(h, w, ids, temperature)
    g_lp, g_ent = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1)), 0.5
    (log_probs.float() * g_lp).sum().add(entropy.float().sum() * g_ent).backward()
    return log_probs.detach(), entropy.detach(), h.grad, w.grad


def _verl_fused(h, w, ids, temperature):
    return FusedLinearForPPO(impl_backend="torch").forward(h, w, ids, temperature)


def _our_fused(h, w, ids, temperature):
    return adapter.fused_linear_for_ppo_forward(None, h, w, ids, temperature)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_linear_for_ppo_matches_verl(temperature):
    """verl's fused-kernel LM head (its torch backend, which runs on the CPU): the same
    log-probs, entropy and gradients, dtypes included."""
    hidden, weight, ids = _fused_head_inputs()
    ours = _fused_head(_our_fused, hidden, weight, ids, temperature)
    theirs = _fused_head(_verl_fused, hidden, weight, ids, temperature)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **TOL)


def test_fused_linear_for_ppo_bf16_dtype_and_accuracy():
    """bf16: verl forms the logits in bf16, the adapter in float32; its error against
    float64 is at most twice verl's."""
    hidden, weight, ids = _fused_head_inputs(torch.bfloat16)
    with torch.no_grad():
        ours, theirs = _our_fused(hidden, weight, ids, 0.9), _verl_fused(hidden, weight, ids, 0.9)
        exact = _verl_fused(hidden.double(), weight.double(), ids, 0.9)
    for a, b, e in zip(ours, theirs, exact, strict=True):
        assert a.dtype == b.dtype
        assert (a.double() - e).abs().max() <= 2 * (b.double() - e).abs().max() + 1e-3


def test_fused_linear_for_ppo_per_sample_temperature():
    """Beyond verl (its engines refuse per-sample temperatures with fused kernels): one
    temperature per sequence equals verl's head run on each sequence with its own."""
    hidden, weight, ids = _fused_head_inputs()
    temps = torch.tensor([0.5, 1.0, 1.7])
    log_probs, entropy = _our_fused(hidden, weight, ids, temps)
    for row, t in enumerate(temps.tolist()):
        want = _verl_fused(hidden[row : row + 1], weight, ids[row : row + 1], t)
        torch.testing.assert_close(log_probs[row], want[0][0], **TOL)
        torch.testing.assert_close(entropy[row], want[1][0], **TOL)


def test_patch_reaches_the_fused_lm_head():
    hidden, weight, ids = _fused_head_inputs()
    before = _verl_fused(hidden, weight, ids, 1.0)
    replaced = adapter.patch()
    try:
        assert "verl.utils.experimental.torch_functional.FusedLinearForPPO.forward" in replaced
        assert FusedLinearForPPO.forward is adapter.fused_linear_for_ppo_forward
        after = FusedLinearForPPO(impl_backend="liger").forward(hidden, weight, ids, 1.0)
    finally:
        adapter.unpatch()
    assert FusedLinearForPPO.forward is not adapter.fused_linear_for_ppo_forward
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_patch_replaces_registries_and_verl_callers_agree():
    """After patch(), verl's own entry points (the policy-loss and advantage registries,
    compute_entropy_loss, the deprecated compute_policy_loss) run the adapter and give the
    same results as before; unpatch() restores verl exactly."""
    logits = torch.randn(B, T, 33)
    mask = _mask()
    old = _logprobs()
    new = old + torch.randn(B, T) * 0.3
    advantages = torch.randn(B, T)
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    mask[2, 0] = 1.0
    config = Config(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.3, global_batch_info={})
    originals = {name: getattr(core, name) for name in ("agg_loss", "kl_penalty")}

    def run_verl():
        policy_loss, _ = core.get_policy_loss_fn("vanilla")(
            old, new, advantages, mask, config=config
        )
        gae = core.get_adv_estimator_fn("gae")(rewards, values, mask, 1.0, 0.95)
        entropy = core.compute_entropy_loss(logits, mask, "seq-mean-token-mean")
        return policy_loss, entropy, *gae

    before = run_verl()
    replaced = adapter.patch()
    try:
        assert "verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY['vanilla']" in replaced
        assert core.get_policy_loss_fn("vanilla") is adapter.compute_policy_loss_vanilla
        assert verl_F.entropy_from_logits is adapter.entropy_from_logits
        assert adapter.patch() == replaced
        after = run_verl()
    finally:
        restored = adapter.unpatch()
    assert set(replaced) <= set(restored)
    for name, function in originals.items():
        assert getattr(core, name) is function
    assert core.get_policy_loss_fn("vanilla") is adapter.original(
        "verl.trainer.ppo.core_algos.compute_policy_loss_vanilla"
    )
    for mine, reference in zip(after, before, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-4)


# --- the policy losses of POLICY_LOSS_REGISTRY ----------------------------------------------

# registry name -> (the actor config's clip ratios; dppo: the divergence thresholds)
REGISTRY_CLIPS = {
    "vanilla": dict(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28),
    "gpg": dict(clip_ratio=0.2),
    "cispo": dict(clip_ratio=0.2, clip_ratio_low=0.1, clip_ratio_high=0.3),
    "sapo": dict(clip_ratio=0.2, tau_pos=1.0, tau_neg=1.05),
    "dppo_tv": dict(clip_ratio=0.05, clip_ratio_high=0.08, clip_ratio_c=1.3),
    "dppo_kl": dict(clip_ratio=0.01, clip_ratio_low=0.005, clip_ratio_c=1.3),
    "gspo": dict(clip_ratio=0.2, clip_ratio_low=0.05, clip_ratio_high=0.08),
    "dro": dict(clip_ratio=0.2),
    "geo_mean": dict(clip_ratio=0.2, clip_ratio_low=0.05, clip_ratio_high=0.08),
}


def _actor_config(name, dro_beta=0.1):
    """verl's own ActorConfig (gspo, sapo and cispo assert its type)."""
    from verl.workers.config import ActorConfig, PolicyLossConfig

    return ActorConfig(
        strategy="fsdp",
        ppo_micro_batch_size_per_gpu=1,
        rollout_n=1,
        policy_loss=PolicyLossConfig(loss_mode=name, dro_beta=dro_beta),
        **REGISTRY_CLIPS[name],
    )


def test_every_registry_policy_loss_is_covered():
    assert set(adapter.POLICY_LOSSES) == set(REGISTRY_CLIPS)
    left = set(core.POLICY_LOSS_REGISTRY) - set(adapter.POLICY_LOSSES)
    assert left == {"clip_cov", "kl_cov", "bypass_mode"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", sorted(REGISTRY_CLIPS))
def test_registry_policy_losses_match_verl(name, mode, weighted):
    """Each POLICY_LOSS_REGISTRY adapter against verl's own function: loss, gradient and
    metrics, with masks with holes and an empty row, with and without IS weights."""
    old = _logprobs()
    new = (old + torch.randn(B, T) * 0.3).requires_grad_(True)
    advantages = torch.randn(B, T)
    mask = _mask()
    config = _actor_config(name)
    weights = None
    if weighted:
        weights = torch.rand(B, T) * 2 + 0.1
        weights[torch.rand(B, T) < 0.2] = 0.0
    ours, our_metrics = adapter.POLICY_LOSSES[name](
        old, new, advantages, mask, mode, config, weights
    )
    theirs, their_metrics = core.POLICY_LOSS_REGISTRY[name](
        old, new, advantages, mask, mode, config, weights
    )
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(_grad(ours, new), _grad(theirs, new), **TOL)
    assert our_metrics.keys() == their_metrics.keys()
    for key, value in their_metrics.items():
        assert our_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("name", ["cispo", "gspo", "dppo_tv"])
def test_registry_policy_losses_global_batch_info_match_verl(name):
    old = _logprobs()
    new = (old + torch.randn(B, T) * 0.3).requires_grad_(True)
    advantages, mask = torch.randn(B, T), _mask()
    config = _actor_config(name)
    config.global_batch_info.update(dp_size=4, batch_num_tokens=300, global_batch_size=20)
    for mode in ("token-mean", "seq-mean-token-mean"):
        ours, _ = adapter.POLICY_LOSSES[name](old, new, advantages, mask, mode, config)
        theirs, _ = core.POLICY_LOSS_REGISTRY[name](old, new, advantages, mask, mode, config)
        torch.testing.assert_close(ours, theirs, **TOL)


def test_registry_policy_loss_errors_name_the_function():
    old, advantages, mask = _logprobs(), torch.randn(B, T), _mask()
    with pytest.raises(ValueError, match=r"compute_policy_loss_cispo: `config` is required"):
        adapter.compute_policy_loss_cispo(old, old, advantages, mask)
    config = _actor_config("dro", dro_beta=None)
    with pytest.raises(ValueError, match=r"compute_policy_loss_dro: `config.policy_loss.dro_beta`"):
        adapter.compute_policy_loss_dro(old, old, advantages, mask, config=config)


def test_patch_swaps_every_registry_policy_loss():
    before = dict(core.POLICY_LOSS_REGISTRY)
    replaced = adapter.patch()
    try:
        for key, function in adapter.POLICY_LOSSES.items():
            assert core.get_policy_loss_fn(key) is function
            assert f"{CORE_NAME}POLICY_LOSS_REGISTRY[{key!r}]" in replaced
            assert getattr(core, function.__name__) is function
    finally:
        adapter.unpatch()
    for key, function in before.items():
        assert core.POLICY_LOSS_REGISTRY[key] is function


# --- outcome advantage estimators (ADV_ESTIMATOR_REGISTRY) ---------------------------------
#
# Every adapter against verl's own function (``adapter.original``), on fresh random inputs:
# one outcome reward at the last valid token of each row (random lengths, holes in some rows),
# uid-string groups in several layouts. Intended differences (docs/integrations.md):
# - a tensor ``index`` is grouped by value; verl's loop estimators key their dicts by 0-d
#   tensors (object identity), which groups nothing reliably, so those are compared with
#   verl on the equivalent numpy labels;
# - errors verl raises with ``assert`` (config missing, GDPO keys) are ValueErrors;
# - the group sums run in double in rlhf_ext and in float32 in verl: on random inputs the
#   differences are float32 rounding (a few ulps, well inside rtol=1e-5, atol=1e-6), but a
#   group of equal non-dyadic scores under std normalisation gets exactly 0 from rlhf_ext
#   and float32 noise divided by std + eps (up to ~0.2) from verl
#   (test_equal_scores_give_exactly_zero).

OUTCOME_TOL = dict(rtol=1e-5, atol=1e-6)
ROWS, LENGTH = 48, 16
CORE_NAME = "verl.trainer.ppo.core_algos."
LAYOUTS = {
    "contiguous": [8] * 6,
    "shuffled": [8] * 6,
    "ragged": [1, 2, 3, 5, 8, 13, 16],
    "singletons": [1] * 8 + [4] * 10,
    "int_labels": [3, 5, 7, 9, 11, 13],
}
PASSK_LAYOUTS = {"contiguous": [8] * 6, "shuffled": [8] * 6, "ragged": [2, 3, 5, 8, 14, 16]}
ESTIMATORS = {
    "grpo": "compute_grpo_outcome_advantage",
    "grpo_vectorized": "compute_grpo_vectorized_outcome_advantage",
    "gdpo": "compute_gdpo_outcome_advantage",
    "grpo_passk": "compute_grpo_passk_outcome_advantage",
    "reinforce_plus_plus_baseline": "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "rloo": "compute_rloo_outcome_advantage",
    "rloo_vectorized": "compute_rloo_vectorized_outcome_advantage",
    "opo": "compute_opo_outcome_advantage",
    "reinforce_plus_plus": "compute_reinforce_plus_plus_outcome_advantage",
    "remax": "compute_remax_outcome_advantage",
    "gpg": "compute_gpg_outcome_advantage",
}


def _index(layout: str, sizes=None) -> np.ndarray:
    """Group labels for ROWS rows: uid strings (numpy object array, as verl's
    ``non_tensor_batch["uid"]``) or, for "int_labels", sparse int64 labels; rows in group
    order for "contiguous", shuffled otherwise."""
    sizes = sizes or LAYOUTS[layout]
    assert sum(sizes) == ROWS
    if layout == "int_labels":
        labels = [1000 + 7 * g for g in range(len(sizes))]
        index = np.array(
            [lab for lab, n in zip(labels, sizes, strict=True) for _ in range(n)], np.int64
        )
    else:
        labels = [_uid() for _ in sizes]
        index = np.array(
            [lab for lab, n in zip(labels, sizes, strict=True) for _ in range(n)], dtype=object
        )
    if layout != "contiguous":
        index = index[np.random.permutation(ROWS)]
    return index


def _outcome(rows=ROWS, length=LENGTH, holes=True):
    """(token_level_rewards, response_mask): random lengths 1..T, interior holes in some
    rows (multi-turn observation spans), one random reward at each row's last valid token."""
    lengths = torch.randint(1, length + 1, (rows,))
    mask = (torch.arange(length) < lengths.unsqueeze(-1)).float()
    if holes:
        hole = (torch.rand(rows, length) < 0.2) & (torch.arange(length) < lengths.unsqueeze(-1) - 1)
        mask[hole] = 0.0
    rewards = torch.zeros(rows, length)
    rewards[torch.arange(rows), lengths - 1] = torch.randn(rows) * 2 + 0.5
    return rewards, mask


def _dense(rows=ROWS, length=LENGTH):
    """Dense random token rewards (REINFORCE++, ReMax) and a mask with holes."""
    _, mask = _outcome(rows, length)
    return torch.randn(rows, length), mask


def _theirs(name):
    return adapter.original(CORE_NAME + name)


def _compare(name, *args, **kwargs):
    """Ours and verl's on clones of the same inputs (verl writes into some of them)."""

    def clone(x):
        return x.clone() if isinstance(x, torch.Tensor) else x

    ours = getattr(adapter, name)(*map(clone, args), **kwargs)
    theirs = _theirs(name)(*map(clone, args), **kwargs)
    assert len(ours) == len(theirs) == 2
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.dtype == reference.dtype and mine.shape == reference.shape
        torch.testing.assert_close(mine, reference, **OUTCOME_TOL)
    return ours


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("epsilon", [1e-6, 1e-2])
@pytest.mark.parametrize("name", ["grpo", "grpo_vectorized", "gdpo"])
def test_grpo_family_matches_verl(name, layout, norm, epsilon):
    rewards, mask = _outcome()
    advantages, returns = _compare(
        ESTIMATORS[name],
        rewards,
        mask,
        _index(layout),
        epsilon=epsilon,
        norm_adv_by_std_in_grpo=norm,
    )
    assert advantages is returns


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "name", ["reinforce_plus_plus_baseline", "rloo", "rloo_vectorized", "opo", "gpg"]
)
def test_baseline_estimators_match_verl(name, layout):
    rewards, mask = _outcome()
    _compare(ESTIMATORS[name], rewards, mask, _index(layout), config=Config(gamma=1.0))


@pytest.mark.parametrize("f_norm", [1.0, 0.3])
def test_gpg_nonzero_rescale_matches_verl(f_norm):
    """Exact-zero scores make GPG's alpha = bs / #nonzero differ from 1."""
    rewards, mask = _outcome()
    rewards[torch.randperm(ROWS)[:17]] = 0.0
    _compare(ESTIMATORS["gpg"], rewards, mask, _index("ragged"), f_norm=f_norm, alpha=5.0)


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool])
@pytest.mark.parametrize("name", ["grpo", "rloo", "opo"])
def test_integer_masks_match_verl(name, mask_dtype):
    """verl's response_mask is often the int64 attention mask; OPO's lengths are then ints."""
    rewards, mask = _outcome()
    _compare(ESTIMATORS[name], rewards, mask.to(mask_dtype), _index("shuffled"))


@pytest.mark.parametrize("layout", PASSK_LAYOUTS)
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("epsilon", [1e-6, 1e-2])
def test_passk_matches_verl(layout, norm, epsilon):
    """Pass@k reads norm_adv_by_std_in_grpo from the config and ignores the argument."""
    rewards, mask = _outcome()
    config = Config(norm_adv_by_std_in_grpo=norm)
    index = _index(layout, PASSK_LAYOUTS[layout])
    _compare(
        ESTIMATORS["grpo_passk"],
        rewards,
        mask,
        index,
        epsilon=epsilon,
        norm_adv_by_std_in_grpo=not norm,
        config=config,
    )


def test_passk_errors_like_verl():
    rewards, mask = _outcome()
    index = _index("ragged")  # has a group of one row
    name = ESTIMATORS["grpo_passk"]
    with pytest.raises(ValueError, match="at least 2"):
        _theirs(name)(rewards, mask, index, config=Config())
    with pytest.raises(ValueError, match="at least 2"):
        getattr(adapter, name)(rewards, mask, index, config=Config())
    with pytest.raises(ValueError, match="`config` is required"):
        getattr(adapter, name)(rewards, mask, _index("contiguous"))


@pytest.mark.parametrize("name", ["grpo", "gdpo", "rloo", "rloo_vectorized", "grpo_passk"])
def test_binary_rewards_with_tied_groups_match_verl(name):
    """0/1 rewards, one group all 1 and one all 0 (std 0: advantage 0), and ties for the
    best row (Pass@k: 0): exact in both."""
    rewards, mask = _outcome()
    last = rewards != 0
    rewards = (rewards > 0.5).float()
    index = _index("shuffled")
    for label, value in ((index[0], 1.0), (index[index != index[0]][0], 0.0)):
        rows = torch.from_numpy(index == label)
        rewards[rows] = torch.where(last[rows], value, 0.0)
    _compare(ESTIMATORS[name], rewards, mask, index, config=Config())


@pytest.mark.parametrize("weights", [None, [0.3, 2.0, -0.5]])
@pytest.mark.parametrize("norm", [True, False])
def test_gdpo_components_match_verl(weights, norm):
    """GDPO's per-component path (config + non_tensor_batch + batch), as verl's trainer
    passes it: component scores in non_tensor_batch (numpy / lists), prompts and an int64
    attention mask in batch; each component normalised per group, weighted sum, whitened."""
    rewards, mask = _outcome()
    index = _index("ragged")
    prompt = 5
    non_tensor_batch = {
        "uid": index,
        "format_reward": np.random.randint(0, 2, ROWS).astype(np.float64),
        "accuracy_reward": list(np.random.rand(ROWS)),
        "length_penalty": np.random.randn(ROWS).astype(np.float32),
    }
    response_lengths = (torch.arange(LENGTH) < torch.randint(1, LENGTH + 1, (ROWS, 1))).long()
    batch = {
        "prompts": torch.randint(0, 100, (ROWS, prompt)),
        "attention_mask": torch.cat([torch.ones(ROWS, prompt, dtype=torch.long),
                                     response_lengths], dim=1),
    }  # fmt: skip
    config = Config(
        gdpo_reward_keys=["format_reward", "accuracy_reward", "length_penalty"],
        gdpo_reward_weights=weights,
    )
    _compare(
        ESTIMATORS["gdpo"],
        rewards,
        mask,
        index,
        norm_adv_by_std_in_grpo=norm,
        config=config,
        non_tensor_batch=non_tensor_batch,
        batch=batch,
    )
    with pytest.raises(ValueError, match="gdpo_reward_keys"):
        adapter.compute_gdpo_outcome_advantage(
            rewards, mask, index, config=Config(), non_tensor_batch=non_tensor_batch, batch=batch
        )
    with pytest.raises(ValueError, match="'missing' not found"):
        adapter.compute_gdpo_outcome_advantage(
            rewards, mask, index, config=Config(gdpo_reward_keys=["missing"]),
            non_tensor_batch=non_tensor_batch, batch=batch,
        )  # fmt: skip


@pytest.mark.parametrize("gamma", [1.0, 0.95, 0.5])
def test_reinforce_plus_plus_matches_verl(gamma):
    """Dense token rewards, holes in the mask: rewards at masked tokens are dropped and the
    running return passes through them undiscounted (rlhf_ext.gae's masked skip)."""
    rewards, mask = _dense()
    _compare(ESTIMATORS["reinforce_plus_plus"], rewards, mask, config=Config(gamma=gamma))
    with pytest.raises(ValueError, match="`config` is required"):
        adapter.compute_reinforce_plus_plus_outcome_advantage(rewards, mask)


def test_remax_matches_verl():
    rewards, mask = _dense()
    baselines = torch.randn(ROWS)
    _compare(ESTIMATORS["remax"], rewards, baselines, mask, config=Config())


@pytest.mark.parametrize(
    "labels",
    [
        np.array(["1", "01", "2", "002", "3", "03"] * 8),  # numeric strings: grouped by value
        np.array([0.0, 1.0, 2.0, 1.0000001, 3.0, 2.0] * 8),  # near-integer floats: rounded
        np.array([0.5, 0.7, 1.5, 2.2, 1.9, 3.1] * 8),  # other floats: truncated by astype
        torch.tensor([5, 5, 7, 7, 9, 11] * 8),
        torch.tensor([0.5, 0.7, 1.5, 2.2, 0.5, 0.7] * 8),
    ],
)
def test_grpo_vectorized_groups_like_as_torch_index(labels):
    """The vectorised GRPO groups with verl's as_torch_index rules, which differ from the
    loop estimators' dict grouping for numeric-looking labels."""
    rewards, mask = _outcome()
    _compare(ESTIMATORS["grpo_vectorized"], rewards, mask, labels)


@pytest.mark.parametrize("name", ["grpo", "reinforce_plus_plus_baseline", "rloo", "gpg"])
def test_tensor_index_groups_by_value(name):
    """A tensor ``index`` is grouped by value: the result is verl's for the same labels as a
    numpy array (verl's loop estimators key dicts by 0-d tensors, i.e. by identity)."""
    rewards, mask = _outcome()
    labels = _index("int_labels")
    ours = getattr(adapter, ESTIMATORS[name])(rewards, mask, torch.from_numpy(labels))
    theirs = _theirs(ESTIMATORS[name])(rewards.clone(), mask, labels)
    torch.testing.assert_close(ours[0], theirs[0], **OUTCOME_TOL)


def test_every_outcome_estimator_is_covered():
    assert {key: f.__name__ for key, f in adapter.ADV_ESTIMATORS.items()} == ESTIMATORS
    left = set(core.ADV_ESTIMATOR_REGISTRY) - set(ESTIMATORS) - {"gae"}
    assert left == {"optimal_token_baseline", "tir_optimal_token_baseline"}


@pytest.mark.skipif(
    resolve_backend("rlhf_ext.group_advantages", "auto", torch.device("cpu")) == "torch",
    reason="the exact double-precision group sums are the compiled kernel's",
)
@pytest.mark.parametrize("name", ["grpo", "grpo_vectorized", "gdpo"])
def test_equal_scores_give_exactly_zero(name):
    """Intended difference: groups of equal non-dyadic scores (5 rows of the same random
    score) get exactly 0 from the adapter (group sums in double). verl's float32 mean is
    then often an ulp off, and dividing that by std + 1e-6 leaves advantages of up to ~0.2."""
    groups, size = 200, 5
    rewards = torch.zeros(groups * size, 4)
    rewards[:, -1] = torch.randn(groups).repeat_interleave(size)
    mask = torch.ones_like(rewards)
    index = np.repeat(np.array([_uid() for _ in range(groups)], dtype=object), size)
    if name == "gdpo":  # whitening needs a nonzero batch: one group with distinct scores
        rewards[:size, -1] = torch.randn(size)
    ours, _ = getattr(adapter, ESTIMATORS[name])(rewards, mask, index)
    theirs, _ = _theirs(ESTIMATORS[name])(rewards.clone(), mask, index)
    tied = slice(size, None)
    if name == "gdpo":  # whitened: the tied rows all sit at the same value
        assert torch.unique(ours[tied]).numel() == 1
    else:
        assert torch.equal(ours[tied], torch.zeros_like(ours[tied]))
    assert theirs[tied].abs().max() > 1e-3  # verl's float32 rounding, amplified


def test_index_length_is_checked():
    rewards, mask = _outcome()
    with pytest.raises(ValueError, match="`index` must have one label per row"):
        adapter.compute_grpo_outcome_advantage(rewards, mask, _index("contiguous")[:-1])


def test_patch_swaps_every_advantage_estimator():
    """patch(): the module attributes (ray_trainer calls
    core_algos.compute_grpo_outcome_advantage by attribute) and ADV_ESTIMATOR_REGISTRY
    entries (get_adv_estimator_fn) are ours and give verl's results; unpatch() restores
    both exactly (and leaves the registry's other entries alone)."""
    registry_before = dict(core.ADV_ESTIMATOR_REGISTRY)
    attributes_before = {name: getattr(core, name) for name in ESTIMATORS.values()}
    rewards, mask = _outcome()
    index = _index("shuffled")
    config = Config(gamma=0.9, norm_adv_by_std_in_grpo=True)
    kwargs = dict(token_level_rewards=rewards, response_mask=mask, config=config)
    before = core.get_adv_estimator_fn("rloo")(index=index, **kwargs)
    replaced = adapter.patch()
    try:
        for key, name in ESTIMATORS.items():
            ours = getattr(adapter, name)
            assert getattr(core, name) is ours
            assert core.get_adv_estimator_fn(key) is ours
            assert core.get_adv_estimator_fn(core.AdvantageEstimator(key)) is ours
            assert f"{CORE_NAME}ADV_ESTIMATOR_REGISTRY[{key!r}]" in replaced
            assert adapter.original(CORE_NAME + name) is attributes_before[name]
        after = core.get_adv_estimator_fn("rloo")(index=index, **kwargs)
        grpo = core.compute_grpo_outcome_advantage(
            token_level_rewards=rewards, response_mask=mask, index=index,
            norm_adv_by_std_in_grpo=True,
        )  # fmt: skip
    finally:
        adapter.unpatch()
    assert core.ADV_ESTIMATOR_REGISTRY == registry_before
    for key, function in registry_before.items():
        assert core.ADV_ESTIMATOR_REGISTRY[key] is function
    for name, function in attributes_before.items():
        assert getattr(core, name) is function
    for mine, reference in zip(after, before, strict=True):
        torch.testing.assert_close(mine, reference, **OUTCOME_TOL)
    reference = core.compute_grpo_outcome_advantage(rewards.clone(), mask, index)
    torch.testing.assert_close(grpo[0], reference[0], **OUTCOME_TOL)


WORKER_CHECK = """
import json, verl
from verl.trainer.ppo import core_algos
import verl.utils.torch_functional as F
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
print(json.dumps({
    "engine": FSDPEngineWithLMHead.prepare_model_outputs.__module__,
    "gae": core_algos.compute_gae_advantage_return.__module__,
    "logprobs": F.logprobs_from_logits.__module__,
    "registry": core_algos.get_adv_estimator_fn("reinforce_plus_plus").__module__,
    "policy_loss": core_algos.get_policy_loss_fn("vanilla").__module__,
}))
"""


@pytest.mark.parametrize("setting", [True, False], ids=["with the setting", "without"])
def test_verl_plugin_patches_a_fresh_process_through_verls_hook(setting):
    """What a Ray worker does: a fresh interpreter that imports verl. With the documented
    setting (VERL_USE_EXTERNAL_MODULES=rlhf_ext.integrations.verl_plugin) verl's own
    functions and registries are the adapters; without it, they are verl's."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_MODULES"}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    env["RLHF_EXT_QUIET"] = "1"
    if setting:
        env["VERL_USE_EXTERNAL_MODULES"] = "rlhf_ext.integrations.verl_plugin"
    done = subprocess.run(
        [sys.executable, "-c", WORKER_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    if setting:
        assert modules["gae"] == modules["registry"] == "rlhf_ext.integrations.verl"
        assert modules["policy_loss"].startswith("rlhf_ext.integrations")
        assert modules["logprobs"].startswith("rlhf_ext.integrations")
        assert modules["engine"] == "rlhf_ext.integrations.verl"
    else:
        assert set(modules.values()) == {
            "verl.trainer.ppo.core_algos",
            "verl.utils.torch_functional",
            "verl.workers.engine.fsdp.transformer_impl",
        }
