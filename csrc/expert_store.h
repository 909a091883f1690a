// Where each expert's bytes lie: key -> [(file, offset, length), ...] over one or
// more files, validated against the files' sizes when opened. Immutable after
// construction, so IO threads read through it without locks.
#pragma once

#include <cstdint>
#include <functional>
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

// Reads go in chunks of this size, so that a prefetch can give the disk to a read the
// model waits for, or stop when its guess is proven wrong, without waiting for the whole
// expert. 4-64 MiB O_DIRECT reads measured the same bandwidth here; 1 MiB a little less.
// (The default of ExpertStore's read_chunk_bytes; tests take small ones.)
constexpr uint64_t kReadChunk = 8ull << 20;

// ExpertStore::read stopped because its go_on said so; bytes: what it had read.
struct ReadStopped {
  uint64_t bytes;
};

class ExpertStore {
 public:
  // Throws OsError for a file that cannot be opened, std::invalid_argument naming
  // file, key, offset and length for a range outside its file, and
  // for a read_chunk_bytes that is not a positive multiple of kDirectAlign.
  ExpertStore(const std::vector<std::string>& paths, RangeTable ranges, bool direct_io,
              uint64_t read_chunk_bytes = kReadChunk);

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
  uint64_t read_chunk_bytes() const { return read_chunk_; }

  std::vector<std::string> paths() const;
  bool direct_io() const;                 // true when every file reads with O_DIRECT
  std::string direct_io_fallback() const;  // why not, when asked for

  // Reads the expert's segments packed back to back into slot + data_offset(key)
  // (slot page-aligned, slot_bytes(key) long), read_chunk_bytes() per read call. Returns
  // the bytes read from disk, O_DIRECT padding included. Throws ReadError naming file
  // and offset. go_on, if given, is asked before every chunk after the first; when it
  // says no, the read stops there and throws ReadStopped.
  uint64_t read(uint64_t key, uint8_t* slot, const std::function<bool()>& go_on = {}) const;

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
  uint64_t read_chunk_;
};

}  // namespace moeedge
