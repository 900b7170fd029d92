// Snapshot copy on CUDA: many tensors to/from one flat buffer in a few launches.
//
// Host buffer (pinned): tensors under kStagedCopyBytes are gathered by one multi-tensor
// kernel into a device staging range that mirrors their span of the buffer, which then
// moves in one cudaMemcpyAsync; larger tensors go straight across with their own
// cudaMemcpyAsync, where the per-copy cost is lost in the transfer. Device buffer: one
// multi-tensor kernel copies everything. Nothing synchronises: the caller records an event.
// A staged transfer also writes the padding between its small tensors, so a buffer packed
// in several calls (one per device) keeps each call's small tensors in one run of offsets.
#include <torch/library.h>

#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <vector>

#include "cuda/snapshot_kernels.cuh"
#include "snapshot.h"

namespace esper_fast {
namespace {

// A staging range never spans more than this, so the device scratch stays bounded.
constexpr int64_t kMaxStagingBytes = 64 << 20;

// Enqueues all copies on `stream` (snapshot_kernels.cuh plans the launches).
void multi_tensor_copy(const std::vector<ByteCopy>& copies, cudaStream_t stream) {
  auto launch = [stream](auto kernel, dim3 grid, int threads, const ByteCopyBatch& batch) {
    kernel<<<grid, threads, 0, stream>>>(batch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  launch_multi_tensor_copy(launch, copies.data(), copies.size());
}

int64_t nbytes_of(const at::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

// Tensor i packed at `offset` of the memory at `base` on `device`, with contiguous strides.
at::Tensor region_view(uint8_t* base, int64_t offset, const at::Tensor& t, const at::Device& device) {
  return at::from_blob(base + offset, t.sizes(), t.options().device(device));
}

// Consecutive (by offset) small tensors whose buffer span fits one staging range.
struct StagingGroup {
  int64_t lo = 0;
  int64_t hi = 0;
  std::vector<size_t> members;
};

std::vector<StagingGroup> staging_groups(at::TensorList tensors, at::IntArrayRef offsets) {
  std::vector<size_t> small;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t n = nbytes_of(tensors[i]);
    if (n > 0 && n < kStagedCopyBytes) small.push_back(i);
  }
  std::sort(small.begin(), small.end(), [&](size_t a, size_t b) { return offsets[a] < offsets[b]; });
  std::vector<StagingGroup> groups;
  for (size_t i : small) {
    const int64_t end = offsets[i] + nbytes_of(tensors[i]);
    if (groups.empty() || end - groups.back().lo > kMaxStagingBytes) {
      groups.push_back({offsets[i], end, {}});
    }
    groups.back().hi = std::max(groups.back().hi, end);
    groups.back().members.push_back(i);
  }
  return groups;
}

// The staging range starts at this offset: scratch addresses then share the buffer
// offsets' alignment (element size, and 16 bytes for the vector copy).
int64_t staging_origin(const StagingGroup& group) { return group.lo - group.lo % 16; }

// Tensor::copy_'s rule for pinned memory: the caching host allocator must not hand the
// buffer's block out again (once the buffer is freed) before this stream has done with it.
void hold_host_buffer_for_stream(const at::Tensor& buffer) {
  const c10::DataPtr& data = buffer.storage().data_ptr();
  at::getHostAllocator(at::kCUDA)->record_event(data.get(), data.get_context(),
                                                at::cuda::getCurrentCUDAStream().unwrap());
}

at::Device common_device(at::TensorList tensors, const at::Tensor& buffer) {
  const at::Device device = tensors[0].device();
  TORCH_CHECK(device.is_cuda(), "esper_fast: snapshot tensors must be CUDA tensors here, got ", device);
  TORCH_CHECK(buffer.is_cpu() || buffer.device() == device, "esper_fast: snapshot buffer is on ", buffer.device(),
              " but the tensors are on ", device, "; use a host buffer or one on the tensors' device");
  return device;
}

void snapshot_pack_cuda(at::TensorList tensors, const at::Tensor& buffer, at::IntArrayRef offsets) {
  check_snapshot_args(tensors, buffer, offsets);
  if (tensors.empty()) return;
  const at::Device device = common_device(tensors, buffer);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  uint8_t* base = buffer.data_ptr<uint8_t>();

  if (buffer.is_cuda()) {
    std::vector<ByteCopy> copies;
    for (size_t i = 0; i < tensors.size(); ++i) {
      const at::Tensor& t = tensors[i];
      if (t.numel() == 0) continue;
      if (t.is_contiguous()) {
        copies.push_back({static_cast<const uint8_t*>(t.const_data_ptr()), base + offsets[i], nbytes_of(t)});
      } else {
        region_view(base, offsets[i], t, device).copy_(t);  // strided gather, stream-ordered
      }
    }
    multi_tensor_copy(copies, stream);
    return;
  }

  // Staged small tensors first: a staging range may cover bytes of large tensors between
  // small ones, and the direct copies enqueued after it overwrite those bytes in order.
  for (const StagingGroup& group : staging_groups(tensors, offsets)) {
    const int64_t origin = staging_origin(group);
    at::Tensor staging = at::empty({group.hi - origin}, at::TensorOptions().dtype(at::kByte).device(device));
    uint8_t* scratch = staging.data_ptr<uint8_t>() - origin;  // indexed by buffer offset
    std::vector<ByteCopy> copies;
    for (size_t i : group.members) {
      const at::Tensor& t = tensors[i];
      if (t.is_contiguous()) {
        copies.push_back({static_cast<const uint8_t*>(t.const_data_ptr()), scratch + offsets[i], nbytes_of(t)});
      } else {
        region_view(scratch, offsets[i], t, device).copy_(t);
      }
    }
    multi_tensor_copy(copies, stream);
    C10_CUDA_CHECK(cudaMemcpyAsync(base + group.lo, scratch + group.lo, group.hi - group.lo, cudaMemcpyDeviceToHost,
                                   stream));
    // `staging` returns to the caching allocator, which reuses it only in this stream's order.
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t n = nbytes_of(tensors[i]);
    if (n < kStagedCopyBytes) continue;
    const at::Tensor source = tensors[i].contiguous();
    C10_CUDA_CHECK(cudaMemcpyAsync(base + offsets[i], source.const_data_ptr(), n, cudaMemcpyDeviceToHost, stream));
  }
  hold_host_buffer_for_stream(buffer);
}

void snapshot_unpack_cuda(at::TensorList tensors, const at::Tensor& buffer, at::IntArrayRef offsets) {
  check_snapshot_args(tensors, buffer, offsets);
  if (tensors.empty()) return;
  const at::Device device = common_device(tensors, buffer);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  uint8_t* base = buffer.data_ptr<uint8_t>();

  if (buffer.is_cuda()) {
    std::vector<ByteCopy> copies;
    for (size_t i = 0; i < tensors.size(); ++i) {
      at::Tensor t = tensors[i];
      if (t.numel() == 0) continue;
      if (t.is_contiguous()) {
        copies.push_back({base + offsets[i], static_cast<uint8_t*>(t.data_ptr()), nbytes_of(t)});
      } else {
        t.copy_(region_view(base, offsets[i], t, device));  // strided scatter, stream-ordered
      }
    }
    multi_tensor_copy(copies, stream);
    return;
  }

  for (const StagingGroup& group : staging_groups(tensors, offsets)) {
    const int64_t origin = staging_origin(group);
    at::Tensor staging = at::empty({group.hi - origin}, at::TensorOptions().dtype(at::kByte).device(device));
    uint8_t* scratch = staging.data_ptr<uint8_t>() - origin;
    C10_CUDA_CHECK(cudaMemcpyAsync(scratch + group.lo, base + group.lo, group.hi - group.lo, cudaMemcpyHostToDevice,
                                   stream));
    std::vector<ByteCopy> copies;
    for (size_t i : group.members) {
      at::Tensor t = tensors[i];
      if (t.is_contiguous()) {
        copies.push_back({scratch + offsets[i], static_cast<uint8_t*>(t.data_ptr()), nbytes_of(t)});
      } else {
        t.copy_(region_view(scratch, offsets[i], t, device));
      }
    }
    multi_tensor_copy(copies, stream);
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    at::Tensor t = tensors[i];
    const int64_t n = nbytes_of(t);
    if (n < kStagedCopyBytes) continue;
    if (t.is_contiguous()) {
      C10_CUDA_CHECK(cudaMemcpyAsync(t.data_ptr(), base + offsets[i], n, cudaMemcpyHostToDevice, stream));
    } else {
      at::Tensor landing = at::empty(t.sizes(), t.options());
      C10_CUDA_CHECK(cudaMemcpyAsync(landing.data_ptr(), base + offsets[i], n, cudaMemcpyHostToDevice, stream));
      t.copy_(landing);
    }
  }
  hold_host_buffer_for_stream(buffer);
}

}  // namespace

TORCH_LIBRARY_IMPL(esper_fast, CUDA, m) {
  m.impl("snapshot_pack", &snapshot_pack_cuda);
  m.impl("snapshot_unpack", &snapshot_unpack_cuda);
}

}  // namespace esper_fast
