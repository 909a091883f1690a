#include "slab.h"

#include <sys/mman.h>

#include <cerrno>

#include "errors.h"

namespace moeedge {

Slab::Slab(size_t bytes) : bytes_(round_up(bytes ? bytes : 1, kPageBytes)) {
  void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    throw BudgetError(errno_message("cannot map " + std::to_string(bytes_) + " bytes for an expert", errno));
  data_ = static_cast<uint8_t*>(p);
#ifdef MADV_HUGEPAGE
  // Large experts fault in 2 MiB at a time instead of 4 KiB (where THP is on "madvise").
  if (bytes_ >= (2u << 20)) madvise(data_, bytes_, MADV_HUGEPAGE);
#endif
}

Slab::~Slab() {
  if (data_) munmap(data_, bytes_);
}

}  // namespace moeedge
