"""rlhf_ext.group_advantages against reference.py (float64) and against the formulas
written out by hand, on every backend here; batch-order invariance and determinism;
bad input. (The peers' own estimators: test_integrations_verl.py.)"""

from __future__ import annotations

import functools
import itertools

import conftest
import pytest
import torch
from conftest import CPU_BACKENDS, assert_within_eager_error

import rlhf_ext
from rlhf_ext import reference
from rlhf_ext.ops._vocab import GROUP_BASELINES, GROUP_SCALES

OP = "rlhf_ext.group_advantages"
KERNEL_BACKENDS = [b for b in CPU_BACKENDS if b != "torch"]


def _problem(inputs, rows=24, components=None, singletons=True):
    """Scores, shuffled group ids (sizes 1..6 when singletons, else 2..6), lengths and
    per-row baselines."""
    sizes, total = [], 0
    while total < rows:
        size = int(inputs.randint(1 if singletons else 2, 7))
        size = min(size, rows - total)
        if size == 1 and not singletons:
            sizes[-1] += 1
        else:
            sizes.append(size)
        total += size
    ids = torch.cat([torch.full((n,), 3 * g + 1) for g, n in enumerate(sizes)])
    ids = ids[torch.randperm(rows, generator=inputs.gen)]
    shape = (rows,) if components is None else (rows, components)
    scores = inputs.randn(*shape, dtype=torch.float64)
    lengths = inputs.randint(1, 50, (rows,)).double()
    baselines = inputs.randn(rows, dtype=torch.float64)
    return scores, ids, lengths, baselines


def _call(backend, scores, ids, lengths, baselines, **options):
    return rlhf_ext.group_advantages(
        scores, ids, lengths=lengths, baselines=baselines, backend=backend, **options
    )


