// The metrics accumulator: one int64 tensor shared by the CPU and CUDA kernels. This is the one
// definition of its layout: csrc/esper_fast.cpp exports it to Python (esper_fast._C.metrics_*),
// which reads it from there.
#pragma once

#include <ATen/ATen.h>

#include "common.h"

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

// Checks shared by both backends; returns whether per-class counting is on.
inline bool check_update_args(const at::Tensor& logits, const at::Tensor& targets,
                              const c10::optional<at::Tensor>& batch_loss, const at::Tensor& state) {
  TORCH_CHECK(logits.dim() == 2, "esper_fast.metrics_update: logits must be [N, C], got shape ", logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "esper_fast.metrics_update: logits must be float64, float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(logits.size(1) > 0, "esper_fast.metrics_update: logits need at least one class (C >= 1)");
  TORCH_CHECK(logits.size(1) <= kMaxClasses, "esper_fast.metrics_update: at most ", kMaxClasses,
              " classes, got C = ", logits.size(1));
  TORCH_CHECK(logits.is_contiguous(),
              "esper_fast.metrics_update: logits rows must be contiguous (call .contiguous())");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), "esper_fast.metrics_update: targets must be [N] = [",
              logits.size(0), "], got shape ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "esper_fast.metrics_update: targets must be int64, got ",
              targets.scalar_type());
  TORCH_CHECK(targets.is_contiguous(), "esper_fast.metrics_update: targets must be contiguous");
  TORCH_CHECK(state.scalar_type() == at::kLong && state.dim() == 1 && state.is_contiguous(),
              "esper_fast.metrics_update: state must be a contiguous 1-d int64 tensor");
  const int64_t classes = logits.size(1);
  const bool per_class = state.numel() == kHeader + 2 * classes;
  TORCH_CHECK(per_class || state.numel() == kHeader, "esper_fast.metrics_update: state has ", state.numel(),
              " slots; expected ", static_cast<int64_t>(kHeader), " or ", kHeader + 2 * classes, " for C = ", classes);
  check_same_device(logits, "logits", targets, "targets");
  check_same_device(logits, "logits", state, "state");
  if (batch_loss.has_value()) {
    TORCH_CHECK(batch_loss->numel() == 1, "esper_fast.metrics_update: batch_loss must hold one value, got shape ",
                batch_loss->sizes());
    check_floating(*batch_loss, "batch_loss");
    check_same_device(logits, "logits", *batch_loss, "batch_loss");
  }
  return per_class;
}

}  // namespace metrics
}  // namespace esper_fast
