// A byte-budgeted cache of expert buffers, filled by IO threads.
//
// Every entry's slot is reserved against the budget before its memory is mapped,
// so resident bytes (padding and buffers being filled included) never exceed the
// budget. A pinned entry (a live ExpertPin, or a reader waiting for it) is never
// evicted. Demand reads go before prefetches. A prefetch being read gives the disk to
// any more urgent read between its chunks (reading it on its own thread, or waiting for
// the thread that does), and a cancelled one stops there, unless someone waits for it.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "eviction.h"
#include "expert_store.h"
#include "slab.h"

namespace moeedge {

struct CacheStats {
  uint64_t hits = 0;                 // gets served by a ready entry
  uint64_t misses = 0;               // gets that waited for a read
  uint64_t prefetch_issued = 0;      // keys queued by prefetch()
  uint64_t prefetch_hits = 0;        // first get of an entry a prefetch loaded or is loading
  uint64_t prefetch_late = 0;        // a get came before the queued prefetch started: read on demand
  uint64_t prefetch_cancelled = 0;   // dropped from the queue by cancel_prefetches()
  uint64_t prefetch_stopped = 0;     // being read when cancelled: stopped between chunks
  uint64_t prefetch_stopped_bytes = 0;  // what they had read (also in bytes_read)
  uint64_t prefetch_dropped = 0;     // no room when the read would start
  uint64_t prefetch_wasted = 0;      // prefetched, then evicted without a get
  uint64_t prefetch_wasted_bytes = 0;
  uint64_t evictions = 0;
  uint64_t bytes_read = 0;           // from disk, O_DIRECT alignment padding included
  uint64_t io_errors = 0;
  uint64_t resident_bytes = 0;
  uint64_t peak_resident_bytes = 0;
  uint64_t pinned_bytes = 0;
  uint64_t budget_bytes = 0;
  uint64_t n_resident = 0;
  double wait_seconds = 0;           // time callers spent blocked in get()
  uint64_t reads = 0;                // loads that finished, from disk
  double read_seconds = 0;           // their durations summed (concurrent reads overlap)
  double read_busy_seconds = 0;      // wall time with at least one read in flight: bytes_read over it is the
                                     // bandwidth the disk gave while it was asked for something
};

class ExpertCache;

struct CacheEntry {
  enum class State { Queued, Loading, Ready, Failed };
  uint64_t key = 0;
  uint64_t reserved_bytes = 0;  // counted in resident_bytes
  std::shared_ptr<Slab> slab;  // the bytes once Ready; before that, a recycled slab to read into
  State state = State::Queued;
  int pins = 0;
  bool prefetched = false;
  bool stop = false;  // cancelled while being read: stop at the next chunk unless pinned
  bool used = false;
  uint64_t last_use = 0;
  std::exception_ptr error;
};

// Keeps one entry pinned and its bytes alive while it exists.
class ExpertPin {
 public:
  ExpertPin(std::shared_ptr<ExpertCache> cache, std::shared_ptr<CacheEntry> entry, uint64_t offset, uint64_t nbytes);
  ~ExpertPin();
  ExpertPin(const ExpertPin&) = delete;
  ExpertPin& operator=(const ExpertPin&) = delete;

  uint64_t key() const { return entry_->key; }
  const uint8_t* data() const { return slab_->data() + offset_; }
  uint64_t nbytes() const { return nbytes_; }

 private:
  std::shared_ptr<ExpertCache> cache_;
  std::shared_ptr<CacheEntry> entry_;
  std::shared_ptr<Slab> slab_;
  uint64_t offset_;  // where the packed bytes start in the slab (ExpertStore::data_offset)
  uint64_t nbytes_;
};

class ExpertCache : public std::enable_shared_from_this<ExpertCache> {
 public:
  static std::shared_ptr<ExpertCache> create(std::shared_ptr<const ExpertStore> store, uint64_t budget_bytes,
                                             const std::string& policy, int io_threads);
  ~ExpertCache();
  ExpertCache(const ExpertCache&) = delete;
  ExpertCache& operator=(const ExpertCache&) = delete;

  // Blocks until the expert is ready. Throws UnknownKey, BudgetError, ReadError,
  // or std::runtime_error once closed.
  std::unique_ptr<ExpertPin> get(uint64_t key);
  size_t prefetch(const std::vector<uint64_t>& keys, int64_t priority);
  size_t cancel_prefetches(const std::vector<uint64_t>* keys);  // nullptr: all
  void set_budget(uint64_t budget_bytes);
  // Evict these keys now where ready and unpinned (a representation no longer read); bytes freed.
  uint64_t drop(const std::vector<uint64_t>& keys);
  void set_scores(const std::vector<std::pair<uint64_t, double>>& scores);
  bool contains(uint64_t key) const;
  std::vector<uint64_t> resident_keys() const;
  CacheStats stats() const;
  void reset_stats();
  void close();

