// The IO threads' side of the expert cache: demand reads first, then the most urgent
// prefetch that may start, each read in chunks that give way to anything more urgent.
#include <chrono>
#include <limits>
#include <stdexcept>

#include "errors.h"
#include "expert_cache.h"

namespace moeedge {

namespace {
using Clock = std::chrono::steady_clock;
constexpr int64_t kDemand = std::numeric_limits<int64_t>::max();
}  // namespace

void ExpertCache::io_loop() {
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    work_cv_.wait(lk, [&] { return closed_ || !demand_.empty() || prefetch_may_start(); });
    if (closed_) return;
    load_next(lk, std::numeric_limits<int64_t>::min());
  }
}

void ExpertCache::load_next(std::unique_lock<std::mutex>& lk, int64_t above) {
  // The next read more urgent than `above`: a demand read, else the first queued prefetch.
  Freed freed;
  std::shared_ptr<Entry> e;
  int64_t priority = kDemand;
  if (!demand_.empty()) {
    e = demand_.front();
    demand_.pop_front();
  } else if (queued_above(above)) {
    e = next_prefetch(freed, priority);
  }
  if (!freed.empty()) {  // give evicted pages back outside the lock
    lk.unlock();
    freed.clear();
    lk.lock();
  }
  if (!e) return;
  ++reading_[priority];
  load(e, lk, priority);
  if (--reading_[priority] == 0) reading_.erase(priority);
  work_cv_.notify_all();  // a prefetch held back for this read may start
  pause_cv_.notify_all();
}

bool ExpertCache::keep_reading(const Entry& e, int64_t priority, std::unique_lock<std::mutex>& lk) {
  // Between two chunks of a prefetch. Whatever is more urgent goes first: a queued read
  // is read here, on this thread; one that another thread reads is waited for, so that
  // the disk serves the read the model waits for alone.
  for (;;) {
    if (closed_) return false;
    if (e.pins > 0) return true;  // no longer a guess: someone waits for it
    if (e.stop) return false;
    if (!demand_.empty() || queued_above(priority)) {
      load_next(lk, priority);
    } else if (!reading_.empty() && reading_.rbegin()->first > priority) {
      pause_cv_.wait(lk);
    } else {
      return true;
    }
  }
}

bool ExpertCache::queued_above(int64_t priority) const {
  return !prefetch_queue_.empty() && -prefetch_queue_.begin()->first.first > priority;
}

bool ExpertCache::prefetch_may_start() const {
  if (prefetch_queue_.empty()) return false;
  return reading_.empty() || -prefetch_queue_.begin()->first.first >= reading_.rbegin()->first;
}

std::shared_ptr<CacheEntry> ExpertCache::next_prefetch(Freed& freed, int64_t& priority) {
  while (!prefetch_queue_.empty()) {
    auto it = prefetch_queue_.begin();
    uint64_t key = it->second;
    priority = -it->first.first;
    queued_.erase(key);
    prefetch_queue_.erase(it);
    if (entries_.count(key)) continue;  // loaded on demand meanwhile
    uint64_t slot = store_->slot_bytes(key);
    Room room;
    try {
      room = make_room(slot, freed);
    } catch (const BudgetError&) {
      room = Room::WaitForLoads;
    }
    if (room != Room::Made) {  // a prefetch never waits for room: it is only a guess
      ++stats_.prefetch_dropped;
      continue;
    }
    auto e = std::make_shared<Entry>();
    e->key = key;
    e->prefetched = true;
    e->slab = recycle(freed, slot);
    reserve(e, slot);
    entries_[key] = e;
    return e;
  }
  return nullptr;
}

void ExpertCache::load(const std::shared_ptr<Entry>& e, std::unique_lock<std::mutex>& lk, int64_t priority) {
  e->state = Entry::State::Loading;
  const uint64_t key = e->key;
  std::shared_ptr<Slab> slab = std::move(e->slab);  // recycled from an eviction, or none yet
  const auto t0 = Clock::now();
  if (reads_in_flight_++ == 0) busy_since_ = t0;
  lk.unlock();
  uint64_t from_disk = 0;
  bool stopped = false;
  std::exception_ptr error;
  try {
    if (!slab) slab = std::make_shared<Slab>(e->reserved_bytes);
    std::function<bool()> go_on;
    if (e->prefetched) go_on = [&] {
      std::unique_lock<std::mutex> l(mu_);
      return keep_reading(*e, priority, l);
    };
    from_disk = store_->read(key, slab->data(), go_on);
  } catch (const ReadStopped& s) {
    stopped = true;
    from_disk = s.bytes;
  } catch (...) {
    error = std::current_exception();
  }
  const auto t1 = Clock::now();
  const double seconds = std::chrono::duration<double>(t1 - t0).count();
  lk.lock();
  // The union of the reads' intervals: a read that ends while another goes on adds nothing yet.
  if (--reads_in_flight_ == 0) stats_.read_busy_seconds += std::chrono::duration<double>(t1 - busy_since_).count();
  stats_.bytes_read += from_disk;
  if (stopped && e->pins > 0 && !closed_) {
    // Pinned after it stopped: read it again, now on demand.
    e->state = Entry::State::Queued;
    e->prefetched = false;
    e->slab = std::move(slab);
    demand_.push_front(e);
    work_cv_.notify_one();
    return;
  }
  if (stopped || error) {
    e->state = Entry::State::Failed;
    e->error = error ? error : std::make_exception_ptr(std::runtime_error(
        "the expert cache was closed before " + describe_key(key) + " was read"));
    if (stopped) {
      ++stats_.prefetch_stopped;
      stats_.prefetch_stopped_bytes += from_disk;
    } else {
      ++stats_.io_errors;
    }
    auto it = entries_.find(key);
    if (it != entries_.end() && it->second == e) entries_.erase(it);
    stats_.resident_bytes -= e->reserved_bytes;
    e->reserved_bytes = 0;
  } else {
    e->slab = std::move(slab);
    ++stats_.reads;
    stats_.read_seconds += seconds;
    if (!e->used) e->last_use = ++tick_;  // a landed prefetch counts as recent
    e->state = Entry::State::Ready;
  }
  landed_.fetch_add(1, std::memory_order_release);
  done_cv_.notify_all();
}

}  // namespace moeedge
