#include "expert_cache.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <stdexcept>

#include "errors.h"
#include "spin.h"

namespace moeedge {

namespace {

using Clock = std::chrono::steady_clock;

std::string bytes_str(uint64_t n) { return std::to_string(n) + " bytes"; }

template <class Busy>
void spin_while(const Busy& busy) {
  while (busy())
    for (int i = 0; i < 64; ++i) MOEEDGE_PAUSE();
}

}  // namespace

ExpertPin::ExpertPin(std::shared_ptr<ExpertCache> cache, std::shared_ptr<CacheEntry> entry, uint64_t offset,
                     uint64_t nbytes)
    : cache_(std::move(cache)), entry_(std::move(entry)), slab_(entry_->slab), offset_(offset), nbytes_(nbytes) {}

ExpertPin::~ExpertPin() { cache_->unpin(entry_.get()); }

std::shared_ptr<ExpertCache> ExpertCache::create(std::shared_ptr<const ExpertStore> store, uint64_t budget_bytes,
                                                 const std::string& policy, int io_threads) {
  if (!store) throw std::invalid_argument("ExpertCache needs an ExpertStore");
  if (budget_bytes == 0) throw std::invalid_argument("budget_bytes must be positive");
  if (io_threads < 1 || io_threads > 64)
    throw std::invalid_argument("io_threads must be between 1 and 64, got " + std::to_string(io_threads));
  std::shared_ptr<ExpertCache> cache(new ExpertCache(std::move(store), budget_bytes, parse_policy(policy)));
  cache->start(io_threads);
  return cache;
}

ExpertCache::ExpertCache(std::shared_ptr<const ExpertStore> store, uint64_t budget_bytes, Policy policy)
    : store_(std::move(store)), policy_(policy), budget_bytes_(budget_bytes) {
  stats_.budget_bytes = budget_bytes;
}

ExpertCache::~ExpertCache() { close(); }

void ExpertCache::start(int io_threads) {
  n_threads_ = io_threads;
  for (int i = 0; i < io_threads; ++i) threads_.emplace_back([this] { io_loop(); });
}

void ExpertCache::close() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    closed_ = true;
    // Demand reads not yet started fail their waiters; reads in flight finish.
    for (auto& e : demand_) {
      e->state = Entry::State::Failed;
      e->error = std::make_exception_ptr(std::runtime_error(
          "the expert cache was closed before " + describe_key(e->key) + " was read"));
      entries_.erase(e->key);
      stats_.resident_bytes -= e->reserved_bytes;
      e->reserved_bytes = 0;
    }
    demand_.clear();
    stats_.prefetch_cancelled += prefetch_queue_.size();
    prefetch_queue_.clear();
    queued_.clear();
  }
  work_cv_.notify_all();
  landed_.fetch_add(1, std::memory_order_release);
  done_cv_.notify_all();
  pause_cv_.notify_all();
  std::lock_guard<std::mutex> join_lk(join_mu_);
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

void ExpertCache::set_spin_wait(double seconds) {
  if (!(seconds >= 0 && seconds <= 10)) throw std::invalid_argument("spin_wait must be 0-10 seconds, got " + std::to_string(seconds));
  spin_wait_.store(seconds, std::memory_order_relaxed);
}

std::shared_ptr<Slab> ExpertCache::recycle(Freed& freed, uint64_t bytes) {
  // Experts of a model mostly share one size: reusing an evicted slab of that size
  // skips an mmap, a page fault per page and the kernel zeroing every page.
  for (auto it = freed.begin(); it != freed.end(); ++it) {
    if ((*it)->bytes() == bytes && it->use_count() == 1) {
      auto slab = std::move(*it);
      freed.erase(it);
      return slab;
    }
  }
  return nullptr;
}

void ExpertCache::check_fits(uint64_t key, uint64_t slot) const {
  if (slot > budget_bytes_)
    throw BudgetError(describe_key(key) + " needs " + bytes_str(slot) + " (page padding included), more than the whole budget of " +
                      bytes_str(budget_bytes_));
}

