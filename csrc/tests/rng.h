// Seeded random inputs for the C++ unit tests: fixed seeds keep a failure
// reproducible, and the same run gives the same numbers on every machine that
// shares a standard library.
#pragma once

#include <cstdint>
#include <random>

namespace rlhf_test {

class Rng {
 public:
  explicit Rng(std::uint64_t seed) : engine_(seed) {}

  double uniform(double lo, double hi) {
    return std::uniform_real_distribution<double>(lo, hi)(engine_);
  }

  bool bernoulli(double p) { return std::bernoulli_distribution(p)(engine_); }

  int integer(int lo, int hi) {  // inclusive bounds
    return std::uniform_int_distribution<int>(lo, hi)(engine_);
  }

 private:
  std::mt19937_64 engine_;
};

}  // namespace rlhf_test
