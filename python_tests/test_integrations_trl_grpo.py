"""rlhf_ext.integrations.trl.grpo_loss against TRL 1.16's ``GRPOTrainer._compute_loss``.

Its policy loss, off-policy sequence mask and clip metrics are transcribed below from TRL
1.16.0's ``trl/trainer/grpo_trainer.py`` (cited ``grpo:L``) and ``trl/trainer/utils.py``, for
``beta == 0``, no entropy mask and no vLLM importance-sampling ratio.

The tests at the end cut ``GRPOTrainer._compute_loss`` and ``get_off_policy_mask`` (and
``nanmin`` / ``nanmax`` from ``utils.py``) out of TRL 1.16's own sources with ``ast`` (the
installed TRL 1.16, which ``make test`` installs, else its wheel at ``RLHF_EXT_TRL116_WHEEL``;
skipped without either) and run them, verbatim, on a stand-in ``self`` (an identity
accelerator, a model stub that returns the test's log-probs), comparing loss, gradient and
logged metrics with the adapter.
"""

from __future__ import annotations

import ast
import itertools
import os
import zipfile
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf_ext.integrations import trl as adapter

TOL = dict(rtol=1e-5, atol=1e-6)
B, T = 7, 9
EPS_LOW, EPS_HIGH = 0.2, 0.28
DELTA = 1.5  # >= 1 + EPS_HIGH, as the sequence level requires (and TRL recommends)
SMALL_DELTA = 1.1  # < 1 + EPS_HIGH: token level only; caps what the high-clip metric sees
THRESHOLD = 0.3
CISPO_EPS_HIGH = (1.3, 0.9)  # kind "cispo" (> 1) and the folded-weight path (<= 1)
# A train micro-batch of a generation batch split into steps_per_generation slices.
TRAIN = dict(num_processes=2, gradient_accumulation_steps=2, steps_per_generation=4,
             max_completion_length=16)  # fmt: skip


def make_inputs(seed, dtype=torch.float32, per_token_adv=False):
    """Fresh log-probs whose rows drift by different amounts (so that every clip, the
    sequence-level delta cap and OPSM all fire), a mask with an empty row and a one-token
    row, and advantages of both signs with one exact 0."""
    g = torch.Generator().manual_seed(seed)
    lp = -2.0 * torch.rand(B, T, generator=g) - 0.05
    shift = torch.tensor([-0.8, -0.3, 0.05, 0.3, 0.8, 0.55, 0.1]).unsqueeze(1)
    d = shift + 0.05 * torch.randn(B, 1, generator=g) + 0.3 * torch.randn(B, T, generator=g)
    old = lp - d
    mask = (torch.rand(B, T, generator=g) > 0.25).long()
    mask[:, 0] = 1
    mask[2] = 0  # empty row
    mask[4, 1:] = 0  # one valid token
    sign = torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 0.0])
    adv = sign * (0.5 + torch.rand(B, generator=g))
    if per_token_adv:
        adv = adv.unsqueeze(1) * (0.5 + torch.rand(B, T, generator=g))
    lp = lp.to(dtype).requires_grad_()
    return lp, old.to(dtype), adv.to(dtype), mask


# -- TRL 1.16's formulas ----------------------------------------------------------------------


def trl_nanmin(x):  # utils.py:1124-1138
    if torch.isnan(x).all():
        return torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
    return torch.min(x[~torch.isnan(x)])


def trl_nanmax(x):  # utils.py:1141-1155
    if torch.isnan(x).all():
        return torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
    return torch.max(x[~torch.isnan(x)])


