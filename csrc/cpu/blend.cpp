// CPU kernels of the blend family: lerp forward, its fused backward, and the STE.
//
// Work is cut into tasks that never straddle a sample (one alpha value per task), so the
// per-sample d_alpha is a sum of per-task partials with no atomics and a fixed order.
#include <ATen/Parallel.h>
#include <ATen/ops/_lazy_clone.h>
#include <c10/core/impl/COW.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "blend.h"

namespace esper_fast::blend {
namespace {

// Elements per task: large enough to amortise scheduling, small enough to balance threads.
constexpr int64_t kTaskElems = 32768;

// The task grid over `groups` runs of `group_numel` elements each.
struct Tasks {
  int64_t group_numel;
  int64_t per_group;  // tasks in one group
  int64_t count;      // tasks in all
  int64_t grain;      // tasks per parallel chunk

  Tasks(int64_t groups, int64_t numel_per_group)
      : group_numel(numel_per_group),
        per_group(std::max<int64_t>(1, (numel_per_group + kTaskElems - 1) / kTaskElems)),
        count(groups * per_group),
        grain(std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, numel_per_group))) {}

  int64_t group(int64_t task) const { return task / per_group; }
  int64_t begin(int64_t task) const { return group(task) * group_numel + (task % per_group) * kTaskElems; }
  int64_t length(int64_t task) const {
    return std::min(kTaskElems, group_numel - (task % per_group) * kTaskElems);
  }
};

// A fresh output. A large one is offered transparent huge pages for the 2 MiB-aligned part of
// it: first-touch page faults on 4 KiB pages cost as much as the blend itself at these sizes.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  constexpr size_t kMinBytes = size_t(4) << 20;
  if (out.nbytes() >= kMinBytes) {
    const auto data = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t begin = (data + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t end = (data + out.nbytes()) & ~(kHugePage - 1);
    // Advice only: where the kernel declines, the memory is ordinary pages.
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return out;
}

// ---- float math over float or double data.

// The build targets the baseline ISA; the element-wise loops are also compiled for AVX2+FMA and
// the better one is picked when the library loads (torch's own kernels are dispatched likewise).
// Older compilers may not dispatch target_clones on an ISA level; they build the baseline loops.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
#define ESPER_FAST_ISA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ESPER_FAST_ISA_CLONES
#endif

// torch.lerp's form: one multiply-add from the nearer end (fused where the ISA has FMA, as
// torch's vectorised lerp is).
template <typename T>
inline __attribute__((always_inline)) void lerp_loop(T* __restrict__ out, const T* __restrict__ host,
                                                     const T* __restrict__ seed, int64_t n, T a) {
  const bool small = a < T(0.5);
  const T coeff = small ? a : a - T(1);
  const T* __restrict__ base = small ? host : seed;
  for (int64_t i = 0; i < n; ++i) out[i] = base[i] + coeff * (seed[i] - host[i]);
}

ESPER_FAST_ISA_CLONES void lerp_kernel(float* out, const float* host, const float* seed, int64_t n, float a) {
  lerp_loop(out, host, seed, n, a);
}

ESPER_FAST_ISA_CLONES void lerp_kernel(double* out, const double* host, const double* seed, int64_t n, double a) {
  lerp_loop(out, host, seed, n, a);
}

// d_seed = a * g and d_host = b * g, either pointer may be null.
template <typename T>
inline __attribute__((always_inline)) void scale_loop(T* __restrict__ d_host, T* __restrict__ d_seed,
                                                      const T* __restrict__ grad, int64_t n, T a, T b) {
  if (d_host != nullptr && d_seed != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      d_seed[i] = a * grad[i];
      d_host[i] = b * grad[i];
    }
  } else if (d_seed != nullptr) {
    for (int64_t i = 0; i < n; ++i) d_seed[i] = a * grad[i];
  } else if (d_host != nullptr) {
    for (int64_t i = 0; i < n; ++i) d_host[i] = b * grad[i];
  }
}

