"""Per-token KL estimators in Triton: the Triton twin of
csrc/include/rlhf_ext/kl.h (same kinds, same clamps)."""

import triton
import triton.language as tl

KL_KIND_CODES = {"k1": 0, "kl": 0, "abs": 1, "k2": 2, "mse": 2, "k3": 3, "low_var_kl": 3}
LOG_RATIO_CLAMP = 20.0
VALUE_CLAMP = 10.0


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