def trl_grpo_loss(lp, old, adv, mask, *, loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                  delta=None, level="token", tau_pos=1.0, tau_neg=1.05, max_completion_length=16,
                  num_items_in_batch=None, num_processes=1, ga=1, spg=1, threshold=None,
                  sampling=None, mode="train"):  # fmt: skip
    """grpo:3044-3184 and 3253-3288 with beta = 0, no entropy mask, no vLLM, no entropy
    bonus, no aux loss, and a single process (the accelerator's reduce / gather are the
    identity). Returns (loss, policy_loss, metrics as tensors)."""
    advantages = adv.unsqueeze(1) if adv.dim() == 1 else adv  # grpo:3049-3050
    old = lp.detach() if old is None else old  # grpo:3055-3056
    if threshold is not None:  # grpo:3058-3070, get_off_policy_mask grpo:2945-2968
        sampling = old if sampling is None else sampling
        kl_div = torch.nan_to_num(sampling - lp.detach(), nan=0.0)
        seq_kl_sum = (kl_div * mask).sum(dim=1, keepdim=True)
        avg_seq_kl = seq_kl_sum / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        off_policy_mask = ((advantages >= 0) | (avg_seq_kl <= threshold)).to(dtype=mask.dtype)
    log_ratio = lp - old  # grpo:3072-3082
    if level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)  # grpo:3095
    if loss_type == "cispo":  # grpo:3109-3111
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * lp
    elif loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:  # grpo:3112-3120
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    else:  # sapo, grpo:3121-3124
        temperatures = torch.where(advantages > 0, tau_pos, tau_neg)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        per_token_loss = -soft_coef_1 * advantages
    if threshold is not None:  # grpo:3140-3141
        per_token_loss = per_token_loss * off_policy_mask
    normalizer = ga if mode == "train" else 1.0
    if loss_type in ["grpo", "sapo"]:  # grpo:3153-3157
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        policy_loss, loss = loss.detach(), loss / normalizer
    elif loss_type == "bnpo":  # grpo:3158-3162
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
        policy_loss, loss = loss.detach(), loss / normalizer
    elif loss_type == "dr_grpo":  # grpo:3163-3167
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
        policy_loss, loss = loss.detach(), loss / normalizer
    elif loss_type in ["cispo", "dapo"]:  # grpo:3168-3174
        z = num_items_in_batch.clamp(min=1.0) / num_processes
        if mode == "train":
            z = z * ga / spg
        loss = (per_token_loss * mask).sum() / z
        policy_loss = loss.detach()
    else:  # luspo, grpo:3175-3182
        loss = (per_token_loss * mask).sum(-1).mean()
        policy_loss, loss = loss.detach(), loss / normalizer

    def masked_seq_mean(x):  # grpo:3254-3257
        if x.shape[1] == 1:
            return x.squeeze(1)
        return (x * mask).sum(-1) / mask.sum(-1)

    def global_masked_mean(x):  # grpo:3259-3265, without the .item()
        if x.shape[1] == 1:
            local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            local_sum, local_count = (x * mask).sum(), mask.sum().float()
        totals = torch.stack([local_sum, local_count])
        return totals[0] / totals[1].clamp(min=1.0)

    metrics = {}
    with torch.no_grad():
        if loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:  # grpo:3273-3283
            is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
            is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
            is_region_clipped = is_low_clipped | is_high_clipped
            metrics["clip_ratio/low_mean"] = global_masked_mean(is_low_clipped.float())
            metrics["clip_ratio/high_mean"] = global_masked_mean(is_high_clipped.float())
            metrics["clip_ratio/region_mean"] = global_masked_mean(is_region_clipped.float())
            metrics["clip_ratio/low_per_row"] = masked_seq_mean(is_low_clipped.float())
            metrics["clip_ratio/low_min"] = trl_nanmin(metrics["clip_ratio/low_per_row"])
            metrics["clip_ratio/high_per_row"] = masked_seq_mean(is_high_clipped.float())
            metrics["clip_ratio/high_max"] = trl_nanmax(metrics["clip_ratio/high_per_row"])
        elif loss_type == "cispo":  # grpo:3284-3286
            is_cispo_clipped = (coef_1 > epsilon_high) & (advantages > 0)
            metrics["cispo_clip_ratio"] = global_masked_mean(is_cispo_clipped.float())
    return loss, policy_loss, metrics


# -- the supported grid -----------------------------------------------------------------------


def _cases():
    for loss_type, level, delta, opsm in itertools.product(
        adapter.GRPO_LOSS_TYPES, adapter.GRPO_IS_LEVELS, (None, DELTA, SMALL_DELTA), (False, True)
    ):
        if loss_type == "sapo" and level == "sequence":
            continue  # rejected (test_argument_errors_name_function_and_argument)
        if delta == SMALL_DELTA and (level == "sequence" or opsm):
            continue  # rejected at sequence level; one OPSM setting is enough
        highs = CISPO_EPS_HIGH if loss_type == "cispo" else (EPS_HIGH,)
        for eps_high in highs:
            yield loss_type, level, delta, opsm, eps_high


CASES = list(_cases())
CASE_IDS = [f"{t}-{lv}-delta{d}-opsm{int(o)}-eh{e}" for t, lv, d, o, e in CASES]