  uint64_t budget_bytes() const;
  // How long get() spins for a read in flight before it sleeps (0: sleep at once).
  void set_spin_wait(double seconds);
  double spin_wait() const { return spin_wait_.load(std::memory_order_relaxed); }
  Policy policy() const { return policy_; }
  int io_threads() const { return n_threads_; }
  const std::shared_ptr<const ExpertStore>& store() const { return store_; }

 private:
  friend class ExpertPin;
  using Entry = CacheEntry;
  using Freed = std::vector<std::shared_ptr<Slab>>;
  enum class Room { Made, WaitForLoads };

  ExpertCache(std::shared_ptr<const ExpertStore> store, uint64_t budget_bytes, Policy policy);
  void start(int io_threads);
  void io_loop();
  void load(const std::shared_ptr<Entry>& e, std::unique_lock<std::mutex>& lk, int64_t priority);
  void load_next(std::unique_lock<std::mutex>& lk, int64_t above);
  bool keep_reading(const Entry& e, int64_t priority, std::unique_lock<std::mutex>& lk);
  std::shared_ptr<Entry> next_prefetch(Freed& freed, int64_t& priority);
  // get's two halves: the entry of key, admitted and queued for a demand read if absent
  // (waiting for room while prefetches land), then waiting for its read to land.
  std::shared_ptr<Entry> find_or_admit(uint64_t key, uint64_t slot, Freed& freed, std::unique_lock<std::mutex>& lk,
                                       bool& waited);
  void wait_landed(const std::shared_ptr<Entry>& e, std::unique_lock<std::mutex>& lk);
  bool prefetch_may_start() const;
  bool queued_above(int64_t priority) const;  // a queued prefetch more urgent than priority
  Room make_room(uint64_t bytes, Freed& freed);
  std::shared_ptr<Slab> recycle(Freed& freed, uint64_t bytes);
  Entry* pick_victim();
  void evict(Entry* e, Freed& freed);
  void reserve(const std::shared_ptr<Entry>& e, uint64_t bytes);
  void unpin(Entry* e);
  void check_fits(uint64_t key, uint64_t slot) const;

  const std::shared_ptr<const ExpertStore> store_;
  const Policy policy_;

  mutable std::mutex mu_;
  std::condition_variable work_cv_;  // IO threads: a demand or prefetch is queued
  std::condition_variable done_cv_;  // readers: a load finished or failed
  int reads_in_flight_ = 0;                      // under mu_
  std::chrono::steady_clock::time_point busy_since_;  // when reads_in_flight_ last rose from 0
  std::atomic<uint64_t> landed_{0};  // bumped with every done_cv_ notify: what a spinning reader watches
  // A thread that sleeps while its expert is read leaves its core idle, and on the machines
  // measured the next products then ran up to 2x slower (a wait of 20 ms before each FFN:
  // 4.1 -> 8.3 ms; spinning through the same wait: 4.7 ms). Reads here take tens of ms.
  std::atomic<double> spin_wait_{0.1};
  std::condition_variable pause_cv_;  // prefetches paused for a more urgent read: look again
  std::unordered_map<uint64_t, std::shared_ptr<Entry>> entries_;
  std::deque<std::shared_ptr<Entry>> demand_;
  // Queued prefetches, highest priority first, then first come: (-priority, seq) -> key.
  std::map<std::pair<int64_t, uint64_t>, uint64_t> prefetch_queue_;
  std::unordered_map<uint64_t, std::map<std::pair<int64_t, uint64_t>, uint64_t>::iterator> queued_;
  // Reads in flight by priority (demand reads at the top): a prefetch starts only when
  // nothing more urgent is being read, so that a guess never shares the disk with a read
  // the model is waiting for or is about to wait for.
  std::map<int64_t, int> reading_;
  std::unordered_map<uint64_t, uint64_t> uses_;
  std::unordered_map<uint64_t, double> scores_;
  uint64_t budget_bytes_;
  uint64_t tick_ = 0;
  uint64_t seq_ = 0;
  CacheStats stats_;
  bool closed_ = false;
  int n_threads_ = 0;
  std::mutex join_mu_;  // close() may be called from several threads
  std::vector<std::thread> threads_;
};

}  // namespace moeedge
