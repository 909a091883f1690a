// A read-only file opened for positional reads, buffered and optionally O_DIRECT.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace moeedge {

constexpr size_t kDirectAlign = 4096;

class File {
 public:
  // Opens for buffered reads with POSIX_FADV_RANDOM (no read-ahead of what we never
  // asked for). With want_direct, also opens with O_DIRECT; where the file system
  // refuses it, direct() is false and direct_fallback() says why.
  File(const std::string& path, bool want_direct);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const std::string& path() const { return path_; }
  uint64_t size() const { return size_; }
  bool direct() const { return direct_fd_ >= 0; }
  const std::string& direct_fallback() const { return direct_fallback_; }

  // Reads exactly len bytes at offset, then drops them from the page cache.
  // Throws ReadError on an error or a short read (the file shrank after opening).
  void read_buffered(void* dst, size_t len, uint64_t offset, uint64_t key) const;

  // O_DIRECT read of [offset, offset + len): dst, offset and len aligned to
  // kDirectAlign. Returns the bytes read, which may stop early only at the end of
  // the file; `need` is the minimum that must arrive. Throws ReadError otherwise.
  size_t read_direct(void* dst, size_t len, uint64_t offset, size_t need, uint64_t key) const;

 private:
  std::string path_;
  int fd_ = -1;
  int direct_fd_ = -1;
  uint64_t size_ = 0;
  std::string direct_fallback_;
};

// "layer 3 expert 7": how errors name an expert key.
std::string describe_key(uint64_t key);

}  // namespace moeedge
