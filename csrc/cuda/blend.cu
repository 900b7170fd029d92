// CUDA launchers of the blend family: lerp forward, its fused backward, and the STE copy. The
// kernels, their tilings and the launch plan are in blend_kernels.cuh; here the checks, the
// device guard, the stream, the outputs and the launch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "blend.h"
#include "cuda/blend_kernels.cuh"

namespace esper_fast::blend {
namespace {

// The CUDA kernel runs when any argument is on the GPU (host and seed of the backward too,
// even when unused); the guard's tensor must be one of them, or CUDAGuard asserts internally.
void check_cuda(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.is_cuda(), "esper_fast.", op, ": ", name, " is on ", t.device(),
              " but another argument is on a CUDA device; move every tensor to the same device");
}

// Blocks that are resident at once on the current device.
int64_t device_resident_blocks() {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  return resident_blocks(props->multiProcessorCount, props->maxThreadsPerMultiProcessor);
}

// Launches a kernel on `stream` and checks the launch.
struct StreamLaunch {
  cudaStream_t stream;
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, dim3 grid, int threads, Args... args) const {
    kernel<<<grid, threads, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

at::Tensor blend_forward_cuda(const at::Tensor& host, const at::Tensor& seed, const std::optional<at::Tensor>& alpha,
                              double alpha_value) {
  // The checks first: a CPU host with a CUDA seed or alpha gets their message, not CUDAGuard's assert.
  const ForwardInputs in = forward_inputs(host, seed, alpha);
  const c10::cuda::CUDAGuard guard(host.device());
  auto out = at::empty(host.sizes(), host.options().memory_format(in.format));
  const int64_t numel = host.numel();
  if (numel == 0) return out;
  const at::Tensor alpha_k = alpha.has_value() ? alpha_for_kernel(*alpha) : at::Tensor();
  const StreamLaunch launch{at::cuda::getCurrentCUDAStream()};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, host.scalar_type(), "blend_forward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    static_assert(std::is_same_v<acc, math_type<scalar_t>>);
    launch_forward<scalar_t>(launch, out.mutable_data_ptr<scalar_t>(), in.host.const_data_ptr<scalar_t>(),
                             in.seed.const_data_ptr<scalar_t>(), alpha_arg(alpha_k), FloatAlpha<acc>(alpha_value).value,
                             numel, in.groups, device_resident_blocks());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> blend_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& host, const std::optional<at::Tensor>& seed,
    const std::optional<at::Tensor>& alpha, double alpha_value, bool need_host_grad, bool need_seed_grad,
    bool need_alpha_grad) {
  check_cuda(grad_out, "grad_out", "blend_backward");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const BackwardInputs in = backward_inputs(grad_out, host, seed, alpha, need_alpha_grad);
  const int64_t groups = in.groups;
  const at::Tensor &g = in.grad, &h = in.host, &s = in.seed;
  const auto grad_options = grad_out.options().memory_format(in.format);
  const auto none = at::empty({0}, grad_out.options());
  at::Tensor d_host = need_host_grad ? at::empty(grad_out.sizes(), grad_options) : none;
  at::Tensor d_seed = need_seed_grad ? at::empty(grad_out.sizes(), grad_options) : none;
  const int64_t numel = grad_out.numel();
  const auto sum_options = grad_out.options().dtype(grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  // Every group's d_alpha is written by the kernels; with no elements it is 0.
  at::Tensor sums;
  if (need_alpha_grad) sums = numel == 0 ? at::zeros({groups}, sum_options) : at::empty({groups}, sum_options);
  const at::Tensor alpha_k = alpha.has_value() ? alpha_for_kernel(*alpha) : at::Tensor();
  const StreamLaunch launch{at::cuda::getCurrentCUDAStream()};

  if (numel > 0 && (need_host_grad || need_seed_grad || need_alpha_grad)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "blend_backward_cuda", [&] {
      using acc = acc_t<scalar_t>;
      static_assert(std::is_same_v<acc, math_type<scalar_t>>);
      const FloatAlpha<acc> value(alpha_value);
      BackwardArgs<scalar_t> args;
      args.grad = g.const_data_ptr<scalar_t>();
      args.host = need_alpha_grad ? h.const_data_ptr<scalar_t>() : nullptr;
      args.seed = need_alpha_grad ? s.const_data_ptr<scalar_t>() : nullptr;
      args.d_host = need_host_grad ? d_host.mutable_data_ptr<scalar_t>() : nullptr;
      args.d_seed = need_seed_grad ? d_seed.mutable_data_ptr<scalar_t>() : nullptr;
      args.alpha_grad = need_alpha_grad ? sums.mutable_data_ptr<acc>() : nullptr;
      const BackwardPlan plan = plan_backward(args, numel, groups);
      at::Tensor tile_sums;
      if (plan.tile_sums > 0) tile_sums = at::empty({plan.tile_sums}, sum_options);
      launch_backward<scalar_t>(launch, plan, args, tile_sums.defined() ? tile_sums.mutable_data_ptr<acc>() : nullptr,
                                alpha_arg(alpha_k), value.value, value.complement, numel, groups,
                                device_resident_blocks());
    });
  }
  at::Tensor d_alpha = need_alpha_grad ? alpha_grad_like(sums, *alpha) : none;
  return {d_host, d_seed, d_alpha};
}

// The output is the host bit for bit, laid out in the kernels' format, written in one copy: a byte
// copy on the copy path when host is already dense in that format, else one gather kernel
// straight from host's strides.
at::Tensor ste_forward_cuda(const at::Tensor& host, const at::Tensor& seed) {
  check_pair(host, seed, "ste_forward");
  const c10::cuda::CUDAGuard guard(host.device());
  const auto format = dense_format(host);
  auto out = at::empty(host.sizes(), host.options().memory_format(format));
  if (host.numel() == 0) return out;
  if (host.is_contiguous(format)) {
    const size_t bytes = static_cast<size_t>(host.numel()) * host.element_size();
    C10_CUDA_CHECK(cudaMemcpyAsync(out.mutable_data_ptr(), host.const_data_ptr(), bytes, cudaMemcpyDeviceToDevice,
                                   at::cuda::getCurrentCUDAStream()));
  } else {
    as_bits(out).copy_(as_bits(host));
  }
  return out;
}

TORCH_LIBRARY_IMPL(esper_fast, CUDA, m) {
  m.impl("blend_forward", &blend_forward_cuda);
  m.impl("blend_backward", &blend_backward_cuda);
  m.impl("ste_forward", &ste_forward_cuda);
}

}  // namespace esper_fast::blend
