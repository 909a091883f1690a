// Run-time CPU detection: code is compiled portable, and wider SIMD paths are
// chosen from these flags, never from the build machine's -march.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace moeedge {

std::vector<std::pair<std::string, bool>> cpu_features();

}  // namespace moeedge
