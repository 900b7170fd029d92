// metrics_update / metrics_update_stacked, emulated: `updates` launches of the row kernel that
// csrc/cuda/metrics_kernels.cuh plans for the row width, into one state.
//
// metrics_emulated DTYPE ROWS CLASSES CONFIGS WIDTH IGNORE_INDEX HAS_LOSS UPDATES SM_COUNT
//                  BLOCKS_PER_SM LOGITS_OFFSET_ELEMS
// stdin: logits [CONFIGS * ROWS, CLASSES], targets int64 [ROWS], state int64 [CONFIGS, WIDTH],
//        batch_loss float64 (when HAS_LOSS); stdout: the state after the updates.
#include "cuda_emulation.h"
// The kernels after the runtime: the same text nvcc compiles.
#include "cuda/metrics_kernels.cuh"
#include "dtypes.h"

using namespace emulation_driver;
namespace metrics = esper_fast::metrics;

int main(int argc, char** argv) {
  Args args(argc, argv);
  const std::string dtype = args.text();
  const int64_t rows = args.integer(), classes = args.integer(), configs = args.integer(), width = args.integer();
  const int64_t ignore_index = args.integer();
  const bool has_loss = args.integer() != 0;
  const int64_t updates = args.integer();
  const int sm_count = static_cast<int>(args.integer()), blocks_per_sm = static_cast<int>(args.integer());
  const int64_t logits_offset = args.integer();
  args.done();
  Input in;
  with_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    Buffer logits(sizeof(scalar_t) * configs * rows * classes, sizeof(scalar_t) * logits_offset);
    Buffer targets(sizeof(int64_t) * rows, 0), state(sizeof(int64_t) * configs * width, 0);
    Buffer batch_loss(has_loss ? sizeof(double) : 0, 0);
    logits.read(in);
    targets.read(in);
    state.read(in);
    batch_loss.read(in);
    in.done();
    const bool per_class = width == metrics::kHeader + 2 * classes;
    metrics::visit_row_kernel<scalar_t>(classes, [&](auto row_kernel) {
      using K = decltype(row_kernel);
      const dim3 grid = metrics::update_grid(rows, K::kRowsPerBlock, metrics::resident_blocks(blocks_per_sm, sm_count),
                                             configs);
      for (int64_t u = 0; u < updates; ++u) {
        Buffer workspace(sizeof(long long) * metrics::workspace_slots(grid), 0);  // at::empty: 0xff, not zeros
        cuda_emulation::launch(K::kernel(), grid, K::kThreads, logits.data<scalar_t>(), targets.data<int64_t>(),
                               has_loss ? batch_loss.data<double>() : nullptr, state.data<int64_t>(),
                               workspace.data<long long>(), rows, classes, width, ignore_index, per_class);
      }
    });
    state.write();
  });
  return 0;
}
