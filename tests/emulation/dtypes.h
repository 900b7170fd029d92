// The data types the emulated launches run: the kernels are instantiated for c10's 16-bit types,
// as the launchers dispatch them (c10/util/Half.h and BFloat16.h need no library).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <string>

#include "driver.h"

namespace emulation_driver {

// Calls f(T{}) for the dtype named "float32", "float64", "float16" or "bfloat16".
template <typename F>
void with_dtype(const std::string& name, F&& f) {
  if (name == "float32") {
    f(float{});
  } else if (name == "float64") {
    f(double{});
  } else if (name == "float16") {
    f(c10::Half{});
  } else if (name == "bfloat16") {
    f(c10::BFloat16{});
  } else {
    usage("unknown dtype");
  }
}

}  // namespace emulation_driver
