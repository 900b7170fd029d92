// Every esper_fast operator schema, declared once. Backends add kernels with
// TORCH_LIBRARY_IMPL(esper_fast, CPU|CUDA, m) in csrc/cpu and csrc/cuda, which hold kernels
// only; what both devices share sits beside this file (csrc/<family>.h: checks and input
// preparation; csrc/blend_autograd.cpp: the blend family's autograd).
#include <Python.h>
#include <torch/library.h>

#include "metrics.h"
#include "snapshot.h"

extern "C" {
// `from esper_fast import _C` loads this library (and with it the registrations below)
// without pybind11. Its integer constants are the facts Python must agree with the kernels on:
// `cuda_compiled` (whether CUDA kernels were built in), the metrics state layout
// (esper_fast/ops/metrics.py) and the snapshot staging threshold (esper_fast/ops/snapshot.py).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef ESPER_FAST_WITH_CUDA
  constexpr long kCudaCompiled = 1;
#else
  constexpr long kCudaCompiled = 0;
#endif
  namespace metrics = esper_fast::metrics;
  const struct {
    const char* name;
    long value;
  } constants[] = {
      {"cuda_compiled", kCudaCompiled},
      {"metrics_slot_loss_sum", metrics::kLossSum},
      {"metrics_slot_batches", metrics::kBatches},
      {"metrics_slot_correct", metrics::kCorrect},
      {"metrics_slot_total", metrics::kTotal},
      {"metrics_slot_errors", metrics::kErrors},
      {"metrics_slot_bad_value", metrics::kBadValue},
      {"metrics_slot_blocks_done", metrics::kBlocksDone},
      {"metrics_header", metrics::kHeader},
      {"snapshot_staged_copy_bytes", esper_fast::kStagedCopyBytes},
  };
  for (const auto& constant : constants) {
    if (PyModule_AddIntConstant(module, constant.name, constant.value) < 0) {
      Py_DECREF(module);
      return nullptr;
    }
  }
  return module;
}
}

TORCH_LIBRARY(esper_fast, m) {
  // ---- blend family (csrc/cpu/blend.cpp, csrc/cuda/blend.cu, csrc/blend_autograd.cpp,
  //      esper_fast/ops/blend.py) ----
  // y = host + a * (seed - host), a = clamp(alpha[b] if alpha is given else alpha_value, 0, 1):
  // alpha holds one value, or one per sample b of the batch (leading) dimension.
  m.def("blend_forward(Tensor host, Tensor seed, Tensor? alpha, float alpha_value) -> Tensor");
  // (d_host, d_seed, d_alpha) in one pass over grad_out; a gradient not asked for comes back
  // as an empty tensor. host and seed are read only for d_alpha.
  m.def(
      "blend_backward(Tensor grad_out, Tensor? host, Tensor? seed, Tensor? alpha, float alpha_value, "
      "bool need_host_grad, bool need_seed_grad, bool need_alpha_grad) -> (Tensor, Tensor, Tensor)");
  // Straight-through estimator: y == host bit for bit; the gradient goes to host and seed alike.
  // y is a tensor of its own; on CPU it shares host's memory copy-on-write until either is written.
  m.def("ste_forward(Tensor host, Tensor seed) -> Tensor");
  // ---- end blend family ----



  // ---- metrics family (csrc/cpu/metrics.cpp, csrc/cuda/metrics.cu, esper_fast/ops/metrics.py) ----
  // One pass over logits [N, C] and targets [N] adding into the int64 accumulator `state`
  // (layout in csrc/metrics.h): cross-entropy of the batch mean (or `batch_loss` when
  // given), argmax == target count, row count, per-class totals/correct when state holds them,
  // and an error count plus one offending value for targets outside [0, C) other than ignore_index.
  // The CUDA kernel's last block updates `state` with plain read-modify-writes: updates of one
  // state tensor must be ordered (one stream, or streams ordered by events); different state
  // tensors may be updated from different streams at once.
  m.def(
      "metrics_update(Tensor logits, Tensor targets, Tensor? batch_loss, Tensor(a!) state, "
      "int ignore_index) -> ()");
  // metrics_update for K configurations evaluated together, in one call: logits [K * N, C] (rows
  // k * N .. (k + 1) * N - 1 are configuration k's), targets [N] shared by all, state [K, slots]
  // (row k: configuration k's accumulator, as metrics_update's). Each row of `state` gets exactly
  // what metrics_update of its configuration's rows alone would add (the kernel's cross-entropy;
  // no batch_loss), bit for bit. The same ordering rule holds for `state`.
  m.def("metrics_update_stacked(Tensor logits, Tensor targets, Tensor(a!) state, int ignore_index) -> ()");
  // ---- end metrics family ----



  // ---- snapshot family (csrc/cpu/snapshot.cpp, csrc/cuda/snapshot.cu, esper_fast/ops/snapshot.py) ----
  // Copies each tensor's bytes (row-major, whatever its strides) into the flat uint8 `buffer`
  // at the byte offset `offsets[i]`. The buffer may be host memory (pinned for CUDA tensors)
  // or device memory; CUDA copies are enqueued on the current stream and not synchronised.
  m.def("snapshot_pack(Tensor[] tensors, Tensor(a!) buffer, int[] offsets) -> ()");
  // The inverse: copies the bytes at `offsets[i]` back into `tensors[i]`, in place.
  m.def("snapshot_unpack(Tensor(a!)[] tensors, Tensor buffer, int[] offsets) -> ()");
  // ---- end snapshot family ----
}
