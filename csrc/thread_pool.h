// A small persistent pool for kernels: splits [0, n) into one contiguous range per
// worker and waits for all. Workers sleep on a condition variable between calls.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moeedge {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  // fn(begin, end) over `parts` ranges of [0, n); the caller runs the first range.
  void parallel_for(size_t n, int parts, const std::function<void(size_t, size_t)>& fn);

 private:
  void work(int index);

  std::mutex call_mu_;  // one parallel_for at a time
  std::mutex mu_;
  std::condition_variable start_cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(size_t, size_t)>* fn_ = nullptr;
  size_t n_ = 0;
  int parts_ = 0;
  int pending_ = 0;
  unsigned generation_ = 0;
  bool stop_ = false;
};

// The process-wide pool for kernels, sized to the hardware threads.
ThreadPool& kernel_pool();

}  // namespace moeedge
