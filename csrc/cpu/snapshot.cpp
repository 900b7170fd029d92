// Snapshot copy on CPU: every tensor's bytes to/from one flat buffer, as one parallel memcpy.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace esper_fast {

// Shared by the CPU and CUDA kernels: the buffer is a flat uint8 tensor, every tensor's
// bytes fit at its offset, and all tensors live on one device.
void check_snapshot_args(at::TensorList tensors, const at::Tensor& buffer, at::IntArrayRef offsets) {
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

namespace {

// Below this many bytes per worker a thread costs more than the copy it would do.
constexpr int64_t kParallelGrainBytes = 256 * 1024;

struct ByteSpan {
  const uint8_t* src;
  uint8_t* dst;
  int64_t nbytes;
};

// The buffer region of tensor `t` at `offset`, shaped like `t` with contiguous strides.
at::Tensor buffer_view(const at::Tensor& buffer, int64_t offset, const at::Tensor& t) {
  return at::from_blob(buffer.data_ptr<uint8_t>() + offset, t.sizes(), t.options().device(buffer.device()));
}

// Copies all spans as if they were one concatenated byte range, split evenly across threads.
void parallel_copy(const std::vector<ByteSpan>& spans) {
  if (spans.empty()) return;
  std::vector<int64_t> starts(spans.size() + 1, 0);
  for (size_t i = 0; i < spans.size(); ++i) starts[i + 1] = starts[i] + spans[i].nbytes;
  at::parallel_for(0, starts.back(), kParallelGrainBytes, [&](int64_t begin, int64_t end) {
    size_t i = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (int64_t pos = begin; pos < end; ++i) {
      const int64_t from = pos - starts[i];
      const int64_t count = std::min(end, starts[i + 1]) - pos;
      std::memcpy(spans[i].dst + from, spans[i].src + from, count);
      pos += count;
    }
  });
}

void snapshot_pack_cpu(at::TensorList tensors, const at::Tensor& buffer, at::IntArrayRef offsets) {
  check_snapshot_args(tensors, buffer, offsets);
  uint8_t* base = buffer.data_ptr<uint8_t>();
  std::vector<ByteSpan> spans;
  spans.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    if (t.is_contiguous()) {
      spans.push_back({static_cast<const uint8_t*>(t.const_data_ptr()), base + offsets[i],
                       t.numel() * static_cast<int64_t>(t.element_size())});
    } else {
      buffer_view(buffer, offsets[i], t).copy_(t);  // strided gather
    }
  }
  parallel_copy(spans);
}

void snapshot_unpack_cpu(at::TensorList tensors, const at::Tensor& buffer, at::IntArrayRef offsets) {
  check_snapshot_args(tensors, buffer, offsets);
  const uint8_t* base = buffer.const_data_ptr<uint8_t>();
  std::vector<ByteSpan> spans;
  spans.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    at::Tensor t = tensors[i];
    if (t.numel() == 0) continue;
    if (t.is_contiguous()) {
      spans.push_back({base + offsets[i], static_cast<uint8_t*>(t.data_ptr()),
                       t.numel() * static_cast<int64_t>(t.element_size())});
    } else {
      t.copy_(buffer_view(buffer, offsets[i], t));  // strided scatter
    }
  }
  parallel_copy(spans);
}

}  // namespace

TORCH_LIBRARY_IMPL(esper_fast, CPU, m) {
  m.impl("snapshot_pack", &snapshot_pack_cpu);
  m.impl("snapshot_unpack", &snapshot_unpack_cpu);
}

}  // namespace esper_fast
