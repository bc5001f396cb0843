"""rlhf_ext.integrations.openrlhf against OpenRLHF 0.11.2's semantics.

OpenRLHF installs here only with --no-deps, and ``openrlhf.models`` then fails to import
(it needs flash-attn, a CUDA build, and DeepSpeed); see docs/integrations.md. So the peer's
formulas are written below in this file, from OpenRLHF 0.11.2's
``openrlhf/models/utils.py`` (compute_approx_kl, log_probs_from_logits, masked_mean),
``openrlhf/models/loss.py`` (aggregate_loss, PolicyLoss, ValueLoss) and
``openrlhf/trainer/ppo_utils/experience_maker.py`` (RemoteExperienceMaker's
get_advantages_and_returns, get_cumulative_returns and the group step of
compute_advantages_and_returns), with file:line citations. patch() / unpatch() are
exercised on a stand-in ``openrlhf`` package with the same module layout, built from those
formulas.

Where OpenRLHF 0.11.2's wheel is on disk (``make test`` downloads it into
``.venv/peer-wheels``; ``RLHF_EXT_OPENRLHF_WHEEL`` elsewhere; skipped without it), the tests
at the end run the peer's own code: the pure functions and classes are cut
out of the wheel's sources with ``ast`` and exec'd without flash-attn / DeepSpeed / Ray, and
the wheel's ``loss.py`` is used verbatim in a stand-in package for patch().
"""

from __future__ import annotations

import ast
import copy
import itertools
import sys
import textwrap
import types
from typing import Optional, Union

import pytest
import torch

from bench import peers
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
    # loss.py:174-259, without the IS correction (is_correction_level="off")
    log_ratio = lp - old  # :185
    if module.policy_loss_type == "ppo":  # :186-188
        ratio = log_ratio.clamp(-20, 20).exp()
    else:  # gspo, :189-196: the row's mean log-ratio (count clamped to 1), no clamp, times mask
        seq_log_ratio = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        ratio = seq_log_ratio.exp().unsqueeze(-1) * mask
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


def peer_cumulative_returns(rewards, mask, gamma):
    # experience_maker.py:389-421
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.size(0), device=rewards.device)  # float32, as OpenRLHF's
    if mask is not None:
        rewards = mask * rewards
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns


def peer_group_step(rewards, estimator):
    # experience_maker.py:268-278, on the [num_prompts, n_samples_per_prompt] matrix of :256
    n = rewards.shape[1]
    if estimator == "rloo":
        return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (n - 1)
    if estimator in ["reinforce_baseline", "dr_grpo"]:
        return rewards - rewards.mean(-1, keepdim=True)
    if estimator == "group_norm":
        centred = rewards - rewards.mean(-1, keepdim=True)
        return centred / (rewards.std(-1, keepdim=True) + 1e-9)
    if estimator == "flash_reinforce":
        return rewards - rewards.mean()
    return rewards  # gae, reinforce


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
    assert not adapter._needs_peer_policy_loss(module)
    old = torch.randn(B, T) - 1
    lp = (old + torch.randn(B, T) * 0.4).requires_grad_(True)
    adv, mask = torch.randn(B, T), _mask()
    ours = module(lp, old, adv, mask, None, **_scaling_kwargs(scaling))
    theirs = peer_policy_loss(module, lp, old, adv, mask, **scaling)
    for mine, reference in zip(ours[:3], theirs[:3], strict=True):
        torch.testing.assert_close(mine, reference, **TOL)
    assert ours[3:] == (None, None)
    torch.testing.assert_close(_grad(ours[0], lp), _grad(theirs[0], lp), **TOL)


def _gspo_inputs(dtype, per_row_advantage, spread=0.3):
    old = (torch.randn(B, T) - 1).to(dtype)
    lp = (old.float() + torch.randn(B, T) * spread).to(dtype).requires_grad_(True)
    adv = torch.randn(B, 1).expand(B, T) if per_row_advantage else torch.randn(B, T)
    return lp, old, adv.to(dtype).contiguous(), _mask()


