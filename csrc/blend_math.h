// The blend family's element math, shared by the CPU kernels (csrc/cpu/blend.cpp) and the device
// code (csrc/cuda/blend_kernels.cuh). Free of ATen: the CPU emulation of the CUDA kernels
// (tests/emulation/) compiles it with a plain g++.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace esper_fast::blend {

// A kernel's view of the alpha tensor prepared by alpha_for_kernel, or of none (data == nullptr).
struct AlphaArg {
  const void* data = nullptr;
  bool is_double = false;

  ESPER_FAST_HOST_DEVICE double operator[](int64_t group) const {
    return is_double ? static_cast<const double*>(data)[group]
                     : static_cast<double>(static_cast<const float*>(data)[group]);
  }
};

// alpha clamped to [0, 1]; NaN stays NaN, as torch.clamp does.
template <typename T>
ESPER_FAST_HOST_DEVICE inline T clamp_unit(T a) {
  return a < T(0) ? T(0) : (a > T(1) ? T(1) : a);
}

// torch.clamp's gradient rule: the gradient passes where 0 <= alpha <= 1 (never for NaN). Taken
// on alpha's own value: 1 + 2**-30 in float64 is outside even though it rounds to 1 in float32.
ESPER_FAST_HOST_DEVICE inline bool clamp_passes_grad(double a) {
  return a >= 0.0 && a <= 1.0;
}

// The alpha a kernel applies to group `group`: the tensor's value clamped in its own precision,
// then rounded to the data type like the reference's alpha.clamp(0, 1).to(dtype); else the float
// alpha, already clamped and in the math type.
template <typename scalar_t, typename acc_t>
ESPER_FAST_HOST_DEVICE inline acc_t applied_alpha(AlphaArg alpha, int64_t group, acc_t alpha_value) {
  return alpha.data == nullptr ? alpha_value : static_cast<acc_t>(static_cast<scalar_t>(clamp_unit(alpha[group])));
}

// The factors of the backward, d_seed = seed * g and d_host = host * g, exactly as torch.lerp's
// autograd forms them: for a float alpha (alpha_value, complement) with the complement 1 - alpha
// taken in double and then rounded (torch multiplies by the Scalar 1 - weight.toDouble()); for a
// tensor alpha, the complement of the applied alpha in the data type (torch's 1 - weight tensor).
template <typename acc_t>
struct GradScales {
  acc_t seed, host;
};

template <typename scalar_t, typename acc_t>
ESPER_FAST_HOST_DEVICE inline GradScales<acc_t> grad_scales(AlphaArg alpha, int64_t group, acc_t alpha_value,
                                                     acc_t complement) {
  if (alpha.data == nullptr) return {alpha_value, complement};
  const acc_t a = applied_alpha<scalar_t, acc_t>(alpha, group, alpha_value);
  return {a, static_cast<acc_t>(static_cast<scalar_t>(acc_t(1) - a))};
}

// torch.lerp's formula: exact at both ends (alpha 0 gives host, alpha 1 gives seed).
template <typename T, typename acc_t>
ESPER_FAST_HOST_DEVICE inline T lerp_value(T h, T s, acc_t a) {
  return a < acc_t(0.5) ? h + T(a) * (s - h) : s - (s - h) * T(acc_t(1) - a);
}

// A float alpha as the kernels take it: clamped, in the math type, with its complement formed
// in double.
template <typename acc_t>
struct FloatAlpha {
  acc_t value, complement;
  explicit FloatAlpha(double alpha_value) {
    const double clamped = clamp_unit(alpha_value);
    value = static_cast<acc_t>(clamped);
    complement = static_cast<acc_t>(1.0 - clamped);
  }
};

}  // namespace esper_fast::blend
