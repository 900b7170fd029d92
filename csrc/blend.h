// Host-side preparation shared by the CPU and CUDA blend kernels: argument checks, the
// memory format a call computes in, and how the alpha tensor maps onto the elements.
#pragma once

#include <optional>

#include "common.h"

namespace esper_fast::blend {

// The dense memory format the kernels walk: the input's own when it is dense contiguous,
// channels_last or channels_last_3d (batch outermost in all three, so the sample of the
// element at flat offset i is i / sample_numel); contiguous for any other layout.
inline at::MemoryFormat dense_format(const at::Tensor& t) {
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

// `t` laid out in `format`: the tensor itself when it already is, else a copy (only for
// layouts the kernels cannot walk, or a partner tensor whose layout differs).
inline at::Tensor in_format(const at::Tensor& t, at::MemoryFormat format) {
  return t.contiguous(format);
}

inline void check_pair(const at::Tensor& host, const at::Tensor& seed, const char* op) {
  check_floating(host, "host");
  check_same_dtype(seed, "seed", host, "host");
  check_same_device(seed, "seed", host, "host");
  check_same_shape(seed, "seed", host, "host");
  TORCH_CHECK(host.layout() == at::kStrided, "esper_fast.", op, ": host must be a strided (dense) tensor");
}

// How many alpha values there are: 1 for a single-element alpha (broadcast to every element),
// else the batch size, one per sample. Rejects alpha tensors that do not broadcast that way.
inline int64_t alpha_groups(const at::Tensor& alpha, const at::Tensor& like, const char* op) {
  TORCH_CHECK(alpha.device() == like.device(), "esper_fast.", op, ": alpha is on ", alpha.device(),
              " but host is on ", like.device(), "; move alpha to the host's device");
  TORCH_CHECK(at::isFloatingType(alpha.scalar_type()), "esper_fast.", op,
              ": alpha must be a floating point tensor, got ", alpha.scalar_type());
  if (alpha.numel() == 1) return 1;
  bool per_sample = like.dim() >= 1 && alpha.dim() >= 1 && alpha.size(0) == like.size(0);
  for (int64_t d = 1; per_sample && d < alpha.dim(); ++d) per_sample = alpha.size(d) == 1;
  TORCH_CHECK(per_sample, "esper_fast.", op, ": alpha of shape ", alpha.sizes(),
              " does not broadcast over the batch dimension of host of shape ", like.sizes(),
              "; expected [], [1], [B] or [B, 1, ..., 1] with B = ", like.dim() >= 1 ? like.size(0) : 1);
  return like.size(0);
}

// alpha as the kernels read it: dense, in the math type of `dtype` (float, or double for
// float64), so the clamp mask sees alpha's own value; the kernels round it to `dtype` as the
// reference does. A float32 alpha for float32/float16/bfloat16 inputs is used as it is.
inline at::Tensor alpha_for_kernel(const at::Tensor& alpha, at::ScalarType dtype) {
  const auto math_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  return alpha.to(math_dtype).contiguous().reshape({-1});
}

// alpha clamped to [0, 1]; NaN stays NaN, as torch.clamp does.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t clamp_unit(acc_t a) {
  return a < acc_t(0) ? acc_t(0) : (a > acc_t(1) ? acc_t(1) : a);
}

// torch.clamp's gradient rule: the gradient passes where 0 <= alpha <= 1 (never for NaN).
template <typename acc_t>
C10_HOST_DEVICE inline bool clamp_passes_grad(acc_t a) {
  return a >= acc_t(0) && a <= acc_t(1);
}

// The per-sample alpha a kernel applies: clamped, rounded to the data type like the reference.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t applied_alpha(const acc_t* alpha, int64_t group, acc_t alpha_value) {
  return alpha == nullptr ? alpha_value : clamp_unit(static_cast<acc_t>(static_cast<scalar_t>(alpha[group])));
}

// torch.lerp's formula: exact at both ends (alpha 0 gives host, alpha 1 gives seed).
template <typename T, typename acc_t>
C10_HOST_DEVICE inline T lerp_value(T h, T s, acc_t a) {
  return a < acc_t(0.5) ? h + T(a) * (s - h) : s - (s - h) * T(acc_t(1) - a);
}

// d_alpha shaped and typed like alpha, from the per-group sums of g * (seed - host) (already
// zero where the clamp blocks the gradient).
inline at::Tensor alpha_grad_like(const at::Tensor& group_sums, const at::Tensor& alpha) {
  return group_sums.to(alpha.scalar_type()).reshape(alpha.sizes());
}

// blend_forward's inputs, checked and in the layout the kernels walk (seed in host's). Call
// it under the device guard: a layout the kernels cannot walk is copied.
struct ForwardInputs {
  int64_t groups;
  at::MemoryFormat format;
  at::Tensor host, seed;
};

inline ForwardInputs forward_inputs(const at::Tensor& host, const at::Tensor& seed,
                                    const std::optional<at::Tensor>& alpha) {
  check_pair(host, seed, "blend_forward");
  ForwardInputs in;
  in.groups = alpha.has_value() ? alpha_groups(*alpha, host, "blend_forward") : 1;
  in.format = dense_format(host);
  in.host = in_format(host, in.format);
  in.seed = in_format(seed, in.format);
  return in;
}

// blend_backward's inputs, checked and in the layout the kernels walk: the incoming gradient,
// plus host and seed when d_alpha is wanted. Call it under the device guard: a layout the
// kernels cannot walk is copied.
struct BackwardInputs {
  int64_t groups;
  at::MemoryFormat format;
  at::Tensor grad, host, seed;
};

inline BackwardInputs backward_inputs(const at::Tensor& grad_out, const std::optional<at::Tensor>& host,
                                      const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& alpha,
                                      bool need_alpha_grad) {
  check_floating(grad_out, "grad_out");
  TORCH_CHECK(!need_alpha_grad || (host.has_value() && seed.has_value() && alpha.has_value()),
              "esper_fast.blend_backward: need_alpha_grad needs host, seed and alpha");
  BackwardInputs in;
  in.groups = alpha.has_value() ? alpha_groups(*alpha, grad_out, "blend_backward") : 1;
  in.format = dense_format(grad_out);
  in.grad = in_format(grad_out, in.format);
  if (need_alpha_grad) {
    check_pair(*host, *seed, "blend_backward");
    check_same_dtype(grad_out, "grad_out", *host, "host");
    check_same_device(grad_out, "grad_out", *host, "host");
    check_same_shape(grad_out, "grad_out", *host, "host");
    in.host = in_format(*host, in.format);
    in.seed = in_format(*seed, in.format);
  }
  return in;
}

}  // namespace esper_fast::blend
