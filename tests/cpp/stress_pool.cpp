// Hammers the kernel ThreadPool: calls of every part count from 1 to beyond the pool's
// size, back to back (workers still spinning) and after pauses (workers asleep), from
// several caller threads at once. Each call must cover [0, n) exactly once. Built plain,
// with ASan+UBSan and with TSan (MOEEDGE_SANITIZE); run by ctest. Exits non-zero on any
// element covered twice or never.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "thread_pool.h"

using namespace moeedge;

int main() {
  ThreadPool pool(4);
  std::atomic<int> failures{0};
  const auto caller = [&](unsigned seed) {
    std::mt19937 rng(seed);
    std::vector<std::atomic<int>> hits(257);
    for (int call = 0; call < 3000; ++call) {
      const size_t n = rng() % hits.size() + 1;
      const int parts = static_cast<int>(rng() % 6) + 1;
      for (size_t i = 0; i < n; ++i) hits[i] = 0;
      pool.parallel_for(n, parts, [&](size_t begin, size_t end) {
        for (size_t i = begin; i < end; ++i) hits[i].fetch_add(1);
      });
      for (size_t i = 0; i < n; ++i)
        if (hits[i] != 1) {
          std::fprintf(stderr, "call %d: element %zu of %zu covered %d times (parts %d)\n", call, i, n,
                       hits[i].load(), parts);
          ++failures;
          return;
        }
      if (rng() % 50 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));  // let workers sleep
    }
  };
  std::vector<std::thread> callers;
  for (unsigned t = 0; t < 3; ++t) callers.emplace_back(caller, t + 1);
  for (auto& t : callers) t.join();
  if (failures) return 1;
  std::puts("stress_pool: ok");
  return 0;
}
