#include <pybind11/stl.h>

#include "expert_cache.h"
#include "slab.h"
#include "register.h"

namespace py = pybind11;

namespace moeedge {

namespace {

py::dict stats_dict(const ExpertCache& cache) {
  const CacheStats s = cache.stats();
  const auto store = cache.store();
  py::dict d;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["prefetch_issued"] = s.prefetch_issued;
  d["prefetch_hits"] = s.prefetch_hits;
  d["prefetch_late"] = s.prefetch_late;
  d["prefetch_cancelled"] = s.prefetch_cancelled;
  d["prefetch_stopped"] = s.prefetch_stopped;
  d["prefetch_stopped_bytes"] = s.prefetch_stopped_bytes;
  d["prefetch_dropped"] = s.prefetch_dropped;
  d["prefetch_wasted"] = s.prefetch_wasted;
  d["prefetch_wasted_bytes"] = s.prefetch_wasted_bytes;
  d["evictions"] = s.evictions;
  d["bytes_read"] = s.bytes_read;
  d["io_errors"] = s.io_errors;
  d["resident_bytes"] = s.resident_bytes;
  d["peak_resident_bytes"] = s.peak_resident_bytes;
  d["pinned_bytes"] = s.pinned_bytes;
  d["budget_bytes"] = s.budget_bytes;
  d["n_resident"] = s.n_resident;
  d["wait_seconds"] = s.wait_seconds;
  d["reads"] = s.reads;
  d["read_seconds"] = s.read_seconds;
  d["read_busy_seconds"] = s.read_busy_seconds;
  d["policy"] = policy_name(cache.policy());
  d["io_threads"] = cache.io_threads();
  d["direct_io"] = store->direct_io();
  d["direct_io_fallback"] = store->direct_io_fallback();
  return d;
}

std::vector<uint64_t> to_keys(const py::iterable& keys) {
  std::vector<uint64_t> out;
  for (auto k : keys) out.push_back(k.cast<uint64_t>());
  return out;
}

void def_expert_buffer(py::module_& m) {
  py::class_<ExpertPin, std::unique_ptr<ExpertPin>>(
      m, "ExpertBuffer", py::buffer_protocol(),
      "A pinned expert: read-only bytes, never evicted or overwritten while this object lives.")
      .def_buffer([](ExpertPin& pin) {
        return py::buffer_info(const_cast<uint8_t*>(pin.data()), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(pin.nbytes())}, {1}, /*readonly=*/true);
      })
      .def_property_readonly("key", &ExpertPin::key)
      .def_property_readonly("nbytes", &ExpertPin::nbytes)
      .def_property_readonly("address", [](const ExpertPin& pin) { return reinterpret_cast<uintptr_t>(pin.data()); })
      .def("__len__", &ExpertPin::nbytes)
      .def("__repr__", [](const ExpertPin& pin) {
        return "<ExpertBuffer layer " + std::to_string(pin.key() >> 32) + " expert " +
               std::to_string(pin.key() & 0xffffffffu) + ", " + std::to_string(pin.nbytes()) + " bytes>";
      });
}

void def_expert_cache(py::module_& m) {
  py::class_<ExpertCache, std::shared_ptr<ExpertCache>>(m, "ExpertCache",
                                                        "A byte-budgeted cache of experts read by IO threads.")
      .def(py::init([](std::shared_ptr<ExpertStore> store, int64_t budget_bytes, const std::string& policy,
                       int io_threads) {
             if (budget_bytes <= 0)
               throw std::invalid_argument("budget_bytes must be positive, got " + std::to_string(budget_bytes));
             return ExpertCache::create(std::move(store), static_cast<uint64_t>(budget_bytes), policy, io_threads);
           }),
           py::arg("store"), py::arg("budget_bytes"), py::arg("policy") = "lru", py::arg("io_threads") = 2)
      .def(
          "get",
          [](ExpertCache& cache, uint64_t key) {
            py::gil_scoped_release release;
            return cache.get(key);
          },
          py::arg("key"), "The expert's bytes, pinned; blocks (GIL released) on a miss.")
      .def(
          "prefetch",
          [](ExpertCache& cache, const py::iterable& keys, int64_t priority) {
            return cache.prefetch(to_keys(keys), priority);
          },
          py::arg("keys"), py::arg("priority") = 0)
      .def(
          "cancel_prefetches",
          [](ExpertCache& cache, const std::optional<py::iterable>& keys) {
            if (!keys) return cache.cancel_prefetches(nullptr);
            auto k = to_keys(*keys);
            return cache.cancel_prefetches(&k);
          },
          py::arg("keys") = py::none())
      .def(
          "set_budget",
          [](ExpertCache& cache, int64_t budget_bytes) {
            if (budget_bytes <= 0)
              throw std::invalid_argument("budget_bytes must be positive, got " + std::to_string(budget_bytes));
            py::gil_scoped_release release;  // eviction unmaps pages
            cache.set_budget(static_cast<uint64_t>(budget_bytes));
          },
          py::arg("budget_bytes"))
      .def(
          "drop",
          [](ExpertCache& cache, const py::iterable& keys) {
            auto k = to_keys(keys);
            py::gil_scoped_release release;  // eviction unmaps pages
            return cache.drop(k);
          },
          py::arg("keys"), "Evict these keys now where ready and unpinned; the bytes freed.")
      .def(
          "set_scores",
          [](ExpertCache& cache, const py::dict& scores) {
            std::vector<std::pair<uint64_t, double>> v;
            for (auto kv : scores) v.emplace_back(kv.first.cast<uint64_t>(), kv.second.cast<double>());
            cache.set_scores(v);
          },
          py::arg("scores"))
      .def("contains", &ExpertCache::contains, py::arg("key"))
      .def("resident_keys", &ExpertCache::resident_keys)
      .def("stats", &stats_dict)
      .def("reset_stats", &ExpertCache::reset_stats)
      .def_property_readonly("budget_bytes", &ExpertCache::budget_bytes)
      .def_property("spin_wait", &ExpertCache::spin_wait, &ExpertCache::set_spin_wait,
                    "seconds get() spins for a read in flight before it sleeps (default 0.1; 0: sleep at once): "
                    "a core left idle runs the next products slower")
      .def_property_readonly("policy", [](const ExpertCache& c) { return policy_name(c.policy()); })
      .def_property_readonly("io_threads", &ExpertCache::io_threads)
      .def_property_readonly("store",
                             [](const ExpertCache& c) { return std::const_pointer_cast<ExpertStore>(c.store()); })
      .def("close", &ExpertCache::close, py::call_guard<py::gil_scoped_release>())
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](ExpertCache& c, py::args) {
        py::gil_scoped_release release;
        c.close();
      });
}

}  // namespace

void register_cache(py::module_& m) {
  def_expert_buffer(m);
  def_expert_cache(m);
  m.def(
      "slab_bytes", [] { return py::make_tuple(Slab::mapped_bytes(), Slab::peak_bytes()); },
      "(mapped, peak): bytes of expert slabs mapped in this process now, and the most since reset_slab_peak().");
  m.def("reset_slab_peak", &Slab::reset_peak, "Start slab_bytes()'s peak from what is mapped now.");
}

}  // namespace moeedge
