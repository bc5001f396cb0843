"""Per-token KL estimators in Triton: the Triton twin of
csrc/include/rlhf_ext/kl.h (same kinds, same clamps: the log-ratio to [-20, 20],
k3 to [-10, 10])."""

import triton
import triton.language as tl

from rlhf_ext.ops.kl_shaped_rewards import KL_KIND_CODES


def kl_kind_code(kind: str) -> int:
    return KL_KIND_CODES[kind.rstrip("+")]


@triton.jit
def kl_value(logprob, ref_logprob, KIND: tl.constexpr):
    diff = logprob - ref_logprob
    if KIND == 0:
        out = diff
    elif KIND == 1:
        out = tl.abs(diff)
    elif KIND == 2:
        out = 0.5 * diff * diff
    else:
        d = tl.minimum(tl.maximum(-diff, -20.0), 20.0)
        out = tl.minimum(tl.maximum(tl.exp(d) - d - 1.0, -10.0), 10.0)
    return out