@pytest.mark.parametrize("clip", [(0.2, 0.2), (3e-4, 4e-4), (0.1, 0.3)])
@pytest.mark.parametrize("per_row_advantage", [True, False])
@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gspo_policy_loss_matches_openrlhf(clip, per_row_advantage, scaling, dtype):
    module = adapter.PolicyLoss(*clip, policy_loss_type="gspo")
    assert module.token_level_loss is False  # GSPO forces per-sequence aggregation
    assert not adapter._needs_peer_policy_loss(module)
    lp, old, adv, mask = _gspo_inputs(dtype, per_row_advantage)
    ours = module(lp, old, adv, mask, None, **_scaling_kwargs(scaling))
    # rlhf_ext computes in float32 from bf16 inputs: the peer's formula on the same values
    reference_lp = lp.detach().float().requires_grad_(True)
    theirs = peer_policy_loss(module, reference_lp, old.float(), adv.float(), mask, **scaling)
    for mine, reference in zip(ours[:3], theirs[:3], strict=True):
        torch.testing.assert_close(mine, reference, **TOL)
    assert ours[3:] == (None, None)
    grad_tol = TOL if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-6)  # a bf16 gradient
    our_grad = _grad(ours[0], lp)
    assert our_grad.dtype == dtype
    torch.testing.assert_close(our_grad.float(), _grad(theirs[0], reference_lp), **grad_tol)
    assert torch.all(our_grad[mask == 0] == 0)


def test_gspo_policy_loss_clip_ratio_counts_clipped_tokens():
    """Wide log-ratios: most sequences leave the band, so clip_ratio is far from 0 and 1."""
    module = adapter.PolicyLoss(0.05, 0.05, policy_loss_type="gspo")
    lp, old, adv, mask = _gspo_inputs(torch.float32, False, spread=1.0)
    ours = module(lp, old, adv, mask)
    theirs = peer_policy_loss(module, lp, old, adv, mask)
    assert 0.05 < float(theirs[1]) < 0.95
    torch.testing.assert_close(ours[1], theirs[1], **TOL)
    torch.testing.assert_close(_grad(ours[0], lp), _grad(theirs[0], lp), **TOL)


def test_gspo_policy_loss_on_purpose_differences():
    module = adapter.PolicyLoss(policy_loss_type="gspo")
    lp, old, adv, _ = _gspo_inputs(torch.float32, True)
    # no mask: every token valid (OpenRLHF's gspo needs a mask: it multiplies by it)
    ours = module(lp, old, adv, None)
    theirs = peer_policy_loss(module, lp, old, adv, torch.ones(B, T))
    for mine, reference in zip(ours[:3], theirs[:3], strict=True):
        torch.testing.assert_close(mine, reference, **TOL)
    # an all-masked micro-batch: 0 loss, statistics and gradient (OpenRLHF: NaN)
    loss, clip_ratio, ppo_kl, _, _ = module(lp, old, adv, torch.zeros(B, T))
    assert float(loss.detach()) == float(clip_ratio) == float(ppo_kl) == 0.0
    assert torch.all(_grad(loss, lp) == 0)


@pytest.mark.parametrize(
    "kwargs, what",
    [
        (dict(policy_loss_type="gspo", dual_clip=3.0), "policy_loss_type='gspo' with"),
        (dict(is_correction_level="token"), "is_correction_level='token'"),
        (dict(policy_loss_type="gspo", is_correction_level="seq"), "is_correction_level='seq'"),
        (dict(policy_loss_type="cispo"), "policy_loss_type='cispo'"),
    ],
)
def test_policy_loss_unsupported_configurations_say_so(kwargs, what):
    module = adapter.PolicyLoss(**kwargs)
    assert adapter._needs_peer_policy_loss(module)
    lp = torch.randn(2, 4)
    with pytest.raises(ValueError, match=rf"PolicyLoss: .*{what}.* is not backed by rlhf_ext"):
        module(lp, lp, lp, torch.ones(2, 4), lp)


def test_policy_loss_rejects_a_dual_clip_at_most_one():
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