ESPER_FAST_ISA_CLONES void scale_kernel(float* d_host, float* d_seed, const float* grad, int64_t n, float a, float b) {
  scale_loop(d_host, d_seed, grad, n, a, b);
}

ESPER_FAST_ISA_CLONES void scale_kernel(double* d_host, double* d_seed, const double* grad, int64_t n, double a,
                                        double b) {
  scale_loop(d_host, d_seed, grad, n, a, b);
}

// sum(g * (seed - host)) in kLanes independent partial sums, so it vectorises without
// reassociating a single running sum.
template <typename T>
inline __attribute__((always_inline)) T dot_diff_loop(const T* __restrict__ grad, const T* __restrict__ host,
                                                      const T* __restrict__ seed, int64_t n) {
  constexpr int kLanes = 16;
  T lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += grad[i + k] * (seed[i + k] - host[i + k]);
  }
  T sum = T(0);
  for (int k = 0; k < kLanes; ++k) sum += lanes[k];
  for (; i < n; ++i) sum += grad[i] * (seed[i] - host[i]);
  return sum;
}

ESPER_FAST_ISA_CLONES float dot_diff_kernel(const float* grad, const float* host, const float* seed, int64_t n) {
  return dot_diff_loop(grad, host, seed, n);
}

ESPER_FAST_ISA_CLONES double dot_diff_kernel(const double* grad, const double* host, const double* seed, int64_t n) {
  return dot_diff_loop(grad, host, seed, n);
}

// d_seed = a * g and d_host = b * g (each only when its pointer is set); returns
// sum(g * (seed - host)) when host and seed are given, else 0. A task's span is small enough
// (kTaskElems) that the second pass over grad reads it from cache.
template <typename T>
T backward_math(T* d_host, T* d_seed, const T* grad, const T* host, const T* seed, int64_t n, T a, T b) {
  scale_kernel(d_host, d_seed, grad, n, a, b);
  return host == nullptr ? T(0) : dot_diff_kernel(grad, host, seed, n);
}

// ---- half and bfloat16 data: converted to float in small blocks, with plain bit arithmetic
// the compiler vectorises (element-wise c10 conversions are an order of magnitude slower here).

constexpr int64_t kBlock = 256;

inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = uint32_t(src[i].x) << 16;
    std::memcpy(dst + i, &bits, sizeof(float));
  }
}

// Round to nearest even, NaN to the canonical quiet NaN: c10::BFloat16's own rounding.
inline void from_float(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, src + i, sizeof(float));
    const uint16_t rounded = uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    dst[i].x = src[i] != src[i] ? uint16_t(0x7FC0) : rounded;
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
// F16C converts 8 halves per instruction; the baseline build cannot assume it, so it is used
// only where the CPU reports it.
bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  return has;
}

__attribute__((target("avx,f16c"))) void half_to_float_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}
#else
bool cpu_has_f16c() {
  return false;
}
void half_to_float_f16c(const c10::Half*, float*, int64_t) {}
void float_to_half_f16c(const float*, c10::Half*, int64_t) {}
#endif

inline void to_float(const c10::Half* src, float* dst, int64_t n) {
  if (cpu_has_f16c()) return half_to_float_f16c(src, dst, n);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void from_float(const float* src, c10::Half* dst, int64_t n) {
  if (cpu_has_f16c()) return float_to_half_f16c(src, dst, n);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

// ---- the spans a task runs, for every dtype.

template <typename scalar_t>
void lerp_span(scalar_t* out, const scalar_t* host, const scalar_t* seed, int64_t n, acc_t<scalar_t> a) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    lerp_kernel(out, host, seed, n, a);
  } else {
    float h[kBlock], s[kBlock], y[kBlock];
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t m = std::min(kBlock, n - b);
      to_float(host + b, h, m);
      to_float(seed + b, s, m);
      lerp_kernel(y, h, s, m, a);
      from_float(y, out + b, m);
    }
  }
}

