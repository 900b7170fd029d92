// The runtime's own rules, launched like the kernels: `runtime_emulated shuffles` prints, for each
// shuffle kind, width and offset, the source lane every lane received; the other modes run a
// kernel that breaks a rule and must abort (tests/test_emulation.py checks both).
#include "cuda_emulation.h"
#include "driver.h"

namespace {

__global__ void shuffles(int* out) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  int* row = out;
  for (int width = 1; width <= 32; width *= 2) {
    for (int b = 0; b < 33; b += 3) {
      row[lane] = __shfl_sync(0xffffffffu, lane, b, width);
      row[32 + lane] = __shfl_up_sync(0xffffffffu, lane, b, width);
      row[64 + lane] = __shfl_down_sync(0xffffffffu, lane, b, width);
      row[96 + lane] = __shfl_xor_sync(0xffffffffu, lane, b % 32, width);
      row += 128;
    }
  }
}

__global__ void exit_before_barrier() {
  if (threadIdx.x == 7) return;
  __syncthreads();
}

__global__ void partial_mask() { (void)__shfl_down_sync(0x0000ffffu, 1, 1); }

__global__ void divergent_shuffle(int* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1, 1);
  __syncthreads();
}

}  // namespace

int main(int argc, char** argv) {
  emulation_driver::Args args(argc, argv);
  const std::string mode = args.text();
  args.done();
  emulation_driver::Buffer out(sizeof(int) * 6 * 11 * 128, 0);
  if (mode == "shuffles") {
    cuda_emulation::launch(shuffles, dim3(1), 32, out.data<int>());
    out.write();
  } else if (mode == "exit_before_barrier") {
    cuda_emulation::launch(exit_before_barrier, dim3(2), 64);
  } else if (mode == "partial_mask") {
    cuda_emulation::launch(partial_mask, dim3(1), 32);
  } else if (mode == "divergent_shuffle") {
    cuda_emulation::launch(divergent_shuffle, dim3(1), 64, out.data<int>());
  } else {
    emulation_driver::usage("unknown mode");
  }
  return 0;
}