@pytest.mark.parametrize("gamma", [1.0, 0.99, 0.7])
@pytest.mark.parametrize("mask_kind", ["bool", "float", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cumulative_returns_are_openrlhf_bit_for_bit(gamma, mask_kind, dtype):
    rewards = torch.randn(B, 300).to(dtype)  # long rows: any reassociation would show
    mask = None
    if mask_kind is not None:
        mask = torch.rand(B, 300) > 0.3
        mask[3] = False
        mask = mask if mask_kind == "bool" else mask.float()
    ours = adapter.get_cumulative_returns(None, rewards, mask, gamma)
    theirs = peer_cumulative_returns(rewards, mask, gamma)
    assert ours.dtype == theirs.dtype == dtype
    # the same float ops in the same order (r + gamma * G, float32 accumulation)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("estimator", adapter.GROUP_ESTIMATORS + adapter.UNGROUPED_ESTIMATORS)
@pytest.mark.parametrize("n_samples", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_baseline_matches_openrlhf(estimator, n_samples, dtype):
    # OpenRLHF promotes rewards to >= float32 first (experience_maker.py:244)
    rewards = (torch.randn(6, n_samples) * 2 + 0.5).to(dtype)
    rewards[2] = torch.rand(n_samples).round().to(dtype)  # a 0/1 group, as from a verifier
    ours = adapter.group_baseline(rewards, estimator)
    theirs = peer_group_step(rewards, estimator)
    assert ours.shape == theirs.shape and ours.dtype == dtype
    # rlhf_ext sums in double: within one float32 rounding of the exact value
    exact = peer_group_step(rewards.double(), estimator).to(dtype)
    torch.testing.assert_close(ours, exact, rtol=1.2e-7, atol=1e-7)
    # and close to OpenRLHF's float32 arithmetic, whose own error in group_norm grows with a
    # group's max|r| / std (two nearly equal rewards of a pair: up to ~2e-3 seen)
    allowed = torch.full((rewards.shape[0], 1), 1e-5, dtype=torch.float64)
    if estimator == "group_norm":
        std = rewards.double().std(-1, keepdim=True)
        condition = torch.where(std > 0, rewards.double().abs().amax(-1, keepdim=True) / std, 0)
        allowed = allowed * (1 + condition)
    error = (ours.double() - theirs.double()).abs() - 1e-5 * theirs.double().abs()
    assert torch.all(error <= allowed), f"max error {float(error.max())}"


@pytest.mark.parametrize("estimator", ["rloo", "group_norm", "reinforce_baseline", "dr_grpo"])
def test_group_baseline_of_one_sample_per_prompt_is_zero(estimator):
    rewards = torch.randn(5, 1)
    # OpenRLHF: rloo 0/0 and group_norm's one-sample std give NaN (its CLI rejects n=1)
    assert torch.all(adapter.group_baseline(rewards, estimator) == 0)
    flash = adapter.group_baseline(rewards, "flash_reinforce")
    torch.testing.assert_close(flash, peer_group_step(rewards, "flash_reinforce"), **TOL)


def test_group_baseline_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"group_baseline: `advantage_estimator` must be one"):
        adapter.group_baseline(torch.randn(4, 2), "grpo")
    with pytest.raises(ValueError, match=r"group_baseline: `rewards` must be a \[num_prompts"):
        adapter.group_baseline(torch.randn(8), "rloo")


# -- patch() on a stand-in package -----------------------------------------------------------

STAND_IN = {
    "openrlhf/__init__.py": '__version__ = "0.11.2"  # the version the adapter is tested with\n',
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
            peer_calls = 0

            def __init__(self, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None,
                         token_level_loss=True, policy_loss_type="ppo",
                         is_correction_level="off"):
                super().__init__()
                self.clip_eps_low, self.clip_eps_high = clip_eps_low, clip_eps_high
                self.dual_clip, self.token_level_loss = dual_clip, token_level_loss
                self.policy_loss_type = policy_loss_type
                self.is_correction_level = is_correction_level
                if policy_loss_type == "gspo":
                    self.token_level_loss = False

            def forward(self, log_probs, old_log_probs, advantages, action_mask=None,
                        rollout_log_probs=None, dp_size=1, batch_num_tokens=None,
                        global_batch_size=None):
                PolicyLoss.peer_calls += 1  # the stand-in knows no IS correction
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
        from test_integrations_openrlhf import peer_cumulative_returns, peer_gae

        class RemoteExperienceMaker:
            def get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
                return peer_gae(values, rewards, action_mask, gamma, lambd)

            def get_cumulative_returns(self, rewards, action_mask, gamma):
                return peer_cumulative_returns(rewards, action_mask, gamma)

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
    gspo = loss.PolicyLoss(0.1, 0.12, policy_loss_type="gspo")

    def run_openrlhf():
        return (
            policy(lp, old, adv, mask)[:3],
            gspo(lp, old, adv, mask)[:3],
            value(lp, old, adv, mask),
            maker.get_advantages_and_returns(lp, adv, mask, 1.0, 0.95),
            maker.get_cumulative_returns(adv, mask, 1.0),
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
    cumulative = "openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker."
    assert cumulative + "get_cumulative_returns" in replaced
    assert loss.PolicyLoss.forward is adapter.policy_loss_forward
    calls = loss.PolicyLoss.peer_calls
    after = run_openrlhf()
    assert loss.PolicyLoss.peer_calls == calls  # ppo and gspo both ran on rlhf_ext
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-4)
    restored = adapter.unpatch()
    assert set(replaced) <= set(restored)
    assert (utils.compute_approx_kl, loss.PolicyLoss.forward, loss.masked_mean) == originals
    assert experience_maker.compute_approx_kl is originals[0]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(policy_loss_type="gspo", dual_clip=3.0),
        dict(is_correction_level="token"),
        dict(policy_loss_type="gspo", is_correction_level="seq"),
    ],
)
def test_patched_policy_loss_runs_the_peer_for_unsupported_configurations(
    stand_in_openrlhf, kwargs
):
    from openrlhf.models import loss

    adapter.patch()
    module = loss.PolicyLoss(**kwargs)
    lp = torch.randn(2, 4)
    calls = loss.PolicyLoss.peer_calls
    result = module(lp, lp - 0.1, torch.randn(2, 4), torch.ones(2, 4), lp)
    assert len(result) == 5
    assert loss.PolicyLoss.peer_calls == calls + 1  # the stand-in's own forward ran


def test_patch_without_openrlhf_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "openrlhf", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"openrlhf.patch: the `openrlhf` package"):
        adapter.patch()


