#include "linear.h"

#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "linear_impl.h"

namespace moeedge {

namespace detail {

namespace {

std::atomic<int> forced{-1};  // a Path, or -1: the CPU's best

Path cpu_path() {
#ifdef MOEEDGE_X86
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c"))
    return Path::scalar;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return Path::avx512;
  return Path::avx2;
#else
  return Path::scalar;
#endif
}

const char* const kPathNames[] = {"scalar", "avx2", "avx512"};

}  // namespace

Path best_path() {
  static const Path best = cpu_path();
  return best;
}

Path path() {
  const int f = forced.load();
  return f < 0 ? best_path() : static_cast<Path>(f);
}

bool has_avx512vnni() {
#ifdef MOEEDGE_X86
  static const bool vnni = (__builtin_cpu_init(), __builtin_cpu_supports("avx512vnni") != 0);
  return vnni;
#else
  return false;
#endif
}

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0 && man == 0) {
    bits = sign;
  } else if (exp == 0) {  // subnormal: normalise
    int e = -1;
    uint32_t m = man;
    do {
      m <<= 1;
      ++e;
    } while (!(m & 0x400));
    bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((m & 0x3ff) << 13);
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace detail

const char* linear_path() { return detail::kPathNames[static_cast<int>(detail::path())]; }

std::vector<std::string> linear_paths() {
  std::vector<std::string> names;
  for (int p = 0; p <= static_cast<int>(detail::best_path()); ++p) names.emplace_back(detail::kPathNames[p]);
  return names;
}

void linear_force_path(const std::string& name) {
  const auto paths = linear_paths();
  detail::forced = -1;
  if (name.empty()) return;
  for (size_t p = 0; p < paths.size(); ++p)
    if (paths[p] == name) {
      detail::forced = static_cast<int>(p);
      return;
    }
  std::string have;
  for (const auto& p : paths) have += (have.empty() ? "" : ", ") + p;
  throw std::invalid_argument("no kernel path '" + name + "' on this CPU (it has: " + have + ")");
}

}  // namespace moeedge
