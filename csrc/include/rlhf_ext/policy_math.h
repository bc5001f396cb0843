// Per-token math of the policy-loss kinds (docs/design.md §3.3): the clipped PPO
// surrogate and the GRPO-era losses of verl 0.9.1 (POLICY_LOSS_REGISTRY), TRL and
// OpenRLHF. Math only: no ATen, so the CPU kernels, the CUDA kernels and the C++
// unit tests share one definition. The loss machinery (ppo_math.h) sums what
// these return per row and aggregates it.
//
// Every kind maps one valid token (logprob, old logprob, advantage) and, for the
// sequence kinds, the row's mean log-ratio to a PolicyToken: its loss, the
// derivative w.r.t. its logprob and the statistics. Formulas (d = lp - old,
// r = exp(clamp(d, -20, 20)), A the advantage):
//   ppo         max(-A min(r, cap), -A clamp(r, lo, hi)); with dual_clip c and A < 0,
//               min(., -A c) (cap: TRL's two-sided delta, +inf for none)
//   reinforce   -A lp                                         (verl "gpg")
//   cispo       -sg(clamp(r, lo, hi)) A lp
//   sapo        -A sigmoid(tau (r - 1)) 4 / tau,  tau = A > 0 ? tau_pos : tau_neg
//   dppo_tv     -A sg(min(r, cap)) lp [valid],  valid: A > 0 ? p - p_old <= hi : p - p_old >= -lo
//   dppo_kl     as dppo_tv with the binary KL of p_old and p (p = exp(lp)) as the divergence
//   dro         -(lp A - beta / 2 d^2)
//   gspo        s = mean_t d over the row, r = exp(s): max(-A r, -A clamp(r, lo, hi)),
//               the gradient through the mean (TRL, OpenRLHF; the paper's GSPO)
//   gspo_token  as gspo with log r = min(s, 10) and the gradient of lp - sg(lp) + sg(s)
//               (verl "gspo"; the paper's GSPO-token)
//   geo_mean    a row loss: -mean_t(A) exp(mean_t d~), d~ = the unclamped d clipped in
//               log space on the side of sign(A) (A > 0: min(d, hi); A < 0: max(d, -lo))
//               (verl "geo_mean", GMPO); its tokens yield the row's sums, and level 2
//               (ppo_math.h finish_policy_row) turns them into the row's loss
#pragma once

#include <cmath>
#include <limits>

#include "rlhf_ext/kl.h"
#include "rlhf_ext/macros.h"

