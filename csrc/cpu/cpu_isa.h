// Run-time choice between copies of a CPU row loop compiled for the baseline
// x86-64 ISA, AVX2 + FMA and AVX-512. The wheel must run on any x86-64, yet the
// branch-free per-element math (exp polynomials, selects) is 4-8x cheaper on 8
// or 16 lanes with FMA.
//
// Usage: write the loop as an RLHF_INLINE template `NAME(const Args&, begin,
// end)`, declare its copies with RLHF_EXT_ISA_CLONES(NAME) and run it through
// best_loop(&NAME<Args>, &NAME_avx2<Args>, &NAME_avx512<Args>). Inlined into a
// target-attributed copy, the loop is compiled for that ISA.
#pragma once
#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__)
#define RLHF_EXT_X86_CLONES 1
#define RLHF_AVX2 __attribute__((target("avx2,fma")))
#define RLHF_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))
#define RLHF_INLINE __attribute__((always_inline)) inline
#else
#define RLHF_EXT_X86_CLONES 0
#define RLHF_AVX2
#define RLHF_AVX512
#define RLHF_INLINE inline
#endif

#define RLHF_EXT_ISA_CLONES(NAME)                                              \
  template <typename Args>                                                     \
  RLHF_AVX2 void NAME##_avx2(const Args& args, int64_t begin, int64_t end) {   \
    NAME(args, begin, end);                                                    \
  }                                                                            \
  template <typename Args>                                                     \
  RLHF_AVX512 void NAME##_avx512(const Args& args, int64_t begin, int64_t end) { \
    NAME(args, begin, end);                                                    \
  }

namespace rlhf_ext {

enum class Isa { kBaseline, kAvx2, kAvx512 };

inline Isa cpu_isa() {
#if RLHF_EXT_X86_CLONES
  static const Isa isa = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

template <typename Args>
using RangeLoop = void (*)(const Args&, int64_t, int64_t);

// The copy of a loop this CPU runs best.
template <typename Args>
RangeLoop<Args> best_loop(RangeLoop<Args> baseline, RangeLoop<Args> avx2,
                          RangeLoop<Args> avx512) {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return avx512;
    case Isa::kAvx2:
      return avx2;
    default:
      return baseline;
  }
}

}  // namespace rlhf_ext
