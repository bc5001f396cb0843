"""rlhf_ext.integrations.openrlhf against OpenRLHF 0.11.2's semantics.

OpenRLHF installs here only with --no-deps, and ``openrlhf.models`` then fails to import
(it needs flash-attn, a CUDA build, and DeepSpeed); see docs/integrations.md. So the peer's
formulas are written below in this file, from OpenRLHF 0.11.2's
``openrlhf/models/utils.py`` (compute_approx_kl, log_probs_from_logits, masked_mean),
``openrlhf/models/loss.py`` (aggregate_loss, PolicyLoss, ValueLoss) and
``openrlhf/trainer/ppo_utils/experience_maker.py``
(RemoteExperienceMaker.get_advantages_and_returns). patch() / unpatch() are exercised on a
stand-in ``openrlhf`` package with the same module layout, built from those formulas.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from rlhf_ext.integrations import openrlhf as adapter

TOL = dict(rtol=1e-5, atol=1e-5)
B, T = 5, 13


def _mask():
    mask = (torch.rand(B, T) > 0.3).float()
    mask[:, 0] = 1.0
    mask[1, T // 2 :] = 0.0
    mask[3] = 0.0
    return mask


def _grad(value, wrt):
    (grad,) = torch.autograd.grad(value, wrt)
    return grad


# -- OpenRLHF 0.11.2's formulas ------------------------------------------------------------


def peer_approx_kl(lp, base, old=None, kind="k1", unbiased=False):
    diff = lp.float() - base.float()
    if kind == "k1":
        value = diff
    elif kind == "k2":
        value = diff.square() / 2
    else:  # k3 bounds the ratio from below before the exponential
        bounded = diff.clamp(min=-10)
        value = torch.exp(-bounded) - 1 + bounded
    value = value.clamp(-10, 10)
    if not unbiased:
        return value
    weight = 1.0 if old is None else (lp.float() - old.float()).exp().clamp(max=10).detach()
    surrogate = weight * diff.square() / 2
    return value.detach() + surrogate - surrogate.detach()


def peer_masked_mean(x, mask, dim=None):
    if mask is None:
        return x.mean(dim=dim)
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim)


def peer_aggregate(loss, mask, token_level, dp_size=1, num_tokens=None, num_seqs=None):
    if token_level:
        if num_tokens is None:
            return peer_masked_mean(loss, mask)
        return (loss * mask).sum() / num_tokens * dp_size
    counts = mask.sum(-1)
    per_row = (loss * mask).sum(-1) / (counts + 1e-8)
    nonempty = (counts > 0).float()
    if num_seqs is None:
        return peer_masked_mean(per_row, nonempty)
    return (per_row * nonempty).sum() / num_seqs * dp_size


def peer_policy_loss(module, lp, old, adv, mask, dp_size=1, num_tokens=None, num_seqs=None):
    log_ratio = lp - old
    ratio = log_ratio.clamp(-20, 20).exp()
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - module.clip_eps_low, 1 + module.clip_eps_high) * adv
    lower = torch.min(surr1, surr2)
    if module.dual_clip is None:
        loss = -lower
    else:
        loss = -torch.where(adv < 0, torch.max(lower, module.dual_clip * adv), lower)
    loss = peer_aggregate(loss, mask, module.token_level_loss, dp_size, num_tokens, num_seqs)
    clip_ratio = peer_masked_mean((surr2 < surr1).float(), mask)
    ppo_kl = peer_masked_mean(-log_ratio.detach(), mask)
    return loss, clip_ratio, ppo_kl, None, None


def peer_value_loss(module, v, old, ret, mask, dp_size=1, num_tokens=None, num_seqs=None):
    if module.clip_eps is None:
        loss = (v - ret).square()
    else:
        clipped = old + (v - old).clamp(-module.clip_eps, module.clip_eps)
        loss = torch.max((clipped - ret).square(), (v - ret).square())
    return 0.5 * peer_aggregate(loss, mask, module.token_level_loss, dp_size, num_tokens, num_seqs)


def peer_gae(values, rewards, mask, gamma, lambd):
    if mask is not None:
        values, rewards = mask * values, mask * rewards
    running, columns = 0.0, []
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        running = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lambd * running
        columns.append(running)
    advantages = torch.stack(columns[::-1], dim=1)
    return advantages, advantages + values


def peer_log_probs(logits, labels, temperature=1.0):
    if temperature != 1.0:
        logits.div_(temperature)
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, -1)


# -- the adapter against them ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("with_old", [False, True])
def test_compute_approx_kl_matches_openrlhf(kind, unbiased, with_old):
    base = torch.randn(B, T) - 1
    lp = (base + torch.randn(B, T) * 4).requires_grad_(True)  # wide: hits the +-10 clamps
    old = lp.detach() + torch.randn(B, T) * 0.5 if with_old else None
    ours = adapter.compute_approx_kl(lp, base, old, kind, unbiased)
    theirs = peer_approx_kl(lp, base, old, kind, unbiased)
    torch.testing.assert_close(ours, theirs, **TOL)
    upstream = torch.randn(B, T)
    our_grad = _grad((ours * upstream).sum(), lp)
    torch.testing.assert_close(our_grad, _grad((theirs * upstream).sum(), lp), **TOL)


def test_compute_approx_kl_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="compute_approx_kl: `kl_estimator` must be one of"):
        adapter.compute_approx_kl(torch.randn(3), torch.randn(3), kl_estimator="k4")


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_log_probs_from_logits_matches_openrlhf(temperature):
    logits = torch.randn(B, T, 37) * 3
    labels = torch.randint(0, 37, (B, T))
    mine, reference = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours_input, theirs_input = mine * 1.0, reference * 1.0  # non-leaf: divided in place
    ours = adapter.log_probs_from_logits(ours_input, labels, temperature)
    theirs = peer_log_probs(theirs_input, labels, temperature)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(ours_input, theirs_input)  # the same in-place side effect
    upstream = torch.randn(B, T)
    our_grad = _grad((ours * upstream).sum(), mine)
    torch.testing.assert_close(our_grad, _grad((theirs * upstream).sum(), reference), **TOL)


@pytest.mark.parametrize("dim", [None, 1])
@pytest.mark.parametrize("masked", [True, False])
def test_masked_mean_matches_openrlhf(dim, masked):
    x = torch.randn(B, T, requires_grad=True)
    mask = _mask() if masked else None
    if mask is not None and dim is not None:
        mask[3, 0] = 1.0  # OpenRLHF gives NaN for an empty row
    ours, theirs = adapter.masked_mean(x, mask, dim), peer_masked_mean(x, mask, dim)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(_grad(ours.sum(), x), _grad(theirs.sum(), x), **TOL)


SCALINGS = [{}, {"dp_size": 4, "num_tokens": 90, "num_seqs": 11}]


def _scaling_kwargs(scaling):
    return {
        "dp_size": scaling.get("dp_size", 1),
        "batch_num_tokens": scaling.get("num_tokens"),
        "global_batch_size": scaling.get("num_seqs"),
    }


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_policy_loss_matches_openrlhf(dual_clip, token_level_loss, scaling):
    module = adapter.PolicyLoss(0.15, 0.28, dual_clip, token_level_loss)
    old = torch.randn(B, T) - 1
    lp = (old + torch.randn(B, T) * 0.4).requires_grad_(True)
    adv, mask = torch.randn(B, T), _mask()
    ours = module(lp, old, adv, mask, None, **_scaling_kwargs(scaling))
    theirs = peer_policy_loss(module, lp, old, adv, mask, **scaling)
    for mine, reference in zip(ours[:3], theirs[:3], strict=True):
        torch.testing.assert_close(mine, reference, **TOL)
    assert ours[3:] == (None, None)
    torch.testing.assert_close(_grad(ours[0], lp), _grad(theirs[0], lp), **TOL)


def test_policy_loss_unsupported_configurations_say_so():
    module = adapter.PolicyLoss(policy_loss_type="gspo")
    lp = torch.randn(2, 4)
    with pytest.raises(ValueError, match="PolicyLoss: policy_loss_type='gspo'"):
        module(lp, lp, lp, torch.ones(2, 4))
    with pytest.raises(ValueError, match="PolicyLoss: `dual_clip` must be > 1.0"):
        adapter.PolicyLoss(dual_clip=1.0)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_value_loss_matches_openrlhf(clip_eps, token_level_loss, scaling):
    module = adapter.ValueLoss(clip_eps, token_level_loss)
    old, ret = torch.randn(B, T), torch.randn(B, T)
    values = (old + torch.randn(B, T) * 0.5).requires_grad_(True)
    mask = _mask()
    ours = module(values, old, ret, mask, **_scaling_kwargs(scaling))
    theirs = peer_value_loss(module, values, old, ret, mask, **scaling)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(_grad(ours, values), _grad(theirs, values), **TOL)


@pytest.mark.parametrize("gamma, lambd", [(1.0, 0.95), (0.99, 0.9)])
@pytest.mark.parametrize("masked", [True, False])
def test_gae_matches_openrlhf(gamma, lambd, masked):
    values, rewards = torch.randn(B, T), torch.randn(B, T)
    mask = _mask() if masked else None
    ours = adapter.get_advantages_and_returns(None, values, rewards, mask, gamma, lambd)
    theirs = peer_gae(values, rewards, mask, gamma, lambd)
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-4)


# -- patch() on a stand-in package -----------------------------------------------------------

STAND_IN = {
    "openrlhf/__init__.py": "",
    "openrlhf/models/__init__.py": "",
    "openrlhf/models/utils.py": """
        from test_integrations_openrlhf import peer_approx_kl, peer_log_probs, peer_masked_mean

        def compute_approx_kl(log_probs, log_probs_base, log_probs_old=None,
                              kl_estimator="k1", unbiased_gradient=False):
            return peer_approx_kl(log_probs, log_probs_base, log_probs_old, kl_estimator,
                                  unbiased_gradient)

        def log_probs_from_logits(logits, labels, temperature=1.0):
            return peer_log_probs(logits, labels, temperature)

        def masked_mean(tensor, mask, dim=None):
            return peer_masked_mean(tensor, mask, dim)
    """,
    "openrlhf/models/loss.py": """
        import torch.nn as nn
        from test_integrations_openrlhf import peer_policy_loss, peer_value_loss
        from .utils import masked_mean

        class PolicyLoss(nn.Module):
            def __init__(self, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None,
                         token_level_loss=True, policy_loss_type="ppo"):
                super().__init__()
                self.clip_eps_low, self.clip_eps_high = clip_eps_low, clip_eps_high
                self.dual_clip, self.token_level_loss = dual_clip, token_level_loss
                self.policy_loss_type, self.is_correction_level = policy_loss_type, "off"

            def forward(self, log_probs, old_log_probs, advantages, action_mask=None,
                        rollout_log_probs=None, dp_size=1, batch_num_tokens=None,
                        global_batch_size=None):
                return peer_policy_loss(self, log_probs, old_log_probs, advantages,
                                        action_mask, dp_size, batch_num_tokens,
                                        global_batch_size)

        class ValueLoss(nn.Module):
            def __init__(self, clip_eps=None, token_level_loss=True):
                super().__init__()
                self.clip_eps, self.token_level_loss = clip_eps, token_level_loss

            def forward(self, values, old_values, returns, action_mask=None, dp_size=1,
                        batch_num_tokens=None, global_batch_size=None):
                return peer_value_loss(self, values, old_values, returns, action_mask,
                                       dp_size, batch_num_tokens, global_batch_size)
    """,
    "openrlhf/trainer/__init__.py": "",
    "openrlhf/trainer/ppo_utils/__init__.py": "",
    "openrlhf/trainer/ppo_utils/experience_maker.py": """
        from openrlhf.models.utils import compute_approx_kl, masked_mean
        from test_integrations_openrlhf import peer_gae

        class RemoteExperienceMaker:
            def get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
                return peer_gae(values, rewards, action_mask, gamma, lambd)

            def kl(self, log_probs, base):
                return compute_approx_kl(log_probs, base, kl_estimator="k3")
    """,
}


@pytest.fixture
def stand_in_openrlhf(tmp_path, monkeypatch):
    """A package named ``openrlhf`` with OpenRLHF's module layout, on sys.path in place of
    any installed one, removed afterwards."""
    for relative, source in STAND_IN.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    for name in [m for m in sys.modules if m == "openrlhf" or m.startswith("openrlhf.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "test_integrations_openrlhf", sys.modules[__name__])
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    adapter.unpatch()
    for name in [m for m in sys.modules if m == "openrlhf" or m.startswith("openrlhf.")]:
        del sys.modules[name]


def test_patch_then_openrlhf_code_paths_agree(stand_in_openrlhf):
    from openrlhf.models import loss, utils
    from openrlhf.trainer.ppo_utils import experience_maker

    old = torch.randn(B, T) - 1
    lp = old + torch.randn(B, T) * 0.4
    adv, mask = torch.randn(B, T), _mask()
    maker = experience_maker.RemoteExperienceMaker()
    policy, value = loss.PolicyLoss(dual_clip=3.0), loss.ValueLoss(0.2)

    def run_openrlhf():
        return (
            policy(lp, old, adv, mask)[:3],
            value(lp, old, adv, mask),
            maker.get_advantages_and_returns(lp, adv, mask, 1.0, 0.95),
            maker.kl(lp, old),
            loss.masked_mean(lp, mask),
        )

    originals = (utils.compute_approx_kl, loss.PolicyLoss.forward, loss.masked_mean)
    before = run_openrlhf()
    replaced = adapter.patch()
    assert adapter.patch() == replaced
    assert "openrlhf.models.loss.masked_mean" in replaced
    assert "openrlhf.trainer.ppo_utils.experience_maker.compute_approx_kl" in replaced
    assert "openrlhf.models.loss.PolicyLoss.forward" in replaced
    assert loss.PolicyLoss.forward is adapter.policy_loss_forward
    after = run_openrlhf()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-4)
    restored = adapter.unpatch()
    assert set(replaced) <= set(restored)
    assert (utils.compute_approx_kl, loss.PolicyLoss.forward, loss.masked_mean) == originals
    assert experience_maker.compute_approx_kl is originals[0]


def test_patched_policy_loss_runs_the_peer_for_unsupported_types(stand_in_openrlhf):
    from openrlhf.models import loss

    adapter.patch()
    module = loss.PolicyLoss(policy_loss_type="gspo")
    lp = torch.randn(2, 4)
    # the stand-in's own forward runs: it knows no gspo, so it computes plain PPO
    result = module(lp, lp - 0.1, torch.randn(2, 4), torch.ones(2, 4))
    assert len(result) == 5


def test_patch_without_openrlhf_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "openrlhf", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"openrlhf.patch: the `openrlhf` package"):
        adapter.patch()


def test_original_rejects_a_name_that_is_not_a_target():
    with pytest.raises(ValueError, match=r"openrlhf.original: `qualname` must name one of"):
        adapter.original("openrlhf.models.utils.compute_entropy")
