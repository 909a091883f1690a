// Hammers ExpertCache from several threads: gets that verify every byte, pins
// held across other gets, prefetches, cancels and budget changes, under a budget
// that forces constant eviction. Built plain, with ASan+UBSan and with TSan
// (MOEEDGE_SANITIZE); run by ctest. Exits non-zero on any wrong byte or broken
// invariant.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "errors.h"
#include "expert_cache.h"
#include "expert_store.h"

using namespace moeedge;

namespace {

uint8_t byte_at(uint64_t offset) { return static_cast<uint8_t>((offset * 2654435761u) >> 13); }

std::string write_file(const std::string& dir, size_t bytes) {
  std::string path = dir + "/moeedge-stress-XXXXXX";
  std::vector<char> name(path.begin(), path.end());
  name.push_back('\0');
  int fd = mkstemp(name.data());
  if (fd < 0) {
    std::perror("mkstemp");
    std::exit(2);
  }
  std::vector<uint8_t> buf(bytes);
  for (size_t i = 0; i < bytes; ++i) buf[i] = byte_at(i);
  if (write(fd, buf.data(), bytes) != static_cast<ssize_t>(bytes)) {
    std::perror("write");
    std::exit(2);
  }
  close(fd);
  return name.data();
}

struct Options {
  double seconds = 3;
  int threads = 4;
  bool direct = false;
  std::string dir = "/var/tmp";
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    if (a == "--seconds") o.seconds = std::atof(argv[i + 1]);
    else if (a == "--threads") o.threads = std::atoi(argv[i + 1]);
    else if (a == "--direct") o.direct = std::atoi(argv[i + 1]) != 0;
    else if (a == "--dir") o.dir = argv[i + 1];
  }
  return o;
}

// Two unaligned segments per expert, the second from the other end of the file.
RangeTable make_ranges(int n_experts, uint64_t seg, uint64_t file_bytes) {
  RangeTable ranges;
  for (int e = 0; e < n_experts; ++e) {
    uint64_t key = (uint64_t(e % 4) << 32) | uint64_t(e / 4);
    ranges[key] = {{0, 17 + e * (seg + 5), seg}, {0, file_bytes - (e + 1) * 1001 - 3, 777}};
  }
  return ranges;
}

bool verify(const ExpertStore& store, const ExpertPin& pin) {
  uint64_t pos = 0;
  for (const auto& s : store.segments(pin.key())) {
    for (uint64_t i = 0; i < s.length; ++i)
      if (pin.data()[pos + i] != byte_at(s.offset + i)) return false;
    pos += s.length;
  }
  return pos == pin.nbytes();
}

int run(const Options& o) {
  const int n_experts = 32;
  const uint64_t seg = 64 * 1024 + 123;
  const uint64_t file_bytes = n_experts * (seg + 5) + 64 * 1024;
  const std::string path = write_file(o.dir, file_bytes);
  // Reads of one page a call: every expert takes many, so prefetches pause for demand
  // reads and stop when cancelled while other threads get, prefetch and cancel.
  auto store = std::make_shared<ExpertStore>(std::vector<std::string>{path}, make_ranges(n_experts, seg, file_bytes),
                                             o.direct, kDirectAlign);
  const auto keys = store->keys();
  const uint64_t slot = store->slot_bytes(keys[0]);
  const uint64_t pins_per_thread = 2;
  // A thread holds pins_per_thread pins while it gets one more: that much must always fit.
  const uint64_t low = (o.threads * (pins_per_thread + 1) + 1) * slot, high = low + 6 * slot;
  auto cache = ExpertCache::create(store, high, "lru", 2);

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> gets{0}, wrong{0}, budget_refused{0}, unexpected{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < o.threads; ++t) {
    workers.emplace_back([&, t] {
      std::mt19937_64 rng(1234 + t);
      std::vector<std::unique_ptr<ExpertPin>> held;
      while (!stop.load()) {
        try {
          uint64_t key = keys[rng() % keys.size()];
          auto pin = cache->get(key);
          ++gets;
          if (!verify(*store, *pin)) ++wrong;
          held.push_back(std::move(pin));
          if (held.size() > pins_per_thread) held.erase(held.begin());
          for (const auto& h : held)  // pinned bytes must never change under pressure
            if (!verify(*store, *h)) ++wrong;
          switch (rng() % 8) {
            case 0: cache->prefetch({keys[rng() % keys.size()], keys[rng() % keys.size()]}, int64_t(rng() % 3)); break;
            case 1: cache->cancel_prefetches(nullptr); break;
            case 2:
              try {
                cache->set_budget(rng() % 2 ? low : high);
              } catch (const BudgetError&) {
                ++budget_refused;
              }
              break;
            default: break;
          }
        } catch (const std::exception& e) {
          std::fprintf(stderr, "thread %d: %s\n", t, e.what());
          ++unexpected;
        }
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(o.seconds));
  stop = true;
  for (auto& w : workers) w.join();

  const CacheStats s = cache->stats();
  int failures = 0;
  auto check = [&](bool ok, const char* what) {
    if (!ok) {
      std::fprintf(stderr, "FAILED: %s\n", what);
      ++failures;
    }
  };
  check(wrong == 0, "every byte matches the file");
  check(unexpected == 0, "no unexpected exception");
  check(s.hits + s.misses == gets, "hits + misses == gets");
  check(s.evictions > 0, "the budget forced evictions");
  check(s.peak_resident_bytes <= high, "peak resident bytes within the largest budget");
  check(s.pinned_bytes == 0, "no pins left");

  // Destroying a cache with reads in flight is safe.
  for (int round = 0; round < 20; ++round) {
    auto c = ExpertCache::create(store, high, "lfu", 3);
    c->prefetch(keys, 0);
    if (round % 2) c->close();
  }
  std::printf("stress_cache: %s, %d threads, %.1f s: %llu gets, %llu hits, %llu misses, %llu evictions, "
              "%llu prefetch hits, %llu budget shrinks refused; %s\n",
              o.direct ? (store->direct_io() ? "O_DIRECT" : "buffered (O_DIRECT refused)") : "buffered", o.threads,
              o.seconds, (unsigned long long)gets.load(), (unsigned long long)s.hits, (unsigned long long)s.misses,
              (unsigned long long)s.evictions, (unsigned long long)s.prefetch_hits,
              (unsigned long long)budget_refused.load(), failures ? "FAILED" : "ok");
  unlink(path.c_str());
  return failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) { return run(parse(argc, argv)); }
