// CUDA kernels of the blend family: lerp forward, its fused backward, and the STE copy.
//
// The elements are cut into tiles that never straddle an alpha group (a sample, or the whole
// tensor for a single alpha), so each tile applies one alpha and the backward reduces its
// d_alpha partial with one block reduction and one atomicAdd. Blocks grid-stride over tiles.
// Inside a group, the elements before the first 16-byte boundary and after the last full
// vector are done one by one; the rest moves in 16-byte vectors.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "blend.h"

namespace esper_fast::blend {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // vectors each thread has in flight per tile
constexpr int kTileVecs = kThreads * kUnroll;
constexpr int kVecBytes = 16;
// At least 2 resident blocks (<= 128 registers a thread): with kUnroll vectors per thread
// that keeps far more bytes in flight per SM than HBM latency needs.
constexpr int kMinBlocksPerSm = 2;

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

// Where group `group` lies: [begin, begin + head) one by one, then `vecs` full vectors from
// `vec_begin`, then [tail_begin, end) one by one.
struct GroupSpan {
  int64_t begin, head, vec_begin, vecs, tail_begin, end;
};

template <int kVec>
__device__ __forceinline__ GroupSpan group_span(int64_t group, int64_t group_numel) {
  GroupSpan span;
  span.begin = group * group_numel;
  span.end = span.begin + group_numel;
  const int64_t misaligned = span.begin % kVec;
  span.head = misaligned == 0 ? 0 : std::min<int64_t>(kVec - misaligned, group_numel);
  span.vec_begin = span.begin + span.head;
  span.vecs = (span.end - span.vec_begin) / kVec;
  span.tail_begin = span.vec_begin + span.vecs * kVec;
  return span;
}

// Sum over the block, valid in thread 0. `shared` holds kWarps values and is free on return.
template <typename acc>
__device__ __forceinline__ acc block_sum(acc value, acc* shared) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  value = threadIdx.x < kWarps ? shared[threadIdx.x] : acc(0);
  if (warp == 0) {
    for (int offset = kWarps / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();
  return value;
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    blend_forward_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ host,
                         const scalar_t* __restrict__ seed, AlphaArg alpha, acc_t<scalar_t> alpha_value,
                         int64_t group_numel, int64_t tiles_per_group, int64_t tiles) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, kVec>;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t group = tile / tiles_per_group;
    const int64_t first_vec = (tile - group * tiles_per_group) * kTileVecs;
    const acc a = applied_alpha<scalar_t>(alpha, group, alpha_value);
    const GroupSpan span = group_span<kVec>(group, group_numel);

    const P* host_v = reinterpret_cast<const P*>(host + span.vec_begin);
    const P* seed_v = reinterpret_cast<const P*>(seed + span.vec_begin);
    P* out_v = reinterpret_cast<P*>(out + span.vec_begin);
    P h[kUnroll], s[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first_vec + threadIdx.x + u * kThreads;
      if (v < span.vecs) {
        h[u] = host_v[v];
        s[u] = seed_v[v];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first_vec + threadIdx.x + u * kThreads;
      if (v < span.vecs) {
        P y;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          y.v[j] = static_cast<scalar_t>(lerp_value(static_cast<acc>(h[u].v[j]), static_cast<acc>(s[u].v[j]), a));
        }
        out_v[v] = y;
      }
    }
    if (first_vec == 0 && threadIdx.x < kVec) {
      // Fewer than kVec elements each side of the vectors: one thread per element.
      const int64_t edge[2] = {span.begin + threadIdx.x, span.tail_begin + threadIdx.x};
      const bool live[2] = {edge[0] < span.vec_begin, edge[1] < span.end};
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t i = edge[e];
        if (live[e]) out[i] = static_cast<scalar_t>(lerp_value(static_cast<acc>(host[i]), static_cast<acc>(seed[i]), a));
      }
    }
  }
}