void ExpertCache::reserve(const std::shared_ptr<Entry>& e, uint64_t bytes) {
  e->reserved_bytes = bytes;
  stats_.resident_bytes += bytes;
  if (stats_.resident_bytes > stats_.peak_resident_bytes) stats_.peak_resident_bytes = stats_.resident_bytes;
}

ExpertCache::Room ExpertCache::make_room(uint64_t bytes, Freed& freed) {
  if (stats_.resident_bytes + bytes <= budget_bytes_) return Room::Made;
  uint64_t evictable = 0, held = 0, in_use = 0;
  bool loads_in_flight = false;
  for (const auto& kv : entries_) {
    const Entry& e = *kv.second;
    if (e.state == Entry::State::Ready && e.pins == 0) {
      evictable += e.reserved_bytes;
    } else {
      held += e.reserved_bytes;
      ++in_use;
      loads_in_flight |= e.pins == 0;  // a prefetch being read: room once it lands
    }
  }
  if (stats_.resident_bytes - evictable + bytes > budget_bytes_) {
    if (loads_in_flight) return Room::WaitForLoads;
    throw BudgetError("budget too small for the working set: " + bytes_str(bytes) + " more are needed but " +
                      bytes_str(held) + " of the " + bytes_str(budget_bytes_) + " budget are pinned or being read (" +
                      std::to_string(in_use) + " experts in use)");
  }
  while (stats_.resident_bytes + bytes > budget_bytes_) evict(pick_victim(), freed);
  return Room::Made;
}

CacheEntry* ExpertCache::pick_victim() {
  Entry* best = nullptr;
  EvictionRank best_rank{};
  for (const auto& kv : entries_) {
    Entry* e = kv.second.get();
    if (e->state != Entry::State::Ready || e->pins != 0) continue;
    auto u = uses_.find(e->key);
    auto s = scores_.find(e->key);
    EvictionRank rank{e->last_use, u == uses_.end() ? 0 : u->second, s == scores_.end() ? 0.0 : s->second};
    if (!best || evict_before(policy_, rank, best_rank)) {
      best = e;
      best_rank = rank;
    }
  }
  return best;
}

void ExpertCache::evict(Entry* e, Freed& freed) {
  if (!e) throw std::logic_error("moeedge: no evictable entry although room was counted");
  freed.push_back(std::move(e->slab));
  stats_.resident_bytes -= e->reserved_bytes;
  ++stats_.evictions;
  if (e->prefetched && !e->used) {
    ++stats_.prefetch_wasted;
    stats_.prefetch_wasted_bytes += e->reserved_bytes;
  }
  entries_.erase(e->key);
}

void ExpertCache::unpin(Entry* e) {
  std::lock_guard<std::mutex> lk(mu_);
  --e->pins;
}

std::shared_ptr<ExpertCache::Entry> ExpertCache::find_or_admit(uint64_t key, uint64_t slot, Freed& freed,
                                                                std::unique_lock<std::mutex>& lk, bool& waited) {
  for (;;) {
    auto it = entries_.find(key);
    if (it != entries_.end()) return it->second;
    if (make_room(slot, freed) == Room::Made) {
      auto e = std::make_shared<Entry>();
      e->key = key;
      e->slab = recycle(freed, slot);
      reserve(e, slot);
      entries_[key] = e;
      auto q = queued_.find(key);
      if (q != queued_.end()) {  // its prefetch had not started: read it now, on demand
        prefetch_queue_.erase(q->second);
        queued_.erase(q);
        ++stats_.prefetch_late;
      }
      if (!freed.empty()) {
        // Unmap what was evicted before the read begins: an evicted slab of another size
        // (recycle takes only equal ones) held through the read of the new one put an expert
        // over the budget, and full-size Mixtral's 8 GiB prefill was OOM-killed. Pinned, the
        // entry stays while the lock is let go; others who want it wait for it to land.
        ++e->pins;
        lk.unlock();
        freed.clear();
        lk.lock();
        --e->pins;
      }
      demand_.push_back(e);
      work_cv_.notify_one();
      pause_cv_.notify_all();  // a prefetch being read gives way to it
      return e;
    }
    done_cv_.wait(lk);  // a prefetch being read frees room once it lands
    waited = true;
    if (closed_) throw std::runtime_error("the expert cache is closed");
  }
}