def _run_both(seed, loss_type, level, delta, opsm, eps_high, *, dtype=torch.float32,
              per_token_adv=False, mode="train", sampling=False):  # fmt: skip
    lp, old, adv, mask = make_inputs(seed, dtype, per_token_adv)
    n_items = torch.tensor(float(mask.sum() + 11))  # the whole generation batch's tokens
    sampling_lp = None
    if sampling:
        g = torch.Generator().manual_seed(seed + 1)
        sampling_lp = old + 0.2 * torch.randn(B, T, generator=g).to(dtype)
        sampling_lp[3, 0] = float("nan")  # vLLM could not score it: row 3 (A < 0) stays kept
    threshold = THRESHOLD if opsm else None
    cfg = dict(loss_type=loss_type, epsilon_high=eps_high, delta=delta, level=level,
               max_completion_length=TRAIN["max_completion_length"], num_items_in_batch=n_items,
               num_processes=TRAIN["num_processes"], ga=TRAIN["gradient_accumulation_steps"],
               spg=TRAIN["steps_per_generation"], threshold=threshold, mode=mode)  # fmt: skip
    lp_peer = lp.detach().float().requires_grad_()
    peer_sampling = None if sampling_lp is None else sampling_lp.float()
    peer_loss, peer_policy, peer_metrics = trl_grpo_loss(
        lp_peer, old.float(), adv.float(), mask, sampling=peer_sampling, **cfg
    )
    (peer_grad,) = torch.autograd.grad(peer_loss, lp_peer)
    loss, metrics = adapter.grpo_loss(
        lp, old, adv, mask, loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=eps_high,
        delta=delta, importance_sampling_level=level, num_items_in_batch=n_items,
        off_policy_mask_threshold=threshold, sampling_per_token_logps=sampling_lp, mode=mode,
        **TRAIN,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, lp)
    return (loss, grad, metrics), (peer_loss, peer_grad, peer_policy, peer_metrics)


def _check(ours, peer, tol=TOL):
    loss, grad, metrics = ours
    peer_loss, peer_grad, peer_policy, peer_metrics = peer
    assert loss.dim() == 0
    torch.testing.assert_close(loss.float(), peer_loss.detach(), **tol)
    torch.testing.assert_close(grad.float(), peer_grad, **tol)
    torch.testing.assert_close(metrics["policy_loss"].float(), peer_policy, **tol)
    for key, value in peer_metrics.items():
        torch.testing.assert_close(metrics[key].float(), value.float(), equal_nan=True, **tol)
    return max(
        (loss.float() - peer_loss.detach()).abs().item(),
        (grad.float() - peer_grad).abs().max().item(),
    )


@pytest.mark.parametrize(("loss_type", "level", "delta", "opsm", "eps_high"), CASES, ids=CASE_IDS)
def test_matches_trl_formulas(loss_type, level, delta, opsm, eps_high):
    seed = CASES.index((loss_type, level, delta, opsm, eps_high))
    ours, peer = _run_both(seed, loss_type, level, delta, opsm, eps_high)
    _check(ours, peer)
    assert torch.count_nonzero(peer[1]) > 0  # a live gradient, not 0 == 0


