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

ExpertStore::ExpertStore(const std::vector<std::string>& paths, RangeTable ranges, bool direct_io,
                         uint64_t read_chunk_bytes)
    : want_direct_(direct_io), read_chunk_(read_chunk_bytes) {
  if (paths.empty()) throw std::invalid_argument("ExpertStore needs at least one file");
  if (read_chunk_bytes == 0 || read_chunk_bytes % kDirectAlign != 0)
    throw std::invalid_argument("read_chunk_bytes must be a positive multiple of " + std::to_string(kDirectAlign) +
                                ", got " + std::to_string(read_chunk_bytes));
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
    place(e);
    total_bytes_ += e.nbytes;
    ranges_.emplace(key, std::move(e));
  }
}

void ExpertStore::place(Expert& e) const {
  // An O_DIRECT read lands its segment at an address with the same remainder modulo the
  // alignment as its file offset. Choosing the packed bytes' start (data_offset) by the
  // remainder that most bytes share reads those segments straight into place; the
  // others are read at the next aligned address and moved down. Model files' tensors
  // mostly share one remainder (page-multiple sizes), so an expert is usually read
  // without a copy: moving it cost 8 ms per 67 MB on a core the kernels want.
  std::vector<std::pair<uint64_t, uint64_t>> bytes_at;  // (remainder, bytes in place with it)
  uint64_t pos = 0;
  for (const auto& s : e.segments) {
    if (files_[s.file]->direct()) {
      uint64_t r = (s.offset + kDirectAlign - pos % kDirectAlign) % kDirectAlign;
      auto it = std::find_if(bytes_at.begin(), bytes_at.end(), [r](const auto& b) { return b.first == r; });
      if (it == bytes_at.end()) bytes_at.emplace_back(r, s.length);
      else it->second += s.length;
    }
    pos += s.length;
  }
  e.data_offset = 0;
  uint64_t most = 0;
  for (const auto& [r, n] : bytes_at)
    if (n > most) most = n, e.data_offset = r;
  // Room for each read: an in-place superset ends under a page past its segment; a
  // moved one is read whole at the aligned address at or after its packed position.
  uint64_t cap = e.data_offset + e.nbytes;
  pos = e.data_offset;
  for (const auto& s : e.segments) {
    if (files_[s.file]->direct()) {
      uint64_t a0 = s.offset / kDirectAlign * kDirectAlign;
      uint64_t a1 = round_up(s.offset + s.length, kDirectAlign);
      bool in_place = pos % kDirectAlign == s.offset % kDirectAlign;
      cap = std::max(cap, in_place ? pos - (s.offset - a0) + (a1 - a0) : round_up(pos, kDirectAlign) + (a1 - a0));
    }
    pos += s.length;
  }
  e.slot_bytes = round_up(cap, kPageBytes);
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

uint64_t ExpertStore::data_offset(uint64_t key) const { return expert(key).data_offset; }

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

uint64_t ExpertStore::read(uint64_t key, uint8_t* slot, const std::function<bool()>& go_on) const {
  const Expert& e = expert(key);
  uint64_t pos = e.data_offset, from_disk = 0;
  bool first = true;
  auto next_chunk = [&] {
    if (!first && go_on && !go_on()) throw ReadStopped{from_disk};
    first = false;
  };
  // [offset, offset + len) of f into dst; O_DIRECT: all three aligned, and `need` bytes
  // must arrive (the last page may stop at the end of the file).
  auto read_direct = [&](const File& f, uint8_t* dst, uint64_t len, uint64_t offset, uint64_t need) {
    for (uint64_t done = 0; done < len;) {
      next_chunk();
      uint64_t n = std::min(read_chunk_, len - done);
      uint64_t got = f.read_direct(dst + done, n, offset + done, need > done ? std::min(n, need - done) : 0, key);
      from_disk += got;
      done += got;
      if (got < n) break;  // the end of the file
    }
  };
  for (const auto& s : e.segments) {
    const File& f = *files_[s.file];
    uint8_t* dst = slot + pos;
    if (f.direct()) {
      uint64_t a0 = s.offset / kDirectAlign * kDirectAlign;
      uint64_t a1 = round_up(s.offset + s.length, kDirectAlign);
      uint64_t head = s.offset - a0;
      if (pos % kDirectAlign == s.offset % kDirectAlign) {
        // In place: the aligned read also covers the page's bytes before dst, which
        // hold the end of earlier segments: keep them aside and put them back.
        uint8_t kept[kDirectAlign];
        std::memcpy(kept, dst - head, head);
        read_direct(f, dst - head, a1 - a0, a0, head + s.length);
        std::memcpy(dst - head, kept, head);
      } else {
        uint8_t* staging = slot + round_up(pos, kDirectAlign);
        read_direct(f, staging, a1 - a0, a0, head + s.length);
        std::memmove(dst, staging + head, s.length);
      }
    } else {
      for (uint64_t done = 0; done < s.length;) {
        next_chunk();
        uint64_t n = std::min(read_chunk_, s.length - done);
        f.read_buffered(dst + done, n, s.offset + done, key);
        from_disk += n;
        done += n;
      }
    }
    pos += s.length;
  }
  return from_disk;
}

}  // namespace moeedge
