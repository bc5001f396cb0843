"""rlhf_ext.group_advantages: critic-free (GRPO-family) advantages of outcome scores."""

from __future__ import annotations

import torch

from rlhf_ext import reference
from rlhf_ext._backend import resolve_backend
from rlhf_ext.ops._checks import acc_dtype, check_tensor, eager
from rlhf_ext.ops._registry import register_fakes, triton_loader
from rlhf_ext.ops._vocab import (
    GROUP_BASELINES,
    GROUP_COMPONENT_MODES,
    GROUP_EPS_MODES,
    GROUP_NAN_MODES,
    GROUP_SCALES,
    GROUP_SINGLETON_MODES,
)

OP = "rlhf_ext.group_advantages"
GROUP_ID_DTYPES = (torch.int64, torch.int32)


def group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    baseline: str = "mean",
    scale: str = "group",
    unbiased: bool = True,
    eps: float = 1e-6,
    eps_mode: str = "add",
    singleton: str = "zero",
    nan_scores: str = "propagate",
    lengths: torch.Tensor | None = None,
    baselines: torch.Tensor | None = None,
    nonzero_rescale: bool = False,
    weights: torch.Tensor | None = None,
    components: str = "normalize_then_sum",
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-row advantages of outcome scores against their group (GRPO, Dr.GRPO, RLOO,
    OPO, Pass@k, ReMax, GPG, GDPO, REINFORCE++-baseline), ``[B]``, one pass, no host sync.

    ``a_i = alpha * (s_i - b_i) / scale_i`` where the group of row i is ``group_ids[i]``
    (any non-negative ints; or ``group_size=n``: rows ``[g*n, (g+1)*n)`` form group g):

    * ``baseline``: "mean" (the group's mean), "leave_one_out" (the mean of the group's
      other rows: RLOO), "length_weighted" (``sum(L s) / sum(L)`` with ``lengths``:
      OPO), "pass_at_k" (only the group's best row gets ``r_max - r_2nd``; all others
      0), "given" (``baselines[i]``: ReMax), "none".
    * ``scale``: "group" (the group's std), "batch" (the std of all scores), "none";
      ``unbiased`` for Bessel's correction; ``eps_mode`` "add" divides by ``std + eps``
      (verl ``1e-6``, TRL ``1e-4``, OpenRLHF ``1e-9``), "clamp" by ``sqrt(max(var, eps))``.
    * ``singleton``: a group with one usable row gets ``s - s`` = 0 ("zero"; NaN for a
      non-finite score) or a baseline of 0 and a std of 1 ("raw", as verl; the batch's
      std for ``scale="batch"``).
    * ``nan_scores``: "propagate" (a NaN score makes its group NaN) or "ignore" (TRL's
      unscorable rows: left out of every statistic, advantage 0).
    * ``nonzero_rescale``: multiply by GPG's ``alpha = B / #nonzero scores``.
    * ``[B, K]`` scores (K reward components, ``weights [K]``, default ones):
      ``components="normalize_then_sum"`` gives ``sum_k w_k a(s_k)`` (GDPO),
      "sum_then_normalize" ``a(sum_k w_k s_k)`` (TRL's default; with "ignore", a nansum).

    A group's sums run over its rows sorted by (score, length), in double: the same rows
    give the same bits in any batch order (a permutation of the rows permutes the
    result). ``validate=True`` (a few host syncs; skipped under torch.compile) rejects
    negative group ids, pass@k groups with fewer than 2 usable rows, and groups with no
    usable row under ``nan_scores="ignore"``. Returns float32 (float64 for float64
    scores); no gradient.
    """
    check_tensor(OP, "scores", scores)
    if scores.dim() not in (1, 2):
        raise ValueError(f"{OP}: `scores` must be [B] or [B, K], got shape {tuple(scores.shape)}")
    rows = scores.shape[0]
    options = _check_options(baseline, scale, eps, eps_mode, singleton, nan_scores, components)
    for name, flag in (("unbiased", unbiased), ("nonzero_rescale", nonzero_rescale)):
        if not isinstance(flag, bool):
            raise TypeError(f"{OP}: `{name}` must be a bool, got {type(flag).__name__}")
    groups = _group_ids(group_ids, group_size, rows, scores)
    acc = acc_dtype(scores)
    lengths = _row_input("lengths", lengths, rows, scores, acc, baseline == "length_weighted")
    baselines = _row_input("baselines", baselines, rows, scores, acc, baseline == "given")
    columns = scores.detach().to(acc)
    columns = columns.unsqueeze(-1) if columns.dim() == 1 else columns
    w = _weights(weights, columns.shape[1], scores, acc)
    chosen = resolve_backend(OP, backend, scores.device)
    if validate and eager():
        _raise_on_bad_groups(groups, columns, baseline, nan_scores, components)
    if chosen == "torch":
        return reference.group_advantages(
            scores.detach(), groups, baseline=baseline, scale=scale, unbiased=unbiased,
            eps=options["eps"], eps_mode=eps_mode, singleton=singleton, nan_scores=nan_scores,
            lengths=lengths, baselines=baselines, nonzero_rescale=nonzero_rescale,
            weights=w, components=components,
        )  # fmt: skip
    ignore_nan = nan_scores == "ignore"
    if components == "sum_then_normalize":
        columns = _weighted_sum(columns, w, ignore_nan).unsqueeze(-1)
    components_first = columns.T.contiguous()  # [K, B]
    order, batch_order = _sorted_orders(components_first, groups, lengths, scale == "batch")
    args = (
        components_first, groups, order, batch_order, lengths, baselines, baseline, scale,
        unbiased, options["eps"], eps_mode == "clamp", singleton == "raw", ignore_nan,
        nonzero_rescale,
    )  # fmt: skip
    if chosen == "triton":
        per_component = triton_kernels().group_advantages_triton(*args)
    else:
        per_component = torch.ops.rlhf_ext.group_advantages(*args)
    if per_component.shape[0] == 1:
        return per_component[0] * w[0] if components == "normalize_then_sum" else per_component[0]
    return (per_component * w.unsqueeze(-1)).sum(0)  # a fixed order over K


def _check_options(baseline, scale, eps, eps_mode, singleton, nan_scores, components) -> dict:
    for name, value, allowed in (
        ("baseline", baseline, GROUP_BASELINES),
        ("scale", scale, GROUP_SCALES),
        ("eps_mode", eps_mode, GROUP_EPS_MODES),
        ("singleton", singleton, GROUP_SINGLETON_MODES),
        ("nan_scores", nan_scores, GROUP_NAN_MODES),
        ("components", components, GROUP_COMPONENT_MODES),
    ):
        if value not in allowed:
            raise ValueError(f"{OP}: `{name}` must be one of {allowed}, got {value!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{OP}: `eps` must be a float, got {type(eps).__name__}")
    if not (0 <= eps < float("inf")):
        raise ValueError(f"{OP}: `eps` must be a finite float >= 0, got {eps}")
    return {"eps": float(eps)}


def _group_ids(group_ids, group_size, rows: int, scores: torch.Tensor) -> torch.Tensor:
    """The group id of every row as a contiguous int64 [B] tensor."""
    if (group_ids is None) == (group_size is None):
        raise ValueError(f"{OP}: give exactly one of `group_ids` and `group_size`")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"{OP}: `group_size` must be an int, got {type(group_size).__name__}")
        if group_size < 1 or rows % group_size:
            raise ValueError(
                f"{OP}: `group_size` must be >= 1 and divide the {rows} rows, got {group_size}"
            )
        return torch.arange(rows, device=scores.device) // group_size
    check_tensor(OP, "group_ids", group_ids, floating=False)
    if group_ids.dtype not in GROUP_ID_DTYPES:
        raise TypeError(f"{OP}: `group_ids` must be int64 or int32, got {group_ids.dtype}")
    if group_ids.device != scores.device:
        raise ValueError(
            f"{OP}: `group_ids` must be on {scores.device} like `scores`, got {group_ids.device}"
        )
    if group_ids.shape != (rows,):
        raise ValueError(
            f"{OP}: `group_ids` must have shape [{rows}] (one per row of `scores`), got "
            f"{tuple(group_ids.shape)}"
        )
    return group_ids.to(torch.int64).contiguous()


def _row_input(name, t, rows, scores, acc, needed: bool):
    """lengths / baselines: a [B] tensor on scores' device, required by its baseline."""
    if t is None:
        if needed:
            baseline = "length_weighted" if name == "lengths" else "given"
            raise ValueError(f"{OP}: baseline {baseline!r} needs `{name}`")
        return None
    check_tensor(OP, name, t, floating=False)
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{OP}: `{name}` must be a real tensor, got {t.dtype}")
    if t.device != scores.device:
        raise ValueError(f"{OP}: `{name}` must be on {scores.device} like `scores`, got {t.device}")
    if t.shape != (rows,):
        raise ValueError(f"{OP}: `{name}` must have shape [{rows}], got {tuple(t.shape)}")
    return t.detach().to(acc).contiguous()


def _weights(weights, count: int, scores, acc):
    if weights is None:
        return torch.ones(count, dtype=acc, device=scores.device)
    check_tensor(OP, "weights", weights)
    if weights.device != scores.device:
        raise ValueError(f"{OP}: `weights` must be on {scores.device}, got {weights.device}")
    if weights.shape != (count,):
        raise ValueError(
            f"{OP}: `weights` must have shape [{count}] (one per score component), got "
            f"{tuple(weights.shape)}"
        )
    return weights.detach().to(acc)


def _weighted_sum(columns, w, ignore_nan: bool):
    """sum_k w_k s_k per row; with ignore_nan a nansum, NaN where every component is."""
    weighted = columns * w
    if not ignore_nan:
        return weighted.sum(-1)
    return torch.where(columns.isnan().all(-1), float("nan"), weighted.nansum(-1))


def _sorted_orders(components_first, groups, lengths, need_batch: bool):
    """Each component's rows sorted by (group, score, length) and, for the batch scale,
    by (score, length): stable sorts, last key first. A group's rows then come in an
    order of their values alone, whatever the batch order (torch.sort puts NaN last)."""
    count, rows = components_first.shape
    index = torch.arange(rows, device=groups.device).expand(count, rows)
    if lengths is not None:
        index = torch.sort(lengths, stable=True).indices.expand(count, rows)
    by_score = torch.sort(components_first.gather(1, index), dim=1, stable=True).indices
    index = index.gather(1, by_score)
    batch_order = index.contiguous() if need_batch else None
    by_group = torch.sort(groups[index], dim=1, stable=True).indices
    return index.gather(1, by_group).contiguous(), batch_order


def _raise_on_bad_groups(groups, columns, baseline, nan_scores, components) -> None:
    """The data checks of validate=True (host syncs: the validate=True path only)."""
    if groups.numel() and int(groups.min()) < 0:
        position = int((groups < 0).nonzero()[0])
        raise ValueError(
            f"{OP}: `group_ids` must be >= 0, got {int(groups[position])} at row {position}"
        )
    if baseline != "pass_at_k" and nan_scores != "ignore":
        return
    usable = ~columns.isnan() if nan_scores == "ignore" else torch.ones_like(columns, dtype=bool)
    if components == "sum_then_normalize":
        usable = usable.any(-1, keepdim=True)
    ids, inverse = torch.unique(groups, return_inverse=True)
    counts = torch.zeros(ids.numel(), usable.shape[1], dtype=torch.int64, device=groups.device)
    counts.index_add_(0, inverse, usable.to(torch.int64))  # integer counts: exact in any order
    least = 2 if baseline == "pass_at_k" else 1
    bad = (counts < least).any(-1)
    if bool(bad.any()):
        group = int(ids[bad.nonzero()[0]])
        have = int(counts[bad].min())
        what = "pass_at_k needs at least 2 usable rows per group" if least == 2 else (
            "every group needs a usable (non-NaN) score under nan_scores='ignore'")  # fmt: skip
        raise ValueError(f"{OP}: {what}; group {group} has {have}")


def _fake(scores, groups, order, batch_order, lengths, baselines, baseline, scale, unbiased,
          eps, clamp_eps, singleton_raw, ignore_nan, nonzero_rescale):  # fmt: skip
    return torch.empty_like(scores)


register_fakes({"group_advantages": _fake})
# rlhf_ext.triton.group_advantages, imported on first use (a triton_op: traced through,
# no fake kernel; no gradient).
triton_kernels = triton_loader("group_advantages", lambda kernels: None)