def test_inputs_exercise_every_branch():
    """The fixed inputs really clip on both sides, cap rows at sequence level and drop rows
    with OPSM, so the grid above tests those paths."""
    lp, old, adv, mask = make_inputs(0)
    _, _, metrics = trl_grpo_loss(lp, old, adv, mask, loss_type="bnpo", delta=DELTA)
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
    d = lp.detach() - old
    seq = (d * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    assert ((seq.exp() > DELTA) & (adv < 0)).any()  # a capped row with A < 0
    assert ((d.exp() > DELTA) & (adv.unsqueeze(1) < 0) & (mask > 0)).any()
    assert ((-seq > THRESHOLD) & (adv < 0)).any()  # an OPSM-dropped row
    assert ((-seq <= THRESHOLD) & (adv < 0)).any()  # and a kept negative row
    _, _, capped = trl_grpo_loss(lp, old, adv, mask, loss_type="bnpo", delta=SMALL_DELTA)
    assert capped["clip_ratio/high_mean"] == 0  # the metric sees the capped ratio


@pytest.mark.parametrize("loss_type", adapter.GRPO_LOSS_TYPES)
def test_per_token_advantages_vllm_sampling_and_eval(loss_type):
    """[B, T] advantages (TRL subclasses), OPSM on vLLM's log-probs with a NaN, eval mode."""
    for k, level in enumerate(adapter.GRPO_IS_LEVELS):
        if loss_type == "sapo" and level == "sequence":
            continue
        eps_high = 1.3 if loss_type == "cispo" else EPS_HIGH
        ours, peer = _run_both(100 + k, loss_type, level, DELTA, True, eps_high,
                               per_token_adv=True, mode="eval", sampling=True)  # fmt: skip
        _check(ours, peer)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo", "sapo", "luspo"])
def test_bfloat16(loss_type):
    """bf16 log-probs: the adapter computes in float32, so it matches TRL's formulas on the
    same values upcast (TRL itself would round in bf16); the gradient comes back in bf16."""
    eps_high = 1.3 if loss_type == "cispo" else EPS_HIGH
    (loss, grad, metrics), peer = _run_both(7, loss_type, "token", DELTA, True, eps_high,
                                            dtype=torch.bfloat16)  # fmt: skip
    assert grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
    _check((loss, grad, metrics), peer, tol=dict(rtol=1e-2, atol=1e-3))


def test_old_logprobs_none_is_on_policy():
    """TRL's fallback: ``old = per_token_logps.detach()`` (ratio 1, no clipping)."""
    lp, _, adv, mask = make_inputs(3)
    loss, metrics = adapter.grpo_loss(lp, None, adv, mask, loss_type="grpo")
    peer_loss, _, peer_metrics = trl_grpo_loss(lp, None, adv, mask, loss_type="grpo")
    torch.testing.assert_close(loss, peer_loss, **TOL)
    torch.testing.assert_close(
        torch.autograd.grad(loss, lp)[0], torch.autograd.grad(peer_loss, lp)[0], **TOL
    )
    assert metrics["clip_ratio/region_mean"] == 0


def test_opsm_drops_a_row_without_gradient():
    lp, old, adv, mask = make_inputs(5)
    common = dict(loss_type="sapo", num_items_in_batch=mask.sum())
    loss, _ = adapter.grpo_loss(lp, old, adv, mask, off_policy_mask_threshold=THRESHOLD, **common)
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.all(grad[0] == 0) and torch.count_nonzero(grad[3]) > 0  # row 0 dropped


class _Recorder:
    """An accelerator on one of two ranks: records what it is asked to reduce / gather."""

    def __init__(self):
        self.reduced, self.gathered = [], []

    def reduce(self, t, reduction):
        assert reduction == "sum"
        self.reduced.append(t)
        return t

    def gather(self, t):
        self.gathered.append(t)
        return t


class _Replayer:
    """The other rank: adds / concatenates what the recorded rank contributed."""

    def __init__(self, other: _Recorder):
        self.other = other
        self.i = self.j = 0

    def reduce(self, t, reduction):
        self.i += 1
        return t + self.other.reduced[self.i - 1]

    def gather(self, t):
        self.j += 1
        return torch.cat([t, self.other.gathered[self.j - 1]])


@pytest.mark.parametrize(
    ("loss_type", "level"), [("dapo", "token"), ("grpo", "sequence"), ("cispo", "token")]
)
def test_global_metrics_over_two_ranks(loss_type, level):
    """grpo_global_metrics on two ranks equals TRL's metrics of the whole batch on one
    (global_masked_mean's (sum, count) all-reduce; gather + nanmin / nanmax)."""
    lp, old, adv, mask = make_inputs(11)
    kw = dict(loss_type=loss_type, importance_sampling_level=level, delta=DELTA,
              epsilon_high=1.3 if loss_type == "cispo" else EPS_HIGH,
              num_items_in_batch=mask.sum())  # fmt: skip
    rank1 = adapter.grpo_loss(lp[4:], old[4:], adv[4:], mask[4:], **kw)[1]
    rank0 = adapter.grpo_loss(lp[:4], old[:4], adv[:4], mask[:4], **kw)[1]
    recorder = _Recorder()
    adapter.grpo_global_metrics(rank1, recorder)
    merged = adapter.grpo_global_metrics(rank0, _Replayer(recorder))
    _, _, peer = trl_grpo_loss(
        lp, old, adv, mask, loss_type=loss_type, level=level, delta=DELTA,
        epsilon_high=kw["epsilon_high"], num_items_in_batch=mask.sum(),
    )  # fmt: skip
    peer = {k: v for k, v in peer.items() if not k.endswith("_per_row")}
    assert set(merged) == set(peer)
    for key, value in peer.items():
        torch.testing.assert_close(merged[key], value, equal_nan=True, **TOL)


def test_all_rows_empty_gives_nan_extremes_like_trl():
    lp, old, adv, mask = make_inputs(13)
    mask = torch.zeros_like(mask)
    loss, metrics = adapter.grpo_loss(lp, old, adv, mask, loss_type="bnpo")
    assert loss == 0 and metrics["clip_ratio/low_mean"] == 0
    assert metrics["clip_ratio/low_min"].isnan() and metrics["clip_ratio/high_max"].isnan()


# -- errors -----------------------------------------------------------------------------------

NAME = r"rlhf_ext\.integrations\.trl\.grpo_loss"


def _args():
    lp, old, adv, mask = make_inputs(17)
    return lp, old, adv, mask


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(loss_type="ppo"), "`loss_type` must be one of"),
        (dict(loss_type="vespo"), "`loss_type`='vespo' is not backed by rlhf_ext yet"),
        (dict(beta=0.04), "`beta`=0.04: the KL term .* not backed by rlhf_ext yet"),
        (dict(importance_sampling_level="row"), "`importance_sampling_level` must be one of"),
        (
            dict(loss_type="sapo", importance_sampling_level="sequence"),
            "`importance_sampling_level`='sequence' with loss_type='sapo' is not backed",
        ),
        (dict(loss_type="grpo", importance_sampling_level="sequence", delta=1.1), "`delta` must"),
        (dict(loss_type="grpo", delta=0.0), "`delta` must be > 0"),
        (dict(loss_type="dapo"), "`num_items_in_batch`"),
        (dict(loss_type="grpo", mode="test"), "`mode` must be one of"),
        (dict(loss_type="grpo", gradient_accumulation_steps=0), "`gradient_accumulation_steps`"),
        (dict(loss_type="sapo", sapo_temperature_neg=0.0), "`sapo_temperature_neg` must be > 0"),
    ],
)
def test_argument_errors_name_function_and_argument(kwargs, match):
    lp, old, adv, mask = _args()
    with pytest.raises(ValueError, match=f"{NAME}: {match}"):
        adapter.grpo_loss(lp, old, adv, mask, **kwargs)


