#include <pybind11/stl.h>

#include <limits>

#include "errors.h"
#include "expert_store.h"
#include "register.h"
#include "slab.h"

namespace py = pybind11;

namespace moeedge {

namespace {

// A Python int in [0, max]; anything else is reported with `what` naming the range.
uint64_t to_uint(py::handle value, uint64_t max, const std::string& field, const std::string& what) {
  PyObject* index = PyNumber_Index(value.ptr());
  if (!index) {
    PyErr_Clear();
    throw std::invalid_argument(field + " must be an int, got " + std::string(py::repr(value)) + ": " + what);
  }
  py::int_ n = py::reinterpret_steal<py::int_>(index);
  if (PyObject_RichCompareBool(n.ptr(), py::int_(0).ptr(), Py_LT) == 1)
    throw std::invalid_argument(field + " must not be negative, got " + std::string(py::str(n)) + ": " + what);
  unsigned long long v = PyLong_AsUnsignedLongLong(n.ptr());
  if (PyErr_Occurred() || v > max) {
    PyErr_Clear();
    throw std::invalid_argument(field + " is too large, got " + std::string(py::str(n)) + ": " + what);
  }
  return v;
}

RangeTable parse_ranges(const py::dict& ranges, const std::vector<std::string>& paths) {
  RangeTable table;
  for (auto item : ranges) {
    const uint64_t key = to_uint(item.first, std::numeric_limits<uint64_t>::max(), "expert key",
                                 "key " + std::string(py::repr(item.first)));
    const std::string name = describe_key(key) + " (key " + std::to_string(key) + ")";
    std::vector<Segment> segments;
    for (auto seg : py::reinterpret_borrow<py::sequence>(item.second)) {
      auto t = py::reinterpret_borrow<py::sequence>(seg);
      if (t.size() != 3)
        throw std::invalid_argument(name + ": a byte range is (file_index, offset, length), got " + std::string(py::repr(seg)));
      std::string file_name = "#" + std::string(py::str(t[0]));
      if (PyLong_Check(t[0].ptr())) {
        long long i = PyLong_AsLongLong(t[0].ptr());
        if (PyErr_Occurred()) PyErr_Clear();
        else if (i >= 0 && static_cast<size_t>(i) < paths.size()) file_name = paths[i];
      }
      const std::string where = name + ", file " + file_name + ", offset " + std::string(py::str(t[1])) +
                                ", length " + std::string(py::str(t[2]));
      const uint64_t file = to_uint(t[0], std::numeric_limits<uint32_t>::max(), "file index", where);
      segments.push_back({static_cast<uint32_t>(file),
                          to_uint(t[1], std::numeric_limits<uint64_t>::max(), "offset", where),
                          to_uint(t[2], std::numeric_limits<uint64_t>::max(), "length", where)});
    }
    table.emplace(key, std::move(segments));
  }
  return table;
}

std::vector<std::string> parse_paths(const py::iterable& paths) {
  py::object fspath = py::module_::import("os").attr("fspath");
  std::vector<std::string> out;
  for (auto p : paths) out.push_back(py::str(fspath(p)));
  return out;
}

}  // namespace

void register_store(py::module_& m) {
  py::class_<ExpertStore, std::shared_ptr<ExpertStore>>(m, "ExpertStore",
                                                        "Byte ranges of experts over one or more files, validated when opened.")
      .def(py::init([](const py::iterable& paths, const py::dict& ranges, bool direct_io, uint64_t read_chunk_bytes) {
             auto p = parse_paths(paths);
             auto table = parse_ranges(ranges, p);
             py::gil_scoped_release release;
             return std::make_shared<ExpertStore>(p, std::move(table), direct_io, read_chunk_bytes);
           }),
           py::arg("paths"), py::arg("ranges"), py::arg("direct_io") = false, py::arg("read_chunk_bytes") = kReadChunk)
      .def_property_readonly("read_chunk_bytes", &ExpertStore::read_chunk_bytes)
      .def_property_readonly("paths", &ExpertStore::paths)
      .def_property_readonly("direct_io", &ExpertStore::direct_io)
      .def_property_readonly("direct_io_fallback", &ExpertStore::direct_io_fallback)
      .def("keys", &ExpertStore::keys)
      .def("__len__", &ExpertStore::size)
      .def("__contains__", [](const ExpertStore& s, py::handle key) {
        PyObject* index = PyNumber_Index(key.ptr());
        if (!index) {
          PyErr_Clear();
          return false;
        }
        py::int_ k = py::reinterpret_steal<py::int_>(index);
        unsigned long long v = PyLong_AsUnsignedLongLong(k.ptr());
        if (PyErr_Occurred()) {
          PyErr_Clear();
          return false;
        }
        return s.contains(v);
      })
      .def("nbytes", &ExpertStore::nbytes, py::arg("key"))
      .def("slot_bytes", &ExpertStore::slot_bytes, py::arg("key"))
      .def("data_offset", &ExpertStore::data_offset, py::arg("key"))
      .def("segments",
           [](const ExpertStore& s, uint64_t key) {
             std::vector<std::tuple<uint32_t, uint64_t, uint64_t>> out;
             for (const auto& seg : s.segments(key)) out.emplace_back(seg.file, seg.offset, seg.length);
             return out;
           },
           py::arg("key"))
      .def("total_bytes", &ExpertStore::total_bytes)
      .def("read",
           [](const ExpertStore& s, uint64_t key) {
             const uint64_t n = s.nbytes(key);
             Slab slab(s.slot_bytes(key));
             {
               py::gil_scoped_release release;
               s.read(key, slab.data());
             }
             return py::bytes(reinterpret_cast<const char*>(slab.data() + s.data_offset(key)), n);
           },
           py::arg("key"), "Read one expert synchronously (GIL released).")
      .def("__repr__", [](const ExpertStore& s) {
        return "<ExpertStore " + std::to_string(s.size()) + " experts, " + std::to_string(s.total_bytes()) +
               " bytes in " + std::to_string(s.paths().size()) + " files" + (s.direct_io() ? ", O_DIRECT" : "") + ">";
      });
}

}  // namespace moeedge
