#include <pybind11/stl.h>

#include "cpu_features.h"
#include "errors.h"
#include "register.h"

#ifndef MOEEDGE_VERSION
#define MOEEDGE_VERSION "dev"
#endif

namespace py = pybind11;

namespace moeedge {

void register_errors(py::module_& m) {
  py::register_exception<BudgetError>(m, "BudgetError", PyExc_MemoryError);
  static py::handle read_error = PyErr_NewExceptionWithDoc(
      "moeedge._core.ExpertReadError",
      "Reading an expert failed (EIO, short read, file truncated after open); names file and offset.",
      PyExc_OSError, nullptr);
  m.attr("ExpertReadError") = read_error;

  // The API edge: engine exceptions become Python's, once, here.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ReadError& e) {
      PyObject* exc = PyObject_CallFunction(read_error.ptr(), "is", e.err(), e.what());
      if (exc) {
        PyErr_SetObject(read_error.ptr(), exc);
        Py_DECREF(exc);
      }
    } catch (const OsError& e) {
      // OSError(errno, message) becomes FileNotFoundError, PermissionError, ... by errno.
      PyObject* exc = PyObject_CallFunction(PyExc_OSError, "is", e.err(), e.what());
      if (exc) {
        PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc)), exc);
        Py_DECREF(exc);
      }
    } catch (const UnknownKey& e) {
      PyErr_SetString(PyExc_KeyError, e.what());
    }
  });
}

}  // namespace moeedge

PYBIND11_MODULE(_core, m) {
  m.doc() = "moeedge native expert engine: byte-range store, budgeted cache, async prefetch";
  m.attr("__version__") = MOEEDGE_VERSION;
  m.def(
      "cpu_features",
      [] {
        py::dict out;
        for (const auto& [name, present] : moeedge::cpu_features()) out[py::str(name)] = present;
        return out;
      },
      "Run-time CPU flags (avx2, avx512f, avx512vnni, amx_bf16, ...).");
  moeedge::register_errors(m);
  moeedge::register_store(m);
  moeedge::register_cache(m);
  moeedge::register_kernels(m);
}