@pytest.mark.parametrize("which", ["lp", "old", "adv", "mask", "sampling"])
def test_shape_errors_name_the_argument(which):
    lp, old, adv, mask = _args()
    sampling = None
    arg = {"lp": "per_token_logps", "old": "old_per_token_logps", "adv": "advantages",
           "mask": "completion_mask", "sampling": "sampling_per_token_logps"}[which]  # fmt: skip
    if which == "lp":
        lp = lp[0]
    elif which == "old":
        old = old[:, :-1]
    elif which == "adv":
        adv = adv[:-1]
    elif which == "mask":
        mask = mask.T
    else:
        sampling = old[:-1]
    with pytest.raises(ValueError, match=f"{NAME}: `{arg}` must"):
        adapter.grpo_loss(lp, old, adv, mask, loss_type="grpo", sampling_per_token_logps=sampling,
                          off_policy_mask_threshold=THRESHOLD)  # fmt: skip


# -- optional: TRL 1.16's own _compute_loss, cut out of its wheel -----------------------------

TRL_WHEEL = Path(os.environ.get("RLHF_EXT_TRL116_WHEEL", "/tmp/trl116/trl-1.16.0-py3-none-any.whl"))


def _installed_trl116_root() -> Path | None:
    """The directory holding the installed ``trl`` package when it is TRL 1.16, else None."""
    try:
        import trl
    except ImportError:
        return None
    return Path(trl.__file__).parents[1] if trl.__version__.startswith("1.16.") else None


# Where TRL 1.16's sources are read and imported from: the installed package, or the wheel.
TRL116_PATH = _installed_trl116_root() or (TRL_WHEEL if TRL_WHEEL.is_file() else None)
needs_wheel = pytest.mark.skipif(
    TRL116_PATH is None, reason=f"TRL 1.16 is not installed and its wheel is not at {TRL_WHEEL}"
)


def _wheel_source(module_path: str) -> str:
    """A source file of TRL 1.16 (``trl/...``), installed or in its wheel."""
    if TRL116_PATH.is_dir():
        return (TRL116_PATH / module_path).read_text()
    with zipfile.ZipFile(TRL116_PATH) as wheel:
        return wheel.read(module_path).decode()


