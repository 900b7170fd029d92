// The metrics accumulator: one int64 tensor shared by the CPU and CUDA kernels. This is the one
// definition of its layout: csrc/esper_fast.cpp exports it to Python (esper_fast._C.metrics_*),
// which reads it from there. Free of ATen: the device code (csrc/cuda/metrics_kernels.cuh)
// includes it; the argument checks are in csrc/metrics_args.h.
#pragma once

#include <cstdint>

namespace esper_fast {
namespace metrics {

// Slots of the state tensor. The loss slot holds a float64 bit pattern. A reduction over ranks
// carries every slot before kBlocksDone and sums the counts kBatches..kErrors.
enum Slot : int64_t {
  kLossSum = 0,     // float64: sum over batches of the batch-mean loss
  kBatches = 1,
  kCorrect = 2,
  kTotal = 3,
  kErrors = 4,      // targets outside [0, C) other than ignore_index
  kBadValue = 5,    // the first such target (lowest row) of the first batch that had one
  kBlocksDone = 6,  // CUDA last-block-done ticket, always 0 between launches
  kHeader = 7,      // then class_total[C], class_correct[C] when per-class counting is on
};
static_assert(kCorrect == kBatches + 1 && kTotal == kBatches + 2 && kErrors == kBatches + 3,
              "the counts a reduction sums are consecutive");
static_assert(kBlocksDone == kBadValue + 1 && kHeader == kBlocksDone + 1,
              "the ticket follows the carried slots, the class counts follow the ticket");

// Indices within a row are int in the CUDA kernels, with room to spare past the row's end.
constexpr int64_t kMaxClasses = int64_t(1) << 30;
// Stacked configurations are the y dimension of a CUDA grid.
constexpr int64_t kMaxConfigs = 65535;

}  // namespace metrics
}  // namespace esper_fast
