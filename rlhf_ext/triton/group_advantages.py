"""group_advantages in Triton: the twin of csrc/cuda/group_advantages.cu (the math of
csrc/include/rlhf_ext/group_math.h, function for function).

Two kernels, as on CUDA:

* ``_group_batch_stats_kernel``, one program per component, only when the scale is
  the batch's (``batch_order`` given) or with GPG's ``nonzero_rescale``: the variance
  of the component's usable scores, summed in ``batch_order`` (the rows sorted by
  score), and ``alpha = B / max(#nonzero, 1)``, into a ``[K, 2]`` float64 buffer.
* ``_group_segments_kernel``, one lane per sorted position of each component (BLOCK
  positions a program, as the CUDA kernel's threads of a block): a lane whose
  position starts a group (its group id differs from the previous position's in
  ``order``) finds the group's end, walks the segment in sorted order (moments, OPO's
  length-weighted sums, pass@k's best and runner-up) and writes the advantage of
  every row of the group; every other lane is masked off. The lanes of a program walk
  side by side, for as many steps as its longest segment.

Every float sum is a sequential float64 loop in the header's order, whatever the scores'
dtype (each lane walks its own segment one position a step), so the bits match the
C++ kernels' and a permutation of the rows permutes the output bit for bit. No
atomics, no host synchronisation: the segment boundaries are found on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from rlhf_ext.ops._vocab import GROUP_BASELINE_CODES, GROUP_SCALE_CODES
from rlhf_ext.triton._common import next_power_of_2, on_device_of

# Sorted positions a program of _group_segments_kernel (the CUDA kernel's kThreads),
# on one warp: 4 lanes a thread. One warp keeps the lanes' reductions (is any group
# still going on, the longest segment) in registers and shuffles: with 4 warps they
# went through shared memory and barriers, and ptxas spilled registers around them in
# some variants (tools/triton_compile_check.py allows no spill). Wide programs also
# keep the interpreter fast: its cost is per operation, whatever the width.
BLOCK = 128
# Positions the segment-end search advances between two tests of whether it is done.
END_STEPS = tl.constexpr(8)
# The nonzero count's lane width (an integer count: exact in any order, so it may be
# vectorised where the float sums may not).
MAX_COUNT_BLOCK = 1024
# Constexpr globals: a global read inside a @triton.jit must be one (group_math.h
# GroupBaseline / GroupScale codes, from the one Python table of them).
MEAN = tl.constexpr(GROUP_BASELINE_CODES["mean"])
LEAVE_ONE_OUT = tl.constexpr(GROUP_BASELINE_CODES["leave_one_out"])
LENGTH_WEIGHTED = tl.constexpr(GROUP_BASELINE_CODES["length_weighted"])
PASS_AT_K = tl.constexpr(GROUP_BASELINE_CODES["pass_at_k"])
GIVEN = tl.constexpr(GROUP_BASELINE_CODES["given"])
SCALE_BATCH = tl.constexpr(GROUP_SCALE_CODES["batch"])
SCALE_NONE = tl.constexpr(GROUP_SCALE_CODES["none"])
# The batch buffer's columns (group_math.h BatchStats: var, alpha).
STAT_VAR = tl.constexpr(0)
STAT_ALPHA = tl.constexpr(1)
STAT_COLS = tl.constexpr(2)


@triton.jit
def _scale_divisor(var, eps, CLAMP_EPS: tl.constexpr):
    """The divisor of group_math.h scaled_difference: sqrt(max(var, eps)) or std + eps
    (a group's rows share it: computed once, the same bits as the header's per row).

    The clamp keeps a NaN variance NaN, as torch's clamp_min and the header do: a NaN
    score under "propagate" must make its group (or, for scale "batch", the batch) NaN,
    also for the baselines whose difference stays finite ("given", "none", pass@k)."""
    if CLAMP_EPS:
        divisor = tl.sqrt(tl.where((var > eps) | (var != var), var, eps))
    else:
        divisor = tl.sqrt(var) + eps
    return divisor


@triton.jit
def _segment_moments(scores_ptr, order_ptr, begin, count, steps, UNBIASED: tl.constexpr,
                     IGNORE_NAN: tl.constexpr):  # fmt: skip
    """group_math.h segment_moments: (n, sum, mean, var) of the usable scores at
    order[begin, begin + count), two sequential passes in that order (the header's
    bits). Lane-wise: pointers, begin and count may be per-lane vectors, and `steps`
    (at least every lane's count) is the number of steps the lanes walk together.

    A skipped score (unusable, or past the lane's segment) adds 0.0: the sums start at
    +0.0 and so are never -0.0, and s + 0.0 == s for every other s, so skipping by
    addition gives the header's bits.

    usable_score (false only for a NaN under ignore_nan) is written out in each loop:
    the interpreter re-patches triton.language on every @triton.jit call, which would
    dominate a loop's step."""
    segment_ptr = order_ptr + begin
    n = (begin * 0).to(tl.int64)
    total = n.to(tl.float64)
    for j in range(0, steps):
        live = j < count
        x = tl.load(scores_ptr + tl.load(segment_ptr + j, mask=live, other=0), mask=live)
        x = x.to(tl.float64)
        ok = live
        if IGNORE_NAN:
            ok = ok & (x == x)
        n += ok.to(tl.int64)
        total += tl.where(ok, x, 0.0)
    mean = total / n.to(tl.float64)  # NaN for n == 0: never used then
    m2 = tl.zeros_like(total)
    for j in range(0, steps):
        live = j < count
        x = tl.load(scores_ptr + tl.load(segment_ptr + j, mask=live, other=0), mask=live)
        x = x.to(tl.float64)
        ok = live
        if IGNORE_NAN:
            ok = ok & (x == x)
        m2 += tl.where(ok, (x - mean) * (x - mean), 0.0)
    if UNBIASED:
        var = m2 / (n - 1).to(tl.float64)
    else:
        var = m2 / n.to(tl.float64)
    return n, total, mean, var


@triton.jit
def _best_position(scores_ptr, order_ptr, begin, count, steps, skip,
                   IGNORE_NAN: tl.constexpr):  # fmt: skip
    """group_math.h best_position, lane-wise as _segment_moments: the sorted position
    in [begin, begin + count), other than `skip`, of the highest-ranked usable score
    (the first of equal ones; -1 when there is none), and that score (0.0 when there
    is none: the header's `top` / `runner_up`, which read the same score back).
    ranks_above (a NaN above any number, as torch.topk) is written out in the loop."""
    segment_ptr = order_ptr + begin
    best = begin * 0 - 1
    best_score = (begin * 0).to(tl.float64)
    for j in range(0, steps):
        live = j < count
        x = tl.load(scores_ptr + tl.load(segment_ptr + j, mask=live, other=0), mask=live)
        x = x.to(tl.float64)
        take = live & (begin + j != skip)
        if IGNORE_NAN:
            take = take & (x == x)
        above = ((x != x) & (best_score == best_score)) | (x > best_score)
        take = take & ((best < 0) | above)
        best = tl.where(take, begin + j, best)
        best_score = tl.where(take, x, best_score)
    return best, best_score


@triton.jit
def _group_batch_stats_kernel(
    scores_ptr,
    batch_order_ptr,
    stats_ptr,
    rows,
    HAS_BATCH_ORDER: tl.constexpr,
    NONZERO_RESCALE: tl.constexpr,
    UNBIASED: tl.constexpr,
    IGNORE_NAN: tl.constexpr,
    COUNT_BLOCK: tl.constexpr,
):
    """group_math.h batch_stats for component k = program_id(0): stats[k] = (var, alpha)."""
    k = tl.program_id(0).to(tl.int64)
    scores_ptr += k * rows
    # rows + an int64 0: a tensor even where Triton made rows == 1 a constexpr.
    count = tl.zeros((), dtype=tl.int64) + rows
    var = tl.zeros((), dtype=tl.float64)
    if HAS_BATCH_ORDER:
        # The batch variance in batch_order (sorted by score): the header's sequential
        # sums in the same order, hence its bits.
        zero = tl.zeros((), dtype=tl.int64)
        _, _, _, var = _segment_moments(
            scores_ptr, batch_order_ptr + k * rows, zero, count, count, UNBIASED, IGNORE_NAN
        )
    alpha = tl.full((), 1.0, dtype=tl.float64)
    if NONZERO_RESCALE:
        # Every row counts, ignored NaN ones too (NaN != 0, as verl's count_nonzero).
        lanes = tl.arange(0, COUNT_BLOCK).to(tl.int64)
        nonzero = tl.zeros((), dtype=tl.int64)
        for start in range(0, rows, COUNT_BLOCK):
            pos = start + lanes
            x = tl.load(scores_ptr + pos, mask=pos < rows, other=0.0)
            nonzero += tl.sum((x != 0).to(tl.int64), axis=0)
        alpha = count.to(tl.float64) / tl.maximum(nonzero, 1).to(tl.float64)
    tl.store(stats_ptr + k * STAT_COLS + STAT_VAR, var)
    tl.store(stats_ptr + k * STAT_COLS + STAT_ALPHA, alpha)


@triton.jit
def _group_segments_kernel(
    scores_ptr,
    groups_ptr,
    order_ptr,
    lengths_ptr,
    baselines_ptr,
    stats_ptr,
    eps_ptr,
    out_ptr,
    rows,
    BASELINE: tl.constexpr,
    SCALE: tl.constexpr,
    UNBIASED: tl.constexpr,
    CLAMP_EPS: tl.constexpr,
    SINGLETON_RAW: tl.constexpr,
    IGNORE_NAN: tl.constexpr,
    HAS_STATS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """BLOCK sorted positions i of component k = program_id(1), lane-wise:
    group_math.h group_segment for each i that starts a group (starts_group); other
    lanes do nothing. (A 2-D grid: no 64-bit division of a flat index into (k, i),
    which is a subroutine call on the GPU.)"""
    k = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < rows
    base = k * rows  # the component's rows in scores, order and out
    segment = base + i  # the lane's first sorted position, in order

    # starts_group, and the segment's end: the first later position of another group
    # (the loads clamped in bounds: both sides of an & are evaluated).
    group = tl.load(groups_ptr + tl.load(order_ptr + segment, mask=inside, other=0), mask=inside)
    previous = tl.load(order_ptr + base + tl.maximum(i - 1, 0), mask=inside, other=0)
    starts = inside & ((i == 0) | (group != tl.load(groups_ptr + previous, mask=inside)))
    # The lanes' test for "some lane's group goes on" runs every END_STEPS positions:
    # a lane whose group has ended stays put, and the reduction is the costly part of
    # a step (in the interpreter above all).
    end = i
    same = starts
    while tl.max(same.to(tl.int32), axis=0) > 0:
        for _ in tl.static_range(END_STEPS):
            end = tl.where(same, end + 1, end)
            row = tl.load(order_ptr + base + tl.minimum(end, rows - 1), mask=same, other=0)
            same = same & (end < rows)
            same = same & (tl.load(groups_ptr + row, mask=same, other=0) == group)
    count = end - i  # the segment [i, i + count); empty off a start
    steps = tl.max(count, axis=0)

    n, group_sum, mean, group_var = _segment_moments(
        scores_ptr + base, order_ptr, segment, count, steps, UNBIASED, IGNORE_NAN
    )
    if BASELINE == LENGTH_WEIGHTED:  # OPO's sum(L s) / sum(L) over the usable rows
        length_sum = tl.zeros_like(group_sum)  # not group_sum * 0: NaN for an inf sum
        weighted_sum = tl.zeros_like(group_sum)
        for j in range(0, steps):
            live = j < count
            row = tl.load(order_ptr + segment + j, mask=live, other=0)
            x = tl.load(scores_ptr + base + row, mask=live).to(tl.float64)
            ok = live
            if IGNORE_NAN:
                ok = ok & (x == x)
            length = tl.load(lengths_ptr + row, mask=live).to(tl.float64)
            length_sum += tl.where(ok, length, 0.0)
            weighted_sum += tl.where(ok, length * x, 0.0)
    if BASELINE == PASS_AT_K:  # the best usable row (first of equal maxima), runner-up
        lane_scores = scores_ptr + base
        best, top = _best_position(lane_scores, order_ptr, segment, count, steps, -1, IGNORE_NAN)
        _, runner_up = _best_position(
            lane_scores, order_ptr, segment, count, steps, best, IGNORE_NAN
        )

    batch_var = tl.zeros((), dtype=tl.float64)
    alpha = tl.full((), 1.0, dtype=tl.float64)
    if HAS_STATS:
        batch_var = tl.load(stats_ptr + k * STAT_COLS + STAT_VAR)
        alpha = tl.load(stats_ptr + k * STAT_COLS + STAT_ALPHA)
    eps = tl.load(eps_ptr)
    # The variance the difference is divided by: the batch's for scale "batch" (a
    # singleton's too), else the group's, or 1 for a singleton (singleton_raw).
    if SCALE == SCALE_BATCH:
        divisor = _scale_divisor(batch_var, eps, CLAMP_EPS)
    elif SCALE != SCALE_NONE:
        divisor = _scale_divisor(tl.where(n == 1, 1.0, group_var), eps, CLAMP_EPS)

    for j in range(0, steps):
        live = j < count
        row = tl.load(order_ptr + segment + j, mask=live, other=0)
        x = tl.load(scores_ptr + base + row, mask=live).to(tl.float64)
        if BASELINE == MEAN:
            diff = x - mean
        elif BASELINE == LEAVE_ONE_OUT:
            diff = x - (group_sum - x) / (n - 1).to(tl.float64)
        elif BASELINE == LENGTH_WEIGHTED:
            diff = x - weighted_sum / length_sum
        elif BASELINE == PASS_AT_K:
            diff = tl.where(segment + j == best, top - runner_up, 0.0)
        elif BASELINE == GIVEN:
            diff = x - tl.load(baselines_ptr + row, mask=live).to(tl.float64)
        else:  # none
            diff = x
        diff = tl.where(n > 1, diff, x)  # singleton_raw with one row: baseline 0
        if SCALE != SCALE_NONE:
            diff = diff / divisor
        a = diff * alpha
        if not SINGLETON_RAW:
            a = tl.where(n == 1, x - x, a)  # one usable row: s - s (NaN for inf)
        if IGNORE_NAN:
            a = tl.where(x == x, a, 0.0)  # an ignored NaN row: 0
        tl.store(out_ptr + base + row, a.to(out_ptr.dtype.element_ty), mask=live)


@triton_op("rlhf_ext::group_advantages_triton", mutates_args=())
def group_advantages_triton(
    scores: torch.Tensor,
    groups: torch.Tensor,
    order: torch.Tensor,
    batch_order: torch.Tensor | None,
    lengths: torch.Tensor | None,
    baselines: torch.Tensor | None,
    baseline: str,
    scale: str,
    unbiased: bool,
    eps: float,
    clamp_eps: bool,
    singleton_raw: bool,
    ignore_nan: bool,
    nonzero_rescale: bool,
) -> torch.Tensor:
    """Triton group advantages with the signature of torch.ops.rlhf_ext.group_advantages:
    [K, B] scores (float32 / float64), their [K, B] orders sorted by (group, score), and
    the batch's when the scale is the batch's; [K, B] advantages in the scores' dtype."""
    components, rows = scores.shape
    scores = scores.contiguous()
    out = torch.empty_like(scores)
    if rows == 0 or components == 0:
        return out
    order = order.contiguous()
    need_stats = batch_order is not None or nonzero_rescale
    # The [K, 2] float64 BatchStats buffer; a 1-element dummy the kernels never read.
    stat_rows = components if need_stats else 1
    stats = scores.new_empty((stat_rows, STAT_COLS.value), dtype=torch.float64)
    # Dummies for the pointers a variant never reads (lengths: length_weighted only,
    # baselines: given only, batch_order: the batch scale only).
    lengths = order if lengths is None else lengths.contiguous()
    baselines = order if baselines is None else baselines.contiguous()
    flags = dict(UNBIASED=unbiased, IGNORE_NAN=ignore_nan)
    with on_device_of(scores):
        if need_stats:
            # One sequential walk a program: one warp is all it uses.
            wrap_triton(_group_batch_stats_kernel)[(components,)](
                scores,
                order if batch_order is None else batch_order.contiguous(),
                stats,
                rows,
                HAS_BATCH_ORDER=batch_order is not None,
                NONZERO_RESCALE=nonzero_rescale,
                COUNT_BLOCK=min(next_power_of_2(rows), MAX_COUNT_BLOCK),
                num_warps=1,
                **flags,
            )
        # Blocks of positions on axis 0 (up to 2**31 - 1), components on axis 1 (65535).
        wrap_triton(_group_segments_kernel)[(triton.cdiv(rows, BLOCK), components)](
            scores,
            groups.contiguous(),
            order,
            lengths,
            baselines,
            stats,
            # A tensor, not a Python float: Triton would round eps to float32.
            scores.new_full((1,), eps, dtype=torch.float64),
            out,
            rows,
            BASELINE=GROUP_BASELINE_CODES[baseline],
            SCALE=GROUP_SCALE_CODES[scale],
            CLAMP_EPS=clamp_eps,
            SINGLETON_RAW=singleton_raw,
            HAS_STATS=need_stats,
            BLOCK=BLOCK,
            num_warps=1,  # see BLOCK
            **flags,
        )
    return out