@pytest.fixture(scope="module")
def trl_peer_class():
    """A class holding GRPOTrainer's ``_compute_loss`` and ``get_off_policy_mask`` verbatim,
    exec'd with ``torch`` and TRL's own ``nanmin`` / ``nanmax``."""
    if TRL116_PATH is None:
        pytest.skip(f"TRL 1.16 is not installed and its wheel is not at {TRL_WHEEL}")
    namespace = {"torch": torch}
    utils = ast.parse(_wheel_source("trl/trainer/utils.py"))
    helpers = [n for n in utils.body if getattr(n, "name", None) in ("nanmin", "nanmax")]
    (trainer,) = [
        n
        for n in ast.parse(_wheel_source("trl/trainer/grpo_trainer.py")).body
        if isinstance(n, ast.ClassDef) and n.name == "GRPOTrainer"
    ]
    methods = [
        n
        for n in trainer.body
        if isinstance(n, ast.FunctionDef) and n.name in ("_compute_loss", "get_off_policy_mask")
    ]
    assert len(helpers) == 2 and len(methods) == 2
    peer = ast.ClassDef(name="PeerGRPO", bases=[], keywords=[], body=methods, decorator_list=[])
    module = ast.fix_missing_locations(ast.Module(body=helpers + [peer], type_ignores=[]))
    exec(compile(module, "<trl 1.16.0>", "exec"), namespace)
    return namespace["PeerGRPO"]


def _trl_inputs(mask, adv, old, n_items):
    """The ``inputs`` dict _compute_loss reads (the ids only feed the log-prob stub)."""
    return dict(
        prompt_ids=torch.zeros(B, 1, dtype=torch.long),
        prompt_mask=torch.ones(B, 1, dtype=torch.long),
        completion_ids=torch.zeros(B, T, dtype=torch.long),
        completion_mask=mask,
        advantages=adv,
        old_per_token_logps=old,
        num_items_in_batch=n_items,
    )


def _peer_trainer(cls, lp, *, loss_type, level, delta, threshold, eps_high, mode):
    self = cls()
    entropies = torch.rand(lp.shape, generator=torch.Generator().manual_seed(0))
    self._get_per_token_logps_and_entropies = lambda *a, **k: (lp, entropies, None)
    self.top_entropy_quantile = 1.0
    self.off_policy_mask_threshold = threshold
    self.importance_sampling_level = level
    self.beta = 0.0
    self.loss_type = loss_type
    self.epsilon_low, self.epsilon_high = EPS_LOW, eps_high
    self.args = SimpleNamespace(delta=delta, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                                steps_per_generation=TRAIN["steps_per_generation"],
                                use_bias_correction_kl=True)  # fmt: skip
    self.use_vllm = False
    self.vllm_importance_sampling_correction = False
    self.model = SimpleNamespace(training=mode == "train")
    self.current_gradient_accumulation_steps = TRAIN["gradient_accumulation_steps"]
    self.max_completion_length = TRAIN["max_completion_length"]
    self.accelerator = SimpleNamespace(
        num_processes=TRAIN["num_processes"], reduce=lambda t, reduction: t, gather=lambda t: t
    )
    self._entropy_bonus_enabled = False
    self.aux_loss_enabled = False
    self._metrics = defaultdict(lambda: defaultdict(list))
    return self


