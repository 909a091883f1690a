#include "errors.h"

#include <cstring>

namespace moeedge {

std::string errno_message(const std::string& what, int err) {
  return what + ": " + std::strerror(err);
}

}  // namespace moeedge
