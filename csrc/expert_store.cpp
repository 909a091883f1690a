#include "expert_store.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "errors.h"
#include "slab.h"

namespace moeedge {

namespace {

std::string describe_segment(const std::string& path, uint64_t key, const Segment& s) {
  return path + ", " + describe_key(key) + " (key " + std::to_string(key) + "), offset " +
         std::to_string(s.offset) + ", length " + std::to_string(s.length);
}

}  // namespace

ExpertStore::ExpertStore(const std::vector<std::string>& paths, RangeTable ranges, bool direct_io)
    : want_direct_(direct_io) {
  if (paths.empty()) throw std::invalid_argument("ExpertStore needs at least one file");
  for (const auto& path : paths) files_.push_back(std::make_unique<File>(path, direct_io));

  for (auto& [key, segments] : ranges) {
    if (segments.empty())
      throw std::invalid_argument(describe_key(key) + " (key " + std::to_string(key) + ") has no byte ranges");
    Expert e;
    for (const auto& s : segments) {
      if (s.file >= files_.size())
        throw std::invalid_argument("byte range names file index " + std::to_string(s.file) + " but the store has " +
                                    std::to_string(files_.size()) + " files: " +
                                    describe_segment("file #" + std::to_string(s.file), key, s));
      const File& f = *files_[s.file];
      if (s.length == 0)
        throw std::invalid_argument("empty byte range: " + describe_segment(f.path(), key, s));
      // Overflow-safe form of offset + length > size.
      if (s.length > f.size() || s.offset > f.size() - s.length)
        throw std::invalid_argument("byte range past the end of the file (" + std::to_string(f.size()) +
                                    " bytes): " + describe_segment(f.path(), key, s));
      e.nbytes += s.length;
    }
    e.segments = std::move(segments);
    e.slot_bytes = direct_slot_bytes(e.segments);
    total_bytes_ += e.nbytes;
    ranges_.emplace(key, std::move(e));
  }
}

uint64_t ExpertStore::direct_slot_bytes(const std::vector<Segment>& segments) const {
  // Packed position of each segment, and for O_DIRECT files the aligned superset
  // read at the next aligned address at or after it (then moved down into place).
  uint64_t pos = 0, cap = 0;
  for (const auto& s : segments) {
    if (files_[s.file]->direct()) {
      uint64_t a0 = s.offset / kDirectAlign * kDirectAlign;
      uint64_t a1 = round_up(s.offset + s.length, kDirectAlign);
      cap = std::max(cap, round_up(pos, kDirectAlign) + (a1 - a0));
    }
    pos += s.length;
  }
  return round_up(std::max(cap, pos), kPageBytes);
}

const ExpertStore::Expert& ExpertStore::expert(uint64_t key) const {
  auto it = ranges_.find(key);
  if (it == ranges_.end())
    throw UnknownKey("no expert with key " + std::to_string(key) + " (" + describe_key(key) + ") in the store");
  return it->second;
}

const std::vector<Segment>& ExpertStore::segments(uint64_t key) const { return expert(key).segments; }
uint64_t ExpertStore::nbytes(uint64_t key) const { return expert(key).nbytes; }
uint64_t ExpertStore::slot_bytes(uint64_t key) const { return expert(key).slot_bytes; }

std::vector<uint64_t> ExpertStore::keys() const {
  std::vector<uint64_t> out;
  out.reserve(ranges_.size());
  for (const auto& kv : ranges_) out.push_back(kv.first);
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> ExpertStore::paths() const {
  std::vector<std::string> out;
  for (const auto& f : files_) out.push_back(f->path());
  return out;
}

bool ExpertStore::direct_io() const {
  return std::all_of(files_.begin(), files_.end(), [](const auto& f) { return f->direct(); });
}

std::string ExpertStore::direct_io_fallback() const {
  if (!want_direct_) return "";
  for (const auto& f : files_)
    if (!f->direct()) return f->direct_fallback();
  return "";
}

uint64_t ExpertStore::read(uint64_t key, uint8_t* buf) const {
  uint64_t pos = 0, from_disk = 0;
  for (const auto& s : expert(key).segments) {
    const File& f = *files_[s.file];
    if (f.direct()) {
      uint64_t a0 = s.offset / kDirectAlign * kDirectAlign;
      uint64_t a1 = round_up(s.offset + s.length, kDirectAlign);
      uint8_t* staging = buf + round_up(pos, kDirectAlign);
      from_disk += f.read_direct(staging, a1 - a0, a0, s.offset + s.length - a0, key);
      std::memmove(buf + pos, staging + (s.offset - a0), s.length);
    } else {
      f.read_buffered(buf + pos, s.length, s.offset, key);
      from_disk += s.length;
    }
    pos += s.length;
  }
  return from_disk;
}

}  // namespace moeedge
