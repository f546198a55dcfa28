// Python-facing argument parsing shared by the binding files.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "gptqkit/pack.h"

namespace gptqkit::bindings {

// The checkpoint's zero-point convention by name: "v1" (qzeros store zero - 1,
// AutoGPTQ's format) or "v2" (true zeros); a Python ValueError otherwise.
inline ZeroFormat parse_zero_format(const std::string& name) {
  if (name == "v1") return ZeroFormat::kV1;
  if (name == "v2") return ZeroFormat::kV2;
  throw pybind11::value_error("format: expected 'v1' (qzeros store zero - 1) or 'v2' (true zeros), got '" + name +
                              "'");
}

}  // namespace gptqkit::bindings
