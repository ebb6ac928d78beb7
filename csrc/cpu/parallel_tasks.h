// Runs f(begin, end) over [0, n) in tasks of `task` elements that torch's intra-op (OpenMP)
// threads take from a shared counter as they go.
//
// NOTE: a shared counter rather than one equal share per thread. The optimizer updates run
// while the training thread drives the GPU (pipelined with the forward, or in backward), so
// one core is usually shared; with equal shares every update would wait for the thread on
// that core (1.7x slower with one busy thread on 2 cores; 1.35x this way).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace heteromem {

template <class F>
void parallel_tasks(int64_t n, int64_t task, const F& f) {
  const int64_t tasks = (n + task - 1) / task;
  const int64_t workers = std::min<int64_t>(tasks, at::get_num_threads());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      f(t * task, std::min(n, (t + 1) * task));
    }
  });
}

}  // namespace heteromem
