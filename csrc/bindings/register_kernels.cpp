#include <pybind11/pybind11.h>

#include "linear_bf16.h"
#include "register.h"

namespace py = pybind11;

namespace moeedge {

namespace {

// A C-contiguous 2-D buffer of `itemsize`-byte items; ValueError naming `what` otherwise.
py::buffer_info matrix(const py::buffer& b, py::ssize_t itemsize, bool writable, const char* what) {
  py::buffer_info info = b.request(writable);
  if (info.ndim != 2 || info.itemsize != itemsize)
    throw std::invalid_argument(std::string(what) + " must be a 2-D array of " + std::to_string(itemsize) +
                                "-byte items, got " + std::to_string(info.ndim) + "-D of " +
                                std::to_string(info.itemsize) + "-byte items");
  if (info.strides[1] != itemsize || info.strides[0] != info.shape[1] * itemsize)
    throw std::invalid_argument(std::string(what) + " must be C-contiguous");
  return info;
}

}  // namespace

void register_kernels(py::module_& m) {
  m.def(
      "linear_bf16",
      [](const py::buffer& x, const py::buffer& w, const py::buffer& out, int threads) {
        auto xi = matrix(x, 4, false, "x (float32 [tokens, in])");
        auto wi = matrix(w, 2, false, "w (bf16 [out, in], as 2-byte items)");
        auto oi = matrix(out, 4, true, "out (float32 [tokens, out])");
        if (xi.shape[1] != wi.shape[1] || oi.shape[0] != xi.shape[0] || oi.shape[1] != wi.shape[0])
          throw std::invalid_argument("shapes do not fit: x [" + std::to_string(xi.shape[0]) + ", " +
                                      std::to_string(xi.shape[1]) + "], w [" + std::to_string(wi.shape[0]) + ", " +
                                      std::to_string(wi.shape[1]) + "], out [" + std::to_string(oi.shape[0]) +
                                      ", " + std::to_string(oi.shape[1]) + "]");
        py::gil_scoped_release release;
        linear_bf16(static_cast<const float*>(xi.ptr), xi.shape[0], static_cast<const uint16_t*>(wi.ptr),
                    wi.shape[0], wi.shape[1], static_cast<float*>(oi.ptr), threads);
      },
      py::arg("x"), py::arg("w"), py::arg("out"), py::arg("threads") = 0,
      "out = x @ w.T with w in bf16 read as stored (GIL released; threads=0: all cores).");
  m.def("linear_bf16_path", &linear_bf16_path, "The path linear_bf16 takes on this CPU: 'avx2' or 'scalar'.");
  m.def("linear_bf16_force_scalar", &linear_bf16_force_scalar, py::arg("force"),
        "For tests: force the portable path, or go back to the run-time choice.");
}

}  // namespace moeedge
