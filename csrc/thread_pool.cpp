#include "thread_pool.h"

#include <algorithm>

namespace moeedge {

ThreadPool::ThreadPool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { work(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  start_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::work(int index) {
  unsigned seen = 0;
  for (;;) {
    std::unique_lock<std::mutex> lk(mu_);
    start_cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
    if (stop_) return;
    seen = generation_;
    if (index >= parts_) continue;
    const size_t begin = n_ * index / parts_, end = n_ * (index + 1) / parts_;
    const auto* fn = fn_;
    lk.unlock();
    (*fn)(begin, end);
    lk.lock();
    if (--pending_ == 0) done_cv_.notify_one();
  }
}

void ThreadPool::parallel_for(size_t n, int parts, const std::function<void(size_t, size_t)>& fn) {
  parts = std::max(1, std::min({parts, size(), static_cast<int>(n)}));
  if (parts == 1) {
    fn(0, n);
    return;
  }
  std::lock_guard<std::mutex> call(call_mu_);
  {
    std::lock_guard<std::mutex> lk(mu_);
    fn_ = &fn;
    n_ = n;
    parts_ = parts;
    pending_ = parts - 1;
    ++generation_;
  }
  start_cv_.notify_all();
  fn(0, n / parts);
  std::unique_lock<std::mutex> lk(mu_);
  done_cv_.wait(lk, [&] { return pending_ == 0; });
}

ThreadPool& kernel_pool() {
  static ThreadPool pool(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  return pool;
}

}  // namespace moeedge
