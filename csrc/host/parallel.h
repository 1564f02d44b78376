// A minimal work-sharing loop for the host kernels: tasks are claimed from an atomic counter by
// num_threads threads (the calling thread is one of them), so uneven tasks balance themselves.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace glm5v {

inline int default_num_threads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

// Runs body(task) for task in [0, num_tasks). The first exception thrown by any task is rethrown
// on the calling thread after all threads have stopped.
template <typename Body>
void parallel_for(int64_t num_tasks, int num_threads, const Body& body) {
  if (num_tasks <= 0) return;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), num_tasks));
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&]() {
    for (int64_t task = next.fetch_add(1); task < num_tasks; task = next.fetch_add(1)) {
      try {
        body(task);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        next.store(num_tasks);  // stop handing out work
      }
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& thread : pool) thread.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace glm5v