// d_seed = a * g, d_host = (1 - a) * g (each only when its pointer is set) and, with kAlphaGrad,
// sum(g * (seed - host)) per group added into alpha_grad where the clamp passes gradient.
template <typename scalar_t, int kVec, bool kAlphaGrad>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    blend_backward_kernel(scalar_t* __restrict__ d_host, scalar_t* __restrict__ d_seed,
                          acc_t<scalar_t>* __restrict__ alpha_grad, const scalar_t* __restrict__ grad,
                          const scalar_t* __restrict__ host, const scalar_t* __restrict__ seed, AlphaArg alpha,
                          acc_t<scalar_t> alpha_value, acc_t<scalar_t> alpha_complement, int64_t group_numel,
                          int64_t tiles_per_group, int64_t tiles) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, kVec>;
  __shared__ acc shared[kWarps];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t group = tile / tiles_per_group;
    const int64_t first_vec = (tile - group * tiles_per_group) * kTileVecs;
    const GradScales<acc> scales = grad_scales<scalar_t>(alpha, group, alpha_value, alpha_complement);
    const acc a = scales.seed, b = scales.host;
    const GroupSpan span = group_span<kVec>(group, group_numel);
    acc partial = acc(0);

    const P* grad_v = reinterpret_cast<const P*>(grad + span.vec_begin);
    P g[kUnroll], h[kUnroll], s[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first_vec + threadIdx.x + u * kThreads;
      if (v < span.vecs) {
        g[u] = grad_v[v];
        if constexpr (kAlphaGrad) {
          h[u] = reinterpret_cast<const P*>(host + span.vec_begin)[v];
          s[u] = reinterpret_cast<const P*>(seed + span.vec_begin)[v];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first_vec + threadIdx.x + u * kThreads;
      if (v < span.vecs) {
        P ds, dh;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const acc gj = static_cast<acc>(g[u].v[j]);
          ds.v[j] = static_cast<scalar_t>(a * gj);
          dh.v[j] = static_cast<scalar_t>(b * gj);
          if constexpr (kAlphaGrad) partial += gj * (static_cast<acc>(s[u].v[j]) - static_cast<acc>(h[u].v[j]));
        }
        if (d_seed != nullptr) reinterpret_cast<P*>(d_seed + span.vec_begin)[v] = ds;
        if (d_host != nullptr) reinterpret_cast<P*>(d_host + span.vec_begin)[v] = dh;
      }
    }
    if (first_vec == 0 && threadIdx.x < kVec) {
      const int64_t edge[2] = {span.begin + threadIdx.x, span.tail_begin + threadIdx.x};
      const bool live[2] = {edge[0] < span.vec_begin, edge[1] < span.end};
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t i = edge[e];
        if (live[e]) {
          const acc gi = static_cast<acc>(grad[i]);
          if (d_seed != nullptr) d_seed[i] = static_cast<scalar_t>(a * gi);
          if (d_host != nullptr) d_host[i] = static_cast<scalar_t>(b * gi);
          if constexpr (kAlphaGrad) partial += gi * (static_cast<acc>(seed[i]) - static_cast<acc>(host[i]));
        }
      }
    }
    if constexpr (kAlphaGrad) {
      const acc total = block_sum(partial, shared);
      if (threadIdx.x == 0 && clamp_passes_grad(alpha[group])) atomicAdd(alpha_grad + group, total);
    }
  }
}

// The CUDA kernel runs when any argument is on the GPU (host and seed of the backward too,
// even when unused); the guard's tensor must be one of them, or CUDAGuard asserts internally.
void check_cuda(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.is_cuda(), "esper_fast.", op, ": ", name, " is on ", t.device(),
              " but another argument is on a CUDA device; move every tensor to the same device");
}

bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0;
}

// Tiles per group and the grid: enough resident blocks to fill the device, no more.
struct Launch {
  int64_t tiles_per_group, tiles;
  unsigned int blocks;
};

Launch plan_launch(int64_t groups, int64_t group_numel, int vec) {
  Launch launch;
  const int64_t vecs_per_group = group_numel / vec;
  launch.tiles_per_group = std::max<int64_t>(1, (vecs_per_group + kTileVecs - 1) / kTileVecs);
  launch.tiles = groups * launch.tiles_per_group;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int64_t resident = int64_t(props->multiProcessorCount) * (props->maxThreadsPerMultiProcessor / kThreads);
  launch.blocks = static_cast<unsigned int>(std::min(launch.tiles, resident));
  return launch;
}

}  // namespace

