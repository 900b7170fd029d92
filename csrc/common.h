// Shared argument checks and type helpers for every esper_fast kernel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

namespace esper_fast {

// All math is done in opmath (float for half/bfloat16, the type itself otherwise).
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "esper_fast: ", a_name, " is on ", a.device(), " but ", b_name,
              " is on ", b.device(), "; move both to the same device");
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "esper_fast: ", a_name, " has dtype ", a.scalar_type(), " but ",
              b_name, " has dtype ", b.scalar_type(), "; cast one of them");
}

inline void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.sizes() == b.sizes(), "esper_fast: ", a_name, " has shape ", a.sizes(), " but ", b_name,
              " has shape ", b.sizes(), "; they must match");
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "esper_fast: ", name, " must be float64, float32, float16 or bfloat16, got ", dtype);
}

}  // namespace esper_fast
