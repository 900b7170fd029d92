// The snapshot copy, emulated: the launches csrc/cuda/snapshot_kernels.cuh plans for COUNT copies
// of sources into one buffer (pack) or of a buffer into destinations (unpack).
//
// snapshot_emulated MODE(pack|unpack) BUFFER_BYTES COUNT {NBYTES OFFSET TENSOR_MISALIGN} * COUNT
// stdin: pack: every source's bytes; unpack: the buffer. stdout: pack: the buffer (its bytes no
// copy wrote stay 0xff); unpack: every destination's bytes.
#include "cuda_emulation.h"
#include "cuda/snapshot_kernels.cuh"
#include "driver.h"

using namespace emulation_driver;

int main(int argc, char** argv) {
  Args args(argc, argv);
  const std::string mode = args.text();
  const int64_t buffer_bytes = args.integer(), count = args.integer();
  if (mode != "pack" && mode != "unpack") usage("mode is pack or unpack");
  const bool pack = mode == "pack";
  std::vector<Buffer> tensors;
  std::vector<int64_t> offsets;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t nbytes = args.integer();
    offsets.push_back(args.integer());
    tensors.emplace_back(static_cast<size_t>(nbytes), static_cast<size_t>(args.integer()));
  }
  args.done();
  Input in;
  Buffer buffer(static_cast<size_t>(buffer_bytes), 0);
  if (pack) {
    for (Buffer& t : tensors) t.read(in);
  } else {
    buffer.read(in);
  }
  in.done();
  std::vector<esper_fast::ByteCopy> copies;
  for (int64_t i = 0; i < count; ++i) {
    uint8_t* tensor = tensors[i].data<uint8_t>();
    uint8_t* slot = buffer.data<uint8_t>() + offsets[i];
    const int64_t n = static_cast<int64_t>(tensors[i].bytes());
    copies.push_back(pack ? esper_fast::ByteCopy{tensor, slot, n} : esper_fast::ByteCopy{slot, tensor, n});
  }
  auto launch = [](auto kernel, dim3 grid, int threads, const esper_fast::ByteCopyBatch& batch) {
    cuda_emulation::launch(kernel, grid, threads, batch);
  };
  esper_fast::launch_multi_tensor_copy(launch, copies.data(), copies.size());
  if (pack) {
    buffer.write();
  } else {
    for (const Buffer& t : tensors) t.write();
  }
  return 0;
}
