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
        out = clamp_nan(tl.exp(d) - d - 1.0, -10.0, 10.0)
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
        live = (d >= -20.0) & (d <= 20.0) & (e - d - 1.0 <= 10.0)
        out = tl.where(live, 1.0 - e, 0.0).to(diff.dtype)
    return out