void ExpertCache::wait_landed(const std::shared_ptr<Entry>& e, std::unique_lock<std::mutex>& lk) {
  pause_cv_.notify_all();  // if it is a prefetch paused for something else, it now goes on
  const auto landed = [&] { return e->state == Entry::State::Ready || e->state == Entry::State::Failed; };
  // Spin a while before sleeping: a core left idle through the read ran the next FFN up to 2x slower.
  const auto spin_until = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(spin_wait_.load(std::memory_order_relaxed)));
  while (!landed() && !closed_ && Clock::now() < spin_until) {
    const uint64_t seen = landed_.load(std::memory_order_acquire);
    lk.unlock();
    spin_while([&] { return landed_.load(std::memory_order_acquire) == seen && Clock::now() < spin_until; });
    lk.lock();
  }
  done_cv_.wait(lk, landed);
}

std::unique_ptr<ExpertPin> ExpertCache::get(uint64_t key) {
  const auto t0 = Clock::now();
  Freed freed;  // declared before the lock: evicted pages are unmapped after it is released
  std::unique_lock<std::mutex> lk(mu_);
  if (closed_) throw std::runtime_error("the expert cache is closed");
  const uint64_t slot = store_->slot_bytes(key);
  check_fits(key, slot);

  bool waited = false;
  std::shared_ptr<Entry> e = find_or_admit(key, slot, freed, lk, waited);
  ++uses_[key];
  e->last_use = ++tick_;
  ++e->pins;
  const bool ready = e->state == Entry::State::Ready;
  ++(ready ? stats_.hits : stats_.misses);
  if (e->prefetched && !e->used) ++stats_.prefetch_hits;
  e->used = true;
  if (!ready) {
    wait_landed(e, lk);
    waited = true;
  }
  if (waited) stats_.wait_seconds += std::chrono::duration<double>(Clock::now() - t0).count();
  if (e->state == Entry::State::Failed) {
    --e->pins;
    std::rethrow_exception(e->error);
  }
  return std::make_unique<ExpertPin>(shared_from_this(), e, store_->data_offset(key), store_->nbytes(key));
}

size_t ExpertCache::prefetch(const std::vector<uint64_t>& keys, int64_t priority) {
  std::unique_lock<std::mutex> lk(mu_);
  if (closed_) throw std::runtime_error("the expert cache is closed");
  for (uint64_t key : keys) check_fits(key, store_->slot_bytes(key));
  size_t queued = 0;
  for (uint64_t key : keys) {
    if (entries_.count(key)) continue;
    auto q = queued_.find(key);
    if (q != queued_.end()) {
      if (-priority < q->second->first.first) {  // raise its priority, keep one queue entry
        prefetch_queue_.erase(q->second);
        q->second = prefetch_queue_.emplace(std::make_pair(-priority, seq_++), key).first;
      }
      continue;
    }
    queued_[key] = prefetch_queue_.emplace(std::make_pair(-priority, seq_++), key).first;
    ++queued;
  }
  stats_.prefetch_issued += queued;
  lk.unlock();
  if (queued) {
    work_cv_.notify_all();
    pause_cv_.notify_all();
  }
  return queued;
}