namespace rlhf_ext {

// The C++ side of rlhf_ext/ops/_vocab.py's POLICY_KIND_CODES (a test checks both agree).
enum class PolicyKind : int {
  kPPO = 0,
  kReinforce = 1,
  kCISPO = 2,
  kSAPO = 3,
  kDPPOTV = 4,
  kDPPOKL = 5,
  kDRO = 6,
  kGSPO = 7,
  kGSPOToken = 8,
  kGeoMean = 9,
};

// The kinds whose tokens read their row's mean log-ratio (a prologue pass per row).
RLHF_HD constexpr bool uses_row_mean(PolicyKind kind) {
  return kind == PolicyKind::kGSPO || kind == PolicyKind::kGSPOToken;
}

// The kinds whose gradient couples a row's tokens: d loss / d lp[t] is the same
// for every valid token of the row, (1 / n) * sum over the row's tokens of
// d loss_t / d s. Their tokens return gradient 1 and that per-token term as
// PolicyToken::row_grad; level 2 folds the row's sum into the row weight.
RLHF_HD constexpr bool row_coupled(PolicyKind kind) {
  return kind == PolicyKind::kGSPO;
}

// The kinds whose row loss is a function of the row's sums, not a sum of token losses:
// a token writes its share of those sums into the loss and row_grad columns, and
// level 2 computes the row's loss from them (ppo_math.h finish_policy_row).
RLHF_HD constexpr bool row_level(PolicyKind kind) {
  return kind == PolicyKind::kGeoMean;
}

// gspo_token's upper clamp of the log-ratio (verl's, for numerical stability).
constexpr float kGSPOTokenLogRatioMax = 10.f;
// DPPO-KL's epsilon inside log((1 - p_old + eps) / (1 - p + eps)) (verl's).
constexpr float kDPPOKLEps = 1e-8f;
// geo_mean's row means divide by (valid tokens + eps) (verl's).
constexpr double kGeoMeanEps = 1e-8;

// The scalar parameters of every kind; a kind reads only its own.
template <typename T>
struct PolicyParams {
  T lo, hi;       // ratio kinds: the clip band [lo, hi] of the ratio;
                  // dppo kinds: the divergence thresholds (low for A <= 0, high for A > 0);
                  // geo_mean: the log-ratio bounds, d~ in [-lo, hi]
  T dual_clip;    // ppo: c > 1 for the dual clip, 0 for none
  T ratio_cap;    // dppo kinds: the truncation of the detached ratio; ppo: the cap of the
                  // unclipped ratio (TRL's delta; +inf for none)
  T tau_pos, tau_neg;  // sapo: the gate temperatures for A > 0 and A <= 0
  T beta;         // dro: the weight of the quadratic log-ratio penalty
};

template <typename T>
struct PolicyToken {
  T loss;
  T grad;           // d loss / d logprob (row_coupled kinds: 1, see row_grad)
  T ratio;          // the ratio the loss uses (the sequence ratio for the gspo kinds)
  T neg_log_ratio;  // old - new (the approx_kl term), clamped as the kind clamps it
  T row_grad;       // row_coupled kinds: d loss / d (row mean log-ratio); geo_mean: the
                    // advantage (level 2 takes the row's mean); else 0
  bool clipped;     // ppo / gspo kinds: the clipped surrogate won; cispo: the weight was
                    // clipped; dppo kinds: the token was masked out
  bool clipped_lower;  // ppo: the dual clip won; dppo kinds: the ratio exceeded the cap
};

// max(a, b) that propagates NaN from either side (as torch.max does): a NaN
// ratio must reach ratio_max on every backend, so that a non-finite guard fires.
template <typename T>
RLHF_HD T max_value(T a, T b) {
  return select_value(a < b || b != b, b, a);
}

// min(a, b) that propagates NaN from either side (as torch.min does).
template <typename T>
RLHF_HD T min_value(T a, T b) {
  return select_value(b < a || b != b, b, a);
}

// exp over the whole float range (host: exp(x / 2)^2 from the vectorising exp_small,
// ~5 ulp; inf above ~88.7, 0 below ~-103, NaN stays NaN). For unclamped arguments.
RLHF_HD float exp_any(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  const float half = exp_small(clamp_value(x, -160.f, 160.f) * 0.5f);
  return half * half;
#endif
}

RLHF_HD double exp_any(double x) {
#ifdef __CUDA_ARCH__
  return exp(x);
#else
  return std::exp(x);
#endif
}

template <typename T>
RLHF_HD T log_any(T x) {
#ifdef __CUDA_ARCH__
  return log(x);
#else
  return std::log(x);
#endif
}

// ratio = exp(clamp(lp - old, -20, 20)); loss = max(-A min(r, cap), -A clamp(r, lo, hi))
// (cap: TRL's two-sided `delta`, +inf for none); with dual_clip = c > 0 and A < 0:
// min(loss, -A c). The gradient is the one of the branch that wins: -A r where its
// ratio is not clamped (by the band or the cap), 0 for a dual-clipped token and for a
// log-ratio beyond the +-20 clamp.
template <typename T>
RLHF_HD PolicyToken<T> policy_token(T logprob, T old_logprob, T advantage, T ratio_lo, T ratio_hi,
                                    T dual_clip,
                                    T ratio_cap = std::numeric_limits<T>::infinity()) {
  const T raw = logprob - old_logprob;
  const T log_ratio = clamp_value(raw, T(-kKLLogRatioClamp), T(kKLLogRatioClamp));
  const T ratio = exp_small(log_ratio);
  const bool capped = ratio > ratio_cap;
  const T slope = -advantage * ratio;  // d (-A r) / d lp
  const T unclipped = select_value(capped, -advantage * ratio_cap, slope);
  const T clipped = -advantage * clamp_value(ratio, ratio_lo, ratio_hi);
  PolicyToken<T> out;
  out.ratio = ratio;
  out.neg_log_ratio = -log_ratio;
  out.row_grad = T(0);
  // Branch-free (bitwise & and selects): the signs of A and the clip outcomes are
  // data-dependent coin flips that a branch predictor cannot learn.
  out.clipped = clipped > unclipped;
  const T loss = max_value(clipped, unclipped);
  const bool in_clamp = raw == log_ratio;
  const T floor_loss = -advantage * dual_clip;
  out.clipped_lower = (dual_clip > T(0)) & (advantage < T(0)) & (loss > floor_loss);
  out.loss = select_value(out.clipped_lower, floor_loss, loss);  // exact, unlike a blend
  // The winning branch's derivative: the clipped one passes it inside the band (a cap
  // below 1 + eps can make it win there), the unclipped one unless capped.
  // Bool operators only: a bool-to-float conversion here keeps GCC from vectorising the
  // CPU's token loop (3.5x slower; docs/performance.md).
  const bool in_band = (ratio >= ratio_lo) & (ratio <= ratio_hi);
  const bool live = (out.clipped & in_band) | (!out.clipped & !capped);
  out.grad = select_value(live & in_clamp & !out.clipped_lower, slope, T(0));
  return out;
}

// The clipped surrogate on a sequence ratio exp(log_ratio): the gspo kinds.
// `live`: the gradient of the log-ratio passes (no clamp binds).
template <typename T>
RLHF_HD void sequence_surrogate(T log_ratio, bool live, T advantage, T lo, T hi,
                                PolicyToken<T>* out) {
  const T ratio = exp_any(log_ratio);
  const T unclipped = -advantage * ratio;
  const T clipped = -advantage * clamp_value(ratio, lo, hi);
  out->ratio = ratio;
  out->clipped = clipped > unclipped;
  out->loss = max_value(clipped, unclipped);
  // d loss / d log_ratio = (d loss / d ratio) * ratio, in that order: a clipped token of
  // an infinite ratio gives 0 * inf = NaN, as torch's chain rule does; a clamp that binds
  // (not live) zeroes it afterwards, NaN included, as torch.clamp's backward does.
  out->grad = select_value(live, select_value(!out->clipped, -advantage, T(0)) * ratio, T(0));
}

// DPPO's detached-ratio REINFORCE term on the tokens inside the trust region.
template <typename T>
RLHF_HD void dppo_term(T logprob, T ratio, T advantage, bool valid, T cap, PolicyToken<T>* out) {
  const T truncated = select_value(ratio > cap, cap, ratio);  // NaN passes, as torch.clamp
  // A product with the 0/1 mask, not a select: a NaN advantage or ratio stays NaN (verl's).
  const T weight = (-advantage * truncated) * indicator<T>(valid);
  out->loss = weight * logprob;
  out->grad = weight;
  out->clipped = !valid;
  out->clipped_lower = (ratio > cap) & valid;
}

// One valid token of kind K. `row_log_ratio`: the row's mean of lp - old over its
// valid tokens (read by the uses_row_mean kinds only).
template <PolicyKind K, typename T>
RLHF_HD PolicyToken<T> policy_kind_token(T logprob, T old_logprob, T advantage, T row_log_ratio,
                                         const PolicyParams<T>& p) {
  if constexpr (K == PolicyKind::kPPO) {
    return policy_token(logprob, old_logprob, advantage, p.lo, p.hi, p.dual_clip, p.ratio_cap);
  } else {
    const T raw = logprob - old_logprob;
    const T log_ratio = clamp_value(raw, T(-kKLLogRatioClamp), T(kKLLogRatioClamp));
    const bool in_clamp = raw == log_ratio;
    PolicyToken<T> out;
    out.ratio = exp_small(log_ratio);
    out.neg_log_ratio = -log_ratio;
    out.row_grad = T(0);
    out.clipped = false;
    out.clipped_lower = false;
    if constexpr (K == PolicyKind::kReinforce) {
      out.loss = -advantage * logprob;
      out.grad = -advantage;
      out.neg_log_ratio = -raw;  // unclamped, as verl's compute_policy_loss_reinforce metric
    } else if constexpr (K == PolicyKind::kCISPO) {
      const T weight = clamp_value(out.ratio, p.lo, p.hi);
      out.loss = -weight * advantage * logprob;
      out.grad = -weight * advantage;
      out.clipped = out.ratio != weight;
    } else if constexpr (K == PolicyKind::kSAPO) {
      const T tau = select_value(advantage > T(0), p.tau_pos, p.tau_neg);
      const T gate = T(1) / (T(1) + exp_any(-(tau * (out.ratio - T(1)))));
      out.loss = -(gate * (T(4) / tau)) * advantage;
      // d/d lp of sigmoid(tau (r - 1)) 4 / tau = 4 sigmoid (1 - sigmoid) r.
      const T slope = T(4) * gate * (T(1) - gate) * out.ratio;
      out.grad = select_value(in_clamp, -advantage * slope, T(0));
    } else if constexpr (K == PolicyKind::kDPPOTV || K == PolicyKind::kDPPOKL) {
      const T prob = exp_any(logprob);
      const T old_prob = exp_any(old_logprob);
      bool valid_pos, valid_neg;
      if constexpr (K == PolicyKind::kDPPOTV) {
        valid_pos = prob - old_prob <= p.hi;
        valid_neg = prob - old_prob >= -p.lo;
      } else {
        const T eps = T(kDPPOKLEps);
        const T binary_kl = old_prob * (old_logprob - logprob) +
                            (T(1) - old_prob) *
                                log_any((T(1) - old_prob + eps) / (T(1) - prob + eps));
        valid_pos = (binary_kl <= p.hi) | (prob <= old_prob);
        valid_neg = (binary_kl <= p.lo) | (prob >= old_prob);
      }
      const bool positive = advantage > T(0);
      const bool valid = (positive & valid_pos) | (!positive & valid_neg);
      dppo_term(logprob, out.ratio, advantage, valid, p.ratio_cap, &out);
    } else if constexpr (K == PolicyKind::kDRO) {
      out.loss = -(logprob * advantage - T(0.5) * p.beta * (raw * raw));
      out.grad = -(advantage - p.beta * raw);
      out.neg_log_ratio = -raw;  // unclamped, as verl's DRO metric
    } else if constexpr (K == PolicyKind::kGSPO) {
      sequence_surrogate(row_log_ratio, true, advantage, p.lo, p.hi, &out);
      out.row_grad = out.grad;
      out.grad = T(1);
      out.neg_log_ratio = -raw;
    } else if constexpr (K == PolicyKind::kGeoMean) {
      // verl's sign(A) * min(sign(A) d, sign(A) clamp(d, -lo, hi)) on the unclamped d:
      // A > 0 clips d from above only, A < 0 from below only, A = 0 gives 0 (NaN for an
      // infinite d, as 0 * inf in torch); sign(NaN) is NaN.
      const T sign = select_value(advantage > T(0), T(1),
                                  select_value(advantage < T(0), T(-1), advantage * T(0)));
      const T band = clamp_value(raw, -p.lo, p.hi);
      out.loss = sign * min_value(sign * raw, sign * band);  // the row's sum: level 2
      out.row_grad = advantage;                              // likewise
      out.ratio = T(0);  // level 2 writes the row's ratio
      out.neg_log_ratio = -raw;  // unclamped, as verl's ppo_kl
      // verl's clipfrac: outside the band (whichever side binds), split by sign(A).
      const bool outside = raw != band;
      out.clipped = outside & (advantage > T(0));
      out.clipped_lower = outside & (advantage < T(0));
      // d d~ / d lp: 1 where the clip on A's side does not bind, and for a NaN d (torch's
      // minimum passes the gradient to a NaN input); level 2's row weight carries the row
      // factor L / (n + eps).
      const bool live =
          ((advantage > T(0)) & !(raw >= p.hi)) | ((advantage < T(0)) & !(raw <= -p.lo));
      out.grad = select_value(live, T(1), T(0));
    } else {
      static_assert(K == PolicyKind::kGSPOToken, "a PolicyKind without its math");
      // verl's lp - sg(lp) + sg(s): s, and NaN for an infinite (or NaN) log-prob (inf - inf).
      const T log_ratio_t = (logprob - logprob) + row_log_ratio;
      const T capped = select_value(log_ratio_t > T(kGSPOTokenLogRatioMax),
                                    T(kGSPOTokenLogRatioMax), log_ratio_t);
      // The gradient passes where x <= max (not above the cap, nor for a NaN). At the tie
      // x == max torch 2.14.1's clamp passes 0 instead; s is a sum of float log-ratios,
      // so the tie has measure zero and the kernels keep one rule on every torch.
      sequence_surrogate(capped, log_ratio_t <= T(kGSPOTokenLogRatioMax), advantage, p.lo,
                         p.hi, &out);
      out.neg_log_ratio = -raw;
    }
    return out;
  }
}

// policy_kind_token with the kind known only at run time (CUDA: a warp-uniform switch).
template <typename T>
RLHF_HD PolicyToken<T> policy_kind_token(PolicyKind kind, T logprob, T old_logprob, T advantage,
                                         T row_log_ratio, const PolicyParams<T>& p) {
#define RLHF_EXT_POLICY_CASE(K)                                                        \
  case PolicyKind::K:                                                                  \
    return policy_kind_token<PolicyKind::K>(logprob, old_logprob, advantage, row_log_ratio, p);
  switch (kind) {
    RLHF_EXT_POLICY_CASE(kReinforce)
    RLHF_EXT_POLICY_CASE(kCISPO)
    RLHF_EXT_POLICY_CASE(kSAPO)
    RLHF_EXT_POLICY_CASE(kDPPOTV)
    RLHF_EXT_POLICY_CASE(kDPPOKL)
    RLHF_EXT_POLICY_CASE(kDRO)
    RLHF_EXT_POLICY_CASE(kGSPO)
    RLHF_EXT_POLICY_CASE(kGSPOToken)
    RLHF_EXT_POLICY_CASE(kGeoMean)
    case PolicyKind::kPPO:
    default:
      return policy_kind_token<PolicyKind::kPPO>(logprob, old_logprob, advantage, row_log_ratio,
                                                 p);
  }
#undef RLHF_EXT_POLICY_CASE
}

}  // namespace rlhf_ext
