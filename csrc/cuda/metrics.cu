// metrics_update and metrics_update_stacked on CUDA: the launchers. The kernels and their launch
// plan are in metrics_kernels.cuh; here the device guard, the stream, the occupancy query, the
// workspace and the launch.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdint>

#include "cuda/metrics_kernels.cuh"
#include "metrics_args.h"

namespace esper_fast {
namespace metrics {
namespace {

// Blocks of `kernel` (launched with `threads` threads) that are resident at once on the current
// device: a grid-stride grid needs no more, and a larger one runs its last blocks in a second
// wave. `cache` is the caller's, one per kernel, filled per device on first use.
template <typename Kernel>
int64_t device_resident_blocks(Kernel kernel, int threads,
                               std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS>& cache) {
  const auto device = c10::cuda::current_device();
  int per_sm = cache[device].load(std::memory_order_relaxed);
  if (per_sm == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
    per_sm = std::max(per_sm, 1);
    cache[device].store(per_sm, std::memory_order_relaxed);
  }
  return resident_blocks(per_sm, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

// One launch of the row kernel for the row width, its workspace allocated here.
void launch_update(const at::Tensor& logits, const at::Tensor& targets, const double* batch_loss, at::Tensor& state,
                   int64_t ignore_index, const UpdateShape& shape) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "metrics_update_cuda", [&] {
    static_assert(std::is_same_v<math_type<scalar_t>, at::opmath_type<scalar_t>>);
    visit_row_kernel<scalar_t>(shape.classes, [&](auto row_kernel) {
      using K = decltype(row_kernel);
      static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> occupancy{};
      const auto kernel = K::kernel();
      const int64_t resident = device_resident_blocks(kernel, K::kThreads, occupancy);
      const dim3 grid = update_grid(shape.rows, K::kRowsPerBlock, resident, shape.configs);
      const at::Tensor workspace = at::empty({workspace_slots(grid)}, logits.options().dtype(at::kLong));
      kernel<<<grid, K::kThreads, 0, stream>>>(logits.const_data_ptr<scalar_t>(), targets.const_data_ptr<int64_t>(),
                                               batch_loss, state.mutable_data_ptr<int64_t>(),
                                               reinterpret_cast<long long*>(workspace.data_ptr<int64_t>()),
                                               shape.rows, shape.classes, shape.width, ignore_index, shape.per_class);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void metrics_update_cuda(const at::Tensor& logits, const at::Tensor& targets, const c10::optional<at::Tensor>& batch_loss,
                         at::Tensor& state, int64_t ignore_index) {
  const UpdateShape shape = check_update_args("metrics_update", logits, targets, batch_loss, state, false);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor loss_value;
  if (batch_loss.has_value()) loss_value = batch_loss->reshape({1}).to(at::kDouble).contiguous();
  launch_update(logits, targets, batch_loss.has_value() ? loss_value.const_data_ptr<double>() : nullptr, state,
                ignore_index, shape);
}

void metrics_update_stacked_cuda(const at::Tensor& logits, const at::Tensor& targets, at::Tensor& state,
                                 int64_t ignore_index) {
  const UpdateShape shape = check_update_args("metrics_update_stacked", logits, targets, c10::nullopt, state, true);
  const c10::cuda::CUDAGuard guard(logits.device());
  launch_update(logits, targets, nullptr, state, ignore_index, shape);
}

}  // namespace
}  // namespace metrics
}  // namespace esper_fast

TORCH_LIBRARY_IMPL(esper_fast, CUDA, m) {
  m.impl("metrics_update", &esper_fast::metrics::metrics_update_cuda);
  m.impl("metrics_update_stacked", &esper_fast::metrics::metrics_update_stacked_cuda);
}