OPTION_GRID = [
    dict(baseline=b, scale=s, unbiased=u, eps_mode=m, singleton=g, nonzero_rescale=r)
    for b, s, u, m, g, r in itertools.product(
        GROUP_BASELINES, GROUP_SCALES, [True, False], ["add", "clamp"], ["zero", "raw"],
        [False, True],
    )
]  # fmt: skip


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("nan_scores", ["propagate", "ignore"])
def test_group_advantages_equals_the_reference_for_every_option(inputs, backend, nan_scores):
    """Every (baseline, scale, Bessel, eps mode, singleton, GPG) combination, float64."""
    scores, ids, lengths, baselines = _problem(inputs, singletons=True)
    if nan_scores == "ignore":
        scores[inputs.randint(0, scores.numel(), (3,))] = float("nan")
    for options in OPTION_GRID:
        if options["baseline"] == "pass_at_k" and nan_scores == "ignore":
            continue  # groups of one usable row: the validate check below
        options = dict(options, eps=0.01, nan_scores=nan_scores, validate=False)
        want = _call("torch", scores, ids, lengths, baselines, **options)
        got = _call(backend, scores, ids, lengths, baselines, **options)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True,
                                   msg=lambda m, o=options: f"{o}: {m}")  # fmt: skip


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_group_advantages_by_hand(backend):
    """The peers' formulas on one small batch, written out independently."""
    s = torch.tensor([1.0, 2.0, 4.0, 8.0, 0.5, -1.0, 3.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 0, 7, 7, 9])  # groups of 4, 2 and 1
    grp = lambda **kw: rlhf_ext.group_advantages(s, ids, backend=backend, **kw)  # noqa: E731
    first, second = s[:4], s[4:6]
    # GRPO (verl): (s - mean) / (std + eps), Bessel; the singleton: s / (1 + eps).
    want = torch.cat([(first - first.mean()) / (first.std() + 1e-6),
                      (second - second.mean()) / (second.std() + 1e-6),
                      s[6:] / (1 + 1e-6)])  # fmt: skip
    torch.testing.assert_close(grp(singleton="raw"), want, rtol=1e-14, atol=1e-14)
    # Dr.GRPO: no scale; the default singleton gives 0.
    want = torch.cat([first - first.mean(), second - second.mean(), torch.zeros(1).double()])
    torch.testing.assert_close(grp(scale="none"), want, rtol=1e-14, atol=1e-14)
    # RLOO: s - mean of the others.
    loo = torch.cat([first - (first.sum() - first) / 3, second - (second.sum() - second) / 1])
    torch.testing.assert_close(grp(baseline="leave_one_out", scale="none")[:6], loo)
    # Pass@k: the best row only, r_max - r_2nd, over the group's std.
    got = grp(baseline="pass_at_k", validate=False)
    want = torch.tensor([0, 0, 0, 4 / (first.std() + 1e-6), 1.5 / (second.std() + 1e-6), 0, 0])
    torch.testing.assert_close(got, want.double(), rtol=1e-14, atol=1e-14)
    # OPO: the length-weighted mean.
    lengths = torch.tensor([1.0, 3.0, 2.0, 4.0, 5.0, 1.0, 2.0], dtype=torch.float64)
    got = grp(baseline="length_weighted", scale="none", lengths=lengths)
    b = (lengths[:4] * first).sum() / lengths[:4].sum()
    torch.testing.assert_close(got[:4], first - b, rtol=1e-14, atol=1e-14)
    # PPO-Lite: the group's mean, the batch's std; OpenRLHF's clamp form.
    got = grp(scale="batch", eps_mode="clamp", eps=1e-8)
    torch.testing.assert_close(got[:4], (first - first.mean()) / s.var().sqrt())
    # GPG: alpha = B / #nonzero (all 7 nonzero here: alpha 1); with a zero score, 7/6.
    s_zero = s.clone()
    s_zero[2] = 0
    got = rlhf_ext.group_advantages(s_zero, ids, scale="none", nonzero_rescale=True,
                                    backend=backend)  # fmt: skip
    z = s_zero[:4]
    torch.testing.assert_close(got[:4], 7 / 6 * (z - z.mean()), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_group_advantages_unscorable_rows_as_trl(backend):
    """TRL: a NaN (unscorable) score is left out of nanmean / nanstd and gets 0."""
    s = torch.tensor([1.0, float("nan"), 3.0, 6.0, 2.0, float("nan")], dtype=torch.float64)
    got = rlhf_ext.group_advantages(s, group_size=3, eps=1e-4, nan_scores="ignore",
                                    backend=backend)  # fmt: skip
    kept = torch.tensor([1.0, 3.0]).double()
    a = (kept - kept.mean()) / (kept.std() + 1e-4)
    kept2 = torch.tensor([6.0, 2.0]).double()
    b = (kept2 - kept2.mean()) / (kept2.std() + 1e-4)
    want = torch.stack([a[0], torch.tensor(0.0).double(), a[1], b[0], b[1], torch.tensor(0.0)])
    torch.testing.assert_close(got, want.double(), rtol=1e-14, atol=1e-14)
    # "propagate": the NaN reaches its whole group, so a non-finite guard fires.
    got = rlhf_ext.group_advantages(s, group_size=3, backend=backend)
    assert got.isnan().all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("components", ["normalize_then_sum", "sum_then_normalize"])
def test_group_advantages_reward_components(inputs, backend, components):
    """[B, K] scores: GDPO (normalise each, then the weighted sum) and the sum first."""
    scores, ids, _, _ = _problem(inputs, components=3, singletons=False)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    got = rlhf_ext.group_advantages(scores, ids, weights=w, components=components,
                                    backend=backend)  # fmt: skip
    one = functools.partial(rlhf_ext.group_advantages, group_ids=ids, backend="torch")
    if components == "normalize_then_sum":
        want = sum(w[k] * one(scores[:, k]) for k in range(3))
    else:
        want = one(scores @ w)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("options", [dict(), dict(baseline="leave_one_out", scale="batch"),
                                     dict(baseline="length_weighted", nonzero_rescale=True),
                                     dict(baseline="pass_at_k", singleton="raw")])  # fmt: skip
def test_group_advantages_any_batch_order_gives_the_same_bits(inputs, backend, options):
    """A permutation of the rows permutes the result bit for bit (the sums run in the
    rows' sorted order); two calls give the same bits."""
    scores, ids, lengths, baselines = _problem(inputs, rows=40, singletons=False)
    scores = scores.float()
    scores[::7] = scores[1]  # ties between groups and inside them
    kwargs = dict(options, lengths=lengths, validate=False)
    got = _call(backend, scores, ids, **kwargs, baselines=baselines)
    again = _call(backend, scores, ids, **kwargs, baselines=baselines)
    assert torch.equal(got, again)
    perm = torch.randperm(scores.shape[0], generator=inputs.gen)
    permuted = _call(backend, scores[perm], ids[perm], lengths[perm], baselines[perm],
                     **dict(options, validate=False))  # fmt: skip
    assert torch.equal(permuted, got[perm])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_group_advantages_a_group_does_not_see_the_others(inputs, backend):
    """Batch invariance: with group statistics only, a group's bits do not depend on
    which other groups share the call."""
    scores, ids, _, _ = _problem(inputs, rows=30, singletons=False)
    scores = scores.float()
    full = rlhf_ext.group_advantages(scores, ids, backend=backend)
    keep = ids == ids[0]
    alone = rlhf_ext.group_advantages(scores[keep], ids[keep], backend=backend)
    assert torch.equal(alone, full[keep])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_group_advantages_low_precision_within_eager_error(inputs, backend, dtype):
    """Float32 out for low-precision scores, within 2x the error of the same computation
    in eager float32 (the reference run on float32)."""
    scores, ids, _, _ = _problem(inputs, rows=256, singletons=False)
    scores = (scores * 100 + 1000).to(dtype)  # a large common offset: cancellation
    ref64 = reference.group_advantages(scores.double(), ids)
    eager = reference.group_advantages(scores.float(), ids)
    got = rlhf_ext.group_advantages(scores, ids, backend=backend)
    assert got.dtype == torch.float32
    assert_within_eager_error(got, ref64, eager)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_group_advantages_empty_batch(backend):
    got = rlhf_ext.group_advantages(torch.empty(0), torch.empty(0, dtype=torch.int64),
                                    backend=backend)  # fmt: skip
    assert got.shape == (0,) and got.dtype == torch.float32


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_group_advantages_group_size_equals_contiguous_ids(inputs, backend):
    scores = inputs.randn(24)
    by_size = rlhf_ext.group_advantages(scores, group_size=4, backend=backend)
    by_ids = rlhf_ext.group_advantages(scores, torch.arange(24) // 4, backend=backend)
    assert torch.equal(by_size, by_ids)


# bad_inputs rows (id, error, pattern after the prefix, fn): fn(s, ids, op) with scores s [6]
# and ids [6] (two groups of 3); op = rlhf_ext.group_advantages on the test's backend.
GROUP_ADVANTAGES_BAD_INPUT = conftest.bad_inputs(
    r"rlhf_ext\.group_advantages: ",
    ("ids-and-size", ValueError, r"give exactly one of `group_ids` and `group_size`"),
    lambda s, ids, op: op(s, ids, group_size=3),
    ("neither", ValueError, r"give exactly one of"),
    lambda s, ids, op: op(s),
    ("size-divides", ValueError, r"`group_size` must be >= 1 and divide the 6 rows, got 4"),
    lambda s, ids, op: op(s, group_size=4),
    ("size-zero", ValueError, r"`group_size` must be >= 1"),
    lambda s, ids, op: op(s, group_size=0),
    ("size-float", TypeError, r"`group_size` must be an int, got float"),
    lambda s, ids, op: op(s, group_size=3.0),
    ("ids-float", TypeError, r"`group_ids` must be int64 or int32, got torch.float32"),
    lambda s, ids, op: op(s, ids.float()),
    ("ids-shape", ValueError, r"`group_ids` must have shape \[6\]"),
    lambda s, ids, op: op(s, ids[:4]),
    ("ids-negative", ValueError, r"`group_ids` must be >= 0, got -1 at row 2"),
    lambda s, ids, op: op(s, torch.where(torch.arange(6) == 2, -1, ids)),
    ("scores-int", TypeError, r"`scores` must be float32, float64, bfloat16 or float16"),
    lambda s, ids, op: op(ids, ids),
    ("scores-3d", ValueError, r"`scores` must be \[B\] or \[B, K\]"),
    lambda s, ids, op: op(s.reshape(6, 1, 1), ids),
    ("baseline", ValueError, r"`baseline` must be one of .*got 'median'"),
    lambda s, ids, op: op(s, ids, baseline="median"),
    ("scale", ValueError, r"`scale` must be one of .*got 'std'"),
    lambda s, ids, op: op(s, ids, scale="std"),
    ("eps-nan", ValueError, r"`eps` must be a finite float >= 0, got nan"),
    lambda s, ids, op: op(s, ids, eps=float("nan")),
    ("eps-negative", ValueError, r"`eps` must be a finite float >= 0"),
    lambda s, ids, op: op(s, ids, eps=-1e-6),
    ("unbiased-str", TypeError, r"`unbiased` must be a bool"),
    lambda s, ids, op: op(s, ids, unbiased="yes"),
    ("lengths-missing", ValueError, r"baseline 'length_weighted' needs `lengths`"),
    lambda s, ids, op: op(s, ids, baseline="length_weighted"),
    ("lengths-shape", ValueError, r"`lengths` must have shape \[6\]"),
    lambda s, ids, op: op(s, ids, baseline="length_weighted", lengths=torch.ones(5)),
    ("baselines-missing", ValueError, r"baseline 'given' needs `baselines`"),
    lambda s, ids, op: op(s, ids, baseline="given"),
    ("weights-shape", ValueError, r"`weights` must have shape \[2\]"),
    lambda s, ids, op: op(torch.stack([s, s], -1), ids, weights=torch.ones(3)),
    ("pass-at-k-singleton", ValueError, r"pass_at_k needs at least 2 usable rows.*group 5"),
    lambda s, ids, op: op(s, torch.tensor([0, 0, 0, 0, 0, 5]), baseline="pass_at_k"),
    ("all-nan-group", ValueError, r"every group needs a usable .*group 1 has 0"),
    lambda s, ids, op: op(torch.where(ids == 1, float("nan"), s), ids, nan_scores="ignore"),
    ("nan-mode", ValueError, r"`nan_scores` must be one of"),
    lambda s, ids, op: op(s, ids, nan_scores="drop"),
)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("error, pattern, fn", GROUP_ADVANTAGES_BAD_INPUT)
def test_group_advantages_bad_input(inputs, backend, error, pattern, fn):
    scores, ids = inputs.randn(6), torch.tensor([0, 0, 0, 1, 1, 1])
    with pytest.raises(error, match=pattern):
        fn(scores, ids, functools.partial(rlhf_ext.group_advantages, backend=backend))


# The dispatcher op's own checks (it trusts `order` to be sorted, which the public
# function guarantees, but refuses arguments that would read out of bounds).
GROUP_ADVANTAGES_RAW_OP_BAD_INPUT = conftest.bad_inputs(
    r"rlhf_ext\.group_advantages: ",
    ("order-shape", ValueError, r"`order` must have shape \[1, 6\]"),
    lambda s, g, o: (s, g, o[:, :4], None, None, None, "mean", "group"),
    ("order-dtype", TypeError, r"`order` must be int64, got Int"),
    lambda s, g, o: (s, g, o.int(), None, None, None, "mean", "group"),
    ("groups-shape", ValueError, r"`groups` must have shape \[6\]"),
    lambda s, g, o: (s, g[:5], o, None, None, None, "mean", "group"),
    ("baseline", ValueError, r"`baseline` must be one of 'mean', .*got 'x'"),
    lambda s, g, o: (s, g, o, None, None, None, "x", "group"),
    ("batch-order", ValueError, r"scale 'batch' needs `batch_order`"),
    lambda s, g, o: (s, g, o, None, None, None, "mean", "batch"),
    ("scores-half", TypeError, r"`scores` must be float32 or float64 here"),
    lambda s, g, o: (s.half(), g, o, None, None, None, "mean", "group"),
)


@conftest.requires_compiled
@pytest.mark.parametrize("error, pattern, build", GROUP_ADVANTAGES_RAW_OP_BAD_INPUT)
def test_group_advantages_raw_op_bad_input(error, pattern, build):
    scores = torch.randn(1, 6)
    groups, order = torch.tensor([0, 0, 0, 1, 1, 1]), torch.arange(6).unsqueeze(0)
    args = build(scores, groups, order)
    with pytest.raises(error, match=pattern):
        torch.ops.rlhf_ext.group_advantages(*args, True, 1e-6, False, False, False, False)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("baseline", ["length_weighted", "mean", "leave_one_out"])
def test_group_advantages_inf_score_gives_the_references_non_finites(backend, baseline):
    """An infinite score: its group's other rows get -inf (s - inf), the row itself NaN
    (inf - inf), as the reference computes it; the accumulators must start at 0, not
    at 0 * (an infinite sum)."""
    s = torch.tensor([1.0, float("inf"), 3.0, 2.0, 5.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 1, 1])
    lengths = torch.tensor([2.0, 1.0, 4.0, 3.0, 3.0], dtype=torch.float64)
    kwargs = dict(baseline=baseline, scale="none", lengths=lengths)
    want = rlhf_ext.group_advantages(s, ids, backend="torch", **kwargs)
    got = rlhf_ext.group_advantages(s, ids, backend=backend, **kwargs)
    assert not torch.isfinite(want[:3]).any()
    torch.testing.assert_close(got, want, equal_nan=True)
