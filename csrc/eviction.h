// Eviction policies: which ready, unpinned entry goes first.
#pragma once

#include <cstdint>
#include <string>

namespace moeedge {

enum class Policy { Lru, Lfu, Score };

Policy parse_policy(const std::string& name);  // throws std::invalid_argument
const char* policy_name(Policy policy);

struct EvictionRank {
  uint64_t last_use;  // tick of the last get (or of the load, for a prefetch)
  uint64_t uses;      // gets over the cache's life, surviving eviction
  double score;       // set by Python for Policy::Score, e.g. from a predictor
};

// True when `a` should be evicted before `b`. Ties go to the least recent.
bool evict_before(Policy policy, const EvictionRank& a, const EvictionRank& b);

}  // namespace moeedge
