"""rlhf_ext.integrations.verl against verl's own functions (verl 0.9.1 installed with
--no-deps plus a few light dependencies; see docs/integrations.md). Without verl the module
is skipped; docs/integrations.md says how to install it. Values and gradients within float32
tolerance on random inputs with masks with holes, every mode and kind."""

from __future__ import annotations

import pytest
import torch

core = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_F = pytest.importorskip("verl.utils.torch_functional")

from rlhf_ext.integrations import verl as adapter  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
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


FUNCTIONS = ["logprobs_from_logits", "entropy_from_logits"]


def _call(name, module, logits, labels):
    if name == "entropy_from_logits":
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
