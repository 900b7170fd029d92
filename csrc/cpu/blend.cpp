// CPU kernels of the blend family: lerp forward, its fused backward, and the STE copy.
//
// Work is cut into tasks that never straddle a sample (one alpha value per task), so the
// per-sample d_alpha is a sum of per-task partials with no atomics and a fixed order.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "blend.h"

namespace esper_fast::blend {
namespace {

using at::vec::Vectorized;

// The extension is built for the baseline ISA; the hot loops are also compiled for AVX2 and
// AVX-512 and the best one the CPU supports is picked when the library loads.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ESPER_FAST_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ESPER_FAST_ISA_CLONES
#endif

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

// A fresh output. A large one (always its own mapping) is offered transparent huge pages: the
// first-touch page faults of 4 KiB pages cost more than the blend itself at that size.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  constexpr size_t kMinBytes = size_t(32) << 20;
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

// `Vectorized<scalar_t>::size()` elements as float math vectors (two for half/bfloat16).
template <typename scalar_t>
struct MathVec {
  static constexpr bool kReduced = at::is_reduced_floating_point_v<scalar_t>;
  using fVec = Vectorized<acc_t<scalar_t>>;
  static constexpr int kParts = kReduced ? 2 : 1;
  static constexpr int64_t kSize = Vectorized<scalar_t>::size();

  fVec v[kParts];

  static MathVec load(const scalar_t* p) {
    MathVec m;
    auto raw = Vectorized<scalar_t>::loadu(p);
    if constexpr (kReduced) {
      std::tie(m.v[0], m.v[1]) = at::vec::convert_to_float<scalar_t>(raw);
    } else {
      m.v[0] = raw;
    }
    return m;
  }

  void store(scalar_t* p) const {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    } else {
      v[0].store(p);
    }
  }
};

template <typename scalar_t, bool kSmallAlpha>
ESPER_FAST_ISA_CLONES void lerp_span(scalar_t* out, const scalar_t* host, const scalar_t* seed, int64_t n, acc_t<scalar_t> a) {
  using M = MathVec<scalar_t>;
  using acc = acc_t<scalar_t>;
  const typename M::fVec va(a), vb(acc(1) - a);
  int64_t i = 0;
  for (; i + M::kSize <= n; i += M::kSize) {
    const M h = M::load(host + i), s = M::load(seed + i);
    M y;
    for (int p = 0; p < M::kParts; ++p) {
      y.v[p] = kSmallAlpha ? h.v[p] + va * (s.v[p] - h.v[p]) : s.v[p] - (s.v[p] - h.v[p]) * vb;
    }
    y.store(out + i);
  }
  for (; i < n; ++i) out[i] = static_cast<scalar_t>(lerp_value(acc(host[i]), acc(seed[i]), a));
}

// d_seed = a * g and d_host = (1 - a) * g (each only when its pointer is set); returns
// sum(g * (seed - host)) over the span when host and seed are given, else 0.
template <typename scalar_t>
ESPER_FAST_ISA_CLONES acc_t<scalar_t> backward_span(scalar_t* d_host, scalar_t* d_seed, const scalar_t* grad, const scalar_t* host,
                              const scalar_t* seed, int64_t n, acc_t<scalar_t> a) {
  using M = MathVec<scalar_t>;
  using acc = acc_t<scalar_t>;
  const typename M::fVec va(a), vb(acc(1) - a);
  typename M::fVec vsum(acc(0));
  const bool reduce = host != nullptr;
  int64_t i = 0;
  for (; i + M::kSize <= n; i += M::kSize) {
    const M g = M::load(grad + i);
    if (d_seed != nullptr) {
      M out;
      for (int p = 0; p < M::kParts; ++p) out.v[p] = va * g.v[p];
      out.store(d_seed + i);
    }
    if (d_host != nullptr) {
      M out;
      for (int p = 0; p < M::kParts; ++p) out.v[p] = vb * g.v[p];
      out.store(d_host + i);
    }
    if (reduce) {
      const M h = M::load(host + i), s = M::load(seed + i);
      for (int p = 0; p < M::kParts; ++p) vsum = vsum + g.v[p] * (s.v[p] - h.v[p]);
    }
  }
  acc sum = reduce ? at::vec::vec_reduce_all<acc>([](auto x, auto y) { return x + y; }, vsum) : acc(0);
  for (; i < n; ++i) {
    const acc g = grad[i];
    if (d_seed != nullptr) d_seed[i] = static_cast<scalar_t>(a * g);
    if (d_host != nullptr) d_host[i] = static_cast<scalar_t>((acc(1) - a) * g);
    if (reduce) sum += g * (acc(seed[i]) - acc(host[i]));
  }
  return sum;
}

}  // namespace