size_t ExpertCache::cancel_prefetches(const std::vector<uint64_t>* keys) {
  std::lock_guard<std::mutex> lk(mu_);
  size_t n = 0;
  auto stop_reading = [&](uint64_t key) {
    auto it = entries_.find(key);
    if (it == entries_.end()) return;
    Entry& e = *it->second;
    if (e.state == Entry::State::Loading && e.prefetched && e.pins == 0) e.stop = true;
  };
  if (!keys) {
    n = prefetch_queue_.size();
    prefetch_queue_.clear();
    queued_.clear();
    for (const auto& kv : entries_) stop_reading(kv.first);
  } else {
    for (uint64_t key : *keys) {
      stop_reading(key);
      auto q = queued_.find(key);
      if (q == queued_.end()) continue;
      prefetch_queue_.erase(q->second);
      queued_.erase(q);
      ++n;
    }
  }
  stats_.prefetch_cancelled += n;
  pause_cv_.notify_all();
  return n;
}

void ExpertCache::set_budget(uint64_t budget_bytes) {
  if (budget_bytes == 0) throw std::invalid_argument("budget_bytes must be positive");
  Freed freed;
  std::lock_guard<std::mutex> lk(mu_);
  uint64_t held = 0;
  for (const auto& kv : entries_)
    if (kv.second->pins > 0 || kv.second->state != Entry::State::Ready) held += kv.second->reserved_bytes;
  if (held > budget_bytes)
    throw BudgetError("cannot shrink the budget to " + bytes_str(budget_bytes) + ": " + bytes_str(held) +
                      " are pinned or being read; the budget stays at " + bytes_str(budget_bytes_));
  budget_bytes_ = budget_bytes;
  stats_.budget_bytes = budget_bytes;
  while (stats_.resident_bytes > budget_bytes_) evict(pick_victim(), freed);
}

uint64_t ExpertCache::drop(const std::vector<uint64_t>& keys) {
  Freed freed;  // declared before the lock: the pages are unmapped after it is released
  std::lock_guard<std::mutex> lk(mu_);
  uint64_t bytes = 0;
  for (uint64_t key : keys) {
    auto it = entries_.find(key);
    if (it == entries_.end() || it->second->state != Entry::State::Ready || it->second->pins != 0) continue;
    bytes += it->second->reserved_bytes;
    evict(it->second.get(), freed);
  }
  return bytes;
}

void ExpertCache::set_scores(const std::vector<std::pair<uint64_t, double>>& scores) {
  std::lock_guard<std::mutex> lk(mu_);
  for (const auto& [key, score] : scores) scores_[key] = score;
}

bool ExpertCache::contains(uint64_t key) const {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = entries_.find(key);
  return it != entries_.end() && it->second->state == Entry::State::Ready;
}

std::vector<uint64_t> ExpertCache::resident_keys() const {
  std::vector<uint64_t> keys;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (const auto& kv : entries_)
      if (kv.second->state == Entry::State::Ready) keys.push_back(kv.first);
  }
  std::sort(keys.begin(), keys.end());
  return keys;
}

CacheStats ExpertCache::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  CacheStats s = stats_;
  if (reads_in_flight_ > 0)  // the busy interval still open counts up to now
    s.read_busy_seconds += std::chrono::duration<double>(Clock::now() - busy_since_).count();
  for (const auto& kv : entries_) {
    if (kv.second->pins > 0) s.pinned_bytes += kv.second->reserved_bytes;
    if (kv.second->state == Entry::State::Ready) ++s.n_resident;
  }
  return s;
}

void ExpertCache::reset_stats() {
  std::lock_guard<std::mutex> lk(mu_);
  CacheStats fresh;
  fresh.resident_bytes = fresh.peak_resident_bytes = stats_.resident_bytes;
  fresh.budget_bytes = budget_bytes_;
  stats_ = fresh;
  if (reads_in_flight_ > 0) busy_since_ = Clock::now();  // an open interval counts from the reset
}

uint64_t ExpertCache::budget_bytes() const {
  std::lock_guard<std::mutex> lk(mu_);
  return budget_bytes_;
}

}  // namespace moeedge
