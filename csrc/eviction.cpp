#include "eviction.h"

#include <stdexcept>

namespace moeedge {

Policy parse_policy(const std::string& name) {
  if (name == "lru") return Policy::Lru;
  if (name == "lfu") return Policy::Lfu;
  if (name == "score") return Policy::Score;
  throw std::invalid_argument("unknown eviction policy '" + name + "' (expected 'lru', 'lfu' or 'score')");
}

const char* policy_name(Policy policy) {
  switch (policy) {
    case Policy::Lru: return "lru";
    case Policy::Lfu: return "lfu";
    case Policy::Score: return "score";
  }
  return "?";
}

bool evict_before(Policy policy, const EvictionRank& a, const EvictionRank& b) {
  switch (policy) {
    case Policy::Lfu:
      if (a.uses != b.uses) return a.uses < b.uses;
      break;
    case Policy::Score:
      if (a.score != b.score) return a.score < b.score;
      break;
    case Policy::Lru:
      break;
  }
  return a.last_use < b.last_use;
}

}  // namespace moeedge