at::Tensor blend_forward_cpu(const at::Tensor& host, const at::Tensor& seed, const std::optional<at::Tensor>& alpha,
                             double alpha_value) {
  check_pair(host, seed, "blend_forward");
  const int64_t groups = alpha.has_value() ? alpha_groups(*alpha, host, "blend_forward") : 1;
  const auto format = dense_format(host);
  const auto h = in_format(host, format);
  const auto s = in_format(seed, format);
  auto out = empty_output(host.sizes(), host.options().memory_format(format));
  const int64_t numel = host.numel();
  if (numel == 0) return out;
  const at::Tensor alpha_k = alpha.has_value() ? alpha_for_kernel(*alpha, host.scalar_type()) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, host.scalar_type(), "blend_forward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc* alpha_ptr = alpha_k.defined() ? alpha_k.data_ptr<acc>() : nullptr;
    const acc value = clamp_unit(static_cast<acc>(alpha_value));
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const Tasks tasks(groups, numel / groups);
    at::parallel_for(0, tasks.count, tasks.grain, [&](int64_t first, int64_t last) {
      for (int64_t t = first; t < last; ++t) {
        const acc a = applied_alpha<scalar_t>(alpha_ptr, tasks.group(t), value);
        const int64_t b = tasks.begin(t), n = tasks.length(t);
        if (a < acc(0.5)) {
          lerp_span<scalar_t, true>(op + b, hp + b, sp + b, n, a);
        } else {
          lerp_span<scalar_t, false>(op + b, hp + b, sp + b, n, a);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> blend_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& host, const std::optional<at::Tensor>& seed,
    const std::optional<at::Tensor>& alpha, double alpha_value, bool need_host_grad, bool need_seed_grad,
    bool need_alpha_grad) {
  check_floating(grad_out, "grad_out");
  TORCH_CHECK(!need_alpha_grad || (host.has_value() && seed.has_value() && alpha.has_value()),
              "esper_fast.blend_backward: need_alpha_grad needs host, seed and alpha");
  const int64_t groups = alpha.has_value() ? alpha_groups(*alpha, grad_out, "blend_backward") : 1;
  const auto format = dense_format(grad_out);
  const auto g = in_format(grad_out, format);
  at::Tensor h, s;
  if (need_alpha_grad) {
    check_pair(*host, *seed, "blend_backward");
    check_same_dtype(grad_out, "grad_out", *host, "host");
    check_same_device(grad_out, "grad_out", *host, "host");
    check_same_shape(grad_out, "grad_out", *host, "host");
    h = in_format(*host, format);
    s = in_format(*seed, format);
  }
  const auto grad_options = grad_out.options().memory_format(format);
  const auto none = at::empty({0}, grad_out.options());
  at::Tensor d_host = need_host_grad ? empty_output(grad_out.sizes(), grad_options) : none;
  at::Tensor d_seed = need_seed_grad ? empty_output(grad_out.sizes(), grad_options) : none;
  at::Tensor d_alpha = none;
  const int64_t numel = grad_out.numel();
  const at::Tensor alpha_k = alpha.has_value() ? alpha_for_kernel(*alpha, grad_out.scalar_type()) : at::Tensor();
  const auto sum_dtype = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tasks tasks(groups, groups == 0 ? 0 : numel / groups);
  at::Tensor partials = need_alpha_grad ? at::empty({numel == 0 ? 0 : tasks.count}, grad_out.options().dtype(sum_dtype))
                                        : at::Tensor();

  if (numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "blend_backward_cpu", [&] {
      using acc = acc_t<scalar_t>;
      const acc* alpha_ptr = alpha_k.defined() ? alpha_k.data_ptr<acc>() : nullptr;
      const acc value = clamp_unit(static_cast<acc>(alpha_value));
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* hp = need_alpha_grad ? h.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* sp = need_alpha_grad ? s.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* dhp = need_host_grad ? d_host.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* dsp = need_seed_grad ? d_seed.mutable_data_ptr<scalar_t>() : nullptr;
      acc* part = need_alpha_grad ? partials.mutable_data_ptr<acc>() : nullptr;
      at::parallel_for(0, tasks.count, tasks.grain, [&](int64_t first, int64_t last) {
        for (int64_t t = first; t < last; ++t) {
          const acc a = applied_alpha<scalar_t>(alpha_ptr, tasks.group(t), value);
          const int64_t b = tasks.begin(t), n = tasks.length(t);
          const acc partial = backward_span<scalar_t>(dhp == nullptr ? nullptr : dhp + b,
                                                      dsp == nullptr ? nullptr : dsp + b, gp + b,
                                                      hp == nullptr ? nullptr : hp + b,
                                                      sp == nullptr ? nullptr : sp + b, n, a);
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
        const scalar_t* alpha_ptr = alpha_k.const_data_ptr<scalar_t>();
        scalar_t* out = sums.mutable_data_ptr<scalar_t>();
        for (int64_t t = 0; t < tasks.count; ++t) out[tasks.group(t)] += part[t];
        for (int64_t gi = 0; gi < groups; ++gi) {
          if (!clamp_passes_grad(alpha_ptr[gi])) out[gi] = scalar_t(0);
        }
      });
    }
    d_alpha = alpha_grad_like(sums, *alpha);
  }
  return {d_host, d_seed, d_alpha};
}

at::Tensor ste_forward_cpu(const at::Tensor& host, const at::Tensor& seed) {
  check_pair(host, seed, "ste_forward");
  const auto format = dense_format(host);
  const auto h = in_format(host, format);
  auto out = empty_output(host.sizes(), host.options().memory_format(format));
  const int64_t bytes = h.numel() * h.element_size();
  const auto* src = static_cast<const char*>(h.const_data_ptr());
  auto* dst = static_cast<char*>(out.mutable_data_ptr());
  // A byte copy: the output is the host bit for bit, NaN payloads and -0.0 included.
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
