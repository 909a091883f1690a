#include "thread_pool.h"

#include <algorithm>
#include <chrono>

#ifdef __linux__
#include <sched.h>
#endif

#include "spin.h"

namespace moeedge {

namespace {

// How long a thread spins for the next call (or for the others to finish) before it
// sleeps: longer than the gap between a decode step's products, short enough that an idle
// pool gives its cores back at once to the IO threads and to torch.
constexpr auto kSpin = std::chrono::microseconds(200);

// Ranges per thread and call: enough that a delayed thread's share is taken by the others,
// few enough that each range is a long stream (a decode step's matrices: hundreds of rows).
constexpr size_t kRangesPerThread = 4;

// Spins until done() or kSpin has passed; true if done.
template <class Done>
bool spin_until(const Done& done) {
  const auto until = std::chrono::steady_clock::now() + kSpin;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return true;
      MOEEDGE_PAUSE();
    }
    if (std::chrono::steady_clock::now() > until) return false;
  }
}

}  // namespace

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
  uint64_t seen = 0;
  bool took_part = false;
  const auto called = [&] { return stop_.load(std::memory_order_acquire) ||
                                   call_.load(std::memory_order_acquire) != seen; };
  for (;;) {
    // A worker left out of the last call sleeps at once: calls limited to fewer threads
    // (set_kernel_threads) leave the other CPUs to the rest of the process and the machine.
    if (!took_part || !spin_until(called)) {
      std::unique_lock<std::mutex> lk(mu_);
      start_cv_.wait(lk, called);
    }
    if (stop_) return;
    seen = call_.load(std::memory_order_acquire);
    const size_t parts = seen & 0xffff;
    took_part = static_cast<size_t>(index) < parts;
    if (!took_part) continue;
    take_ranges();
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lk(mu_);  // the caller checks pending_ under mu_ before it sleeps
      done_cv_.notify_one();
    }
  }
}

void ThreadPool::take_ranges() {
  for (size_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < ranges_;) (*fn_)(n_ * i / ranges_, n_ * (i + 1) / ranges_);
}

void ThreadPool::parallel_for(size_t n, int parts, const std::function<void(size_t, size_t)>& fn) {
  parts = std::max(1, std::min({parts, size(), static_cast<int>(std::min<size_t>(n, 0xffff))}));
  if (parts == 1) {
    fn(0, n);
    return;
  }
  std::lock_guard<std::mutex> call(call_mu_);
  fn_ = &fn;
  n_ = n;
  ranges_ = std::min(n, static_cast<size_t>(parts) * kRangesPerThread);
  next_.store(0, std::memory_order_relaxed);
  pending_.store(parts - 1, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lk(mu_);  // a worker about to sleep sees the new call or is woken
    const uint64_t calls = (call_.load(std::memory_order_relaxed) >> 16) + 1;
    call_.store(calls << 16 | static_cast<uint64_t>(parts), std::memory_order_release);
  }
  start_cv_.notify_all();
  take_ranges();
  const auto finished = [&] { return pending_.load(std::memory_order_acquire) == 0; };
  if (!spin_until(finished)) {
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, finished);
  }
}

namespace {

int allowed_cpus() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

std::atomic<int> requested_threads{0};

}  // namespace

ThreadPool& kernel_pool() {
  static ThreadPool pool(allowed_cpus());
  return pool;
}

void set_kernel_threads(int n) { requested_threads.store(std::max(0, n), std::memory_order_relaxed); }

int kernel_threads() {
  const int n = requested_threads.load(std::memory_order_relaxed);
  const int size = kernel_pool().size();
  return n > 0 ? std::min(n, size) : size;
}

}  // namespace moeedge
