// The metrics ops' argument checks, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include "common.h"
#include "metrics.h"

namespace esper_fast {
namespace metrics {

// What one update covers, its arguments checked: `configs` stacked configurations (1 for
// metrics_update) of `rows` rows each, each with a state of `width` slots.
struct UpdateShape {
  int64_t configs, rows, classes, width;
  bool per_class;
};

// Checks shared by both backends and both ops. metrics_update: logits [N, C], state [width].
// metrics_update_stacked (`stacked`): logits [K * N, C], state [K, width], no batch_loss.
inline UpdateShape check_update_args(const char* op, const at::Tensor& logits, const at::Tensor& targets,
                                     const c10::optional<at::Tensor>& batch_loss, const at::Tensor& state,
                                     bool stacked) {
  TORCH_CHECK(logits.dim() == 2, "esper_fast.", op, ": logits must be ", stacked ? "[K * N, C]" : "[N, C]",
              ", got shape ", logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "esper_fast.", op, ": logits must be float64, float32, float16 or bfloat16, got ", dtype);
  const int64_t classes = logits.size(1);
  TORCH_CHECK(classes > 0, "esper_fast.", op, ": logits need at least one class (C >= 1)");
  TORCH_CHECK(classes <= kMaxClasses, "esper_fast.", op, ": at most ", kMaxClasses, " classes, got C = ", classes);
  TORCH_CHECK(logits.is_contiguous(), "esper_fast.", op, ": logits rows must be contiguous (call .contiguous())");
  TORCH_CHECK(state.scalar_type() == at::kLong && state.dim() == (stacked ? 2 : 1) && state.is_contiguous(),
              "esper_fast.", op, ": state must be a contiguous ", stacked ? "2-d [K, slots]" : "1-d",
              " int64 tensor, got ", state.scalar_type(), " of shape ", state.sizes());
  UpdateShape shape;
  shape.configs = stacked ? state.size(0) : 1;
  TORCH_CHECK(shape.configs >= 1 && shape.configs <= kMaxConfigs, "esper_fast.", op, ": 1 to ", kMaxConfigs,
              " configurations (state rows), got ", shape.configs);
  const bool rows_match = targets.dim() == 1 && targets.size(0) * shape.configs == logits.size(0);
  if (stacked) {
    TORCH_CHECK(rows_match, "esper_fast.", op, ": targets must be [N] with K * N = ", logits.size(0),
                " logits rows for K = ", shape.configs, " configurations, got shape ", targets.sizes());
  } else {
    TORCH_CHECK(rows_match, "esper_fast.", op, ": targets must be [N] = [", logits.size(0), "], got shape ",
                targets.sizes());
  }
  TORCH_CHECK(targets.scalar_type() == at::kLong, "esper_fast.", op, ": targets must be int64, got ",
              targets.scalar_type());
  TORCH_CHECK(targets.is_contiguous(), "esper_fast.", op, ": targets must be contiguous");
  shape.rows = targets.size(0);
  shape.classes = classes;
  shape.width = state.size(-1);
  shape.per_class = shape.width == kHeader + 2 * classes;
  TORCH_CHECK(shape.per_class || shape.width == kHeader, "esper_fast.", op, ": state has ", shape.width,
              " slots", stacked ? " per configuration" : "", "; expected ", static_cast<int64_t>(kHeader), " or ",
              kHeader + 2 * classes, " for C = ", classes);
  check_same_device(logits, "logits", targets, "targets");
  check_same_device(logits, "logits", state, "state");
  if (batch_loss.has_value()) {
    TORCH_CHECK(batch_loss->numel() == 1, "esper_fast.", op, ": batch_loss must hold one value, got shape ",
                batch_loss->sizes());
    check_floating(*batch_loss, "batch_loss");
    check_same_device(logits, "logits", *batch_loss, "batch_loss");
  }
  return shape;
}

}  // namespace metrics
}  // namespace esper_fast
