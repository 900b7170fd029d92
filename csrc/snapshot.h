// The snapshot family's argument checks and copy policy, shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "common.h"

namespace esper_fast {

// On CUDA with a host buffer, tensors under this many bytes share one staged transfer; larger
// ones are copied on their own. Exported to Python (esper_fast._C.snapshot_staged_copy_bytes),
// whose buffer layout puts the staged tensors first.
constexpr int64_t kStagedCopyBytes = 1 << 20;

// The buffer is a flat uint8 tensor, every tensor's bytes fit at its offset, and all tensors
// live on one device.
inline void check_snapshot_args(at::TensorList tensors, const at::Tensor& buffer, at::IntArrayRef offsets) {
  TORCH_CHECK(buffer.scalar_type() == at::kByte && buffer.dim() == 1 && buffer.is_contiguous(),
              "esper_fast: snapshot buffer must be a contiguous 1-D uint8 tensor, got ", buffer.scalar_type(),
              " with shape ", buffer.sizes());
  TORCH_CHECK(offsets.size() == tensors.size(), "esper_fast: snapshot got ", tensors.size(), " tensors but ",
              offsets.size(), " offsets; give one byte offset per tensor");
  const int64_t capacity = buffer.numel();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == tensors[0].device(), "esper_fast: snapshot tensor ", i, " is on ", t.device(),
                " but tensor 0 is on ", tensors[0].device(), "; pack one device per call");
    const int64_t nbytes = t.numel() * static_cast<int64_t>(t.element_size());
    // offsets[i] + nbytes could wrap past INT64_MAX: compare against capacity - nbytes instead.
    TORCH_CHECK(offsets[i] >= 0 && nbytes <= capacity && offsets[i] <= capacity - nbytes,
                "esper_fast: snapshot tensor ", i, " (", nbytes, " bytes at offset ", offsets[i],
                ") does not fit the ", capacity, "-byte buffer");
    TORCH_CHECK(offsets[i] % static_cast<int64_t>(t.element_size()) == 0, "esper_fast: snapshot offset ",
                offsets[i], " of tensor ", i, " is not a multiple of its element size ", t.element_size());
    // Strided tensors are copied through typed views of the buffer, which must be aligned.
    TORCH_CHECK(reinterpret_cast<uintptr_t>(buffer.const_data_ptr()) % t.element_size() == 0,
                "esper_fast: the snapshot buffer's start address is not a multiple of tensor ", i,
                "'s element size ", t.element_size(), "; do not slice the buffer at an odd byte");
  }
}

}  // namespace esper_fast
