// Exceptions thrown by the engine. The Python bindings translate each to a
// Python exception type once, at the edge (bindings/module.cpp).
#pragma once

#include <stdexcept>
#include <string>

namespace moeedge {

// An OS call on a file failed: carries errno so Python gets the right OSError subclass.
class OsError : public std::runtime_error {
 public:
  OsError(int err, const std::string& what, std::string path)
      : std::runtime_error(what), err_(err), path_(std::move(path)) {}
  int err() const { return err_; }
  const std::string& path() const { return path_; }

 private:
  int err_;
  std::string path_;
};

// Reading an expert's bytes failed (EIO, short read, truncated file).
class ReadError : public OsError {
 public:
  using OsError::OsError;
};

// The cache cannot honour its byte budget.
class BudgetError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An expert key the store does not hold.
class UnknownKey : public std::out_of_range {
 public:
  using std::out_of_range::out_of_range;
};

// "open /a/b.safetensors: No such file or directory"
std::string errno_message(const std::string& what, int err);

}  // namespace moeedge
