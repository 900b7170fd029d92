// Device code of the snapshot copy: one launch copies the bytes of many (source, destination)
// pairs, the apex multi-tensor idea for plain copies. Each blockIdx.y is one pair; the x blocks
// stride over its bytes. No ATen and no launch syntax: csrc/cuda/snapshot.cu launches it on a
// stream, and the test-only CPU emulation (tests/emulation/) compiles this same text with g++.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace esper_fast {

// Pairs per launch: the batch travels as a kernel argument (64 * 24 bytes, well under 4 KiB).
constexpr int kMaxCopiesPerLaunch = 64;
constexpr int kCopyThreads = 256;
constexpr int kMaxCopyBlocksX = 1024;

struct ByteCopy {
  const uint8_t* src;
  uint8_t* dst;
  int64_t nbytes;
};

struct ByteCopyBatch {
  const uint8_t* src[kMaxCopiesPerLaunch];
  uint8_t* dst[kMaxCopiesPerLaunch];
  int64_t nbytes[kMaxCopiesPerLaunch];
};

static __global__ void multi_tensor_copy_kernel(ByteCopyBatch batch) {
  const uint8_t* src = batch.src[blockIdx.y];
  uint8_t* dst = batch.dst[blockIdx.y];
  const int64_t nbytes = batch.nbytes[blockIdx.y];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  // 16-byte vectors when both ends are aligned (the usual case: allocator and buffer offsets
  // are aligned); the tail and misaligned pairs go byte by byte.
  if (((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) & 15) == 0) {
    const int64_t nvec = nbytes / 16;
    const uint4* src_vec = reinterpret_cast<const uint4*>(src);
    uint4* dst_vec = reinterpret_cast<uint4*>(dst);
    for (int64_t i = first; i < nvec; i += stride) dst_vec[i] = src_vec[i];
    done = nvec * 16;
  }
  for (int64_t i = done + first; i < nbytes; i += stride) dst[i] = src[i];
}

// All `count` copies in ceil(count / kMaxCopiesPerLaunch) launches, each
// `launch(kernel, grid, threads, batch)` (on a stream in snapshot.cu, emulated in the tests).
template <typename Launch>
void launch_multi_tensor_copy(Launch&& launch, const ByteCopy* copies, size_t count) {
  for (size_t start = 0; start < count; start += kMaxCopiesPerLaunch) {
    const size_t n = std::min(count - start, static_cast<size_t>(kMaxCopiesPerLaunch));
    ByteCopyBatch batch;
    int64_t largest = 0;
    for (size_t j = 0; j < n; ++j) {
      batch.src[j] = copies[start + j].src;
      batch.dst[j] = copies[start + j].dst;
      batch.nbytes[j] = copies[start + j].nbytes;
      largest = std::max(largest, copies[start + j].nbytes);
    }
    // Enough x blocks for the largest copy at one 16-byte vector per thread, capped.
    const int64_t vectors = (largest + 15) / 16;
    const int blocks_x = static_cast<int>(
        std::max<int64_t>(1, std::min<int64_t>(kMaxCopyBlocksX, (vectors + kCopyThreads - 1) / kCopyThreads)));
    launch(multi_tensor_copy_kernel, dim3(blocks_x, static_cast<unsigned>(n)), kCopyThreads, batch);
  }
}

}  // namespace esper_fast
