// A minimal test harness for the C++ unit tests. No gtest: CI may be offline,
// and these tests only need "compare, report file:line and values, fail".
//
//   CHECK(cond)               cond is true
//   CHECK_EQ(a, b)            a == b (exact; use for values that must not round)
//   CHECK_NEAR(a, b, tol)     |a - b| <= tol; NaN on either side fails
//   CHECK_SAME_BITS(a, b)     identical bits, for scalars (tells 0 from -0)
//   TRACE(...)                while in scope, failures also print this context
//   RUN(fn)                   call a test function and report it by name
//   return rlhf_test::finish();   at the end of main: 1 if anything failed
#pragma once

#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace rlhf_test {

inline int& failure_count() {
  static int count = 0;
  return count;
}

// Context pushed by TRACE, so a failure inside a loop says which iteration.
inline std::vector<std::string>& trace_stack() {
  static std::vector<std::string> stack;
  return stack;
}

struct Trace {
  template <typename... Args>
  explicit Trace(const Args&... args) {
    std::ostringstream out;
    out.precision(17);
    (out << ... << args);
    trace_stack().push_back(out.str());
  }
  ~Trace() { trace_stack().pop_back(); }
  Trace(const Trace&) = delete;
  Trace& operator=(const Trace&) = delete;
};

// Only the first failures are printed: one broken invariant inside a loop of
// thousands would otherwise bury the useful first lines.
constexpr int kMaxPrintedFailures = 25;

inline void fail(const char* file, int line, const std::string& message) {
  if (++failure_count() > kMaxPrintedFailures) return;
  std::cout.flush();  // keep failures next to the test that printed before them
  std::cerr << file << ":" << line << ": FAILED " << message << "\n";
  for (const std::string& context : trace_stack()) {
    std::cerr << "    in " << context << "\n";
  }
  std::cerr.flush();
}

template <typename A, typename B>
std::string describe(const char* what, const char* a_expr, const A& a,
                     const char* b_expr, const B& b) {
  std::ostringstream out;
  out.precision(17);
  out << what << "(" << a_expr << ", " << b_expr << "): " << a << " vs " << b;
  return out.str();
}

template <typename T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

inline int finish() {
  if (failure_count() == 0) {
    std::cout << "all checks passed\n";
    return 0;
  }
  std::cout.flush();
  std::cerr << failure_count() << " check(s) failed\n";
  return 1;
}

}  // namespace rlhf_test

#define RLHF_TEST_CAT_(a, b) a##b
#define RLHF_TEST_CAT(a, b) RLHF_TEST_CAT_(a, b)

#define TRACE(...) \
  ::rlhf_test::Trace RLHF_TEST_CAT(rlhf_trace_, __LINE__)(__VA_ARGS__)

#define CHECK(cond)                                                \
  do {                                                             \
    if (!(cond)) ::rlhf_test::fail(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

#define CHECK_EQ(a, b)                                                     \
  do {                                                                     \
    const auto rlhf_a_ = (a); /* copies: (a) may name part of a temporary */ \
    const auto rlhf_b_ = (b);                                              \
    if (!(rlhf_a_ == rlhf_b_)) {                                           \
      ::rlhf_test::fail(__FILE__, __LINE__,                                \
                        ::rlhf_test::describe("CHECK_EQ", #a, rlhf_a_, #b, rlhf_b_)); \
    }                                                                      \
  } while (0)

// Written as !(diff <= tol) so that a NaN anywhere is a failure.
#define CHECK_NEAR(a, b, tol)                                                  \
  do {                                                                         \
    const double rlhf_a_ = static_cast<double>(a);                             \
    const double rlhf_b_ = static_cast<double>(b);                             \
    const double rlhf_tol_ = static_cast<double>(tol);                         \
    if (!(std::fabs(rlhf_a_ - rlhf_b_) <= rlhf_tol_)) {                        \
      std::ostringstream rlhf_msg_;                                            \
      rlhf_msg_.precision(17);                                                 \
      rlhf_msg_ << "CHECK_NEAR(" #a ", " #b ", " #tol "): " << rlhf_a_ << " vs " \
                << rlhf_b_ << " (diff " << std::fabs(rlhf_a_ - rlhf_b_)        \
                << " > tol " << rlhf_tol_ << ")";                              \
      ::rlhf_test::fail(__FILE__, __LINE__, rlhf_msg_.str());                  \
    }                                                                          \
  } while (0)

#define CHECK_SAME_BITS(a, b)                                                  \
  do {                                                                         \
    const auto rlhf_a_ = (a);                                                  \
    const decltype(rlhf_a_) rlhf_b_ = (b);                                     \
    if (!::rlhf_test::same_bits(rlhf_a_, rlhf_b_)) {                           \
      ::rlhf_test::fail(__FILE__, __LINE__,                                    \
                        ::rlhf_test::describe("CHECK_SAME_BITS", #a, rlhf_a_, #b, rlhf_b_)); \
    }                                                                          \
  } while (0)

#define RUN(fn)                                                      \
  do {                                                               \
    const int rlhf_before_ = ::rlhf_test::failure_count();           \
    fn();                                                            \
    const bool rlhf_ok_ = ::rlhf_test::failure_count() == rlhf_before_; \
    std::cout << (rlhf_ok_ ? "[  ok  ] " : "[ FAIL ] ") << #fn << std::endl; \
  } while (0)