@needs_wheel
@pytest.mark.parametrize(("loss_type", "level", "delta", "opsm", "eps_high"), CASES, ids=CASE_IDS)
def test_matches_trl_own_compute_loss(trl_peer_class, loss_type, level, delta, opsm, eps_high):
    seed = 1000 + CASES.index((loss_type, level, delta, opsm, eps_high))
    for mode, sampling in (("train", False), ("eval", True)):
        lp, old, adv, mask = make_inputs(seed)
        n_items = torch.tensor(float(mask.sum() + 11))
        inputs = _trl_inputs(mask, adv, old, n_items)
        if sampling:
            g = torch.Generator().manual_seed(seed)
            inputs["sampling_per_token_logps"] = old + 0.2 * torch.randn(B, T, generator=g)
            inputs["sampling_per_token_logps"][3, 0] = float("nan")
        threshold = THRESHOLD if opsm else None
        peer = _peer_trainer(trl_peer_class, lp, loss_type=loss_type, level=level, delta=delta,
                             threshold=threshold, eps_high=eps_high, mode=mode)  # fmt: skip
        peer_loss = peer._compute_loss(None, inputs)
        (peer_grad,) = torch.autograd.grad(peer_loss, lp)
        loss, metrics = adapter.grpo_loss(
            lp, old, adv, mask, loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=eps_high,
            delta=delta, importance_sampling_level=level, num_items_in_batch=n_items,
            off_policy_mask_threshold=threshold,
            sampling_per_token_logps=inputs.get("sampling_per_token_logps"), mode=mode, **TRAIN,
        )  # fmt: skip
        (grad,) = torch.autograd.grad(loss, lp)
        torch.testing.assert_close(loss, peer_loss.detach(), **TOL)
        torch.testing.assert_close(grad, peer_grad, **TOL)
        logged = {k: v for k, v in peer._metrics[mode].items() if k != "entropy"}
        expected = {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                    "clip_ratio/low_min", "clip_ratio/high_max"}  # fmt: skip
        if loss_type in ("cispo", "sapo"):
            expected = {"cispo_clip_ratio"} if loss_type == "cispo" else set()
        assert set(logged) == expected
        for key, (value,) in logged.items():
            torch.testing.assert_close(metrics[key], torch.tensor(value), equal_nan=True, **TOL)


@needs_wheel
def test_transcription_matches_trl_own_code(trl_peer_class):
    """The formulas above are TRL's: same loss and gradient as the wheel's code."""
    for loss_type in adapter.GRPO_LOSS_TYPES:
        lp, old, adv, mask = make_inputs(77)
        inputs = _trl_inputs(mask, adv, old, mask.sum())
        peer = _peer_trainer(trl_peer_class, lp, loss_type=loss_type, level="token", delta=DELTA,
                             threshold=THRESHOLD, eps_high=1.3, mode="train")  # fmt: skip
        peer_loss = peer._compute_loss(None, inputs)
        ours, _, _ = trl_grpo_loss(
            lp, old, adv, mask, loss_type=loss_type, epsilon_high=1.3, delta=DELTA,
            threshold=THRESHOLD, num_items_in_batch=mask.sum(),
            num_processes=TRAIN["num_processes"], ga=TRAIN["gradient_accumulation_steps"],
            spg=TRAIN["steps_per_generation"], max_completion_length=16,
        )  # fmt: skip
        assert torch.equal(ours, peer_loss)


PATCH_ON_TRL116 = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])  # the installed TRL 1.16's directory, or its wheel (a zip)
import trl
from trl.trainer import utils
originals = (utils.selective_log_softmax, utils.entropy_from_logits,
             utils.selective_log_softmax_and_entropy)
from rlhf_ext.integrations import trl as adapter
names = adapter.patch()
logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
row_mask = torch.ones(2, 5, dtype=torch.long)
row_mask[1, 3] = 0
both = utils.selective_log_softmax_and_entropy(logits, labels, True, 0.7, row_mask)
want = originals[2](logits, labels, True, 0.7, row_mask)
close = [
    bool(torch.allclose(utils.selective_log_softmax(logits, labels),
                        originals[0](logits, labels), atol=1e-5)),
    bool(torch.allclose(utils.entropy_from_logits(logits), originals[1](logits), atol=1e-5)),
    all(bool(torch.allclose(a, b, atol=1e-5)) for a, b in zip(both, want)),
]
print(json.dumps({"version": trl.__version__, "names": names, "close": close}))
"""


@needs_wheel
def test_patch_on_trl_116_itself():
    """patch() on TRL 1.16.0 in a fresh interpreter: inside the tested range, it replaces
    selective_log_softmax, entropy_from_logits, selective_log_softmax_and_entropy, which
    agree with TRL's own (with a temperature and a row mask for the last), and the fused LM
    head (python_tests/test_integrations_trl_fused_head.py tests it)."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", RLHF_EXT_QUIET="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", PATCH_ON_TRL116, str(TRL116_PATH)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"] == "1.16.0"
    assert "trl.trainer.utils.selective_log_softmax" in result["names"]
    assert "trl.trainer.utils.entropy_from_logits" in result["names"]
    assert "trl.trainer.utils.selective_log_softmax_and_entropy" in result["names"]
    assert "trl.trainer.utils._ChunkedLogProbFunction" in result["names"]
    assert result["close"] == [True, True, True]
