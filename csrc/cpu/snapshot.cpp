// Snapshot copy on CPU: every tensor's bytes to/from one flat buffer, as one parallel memcpy.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "snapshot.h"

namespace esper_fast {

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