def test_original_rejects_a_name_that_is_not_a_target():
    with pytest.raises(ValueError, match=r"openrlhf.original: `qualname` must name one of"):
        adapter.original("openrlhf.models.utils.compute_entropy")


# -- optional: OpenRLHF 0.11.2's own code, cut out of its wheel ------------------------------


PEER_WHEEL = peers.openrlhf_wheel_path()
needs_wheel = pytest.mark.skipif(
    not PEER_WHEEL.is_file(), reason=f"OpenRLHF 0.11.2's wheel is not at {PEER_WHEEL}"
)
ESTIMATORS = ("gae", "reinforce") + adapter.GROUP_ESTIMATORS


def _wheel_source(module_path: str) -> str:
    return peers.wheel_source(PEER_WHEEL, module_path)


_top_level = peers.top_level


def _exec(nodes, namespace: dict) -> dict:
    return peers.exec_nodes(nodes, namespace, "<openrlhf 0.11.2>")


class _Logger:
    """OpenRLHF's module logger, silent (the experience maker warns when it resets gamma)."""

    def warning(self, *args, **kwargs):
        pass

    info = warning


def _group_step_node(method: ast.FunctionDef) -> ast.If:
    """The estimator if/elif chain of compute_advantages_and_returns (experience_maker.py
    :268-278), found by its first test."""
    for node in ast.walk(method):
        if isinstance(node, ast.If) and "estimator == 'rloo'" in ast.unparse(node.test):
            return node
    raise AssertionError("the group step of compute_advantages_and_returns is not found")


