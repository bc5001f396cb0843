// How the CPU kernels split work over threads: one rule for every kernel.
//
// An OpenMP parallel region (at::parallel_for) ends at a barrier that waits for every
// thread. On a machine shared with other work, a thread whose core another process holds
// runs only when the scheduler gives it a turn, a time slice of milliseconds, so a region
// that splits microseconds of work can take milliseconds (measured with
// bench/bench_threads.py: docs/performance.md, "CPU threads under contention"). So:
//  - work is split only into tasks of at least min_task_elements() elements; below that
//    the calling thread does it all, with no parallel region;
//  - above it, the threads take chunks of that size from a shared counter (dynamic
//    scheduling): a thread that starts late finds the chunks taken by the others instead
//    of holding a fixed share of the work, so a busy core costs at most the chunks its
//    thread has started.
// Which thread computes an item never changes its result (every kernel's item is a row or
// an element computed alone, and the reductions over chunks run afterwards in a fixed
// order), so the results stay bit-identical at any thread count.
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>

namespace rlhf_ext {

// Elements per task below which splitting costs more than it saves under contention.
constexpr int64_t kMinTaskElements = int64_t(1) << 18;
// Overrides kMinTaskElements (read once; an int >= 1), for tuning on other machines.
constexpr const char* kMinTaskElementsEnv = "RLHF_EXT_CPU_MIN_TASK_ELEMENTS";

inline int64_t min_task_elements() {
  static const int64_t value = [] {
    const char* text = std::getenv(kMinTaskElementsEnv);
    if (text == nullptr || *text == '\0') return kMinTaskElements;
    char* end = nullptr;
    const long long parsed = std::strtoll(text, &end, 10);
    TORCH_CHECK_VALUE(end != text && *end == '\0' && parsed >= 1, "rlhf_ext: ", kMinTaskElementsEnv,
                      " must be an int >= 1, got '", text, "'");
    return static_cast<int64_t>(parsed);
  }();
  return value;
}

// Items per task so that a task covers at least min_task_elements() elements.
inline int64_t items_per_task(int64_t elements_per_item) {
  return std::max<int64_t>(1, min_task_elements() / std::max<int64_t>(elements_per_item, 1));
}

// fn(begin, end) over [0, items) in chunks of items_per_task(elements_per_item) items:
// on the calling thread when that is one chunk (or one thread, or inside a parallel
// region), else over the intra-op threads, each taking the next chunk as it finishes one.
template <typename F>
void parallel_over(int64_t items, int64_t elements_per_item, const F& fn) {
  if (items <= 0) return;
  const int64_t chunk = items_per_task(elements_per_item);
  const int64_t chunks = (items + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1 || at::in_parallel_region()) {
    fn(int64_t(0), items);
    return;
  }
  std::atomic<int64_t> next_chunk{0};  // scheduling only: no result is summed through it
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next_chunk.fetch_add(1); c < chunks; c = next_chunk.fetch_add(1)) {
      fn(c * chunk, std::min(items, (c + 1) * chunk));
    }
  });
}

}  // namespace rlhf_ext
