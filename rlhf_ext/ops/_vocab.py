"""The ops' vocabularies: the one Python home of every name, code and constant
that crosses a layer boundary (KL estimator kinds, loss aggregation modes, the
loss ops' statistics, linear_token_logprobs' chunk-loop constants).

A leaf module: it imports nothing from rlhf_ext, so the public ops, the Triton
kernels, the reference and the trainer can all read it without an import cycle.
The codes are those of the C++ enums (csrc/include/rlhf_ext/kl.h ``KLKind``,
ppo_math.h ``LossAgg``); the C++ parsers' tables and constants are exported by
``rlhf_ext._C.build_info()`` and python_tests/test_op_contract.py checks that
both sides agree, so reordering a table here cannot silently change what a
kernel computes.
"""

from __future__ import annotations

# KL estimators (kl.h KLKind). Names and aliases -> code. A "+" suffix on any name
# keeps that kind's value and takes the gradient of k2 (straight-through, as verl).
KL_K1, KL_ABS, KL_K2, KL_K3 = 0, 1, 2, 3
KL_KIND_CODES = {
    "k1": KL_K1,
    "kl": KL_K1,
    "abs": KL_ABS,
    "k2": KL_K2,
    "mse": KL_K2,
    "k3": KL_K3,
    "low_var_kl": KL_K3,
}
KL_KINDS = tuple(KL_KIND_CODES)
STRAIGHT_THROUGH_SUFFIX = "+"

# token_logprobs' outputs (`outputs=`), in the order of its named tuple, and the bits of
# its forward op's `extras` argument for those beyond logprobs, entropy and lse
# (csrc/include/rlhf_ext/logprobs_host.h kExtra*).
LOGPROB_OUTPUTS = ("logprobs", "entropy", "lse", "log_sum_sq_probs", "mean_logits", "is_top1")
LOGPROB_EXTRA_CODES = {"log_sum_sq_probs": 1, "mean_logits": 2, "is_top1": 4}

# Loss aggregation modes (ppo_math.h LossAgg; verl's loss_agg_mode names).
AGG_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_SUM, AGG_SEQ_MEAN_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_SUM_NORM = (
    0,
    1,
    2,
    3,
)
AGG_CODES = {
    "token-mean": AGG_TOKEN_MEAN,
    "seq-mean-token-sum": AGG_SEQ_MEAN_TOKEN_SUM,
    "seq-mean-token-mean": AGG_SEQ_MEAN_TOKEN_MEAN,
    "seq-mean-token-sum-norm": AGG_SEQ_MEAN_TOKEN_SUM_NORM,
}
AGG_MODES = tuple(AGG_CODES)
NORM_AGG = "seq-mean-token-sum-norm"  # the mode that divides by loss_scale_factor

# Policy-loss kinds (csrc/include/rlhf_ext/policy_math.h PolicyKind; formulas there and in
# docs/api.md) and the keyword arguments of rlhf_ext.policy_loss that each one reads.
POLICY_KIND_CODES = {
    "ppo": 0,
    "reinforce": 1,
    "cispo": 2,
    "sapo": 3,
    "dppo_tv": 4,
    "dppo_kl": 5,
    "dro": 6,
    "gspo": 7,
    "gspo_token": 8,
    "geo_mean": 9,
}
POLICY_KINDS = tuple(POLICY_KIND_CODES)
_CLIP = ("clip_eps", "clip_eps_high")
POLICY_KIND_PARAMS = {
    "ppo": (*_CLIP, "dual_clip", "ratio_cap"),
    "reinforce": (),
    "cispo": _CLIP,
    "sapo": ("tau_pos", "tau_neg"),
    "dppo_tv": (*_CLIP, "ratio_cap"),
    "dppo_kl": (*_CLIP, "ratio_cap"),
    "dro": ("beta",),
    "gspo": _CLIP,
    "gspo_token": _CLIP,
    "geo_mean": _CLIP,
}
# The kinds whose clip_eps / clip_eps_high are divergence thresholds, not a ratio band.
POLICY_DIVERGENCE_KINDS = ("dppo_tv", "dppo_kl")
# The kinds whose clip_eps / clip_eps_high bound the log-ratio: d~ in [-clip_eps, clip_eps_high].
POLICY_LOG_CLIP_KINDS = ("geo_mean",)
# The kinds that read their row's mean log-ratio (policy_math.h uses_row_mean) and the
# one whose gradient flows through it (row_coupled).
POLICY_ROW_MEAN_KINDS = ("gspo", "gspo_token")
POLICY_ROW_COUPLED_KINDS = ("gspo",)
# The kinds whose row loss is a function of the row's sums (policy_math.h row_level):
# level 2 computes it.
POLICY_ROW_LEVEL_KINDS = ("geo_mean",)
GEO_MEAN_EPS = 1e-8  # policy_math.h kGeoMeanEps
GSPO_TOKEN_LOG_RATIO_MAX = 10.0  # policy_math.h kGSPOTokenLogRatioMax
DPPO_KL_EPS = 1e-8  # policy_math.h kDPPOKLEps