@pytest.fixture(scope="module")
def openrlhf_code():
    """OpenRLHF 0.11.2's own pure code, exec'd from its wheel: the functions of models/utils
    and models/loss, and a RemoteExperienceMaker with its three advantage methods (also one
    whose group step is the documented one-line ``group_baseline`` use)."""
    if not PEER_WHEEL.is_file():
        pytest.skip(f"OpenRLHF 0.11.2's wheel is not at {PEER_WHEEL}")
    # the names OpenRLHF's code reads from its imports (typing's Tuple / List are aliases)
    peer = dict(torch=torch, nn=torch.nn, F=torch.nn.functional, dist=torch.distributed,
                Optional=Optional, Tuple=tuple, Union=Union, List=list, itertools=itertools,
                logger=_Logger(), apply_length_penalties=lambda experiences, a: None)  # fmt: skip
    utils_names = ["KL_IS_WEIGHT_CLIP", "compute_approx_kl", "compute_reward",
                   "_logsumexp_by_chunk", "log_probs_from_logits", "masked_mean"]  # fmt: skip
    _exec(_top_level(_wheel_source("openrlhf/models/utils.py"), utils_names), peer)
    loss_names = ["aggregate_loss", "PolicyLoss", "ValueLoss"]
    _exec(_top_level(_wheel_source("openrlhf/models/loss.py"), loss_names), peer)
    maker_source = _wheel_source("openrlhf/trainer/ppo_utils/experience_maker.py")
    (maker,) = _top_level(maker_source, ["RemoteExperienceMaker"])
    wanted = ("compute_advantages_and_returns", "get_advantages_and_returns",
              "get_cumulative_returns")  # fmt: skip
    maker.body = [n for n in maker.body if getattr(n, "name", None) in wanted]
    assert len(maker.body) == 3
    _exec([maker], peer)
    # the same class with the group step replaced by the documented one-line use
    one_line = copy.deepcopy(maker)
    one_line.name = "OneLineMaker"
    step = _group_step_node(one_line)
    (line,) = ast.parse("rewards = group_baseline(rewards, args.algo.advantage.estimator)").body
    (method,) = [n for n in one_line.body if n.name == "compute_advantages_and_returns"]
    method.body[method.body.index(step)] = line  # a statement of the method's own body
    one_line_namespace = _exec([one_line], dict(peer, group_baseline=adapter.group_baseline))
    peer["OneLineMaker"] = one_line_namespace["OneLineMaker"]
    peer["group_step"] = _group_step_node(maker)
    return types.SimpleNamespace(**peer)


def _args(estimator, n_samples, gamma=1.0, no_std_norm=False):
    advantage = types.SimpleNamespace(estimator=estimator, gamma=gamma, lambd=0.95,
                                      no_std_norm=no_std_norm)  # fmt: skip
    return types.SimpleNamespace(
        algo=types.SimpleNamespace(advantage=advantage),
        rollout=types.SimpleNamespace(n_samples_per_prompt=n_samples),
        reward=types.SimpleNamespace(clip_range=(-3.0, 3.0)),
    )


@needs_wheel
def test_transcribed_formulas_are_openrlhf_own(openrlhf_code):
    """The formulas written above give the same numbers as OpenRLHF's code."""
    old = torch.randn(B, T) - 1
    lp = old + torch.randn(B, T) * 0.4
    adv, values, mask = torch.randn(B, T), torch.randn(B, T), _mask()  # row 3 empty
    for kind, unbiased in itertools.product(("k1", "k2", "k3"), (False, True)):
        mine = peer_approx_kl(lp, old, old + 0.1, kind, unbiased)
        torch.testing.assert_close(
            mine, openrlhf_code.compute_approx_kl(lp, old, old + 0.1, kind, unbiased)
        )
    for kwargs in (dict(dual_clip=3.0), dict(policy_loss_type="gspo", clip_eps_high=0.3)):
        module = openrlhf_code.PolicyLoss(**kwargs)
        torch.testing.assert_close(
            peer_policy_loss(module, lp, old, adv, mask, 2, 40.0, 7.0)[:3],
            module(lp, old, adv, mask, None, 2, 40.0, 7.0)[:3],
        )
    for clip_eps, token_level_loss in itertools.product((None, 0.2), (True, False)):
        module = openrlhf_code.ValueLoss(clip_eps, token_level_loss)
        torch.testing.assert_close(
            peer_value_loss(module, lp, old, adv, mask, 2, 40.0, 7.0),
            module(lp, old, adv, mask, 2, 40.0, 7.0),
        )
    for dim in (None, 1):
        torch.testing.assert_close(
            peer_masked_mean(lp, mask, dim),
            openrlhf_code.masked_mean(lp, mask, dim),
            equal_nan=True,
        )
    logits, labels = torch.randn(B, T, 37) * 3, torch.randint(0, 37, (B, T))
    torch.testing.assert_close(
        peer_log_probs(logits.clone(), labels, 0.7),
        openrlhf_code.log_probs_from_logits(logits.clone(), labels, 0.7),
    )
    maker = openrlhf_code.RemoteExperienceMaker.__new__(openrlhf_code.RemoteExperienceMaker)
    torch.testing.assert_close(
        peer_gae(values, adv, mask, 0.99, 0.9),
        maker.get_advantages_and_returns(values, adv, mask, 0.99, 0.9),
    )
    torch.testing.assert_close(
        peer_cumulative_returns(adv, mask.bool(), 0.99),
        maker.get_cumulative_returns(adv, mask.bool(), 0.99),
        rtol=0,
        atol=0,
    )


