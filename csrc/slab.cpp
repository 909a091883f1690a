#include "slab.h"

#include <sys/mman.h>

#include <atomic>
#include <cerrno>

#include "errors.h"

namespace moeedge {

namespace {
std::atomic<size_t> mapped{0}, peak{0};
}  // namespace

size_t Slab::mapped_bytes() { return mapped.load(); }
size_t Slab::peak_bytes() { return peak.load(); }
void Slab::reset_peak() { peak.store(mapped.load()); }

Slab::Slab(size_t bytes) : bytes_(round_up(bytes ? bytes : 1, kPageBytes)) {
  void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    throw BudgetError(errno_message("cannot map " + std::to_string(bytes_) + " bytes for an expert", errno));
  data_ = static_cast<uint8_t*>(p);
  const size_t now = mapped += bytes_;
  size_t seen = peak.load();
  while (now > seen && !peak.compare_exchange_weak(seen, now)) {
  }
#ifdef MADV_HUGEPAGE
  // Large experts fault in 2 MiB at a time instead of 4 KiB (where THP is on "madvise").
  if (bytes_ >= (2u << 20)) madvise(data_, bytes_, MADV_HUGEPAGE);
#endif
}

Slab::~Slab() {
  if (!data_) return;
  munmap(data_, bytes_);
  mapped -= bytes_;
}

}  // namespace moeedge
