// A small persistent pool for kernels: splits [0, n) into a few contiguous ranges per
// thread, which the threads take in turn, and waits for all. Taken in turn, not one fixed
// range each: a thread that the machine delays (an IO thread's interrupt, another
// process) leaves its share to the others instead of holding up the whole call. Between calls the workers spin for a short while, then sleep
// on a condition variable: a decode step makes ~80 calls a few hundred microseconds
// apart, and waking a sleeping thread (and being woken when it is done) cost tens of
// microseconds each time on our VMs.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
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
  // fn(begin, end) over the ranges of [0, n), on `parts` threads (the caller is one).
  void parallel_for(size_t n, int parts, const std::function<void(size_t, size_t)>& fn);

 private:
  void work(int index);
  void take_ranges();

  std::mutex call_mu_;  // one parallel_for at a time
  std::mutex mu_;       // for sleeping and waking only; the call's fields are published by generation_
  std::condition_variable start_cv_, done_cv_;
  std::vector<std::thread> workers_;
  // The call's fn and n, stable while a worker that takes part runs: the caller waits for it.
  const std::function<void(size_t, size_t)>* fn_ = nullptr;
  size_t n_ = 0;
  size_t ranges_ = 0;               // this call's ranges, taken in turn by index:
  std::atomic<size_t> next_{0};     // the next range to take
  std::atomic<int> pending_{0};
  // (calls so far << 16) | this call's parts, in one word: a worker that slept through a
  // call it had no part in reads the next call's parts with that call's count.
  std::atomic<uint64_t> call_{0};
  std::atomic<bool> stop_{false};
};

// The process-wide pool for kernels, one thread per CPU this process may run on (its
// affinity mask: taskset and cpuset limits count).
ThreadPool& kernel_pool();

// Threads a kernel call with threads = 0 uses: n (at most the pool's size), or for n = 0
// the whole pool, the default. Process-wide, like torch.set_num_threads.
void set_kernel_threads(int n);
int kernel_threads();

}  // namespace moeedge
