// What device code and the CPU kernels share without ATen: the host/device marker and the
// math type. Headers included by csrc/cuda/<family>_kernels.cuh include nothing heavier, so the
// test-only CPU emulation (tests/emulation/) compiles the kernels with a plain g++.
#pragma once

#include <type_traits>

#if defined(__CUDACC__)
#define ESPER_FAST_HOST_DEVICE __host__ __device__
#else
#define ESPER_FAST_HOST_DEVICE
#endif

namespace esper_fast {

// The type a kernel computes in: float for 16-bit data, the type itself otherwise. The launchers
// check that it is at::opmath_type (csrc/common.h's acc_t) for every dtype they dispatch.
template <typename scalar_t>
using math_type = std::conditional_t<(sizeof(scalar_t) < sizeof(float)), float, scalar_t>;

}  // namespace esper_fast