at::Tensor blend_forward_cuda(const at::Tensor& host, const at::Tensor& seed, const std::optional<at::Tensor>& alpha,
                              double alpha_value) {
  // The checks first: a CPU host with a CUDA seed or alpha gets their message, not CUDAGuard's assert.
  const ForwardInputs in = forward_inputs(host, seed, alpha);
  const c10::cuda::CUDAGuard guard(host.device());
  const int64_t groups = in.groups;
  const at::Tensor &h = in.host, &s = in.seed;
  auto out = at::empty(host.sizes(), host.options().memory_format(in.format));
  const int64_t numel = host.numel();
  if (numel == 0) return out;
  const at::Tensor alpha_k = alpha.has_value() ? alpha_for_kernel(*alpha) : at::Tensor();
  const AlphaArg alphas = alpha_arg(alpha_k);
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, host.scalar_type(), "blend_forward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    constexpr int kVec = kVecBytes / sizeof(scalar_t);
    const acc value = FloatAlpha<acc>(alpha_value).value;
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t group_numel = numel / groups;
    if (aligned(hp) && aligned(sp) && aligned(op)) {
      const Launch l = plan_launch(groups, group_numel, kVec);
      blend_forward_kernel<scalar_t, kVec><<<l.blocks, kThreads, 0, stream>>>(op, hp, sp, alphas, value, group_numel,
                                                                              l.tiles_per_group, l.tiles);
    } else {
      const Launch l = plan_launch(groups, group_numel, 1);
      blend_forward_kernel<scalar_t, 1><<<l.blocks, kThreads, 0, stream>>>(op, hp, sp, alphas, value, group_numel,
                                                                           l.tiles_per_group, l.tiles);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const auto sum_dtype = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sums = need_alpha_grad ? at::zeros({groups}, grad_out.options().dtype(sum_dtype)) : at::Tensor();
  const int64_t numel = grad_out.numel();
  const at::Tensor alpha_k = alpha.has_value() ? alpha_for_kernel(*alpha) : at::Tensor();
  const AlphaArg alphas = alpha_arg(alpha_k);
  const auto stream = at::cuda::getCurrentCUDAStream();

  if (numel > 0 && (need_host_grad || need_seed_grad || need_alpha_grad)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "blend_backward_cuda", [&] {
      using acc = acc_t<scalar_t>;
      constexpr int kVec = kVecBytes / sizeof(scalar_t);
      const FloatAlpha<acc> value(alpha_value);
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* hp = need_alpha_grad ? h.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* sp = need_alpha_grad ? s.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* dhp = need_host_grad ? d_host.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* dsp = need_seed_grad ? d_seed.mutable_data_ptr<scalar_t>() : nullptr;
      acc* sums_ptr = need_alpha_grad ? sums.mutable_data_ptr<acc>() : nullptr;
      const int64_t group_numel = numel / groups;
      const bool vectorise = aligned(gp) && (hp == nullptr || aligned(hp)) && (sp == nullptr || aligned(sp)) &&
                             (dhp == nullptr || aligned(dhp)) && (dsp == nullptr || aligned(dsp));
      auto launch = [&](auto vec_tag, auto alpha_grad_tag) {
        constexpr int kV = decltype(vec_tag)::value;
        constexpr bool kA = decltype(alpha_grad_tag)::value;
        const Launch l = plan_launch(groups, group_numel, kV);
        blend_backward_kernel<scalar_t, kV, kA><<<l.blocks, kThreads, 0, stream>>>(
            dhp, dsp, sums_ptr, gp, hp, sp, alphas, value.value, value.complement, group_numel, l.tiles_per_group,
            l.tiles);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      using Vec = std::integral_constant<int, kVec>;
      using Scalar = std::integral_constant<int, 1>;
      if (vectorise) {
        need_alpha_grad ? launch(Vec{}, std::true_type{}) : launch(Vec{}, std::false_type{});
      } else {
        need_alpha_grad ? launch(Scalar{}, std::true_type{}) : launch(Scalar{}, std::false_type{});
      }
    });
  }
  at::Tensor d_alpha = need_alpha_grad ? alpha_grad_like(sums, *alpha) : none;
  return {d_host, d_seed, d_alpha};
}

at::Tensor ste_forward_cuda(const at::Tensor& host, const at::Tensor& seed) {
  check_pair(host, seed, "ste_forward");
  const c10::cuda::CUDAGuard guard(host.device());
  const auto format = dense_format(host);
  const auto h = in_format(host, format);
  auto out = at::empty(host.sizes(), host.options().memory_format(format));
  const size_t bytes = static_cast<size_t>(h.numel()) * h.element_size();
  // A byte copy on the copy path: the output is the host bit for bit, NaN payloads and -0.0 included.
  if (bytes > 0) {
    C10_CUDA_CHECK(cudaMemcpyAsync(out.mutable_data_ptr(), h.const_data_ptr(), bytes, cudaMemcpyDeviceToDevice,
                                   at::cuda::getCurrentCUDAStream()));
  }
  return out;
}

TORCH_LIBRARY_IMPL(esper_fast, CUDA, m) {
  m.impl("blend_forward", &blend_forward_cuda);
  m.impl("blend_backward", &blend_backward_cuda);
  m.impl("ste_forward", &ste_forward_cuda);
}

}  // namespace esper_fast::blend
