// Host-side preparation shared by the CPU and CUDA blend kernels: argument checks, the
// memory format a call computes in, and how the alpha tensor maps onto the elements.
#pragma once

#include <optional>

#include "blend_math.h"
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

// `t` viewed as integers of its element's width (any strides): a copy_ between such views moves
// the bits unchanged, NaN payloads and -0.0 included.
inline at::Tensor as_bits(const at::Tensor& t) {
  switch (t.element_size()) {
    case 2: return t.view(at::kShort);
    case 4: return t.view(at::kInt);
    default: return t.view(at::kLong);
  }
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

// alpha as the kernels read it: dense, float64 kept as it is and any other dtype as float32
// (exact for float16 and bfloat16), so the clamp and the gradient mask see the value the caller
// passed; the kernels round the clamped value to the data type, as the reference does.
inline at::Tensor alpha_for_kernel(const at::Tensor& alpha) {
  const auto dtype = alpha.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return alpha.to(dtype).contiguous().reshape({-1});
}

inline AlphaArg alpha_arg(const at::Tensor& alpha_k) {
  AlphaArg arg;
  if (alpha_k.defined()) {
    arg.data = alpha_k.const_data_ptr();
    arg.is_double = alpha_k.scalar_type() == at::kDouble;
  }
  return arg;
}

// d_alpha shaped and typed like alpha, from the per-group sums of g * (seed - host) (already
// zero where the clamp blocks the gradient).
inline at::Tensor alpha_grad_like(const at::Tensor& group_sums, const at::Tensor& alpha) {
  return group_sums.to(alpha.scalar_type()).reshape(alpha.sizes());
}

// blend_forward's inputs, checked and in the layout the kernels walk (seed in host's; a layout
// the kernels cannot walk is copied, on the tensor's own device). The device checks come first,
// so the CUDA kernel calls it before building its device guard.
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
