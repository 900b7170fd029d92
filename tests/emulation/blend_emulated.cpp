// blend_forward / blend_backward, emulated: the launches csrc/cuda/blend_kernels.cuh plans.
//
// blend_emulated forward  DTYPE NUMEL GROUPS ALPHA(none|float32|float64) ALPHA_VALUE SM_COUNT
//                         MAX_THREADS_PER_SM HOST_OFF SEED_OFF OUT_OFF
//   stdin: host, seed, alpha [GROUPS] (unless none); stdout: out.
// blend_emulated backward DTYPE NUMEL GROUPS ALPHA ALPHA_VALUE SM_COUNT MAX_THREADS_PER_SM
//                         NEED_HOST NEED_SEED NEED_ALPHA GRAD_OFF HOST_OFF SEED_OFF D_HOST_OFF D_SEED_OFF
//   stdin: grad, host and seed (when NEED_ALPHA), alpha; stdout: d_host, d_seed (when wanted),
//   the per-group d_alpha sums in the math type (when NEED_ALPHA).
// Offsets are in elements past a 64-byte boundary. alpha is what blend.h's alpha_for_kernel makes.
#include "cuda_emulation.h"
#include "cuda/blend_kernels.cuh"
#include "dtypes.h"

using namespace emulation_driver;
namespace blend = esper_fast::blend;

namespace {

struct Launch {
  template <typename Kernel, typename... A>
  void operator()(Kernel kernel, dim3 grid, int threads, A... args) const {
    cuda_emulation::launch(kernel, grid, threads, args...);
  }
};

}  // namespace

int main(int argc, char** argv) {
  Args args(argc, argv);
  const std::string op = args.text(), dtype = args.text();
  const int64_t numel = args.integer(), groups = args.integer();
  const std::string alpha_kind = args.text();
  const double alpha_value = args.real();
  const int64_t resident = blend::resident_blocks(static_cast<int>(args.integer()), static_cast<int>(args.integer()));
  if (op != "forward" && op != "backward") usage("op is forward or backward");
  const bool forward = op == "forward";
  bool need_host = false, need_seed = false, need_alpha = false;
  if (!forward) {
    need_host = args.integer() != 0;
    need_seed = args.integer() != 0;
    need_alpha = args.integer() != 0;
  }
  std::vector<int64_t> offsets;
  for (int i = 0; i < (forward ? 3 : 5); ++i) offsets.push_back(args.integer());
  args.done();
  if (numel <= 0 || groups <= 0 || numel % groups != 0) usage("numel > 0, a multiple of groups");
  if (alpha_kind != "none" && alpha_kind != "float32" && alpha_kind != "float64") usage("alpha kind");
  Input in;
  with_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc = esper_fast::math_type<scalar_t>;
    const size_t bytes = sizeof(scalar_t) * numel;
    const size_t alpha_bytes = alpha_kind == "none" ? 0 : (alpha_kind == "float64" ? 8 : 4) * groups;
    auto at = [&](int i) { return sizeof(scalar_t) * offsets[i]; };
    blend::AlphaArg alpha;
    Buffer alpha_buffer(alpha_bytes, 0);
    if (forward) {
      Buffer host(bytes, at(0)), seed(bytes, at(1)), out(bytes, at(2));
      host.read(in);
      seed.read(in);
      alpha_buffer.read(in);
      in.done();
      if (alpha_bytes > 0) alpha = {alpha_buffer.data(), alpha_kind == "float64"};
      blend::launch_forward<scalar_t>(Launch{}, out.data<scalar_t>(), host.data<scalar_t>(), seed.data<scalar_t>(),
                                      alpha, blend::FloatAlpha<acc>(alpha_value).value, numel, groups, resident);
      out.write();
      return;
    }
    Buffer grad(bytes, at(0)), host(need_alpha ? bytes : 0, at(1)), seed(need_alpha ? bytes : 0, at(2));
    Buffer d_host(need_host ? bytes : 0, at(3)), d_seed(need_seed ? bytes : 0, at(4));
    Buffer sums(need_alpha ? sizeof(acc) * groups : 0, 0);
    grad.read(in);
    host.read(in);
    seed.read(in);
    alpha_buffer.read(in);
    in.done();
    if (alpha_bytes > 0) alpha = {alpha_buffer.data(), alpha_kind == "float64"};
    blend::BackwardArgs<scalar_t> p;
    p.grad = grad.data<scalar_t>();
    p.host = need_alpha ? host.data<scalar_t>() : nullptr;
    p.seed = need_alpha ? seed.data<scalar_t>() : nullptr;
    p.d_host = need_host ? d_host.data<scalar_t>() : nullptr;
    p.d_seed = need_seed ? d_seed.data<scalar_t>() : nullptr;
    p.alpha_grad = need_alpha ? sums.data<acc>() : nullptr;
    const blend::BackwardPlan plan = blend::plan_backward(p, numel, groups);
    Buffer tile_sums(sizeof(acc) * plan.tile_sums, 0);
    const blend::FloatAlpha<acc> value(alpha_value);
    blend::launch_backward<scalar_t>(Launch{}, plan, p, plan.tile_sums > 0 ? tile_sums.data<acc>() : nullptr, alpha,
                                     value.value, value.complement, numel, groups, resident);
    d_host.write();
    d_seed.write();
    sums.write();
  });
  return 0;
}
