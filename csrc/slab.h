// Page-granular anonymous memory for one cache entry. mmap, not malloc, so the
// process's resident memory follows the cache's resident bytes and evicting an
// entry gives its pages back to the system at once.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moeedge {

constexpr size_t kPageBytes = 4096;

inline size_t round_up(size_t n, size_t align) { return (n + align - 1) / align * align; }

class Slab {
 public:
  explicit Slab(size_t bytes);  // bytes rounded up to pages; throws BudgetError on ENOMEM
  ~Slab();
  Slab(const Slab&) = delete;
  Slab& operator=(const Slab&) = delete;

  uint8_t* data() const { return data_; }
  size_t bytes() const { return bytes_; }

  // Bytes of every slab mapped now in this process, and the most since reset_peak() (which
  // sets it to now): what the expert caches hold in memory, evicted slabs not yet unmapped included.
  static size_t mapped_bytes();
  static size_t peak_bytes();
  static void reset_peak();

 private:
  uint8_t* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace moeedge