# Statistics of the loss ops, in the order of their kernels' `stats` output.
POLICY_STATS = ("clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_max")
VALUE_STATS = ("clipfrac",)
KL_LOSS_STATS = ()


def is_kl_kind(kind) -> bool:
    """A known KL kind name, optionally with one straight-through suffix."""
    return (
        isinstance(kind, str)
        and kind.count(STRAIGHT_THROUGH_SUFFIX) <= 1
        and kind.rstrip(STRAIGHT_THROUGH_SUFFIX) in KL_KIND_CODES
    )


def kl_kind_code(kind: str) -> int:
    """The KLKind code of a (checked) kind name, suffix ignored."""
    return KL_KIND_CODES[kind.rstrip(STRAIGHT_THROUGH_SUFFIX)]


def kl_straight_through(kind: str) -> bool:
    return kind.endswith(STRAIGHT_THROUGH_SUFFIX)


def kl_base_kind(kind: str) -> str:
    """The canonical name ("k1", "abs", "k2", "k3") of a (checked) kind name."""
    code = kl_kind_code(kind)
    return next(name for name, c in KL_KIND_CODES.items() if c == code)


# linear_token_logprobs' chunk loop (csrc/include/rlhf_ext/linear_logprobs_host.h:
# kRowQuantum, kMinTileVocab, kVocabQuantum, kAccumulateRows), which the Triton
# backend runs in Python: GEMMs have at least LINEAR_ROW_QUANTUM rows (a batch
# invariance condition), backward tiles at least LINEAR_MIN_TILE_VOCAB columns in
# multiples of LINEAR_VOCAB_QUANTUM, and float32 products LINEAR_ACCUMULATE_ROWS
# rows at a time.
LINEAR_ROW_QUANTUM = 16
LINEAR_MIN_TILE_VOCAB = 1024
LINEAR_VOCAB_QUANTUM = 64
LINEAR_ACCUMULATE_ROWS = 1024


# group_advantages (csrc/include/rlhf_ext/group_math.h GroupBaseline / GroupScale):
# what a row's score is compared with, and what the difference is divided by.
GROUP_BASELINE_CODES = {
    "mean": 0,  # the group's mean (GRPO, Dr.GRPO, REINFORCE++-baseline, GPG)
    "leave_one_out": 1,  # the mean of the group's other rows (RLOO)
    "length_weighted": 2,  # sum(L s) / sum(L) over the group (OPO)
    "pass_at_k": 3,  # only the group's best row: r_max - r_2nd (Pass@k)
    "given": 4,  # a per-row baseline (ReMax's greedy rollout)
    "none": 5,  # no baseline
}
GROUP_BASELINES = tuple(GROUP_BASELINE_CODES)
GROUP_SCALE_CODES = {"group": 0, "batch": 1, "none": 2}
GROUP_SCALES = tuple(GROUP_SCALE_CODES)
# How eps enters the division: (x - b) / (std + eps), or (x - b) / sqrt(max(var, eps)).
GROUP_EPS_MODES = ("add", "clamp")
# A group with one usable row: "zero" gives it s - s (0; NaN for a non-finite score),
# "raw" a baseline of 0 and a group std of 1 (verl).
GROUP_SINGLETON_MODES = ("zero", "raw")
# NaN scores: "propagate" into the row's group, or "ignore": left out of every
# statistic, advantage 0 (TRL's unscorable rows).
GROUP_NAN_MODES = ("propagate", "ignore")
# [B, K] scores: normalise each component then take the weighted sum (GDPO), or sum
# first (TRL's default).
GROUP_COMPONENT_MODES = ("normalize_then_sum", "sum_then_normalize")