template <typename scalar_t>
acc_t<scalar_t> backward_span(scalar_t* d_host, scalar_t* d_seed, const scalar_t* grad, const scalar_t* host,
                              const scalar_t* seed, int64_t n, GradScales<acc_t<scalar_t>> scales) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return backward_math<scalar_t>(d_host, d_seed, grad, host, seed, n, scales.seed, scales.host);
  } else {
    float g[kBlock], h[kBlock], s[kBlock], dh[kBlock], ds[kBlock];
    const bool reduce = host != nullptr;
    float sum = 0.f;
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t m = std::min(kBlock, n - b);
      to_float(grad + b, g, m);
      if (reduce) {
        to_float(host + b, h, m);
        to_float(seed + b, s, m);
      }
      sum += backward_math<float>(d_host ? dh : nullptr, d_seed ? ds : nullptr, g, reduce ? h : nullptr,
                                  reduce ? s : nullptr, m, scales.seed, scales.host);
      if (d_seed != nullptr) from_float(ds, d_seed + b, m);
      if (d_host != nullptr) from_float(dh, d_host + b, m);
    }
    return sum;
  }
}

}  // namespace

at::Tensor blend_forward_cpu(const at::Tensor& host, const at::Tensor& seed, const std::optional<at::Tensor>& alpha,
                             double alpha_value) {
  const ForwardInputs in = forward_inputs(host, seed, alpha);
  const int64_t groups = in.groups;
  const at::Tensor &h = in.host, &s = in.seed;
  auto out = empty_output(host.sizes(), host.options().memory_format(in.format));
  const int64_t numel = host.numel();
  if (numel == 0) return out;
  const at::Tensor alpha_k = alpha.has_value() ? alpha_for_kernel(*alpha) : at::Tensor();
  const AlphaArg alphas = alpha_arg(alpha_k);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, host.scalar_type(), "blend_forward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc value = FloatAlpha<acc>(alpha_value).value;
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const Tasks tasks(groups, numel / groups);
    at::parallel_for(0, tasks.count, tasks.grain, [&](int64_t first, int64_t last) {
      for (int64_t t = first; t < last; ++t) {
        const acc a = applied_alpha<scalar_t>(alphas, tasks.group(t), value);
        const int64_t b = tasks.begin(t), n = tasks.length(t);
        lerp_span<scalar_t>(op + b, hp + b, sp + b, n, a);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> blend_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& host, const std::optional<at::Tensor>& seed,
    const std::optional<at::Tensor>& alpha, double alpha_value, bool need_host_grad, bool need_seed_grad,
    bool need_alpha_grad) {
  const BackwardInputs in = backward_inputs(grad_out, host, seed, alpha, need_alpha_grad);
  const int64_t groups = in.groups;
  const at::Tensor &g = in.grad, &h = in.host, &s = in.seed;
  const auto grad_options = grad_out.options().memory_format(in.format);
  const auto none = at::empty({0}, grad_out.options());
  at::Tensor d_host = need_host_grad ? empty_output(grad_out.sizes(), grad_options) : none;
  at::Tensor d_seed = need_seed_grad ? empty_output(grad_out.sizes(), grad_options) : none;
  at::Tensor d_alpha = none;
  const int64_t numel = grad_out.numel();
  const at::Tensor alpha_k = alpha.has_value() ? alpha_for_kernel(*alpha) : at::Tensor();
  const AlphaArg alphas = alpha_arg(alpha_k);
  const auto sum_dtype = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tasks tasks(groups, groups == 0 ? 0 : numel / groups);
  at::Tensor partials = need_alpha_grad ? at::empty({numel == 0 ? 0 : tasks.count}, grad_out.options().dtype(sum_dtype))
                                        : at::Tensor();

  if (numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "blend_backward_cpu", [&] {
      using acc = acc_t<scalar_t>;
      const FloatAlpha<acc> value(alpha_value);
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* hp = need_alpha_grad ? h.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* sp = need_alpha_grad ? s.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* dhp = need_host_grad ? d_host.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* dsp = need_seed_grad ? d_seed.mutable_data_ptr<scalar_t>() : nullptr;
      acc* part = need_alpha_grad ? partials.mutable_data_ptr<acc>() : nullptr;
      at::parallel_for(0, tasks.count, tasks.grain, [&](int64_t first, int64_t last) {
        for (int64_t t = first; t < last; ++t) {
          const auto scales = grad_scales<scalar_t>(alphas, tasks.group(t), value.value, value.complement);
          const int64_t b = tasks.begin(t), n = tasks.length(t);
          const acc partial = backward_span<scalar_t>(dhp == nullptr ? nullptr : dhp + b,
                                                      dsp == nullptr ? nullptr : dsp + b, gp + b,
                                                      hp == nullptr ? nullptr : hp + b,
                                                      sp == nullptr ? nullptr : sp + b, n, scales);
          if (part != nullptr) part[t] = partial;
        }
      });
    });
  }

  if (need_alpha_grad) {
    auto sums = at::zeros({groups}, grad_out.options().dtype(sum_dtype));
    if (numel > 0) {
      AT_DISPATCH_FLOATING_TYPES(sum_dtype, "blend_alpha_grad_cpu", [&] {
        const scalar_t* part = partials.const_data_ptr<scalar_t>();
        scalar_t* out = sums.mutable_data_ptr<scalar_t>();
        for (int64_t t = 0; t < tasks.count; ++t) out[tasks.group(t)] += part[t];
        for (int64_t gi = 0; gi < groups; ++gi) {
          if (!clamp_passes_grad(alphas[gi])) out[gi] = scalar_t(0);
        }
      });
    }
    d_alpha = alpha_grad_like(sums, *alpha);
  }
  return {d_host, d_seed, d_alpha};
}

// Whether host can be shared copy-on-write: the whole of a plain allocation (a view into a larger
// buffer would keep all of it alive), laid out in a format the kernels keep, in memory whose
// DataPtr the copy-on-write machinery can take over (not pinned or mapped memory, for example).
bool can_share_copy_on_write(const at::Tensor& host, at::MemoryFormat format) {
  if (!host.is_contiguous(format) || host.storage_offset() != 0) return false;
  const c10::StorageImpl& storage = *host.storage().unsafeGetStorageImpl();
  return storage.nbytes() == host.nbytes() &&
         (c10::impl::cow::has_simple_data_ptr(storage) || c10::impl::cow::is_cow_data_ptr(storage.data_ptr()));
}

// The output has host's values and is a tensor of its own. No byte needs to move for that: a
// copy-on-write clone shares host's memory and copies it only if host or the output is written
// later (by then usually one of them is gone, and the other takes the memory over). Other
// layouts get one copy of the bits (NaN payloads and -0.0 included) into the kernels' format:
// a parallel memcpy when host is dense in it, else a gather straight from host's strides.
at::Tensor ste_forward_cpu(const at::Tensor& host, const at::Tensor& seed) {
  check_pair(host, seed, "ste_forward");
  const auto format = dense_format(host);
  if (can_share_copy_on_write(host, format)) return at::_lazy_clone(host);
  auto out = empty_output(host.sizes(), host.options().memory_format(format));
  if (!host.is_contiguous(format)) {
    as_bits(out).copy_(as_bits(host));
    return out;
  }
  const int64_t bytes = host.numel() * host.element_size();
  const auto* src = static_cast<const char*>(host.const_data_ptr());
  auto* dst = static_cast<char*>(out.mutable_data_ptr());
  constexpr int64_t kChunkBytes = 1 << 18;
  at::parallel_for(0, bytes, kChunkBytes, [&](int64_t first, int64_t last) {
    std::memcpy(dst + first, src + first, last - first);
  });
  return out;
}

TORCH_LIBRARY_IMPL(esper_fast, CPU, m) {
  m.impl("blend_forward", &blend_forward_cpu);
  m.impl("blend_backward", &blend_backward_cpu);
  m.impl("ste_forward", &ste_forward_cpu);
}

}  // namespace esper_fast::blend
