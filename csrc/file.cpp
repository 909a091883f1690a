#include "file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "errors.h"

namespace moeedge {

std::string describe_key(uint64_t key) {
  return "layer " + std::to_string(key >> 32) + " expert " + std::to_string(key & 0xffffffffu);
}

namespace {

std::string where(const std::string& path, uint64_t offset, size_t len, uint64_t key) {
  return path + " at offset " + std::to_string(offset) + " (" + std::to_string(len) +
         " bytes, " + describe_key(key) + ")";
}

// Some file systems accept O_DIRECT at open and refuse it at the first read.
bool direct_read_works(int fd) {
  void* probe = mmap(nullptr, kDirectAlign, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (probe == MAP_FAILED) return false;
  ssize_t n;
  do {
    n = pread(fd, probe, kDirectAlign, 0);
  } while (n < 0 && errno == EINTR);
  munmap(probe, kDirectAlign);
  return n >= 0;
}

}  // namespace

File::File(const std::string& path, bool want_direct) : path_(path) {
  fd_ = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw OsError(errno, errno_message("cannot open " + path, errno), path);
  struct stat st;
  if (fstat(fd_, &st) != 0) {
    int err = errno;
    close(fd_);
    throw OsError(err, errno_message("cannot stat " + path, err), path);
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd_);
    int err = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
    throw OsError(err, "not a regular file: " + path, path);
  }
  size_ = static_cast<uint64_t>(st.st_size);
  posix_fadvise(fd_, 0, 0, POSIX_FADV_RANDOM);
  if (!want_direct) return;
#ifdef O_DIRECT
  direct_fd_ = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
  if (direct_fd_ < 0) {
    direct_fallback_ = errno_message("O_DIRECT refused for " + path, errno) + "; using buffered reads";
  } else if (!direct_read_works(direct_fd_)) {
    direct_fallback_ = errno_message("O_DIRECT read refused for " + path, errno) + "; using buffered reads";
    close(direct_fd_);
    direct_fd_ = -1;
  }
#else
  direct_fallback_ = "O_DIRECT is not available on this platform; using buffered reads";
#endif
}

File::~File() {
  if (fd_ >= 0) close(fd_);
  if (direct_fd_ >= 0) close(direct_fd_);
}

void File::read_buffered(void* dst, size_t len, uint64_t offset, uint64_t key) const {
  auto* out = static_cast<char*>(dst);
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd_, out + done, len - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw ReadError(errno, errno_message("read failed: " + where(path_, offset + done, len - done, key), errno), path_);
    if (n == 0)
      throw ReadError(EIO, "short read: " + where(path_, offset, len, key) + ": got " + std::to_string(done) +
                               " bytes (was the file truncated after it was opened?)", path_);
    done += static_cast<size_t>(n);
  }
  // What we read is now in the cache's own buffer: keep it out of the page cache,
  // which would otherwise grow behind the memory budget's back.
  posix_fadvise(fd_, static_cast<off_t>(offset), static_cast<off_t>(len), POSIX_FADV_DONTNEED);
}

size_t File::read_direct(void* dst, size_t len, uint64_t offset, size_t need, uint64_t key) const {
  auto* out = static_cast<char*>(dst);
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(direct_fd_, out + done, len - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw ReadError(errno, errno_message("direct read failed: " + where(path_, offset + done, len - done, key), errno), path_);
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  if (done < need)
    throw ReadError(EIO, "short read: " + where(path_, offset, need, key) + ": got " + std::to_string(done) +
                             " bytes (was the file truncated after it was opened?)", path_);
  return done;
}

}  // namespace moeedge
