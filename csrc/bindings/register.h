// One register_<area> per area of the engine, called by module.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace moeedge {

void register_errors(pybind11::module_& m);
void register_store(pybind11::module_& m);
void register_cache(pybind11::module_& m);
void register_kernels(pybind11::module_& m);

}  // namespace moeedge
