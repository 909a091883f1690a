// Where each expert's bytes lie: key -> [(file, offset, length), ...] over one or
// more files, validated against the files' sizes when opened. Immutable after
// construction, so IO threads read through it without locks.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "file.h"

namespace moeedge {

struct Segment {
  uint32_t file;
  uint64_t offset;
  uint64_t length;
};

using RangeTable = std::unordered_map<uint64_t, std::vector<Segment>>;

class ExpertStore {
 public:
  // Throws OsError for a file that cannot be opened, std::invalid_argument naming
  // file, key, offset and length for a range outside its file.
  ExpertStore(const std::vector<std::string>& paths, RangeTable ranges, bool direct_io);

  std::vector<uint64_t> keys() const;  // sorted
  size_t size() const { return ranges_.size(); }
  bool contains(uint64_t key) const { return ranges_.count(key) != 0; }
  const std::vector<Segment>& segments(uint64_t key) const;
  uint64_t nbytes(uint64_t key) const;
  // What a cache must reserve to read this expert: pages for the packed bytes
  // plus, with O_DIRECT, room for the aligned supersets of its segments.
  uint64_t slot_bytes(uint64_t key) const;
  // Where in its slot the expert's packed bytes start (below one page): with O_DIRECT
  // they are placed so that most segments land where their aligned reads put them.
  uint64_t data_offset(uint64_t key) const;
  uint64_t total_bytes() const { return total_bytes_; }

  std::vector<std::string> paths() const;
  bool direct_io() const;                 // true when every file reads with O_DIRECT
  std::string direct_io_fallback() const;  // why not, when asked for

  // Reads the expert's segments packed back to back into slot + data_offset(key)
  // (slot page-aligned, slot_bytes(key) long). Returns the bytes read from disk,
  // O_DIRECT padding included. Throws ReadError naming file and offset.
  uint64_t read(uint64_t key, uint8_t* slot) const;

 private:
  struct Expert {
    std::vector<Segment> segments;
    uint64_t nbytes = 0;
    uint64_t slot_bytes = 0;
    uint64_t data_offset = 0;
  };
  const Expert& expert(uint64_t key) const;
  void place(Expert& e) const;

  std::vector<std::unique_ptr<File>> files_;
  std::unordered_map<uint64_t, Expert> ranges_;
  uint64_t total_bytes_ = 0;
  bool want_direct_;
};

}  // namespace moeedge
