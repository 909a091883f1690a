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
}

Slab::~Slab() {
  if (data_) munmap(data_, bytes_);
}

void Slab::trim(size_t keep) {
  keep = round_up(keep ? keep : 1, kPageBytes);
  if (keep >= bytes_) return;
  if (munmap(data_ + keep, bytes_ - keep) == 0) bytes_ = keep;
}

}  // namespace moeedge
