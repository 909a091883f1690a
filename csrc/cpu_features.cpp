#include "cpu_features.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace moeedge {

std::vector<std::pair<std::string, bool>> cpu_features() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // AMX is not covered by __builtin_cpu_supports in every compiler: read CPUID leaf 7.
  unsigned a = 0, b = 0, c = 0, d = 0;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    amx_bf16 = d & (1u << 22);
    amx_tile = d & (1u << 24);
    amx_int8 = d & (1u << 25);
  }
  return {
      {"avx2", __builtin_cpu_supports("avx2") != 0},
      {"fma", __builtin_cpu_supports("fma") != 0},
      {"f16c", __builtin_cpu_supports("f16c") != 0},
      {"avx512f", __builtin_cpu_supports("avx512f") != 0},
      {"avx512bw", __builtin_cpu_supports("avx512bw") != 0},
      {"avx512vl", __builtin_cpu_supports("avx512vl") != 0},
      {"avx512vnni", __builtin_cpu_supports("avx512vnni") != 0},
      {"avx512bf16", __builtin_cpu_supports("avx512bf16") != 0},
      {"amx_tile", amx_tile},
      {"amx_bf16", amx_bf16},
      {"amx_int8", amx_int8},
  };
#else
  return {};
#endif
}

}  // namespace moeedge
