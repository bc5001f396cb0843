"""Per-token KL estimators in Triton: the Triton twin of
csrc/include/rlhf_ext/kl.h (same kinds, same clamps: the log-ratio to [-20, 20],
k3 to [-10, 10])."""

import triton
import triton.language as tl

from rlhf_ext.ops._vocab import KL_ABS, KL_K1, KL_K2
from rlhf_ext.triton._common import clamp_nan

# The codes as constexpr globals: a global read inside a @triton.jit must be one.
K1 = tl.constexpr(KL_K1)
ABS = tl.constexpr(KL_ABS)
K2 = tl.constexpr(KL_K2)


@triton.jit
def k3_from_exp(d, e):
    """expm1(d) - d from d and e = exp(d) (kl.h: k3_from_exp): for |d| < 1, where
    exp(d) - d - 1 cancels, the Taylor series d^2/2! + ... + d^10/10! (the first term left
    out is below 7e-8 of the value); the direct form elsewhere. float64 keeps the direct
    form (its cancellation costs ~1e-16 absolute; Triton's float literals are float32, too
    coarse for a float64 series)."""
    if d.dtype == tl.float64:
        out = e - d - 1.0
    else:
        series = d * d * (0.5 + d * (1.0 / 6 + d * (1.0 / 24 + d * (1.0 / 120 + d * (
            1.0 / 720 + d * (1.0 / 5040 + d * (1.0 / 40320 + d * (1.0 / 362880
            + d * (1.0 / 3628800)))))))))  # fmt: skip
        out = tl.where((d > -1.0) & (d < 1.0), series, e - d - 1.0)
    return out


@triton.jit
def kl_value(logprob, ref_logprob, KIND: tl.constexpr):
    """The KL estimator KIND (an ops/_vocab.py code; otherwise k3) of the log-probs."""
    diff = logprob - ref_logprob
    if KIND == K1:
        out = diff
    elif KIND == ABS:
        out = tl.abs(diff)
    elif KIND == K2:
        out = 0.5 * diff * diff
    else:
        d = clamp_nan(-diff, -20.0, 20.0)
        out = clamp_nan(k3_from_exp(d, tl.exp(d)), -10.0, 10.0)
    return out


@triton.jit
def kl_grad(lp, ref, KIND: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr):
    """d kl_value / d lp (ppo_math.h: kl_grad); straight-through: the k2 gradient."""
    diff = lp - ref
    if STRAIGHT_THROUGH:
        out = diff
    elif KIND == K1:
        out = tl.full(diff.shape, 1.0, diff.dtype)
    elif KIND == ABS:
        out = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)).to(diff.dtype)
    elif KIND == K2:
        out = diff
    else:
        d = -diff
        e = tl.exp(d)
        k3 = k3_from_exp(d, e)
        live = (d >= -20.0) & (d <= 20.0) & (k3 <= 10.0)
        if d.dtype == tl.float64:
            slope = 1.0 - e  # the direct form, as k3_from_exp's float64 path
        else:
            slope = -(k3 + d)  # 1 - exp(d) = -expm1(d), without its cancellation
        out = tl.where(live, slope, 0.0).to(diff.dtype)
    return out
