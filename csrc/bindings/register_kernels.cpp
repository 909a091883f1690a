#include <pybind11/pybind11.h>

#include "linear.h"
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

bool contiguous(const py::buffer_info& info) {
  py::ssize_t expected = info.itemsize;
  for (py::ssize_t i = info.ndim - 1; i >= 0; --i) {
    if (info.shape[i] != 1 && info.strides[i] != expected) return false;
    expected *= info.shape[i];
  }
  return true;
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
  m.def(
      "linear_q8_0",
      [](const py::buffer& x, const py::buffer& w, const py::buffer& out, int threads) {
        auto xi = matrix(x, 4, false, "x (float32 [tokens, in])");
        auto wi = w.request();
        auto oi = matrix(out, 4, true, "out (float32 [tokens, out])");
        const py::ssize_t rows = oi.shape[1], cols = xi.shape[1];
        if (cols % static_cast<py::ssize_t>(kQ8Block) != 0)
          throw std::invalid_argument("Q8_0 rows must hold whole 32-weight blocks, got in = " + std::to_string(cols));
        if (oi.shape[0] != xi.shape[0])
          throw std::invalid_argument("x has " + std::to_string(xi.shape[0]) + " tokens but out has " +
                                      std::to_string(oi.shape[0]));
        const py::ssize_t need = rows * (cols / kQ8Block) * kQ8BlockBytes;
        if (wi.size * wi.itemsize != need)
          throw std::invalid_argument("w holds " + std::to_string(wi.size * wi.itemsize) + " bytes; Q8_0 [" +
                                      std::to_string(rows) + ", " + std::to_string(cols) + "] needs " +
                                      std::to_string(need));
        if (!contiguous(wi)) throw std::invalid_argument("w must be C-contiguous");
        py::gil_scoped_release release;
        linear_q8_0(static_cast<const float*>(xi.ptr), xi.shape[0], static_cast<const uint8_t*>(wi.ptr), rows, cols,
                    static_cast<float*>(oi.ptr), threads);
      },
      py::arg("x"), py::arg("w"), py::arg("out"), py::arg("threads") = 0,
      "out = x @ dequant(w).T with w GGUF Q8_0 blocks read as stored (GIL released; threads=0: all cores).");
  m.def("linear_path", &linear_path, "The path the kernels take on this CPU: 'avx2' or 'scalar'.");
  m.def("linear_force_scalar", &linear_force_scalar, py::arg("force"),
        "For tests: force the portable path, or go back to the run-time choice.");
}

}  // namespace moeedge
