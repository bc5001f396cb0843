"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


def acc_tl_dtype(t: torch.Tensor):
    """Triton accumulation dtype: float64 for float64 inputs, else float32."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def acc_torch_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def as_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The mask as contiguous uint8 0/1 (Triton handles int1 pointers awkwardly);
    a 1-element dummy when there is no mask (the kernel never reads it).

    A converted copy even for a bool mask: a zero-copy bool -> uint8 view is
    faster in eager mode, but Inductor (torch 2.11) cannot lower it inside a
    traced triton_op, and the triton_op body cannot tell it is being traced.
    """
    if mask is None:
        return like.new_empty((1,), dtype=torch.uint8)
    return (mask != 0).to(torch.uint8).contiguous()


def optional(t: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` as a contiguous `dtype` tensor, or a 1-element dummy the kernel skips."""
    if t is None:
        return like.new_empty((1,), dtype=dtype)
    return t.to(dtype).contiguous()


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def affine_combine_reversed(a_right, b_right, a_left, b_left):
    """Combine for tl.associative_scan(..., reverse=True) of maps x -> a * x + b.

    A reversed scan passes (accumulated right part, new left element); the
    composite applies the right part first: left(right(x)).
    """
    return a_left * a_right, a_left * b_right + b_left


# NaN-propagating min / max / clamp: tl.minimum / tl.maximum (and tl.max) drop a NaN
# operand by default, where torch and the C++ kernels keep it; a NaN input must come
# out NaN on every backend (the trainer's non-finite guard depends on it).
@triton.jit
def maximum_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def minimum_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def clamp_nan(x, lo, hi):
    """clamp(x, lo, hi) as torch.clamp: NaN stays NaN."""
    return minimum_nan(maximum_nan(x, lo), hi)


@triton.jit
def max_nan(x, axis):
    """tl.max along `axis` that is NaN when any element is (torch.max)."""
    return tl.reduce(x, axis, maximum_nan)


def on_device_of(t: torch.Tensor):
    """A context making t's GPU the current one: Triton launches on the current
    device (and its current stream), whatever device the tensors are on."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def online_softmax_step(x, running_max, sum_exp, sum_shift, scale, AXIS: tl.constexpr,
                        ENTROPY: tl.constexpr, SCALE_PER_ROW: tl.constexpr = False):  # fmt: skip
    """Fold a block of logits `x` into running softmax statistics along AXIS
    (0: one row's block; 1: a [rows, cols] tile, statistics per row).

    running_max: the largest logit so far; sum_exp = sum exp2((x - m) * scale);
    sum_shift = sum exp2((x - m) * scale) * (x - m), for the entropy; m = the
    running max, or 0 while no finite logit has been seen (the sums are then
    empty: nothing to rebase, and -inf - -inf must not make them NaN). `scale`
    is log2(e) / temperature: one for the block, or with SCALE_PER_ROW (AXIS 1) one per row
    of the tile. Returns the new (running_max, sum_exp, sum_shift).
    """
    new_max, sum_exp, sum_shift, _unused = online_softmax_sq_step(
        x, running_max, sum_exp, sum_shift, sum_exp, scale, AXIS, ENTROPY, False, SCALE_PER_ROW
    )
    return new_max, sum_exp, sum_shift


@triton.jit
def online_softmax_sq_step(x, running_max, sum_exp, sum_shift, sum_sq, scale, AXIS: tl.constexpr,
                           ENTROPY: tl.constexpr, SUM_SQ: tl.constexpr,
                           SCALE_PER_ROW: tl.constexpr = False):  # fmt: skip
    """online_softmax_step, and with SUM_SQ also sum_sq = sum exp2((x - m) * scale)^2 on the
    same running max, from the same exponentials (log sum p^2 = log sum_sq - 2 log sum_exp).
    Returns the new (running_max, sum_exp, sum_shift, sum_sq)."""
    new_max = tl.maximum(running_max, tl.max(x, axis=AXIS))
    base = tl.where(new_max == float("-inf"), 0.0, new_max)
    seen = sum_exp > 0
    delta = tl.where(seen, running_max - base, 0.0)
    factor = tl.where(seen, tl.exp2(delta * scale), 0.0)
    shifted = x - tl.expand_dims(base, AXIS)
    if SCALE_PER_ROW:
        e = tl.exp2(shifted * tl.expand_dims(scale, AXIS))
    else:
        e = tl.exp2(shifted * scale)
    if ENTROPY:
        sum_shift = factor * (sum_shift + delta * sum_exp)
        sum_shift += tl.sum(tl.where(e > 0, e * shifted, 0.0), axis=AXIS)
    if SUM_SQ:
        sum_sq = factor * factor * sum_sq + tl.sum(e * e, axis=AXIS)
    sum_exp = factor * sum_exp + tl.sum(e, axis=AXIS)
    return new_max, sum_exp, sum_shift, sum_sq


def tanh_series_max(acc) -> float:
    """Below this |u|, tanh_with_slope takes its odd series (the exp form would lose
    digits to 1 - exp(-2|u|)); above it, the exp form. Chosen so that both stay within a
    few ulps: the series' first dropped term (u^15) is < 1e-8 relative at 0.25 in float32,
    < 1e-20 at 0.05 in float64."""
    return 0.05 if acc == tl.float64 else 0.25


@triton.jit
def tanh_with_slope(u, SERIES_MAX: tl.constexpr):
    """(tanh(u), 1 - tanh(u)^2) without libdevice (which the interpreter lacks): the odd
    Taylor series for |u| < SERIES_MAX, else (1 - e) / (1 + e) with e = exp(-2|u|) and
    the slope 4e / (1 + e)^2 (no 1 - t^2 cancellation near |t| = 1): tanh_with_slope of
    csrc/include/rlhf_ext/logit_transform.h, term for term. NaN stays NaN, +-inf gives +-1
    with slope 0."""
    a = tl.abs(u)
    u2 = u * u
    series = u2 * (62.0 / 2835 + u2 * (-1382.0 / 155925 + u2 * (21844.0 / 6081075)))
    series = u * (1.0 + u2 * (-1.0 / 3 + u2 * (2.0 / 15 + u2 * (-17.0 / 315 + series))))
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    small = a < SERIES_MAX
    t = tl.where(small, series, tl.where(u < 0, -big, big))
    slope = tl.where(small, 1.0 - series * series, 4.0 * e / ((1.0 + e) * (1.0 + e)))
    return t, slope