def _peer_group_step(openrlhf_code, rewards, estimator):
    """experience_maker.py:268-278 run as OpenRLHF's own statements."""
    namespace = dict(rewards=rewards, args=_args(estimator, rewards.shape[1]))
    _exec([openrlhf_code.group_step], namespace)
    return namespace["rewards"]


@needs_wheel
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("n_samples", [2, 4])
def test_group_baseline_matches_openrlhf_own_code(openrlhf_code, estimator, n_samples):
    rewards = torch.randn(5, n_samples) * 2 + 0.5
    theirs = _peer_group_step(openrlhf_code, rewards.clone(), estimator)
    torch.testing.assert_close(peer_group_step(rewards, estimator), theirs, rtol=0, atol=0)
    torch.testing.assert_close(adapter.group_baseline(rewards, estimator), theirs, **TOL)


def _experiences(n_prompts, n_samples, sizes):
    """A rollout of n_prompts x n_samples responses split into micro-batches of ``sizes``
    rows in a shuffled order (OpenRLHF's dynamic batching), with varied lengths."""
    order = torch.randperm(n_prompts * n_samples).tolist()
    experiences, start = [], 0
    for size in sizes:
        mask = torch.rand(size, T) > 0.2
        mask[:, 0] = True
        mask[0, T // 2 :] = False
        experiences.append(
            types.SimpleNamespace(
                index=order[start : start + size],
                rewards=torch.randn(size),
                kl=torch.randn(size, T) * 0.1,
                action_mask=mask,
                values=torch.randn(size, T),
                info={},
            )
        )
        start += size
    assert start == n_prompts * n_samples
    return experiences


def _run_maker(cls, estimator, experiences, gamma, no_std_norm):
    maker = cls.__new__(cls)
    maker.strategy = types.SimpleNamespace(args=_args(estimator, 4, gamma, no_std_norm))
    maker.advantage_estimator = estimator
    maker.kl_ctl = types.SimpleNamespace(value=0.05)
    done = maker.compute_advantages_and_returns(copy.deepcopy(experiences))
    return [(e.advantages, e.returns) for e in done]


@needs_wheel
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("no_std_norm", [False, True])
def test_openrlhf_compute_advantages_and_returns_with_the_adapter(
    openrlhf_code, estimator, no_std_norm
):
    """OpenRLHF's own compute_advantages_and_returns, run (1) as it is, (2) with the patched
    methods (get_advantages_and_returns, get_cumulative_returns) and (3) also with its group
    step replaced by the documented ``group_baseline`` line."""
    experiences = _experiences(3, 4, [5, 4, 3])
    gamma = 0.97 if estimator in ("gae", "reinforce") else 1.0
    peer = openrlhf_code.RemoteExperienceMaker
    methods = dict(
        get_advantages_and_returns=adapter.get_advantages_and_returns,
        get_cumulative_returns=adapter.get_cumulative_returns,
    )
    patched = type("Patched", (peer,), methods)
    one_line = type("OneLinePatched", (openrlhf_code.OneLineMaker,), methods)
    theirs = _run_maker(peer, estimator, experiences, gamma, no_std_norm)
    for cls in (patched, one_line):
        ours = _run_maker(cls, estimator, experiences, gamma, no_std_norm)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if estimator != "gae":  # the same bits until the group step's sums
        ours = _run_maker(patched, estimator, experiences, gamma, no_std_norm)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@needs_wheel
@pytest.mark.parametrize("policy_loss_type", ["ppo", "gspo"])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_policy_loss_matches_openrlhf_own_forward(
    openrlhf_code, policy_loss_type, token_level_loss, dual_clip, scaling
):
    peer_module = openrlhf_code.PolicyLoss(0.15, 0.28, dual_clip, token_level_loss,
                                           policy_loss_type)  # fmt: skip
    ours_module = adapter.PolicyLoss(0.15, 0.28, dual_clip, token_level_loss, policy_loss_type)
    lp, old, adv, mask = _gspo_inputs(torch.float32, policy_loss_type == "gspo")  # row 3 empty
    kwargs = _scaling_kwargs(scaling)
    theirs = peer_module(lp, old, adv, mask, None, **kwargs)
    if adapter._needs_peer_policy_loss(ours_module):  # gspo with dual_clip
        with pytest.raises(ValueError, match="is not backed by rlhf_ext"):
            ours_module(lp, old, adv, mask, None, **kwargs)
        return
    ours = ours_module(lp, old, adv, mask, None, **kwargs)
    torch.testing.assert_close(ours[:3], theirs[:3], **TOL)
    assert ours[3:] == theirs[3:] == (None, None)
    torch.testing.assert_close(_grad(ours[0], lp), _grad(theirs[0], lp), **TOL)


@needs_wheel
def test_patch_on_openrlhf_own_loss_module(tmp_path, monkeypatch, openrlhf_code):
    """patch() on a stand-in package whose models/loss.py is OpenRLHF 0.11.2's own file: ppo
    and gspo run rlhf_ext and agree with the peer's forward; the IS correction and gspo
    with dual_clip run the peer's forward itself."""
    stand_in = dict(STAND_IN)
    stand_in["openrlhf/models/loss.py"] = _wheel_source("openrlhf/models/loss.py")
    for relative, source in stand_in.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source if relative.endswith("loss.py") else textwrap.dedent(source))
    for name in [m for m in sys.modules if m == "openrlhf" or m.startswith("openrlhf.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "test_integrations_openrlhf", sys.modules[__name__])
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        from openrlhf.models import loss

        lp, old, adv, mask = _gspo_inputs(torch.float32, True)
        rollout = old + torch.randn(B, T) * 0.05
        configs = [
            dict(),
            dict(policy_loss_type="gspo"),
            dict(policy_loss_type="gspo", dual_clip=3.0),
            dict(is_correction_level="token"),
            dict(is_correction_level="seq", policy_loss_type="gspo"),
        ]
        modules = [loss.PolicyLoss(**config) for config in configs]
        before = [m(lp, old, adv, mask, rollout, 2, 50.0, 8.0) for m in modules]
        adapter.patch()
        assert loss.PolicyLoss.forward is adapter.policy_loss_forward
        after = [m(lp, old, adv, mask, rollout, 2, 50.0, 8.0) for m in modules]
        for mine, reference in zip(after, before, strict=True):
            torch.testing.assert_close(mine, reference, **TOL)
        for module, (loss_value, *_) in zip(modules, after, strict=True):
            reference = adapter.original("openrlhf.models.loss.PolicyLoss.forward")
            peer_loss = reference(module, lp, old, adv, mask, rollout, 2, 50.0, 8.0)[0]
            torch.testing.assert_close(_grad(loss_value, lp), _grad(peer_loss, lp), **TOL)
    finally:
        adapter.unpatch()
        for name in [m for m in sys.modules if m == "openrlhf" or m.startswith("openrlhf.")]:
            del sys.modules[name]


@pytest.mark.usefixtures("stand_in_openrlhf")
def test_patch_refuses_an_untested_openrlhf_version():
    """OpenRLHF 0.11.0's ppo_actor unpacks four loss values where 0.11.2's loss returns
    five: outside the tested range patch() replaces nothing and says which versions."""
    import openrlhf
    from openrlhf.models import utils

    original = utils.masked_mean
    openrlhf.__version__ = "0.11.0"
    message = r"openrlhf 0\.11\.0 is installed; .* openrlhf>=0\.11\.2,<0\.12"
    with pytest.raises(RuntimeError, match=message):
        adapter.patch()
    assert utils.masked_mean is original and not adapter._PATCHER.active
    with pytest.warns(RuntimeWarning, match="outside the versions this adapter is tested with"):
        assert adapter.patch(allow_untested=True)
    assert utils.masked_mean is not original
    adapter.unpatch()
