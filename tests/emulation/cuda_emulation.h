// A CPU runtime for the CUDA kernels of csrc/cuda/<family>_kernels.cuh, for the tests only (never
// part of the installed package). The kernel headers compile unchanged with g++ after this one,
// and `cuda_emulation::launch` runs a kernel with CUDA's execution model, so that the same text
// nvcc compiles executes on every CI run, under ThreadSanitizer and AddressSanitizer too.
//
// Modelled:
// - grid, block, threadIdx/blockIdx/blockDim/gridDim (1-D blocks whose size is a multiple of 32,
//   grids in x and y). Every thread of a block is a real std::thread, so the race detector sees
//   them; one pool of a block's threads runs the blocks one after another.
// - __syncthreads: a barrier over the block's threads. Aborts when a thread exits while others
//   wait at it, when a thread arrives after another thread of the block exited, and when a thread
//   arrives while a lane of its warp waits in a shuffle.
// - __shfl_sync / _up / _down / _xor: a rendezvous of the warp's 32 lanes with PTX's lane and
//   `width` rules (a lane whose source is outside its segment gets its own value). Aborts on a
//   mask other than 0xffffffff, on lanes that reach different shuffle calls (divergence), on a
//   lane waiting at a barrier or exited while its warp shuffles. A shuffle orders memory only
//   among the lanes of its warp, so the race detector still sees missing barriers across warps.
// - __shared__ memory: static storage of the kernel function, which is per block because blocks
//   run one at a time; every __shared__ variable (found in the program's symbol table) is filled
//   with 0xff bytes (NaN for floating point, -1 for integers, an invalid bool for UBSan) before
//   each block starts.
// - atomics: GCC __atomic builtins, relaxed, as CUDA's are. __threadfence: a sequentially
//   consistent fence. __ldcg: a plain load.
// - math: __expf is expf (the device's is an approximation: its error is not modelled).
// Not modelled: blocks running at the same time (so cross-block memory ordering, the work of
// __threadfence, cannot go wrong here), warps in lockstep or any instruction timing, memory
// spaces (every pointer is host memory; global, shared and local are all one address space),
// partial-warp masks, 2-D/3-D blocks, dynamic shared memory, streams, occupancy (resident blocks
// are an input of the harness), nvcc's floating-point contraction and fast intrinsics.
#pragma once

#include <elf.h>
#include <link.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace cuda_emulation {

[[noreturn]] inline void fail(const char* what, const char* file = "", int line = 0) {
  std::fprintf(stderr, "cuda_emulation: %s (%s:%d, block %u,%u thread %u)\n", what, file, line, blockIdx.x,
               blockIdx.y, threadIdx.x);
  std::fflush(stderr);
  std::abort();
}

// Seconds a thread waits at a barrier or shuffle before the launch is declared deadlocked.
inline std::chrono::seconds watchdog() {
  const char* env = std::getenv("CUDA_EMULATION_WATCHDOG_S");
  return std::chrono::seconds(env != nullptr ? std::atoll(env) : 600);
}

// ---- __shared__ storage: the static locals of functions in namespace esper_fast, found once in
// this executable's symbol table (g++ ignores section attributes on template statics, so the
// symbols are the one list of them).
struct SharedRegion {
  void* address;
  size_t size;
};

inline std::vector<SharedRegion> find_shared_regions() {
  std::vector<SharedRegion> regions;
  FILE* f = std::fopen("/proc/self/exe", "rb");
  if (f == nullptr) fail("cannot read /proc/self/exe");
  std::fseek(f, 0, SEEK_END);
  std::vector<unsigned char> image(static_cast<size_t>(std::ftell(f)));
  std::fseek(f, 0, SEEK_SET);
  if (std::fread(image.data(), 1, image.size(), f) != image.size()) fail("short read of /proc/self/exe");
  std::fclose(f);
  const auto* ehdr = reinterpret_cast<const Elf64_Ehdr*>(image.data());
  const auto* sections = reinterpret_cast<const Elf64_Shdr*>(image.data() + ehdr->e_shoff);
  // The executable's load bias (0 unless it is position independent).
  uintptr_t bias = 0;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* out) {
        *static_cast<uintptr_t*>(out) = info->dlpi_addr;
        return 1;  // the first object is the executable
      },
      &bias);
  for (int s = 0; s < ehdr->e_shnum; ++s) {
    if (sections[s].sh_type != SHT_SYMTAB) continue;
    const auto* symbols = reinterpret_cast<const Elf64_Sym*>(image.data() + sections[s].sh_offset);
    const char* names = reinterpret_cast<const char*>(image.data() + sections[sections[s].sh_link].sh_offset);
    for (size_t i = 0; i < sections[s].sh_size / sizeof(Elf64_Sym); ++i) {
      const Elf64_Sym& sym = symbols[i];
      // _ZZN10esper_fast...: a static local of a function in namespace esper_fast.
      if (ELF64_ST_TYPE(sym.st_info) != STT_OBJECT || sym.st_size == 0 || sym.st_shndx == SHN_UNDEF) continue;
      if (std::strncmp(names + sym.st_name, "_ZZN10esper_fast", 16) != 0) continue;
      regions.push_back({reinterpret_cast<void*>(bias + sym.st_value), static_cast<size_t>(sym.st_size)});
    }
  }
  return regions;  // empty for kernels without shared memory (or a stripped program: do not strip)
}

inline void poison_shared() {
  static const std::vector<SharedRegion> regions = find_shared_regions();
  for (const SharedRegion& r : regions) std::memset(r.address, 0xff, r.size);
}

// ---- Waiting: a generation counter that the last arriver bumps, waited on with a futex (no
// mutex, so woken threads run at once; no spinning: a block has more threads than the machine has
// cores), with a watchdog for deadlocks.
inline void futex_wait(std::atomic<uint32_t>& word, uint32_t expected, const timespec& timeout) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, &timeout, nullptr, 0);
}
inline void futex_wake_all(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
}

inline void wait_for_change(std::atomic<uint32_t>& generation, uint32_t seen, const char* what, const char* file,
                            int line) {
  const auto deadline = std::chrono::steady_clock::now() + watchdog();
  const timespec tick{0, 100 * 1000 * 1000};
  while (generation.load(std::memory_order_acquire) == seen) {
    if (std::chrono::steady_clock::now() > deadline) fail(what, file, line);
    futex_wait(generation, seen, tick);
  }
}

// n threads meet; each runs on_arrived(generation it arrived in) once it is counted, the last to arrive runs on_last() before
// any of them leaves. Memory written by any of them before arriving is visible to all after.
struct Gate {
  std::atomic<uint32_t> generation{0};
  std::atomic<int> arrived{0};

  template <typename Arrived, typename Last>
  void arrive_and_wait(int n, Arrived&& on_arrived, Last&& on_last, const char* what, const char* file, int line) {
    const uint32_t seen = generation.load(std::memory_order_acquire);
    const bool last = arrived.fetch_add(1, std::memory_order_seq_cst) + 1 == n;
    on_arrived(seen);
    if (last) {
      on_last();
      arrived.store(0, std::memory_order_relaxed);
      generation.fetch_add(1, std::memory_order_seq_cst);
      futex_wake_all(generation);
    } else {
      wait_for_change(generation, seen, what, file, line);
    }
  }
};

// ---- One block's synchronisation state.
constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;

struct ShuffleSite {
  const char* file;
  int line, kind, width;
};

struct Warp {
  Gate gate;                              // gate.arrived: lanes in the current shuffle
  std::atomic<unsigned int> at_barrier{0}, exited{0};  // lane bits
  ShuffleSite sites[kWarpSize];
  uint64_t values[2][kWarpSize];  // by generation parity: a slow reader keeps its values
};

struct Block {
  int threads = 0;
  Gate barrier;
  std::atomic<int> exited{0};
  Warp warps[kMaxWarps];

  // Between blocks, with no thread of the block running.
  void reset(int n) {
    threads = n;
    barrier.arrived.store(0);
    exited.store(0);
    for (Warp& w : warps) {
      w.gate.arrived.store(0);
      w.at_barrier.store(0);
      w.exited.store(0);
    }
  }
};

inline Block& block() {
  static Block b;
  return b;
}

inline int lane_of_thread() { return static_cast<int>(threadIdx.x % kWarpSize); }
inline Warp& warp_of_thread() { return block().warps[threadIdx.x / kWarpSize]; }

// Each check below first publishes what this thread does (seq_cst), then reads what the others
// do (seq_cst): of two threads that diverge, at least one sees the other.
inline void syncthreads(const char* file, int line) {
  Block& b = block();
  Warp& w = warp_of_thread();
  w.at_barrier.fetch_or(1u << lane_of_thread(), std::memory_order_seq_cst);
  if (w.gate.arrived.load(std::memory_order_seq_cst) > 0) {
    fail("__syncthreads while lanes of this warp wait in a shuffle (divergent warp)", file, line);
  }
  if (b.exited.load(std::memory_order_seq_cst) > 0) fail("__syncthreads after a thread of the block exited", file, line);
  b.barrier.arrive_and_wait(
      b.threads, [](uint32_t) {},
      [&] {
        // Cleared before anyone leaves: a thread past the barrier sees no stale marks.
        for (int i = 0; i < b.threads / kWarpSize; ++i) b.warps[i].at_barrier.store(0, std::memory_order_relaxed);
      },
      "__syncthreads deadlocked: not every thread of the block reached it", file, line);
}

// A thread's return from the kernel.
inline void thread_exit() {
  Block& b = block();
  Warp& w = warp_of_thread();
  w.exited.fetch_or(1u << lane_of_thread(), std::memory_order_seq_cst);
  b.exited.fetch_add(1, std::memory_order_seq_cst);
  if (w.gate.arrived.load(std::memory_order_seq_cst) > 0) {
    fail("a thread exited while lanes of its warp wait in a shuffle (divergent warp)");
  }
  if (b.barrier.arrived.load(std::memory_order_seq_cst) > 0) fail("a thread exited while others wait at __syncthreads");
}

enum ShuffleKind { kIdx = 1, kUp, kDown, kXor };

// PTX shfl.sync: the source lane of `lane` and whether it lies in the lane's segment of `width`.
inline int shuffle_source(int kind, int lane, int b, int width) {
  const int segmask = (kWarpSize - width) & 31;
  const int clamp = kind == kUp ? 0 : 31;
  const int max_lane = (lane & segmask) | (clamp & ~segmask);
  const int min_lane = lane & segmask;
  int j = lane;
  bool valid = false;
  switch (kind) {
    case kUp: j = lane - b; valid = j >= max_lane; break;
    case kDown: j = lane + b; valid = j <= max_lane; break;
    case kXor: j = lane ^ b; valid = j <= max_lane; break;
    default: j = min_lane | (b & ~segmask); valid = j <= max_lane; break;
  }
  return valid ? j : lane;
}

template <typename T>
T shuffle(int kind, unsigned int mask, T var, int b, int width, const char* file, int line) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "a shuffle moves at most 8 bytes");
  if (mask != 0xffffffffu) fail("shuffle with a partial mask (not modelled)", file, line);
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) fail("shuffle width not a power of two <= 32", file, line);
  Warp& w = warp_of_thread();
  const int lane = lane_of_thread();
  const uint32_t parity = w.gate.generation.load(std::memory_order_acquire) & 1;
  w.sites[lane] = {file, line, kind, width};
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  w.values[parity][lane] = bits;
  w.gate.arrive_and_wait(
      kWarpSize,
      [&](uint32_t seen) {
        // A lane that skipped this shuffle waits at a barrier or is gone. A lane that left it (it
        // is complete) may be at the next barrier already: then the generation has moved on.
        if ((w.at_barrier.load(std::memory_order_seq_cst) | w.exited.load(std::memory_order_seq_cst)) != 0 &&
            w.gate.generation.load(std::memory_order_seq_cst) == seen) {
          fail("shuffle while lanes of this warp wait at __syncthreads or have exited (divergent warp)", file, line);
        }
      },
      [&] {
        for (const ShuffleSite& s : w.sites) {
          if (s.line != line || std::strcmp(s.file, file) != 0 || s.kind != kind || s.width != width) {
            std::fprintf(stderr, "cuda_emulation: lanes of one warp in different shuffles: %s:%d and %s:%d\n", s.file,
                         s.line, file, line);
            fail("divergent shuffle", file, line);
          }
        }
      },
      "shuffle deadlocked: not every lane of the warp reached it", file, line);
  const uint64_t source = w.values[parity][shuffle_source(kind, lane, b, width)];
  T out;
  std::memcpy(&out, &source, sizeof(T));
  return out;
}

// ---- The launch: a pool of one block's threads, reused block after block and launch after launch.
class Pool {
 public:
  static Pool& get() {
    static Pool pool;
    return pool;
  }

  void run(dim3 grid, int threads, const std::function<void()>& body) {
    resize(threads);
    for (unsigned int y = 0; y < grid.y; ++y) {
      for (unsigned int x = 0; x < grid.x; ++x) {
        poison_shared();
        block().reset(threads);
        grid_ = grid;
        block_ = {x, y, 0};
        body_ = &body;
        const uint32_t seen = done_.generation.load(std::memory_order_acquire);
        start_.fetch_add(1, std::memory_order_acq_rel);
        futex_wake_all(start_);
        wait_for_change(done_.generation, seen, "a block never finished", "launch", 0);
      }
    }
  }

  ~Pool() { resize(0); }

 private:
  void resize(int n) {
    if (static_cast<int>(workers_.size()) == n) return;
    stop_ = true;
    start_.fetch_add(1, std::memory_order_acq_rel);
    futex_wake_all(start_);
    for (std::thread& t : workers_) t.join();
    workers_.clear();
    stop_ = false;
    size_ = n;
    const uint32_t seen = start_.load();
    for (int i = 0; i < n; ++i) workers_.emplace_back([this, i, seen] { work(i, seen); });
  }

  void work(int index, uint32_t seen) {
    for (;;) {
      wait_for_change(start_, seen, "idle", "pool", 0);
      seen = start_.load(std::memory_order_acquire);
      if (stop_) return;
      threadIdx = {static_cast<unsigned int>(index), 0, 0};
      blockIdx = block_;
      blockDim = dim3(static_cast<unsigned int>(size_));
      gridDim = grid_;
      (*body_)();
      thread_exit();
      done_.arrive_and_wait(size_, [](uint32_t) {}, [] {}, "", "", 0);
    }
  }

  std::vector<std::thread> workers_;
  int size_ = 0;
  std::atomic<uint32_t> start_{0};
  Gate done_;
  bool stop_ = false;
  dim3 grid_;
  uint3 block_{};
  const std::function<void()>* body_ = nullptr;
};

// kernel<<<grid, threads>>>(args...): each thread calls the kernel with its own copy of the
// arguments converted to the kernel's parameter types, as CUDA passes them.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, int threads, Args&&... args) {
  if (threads <= 0 || threads > 1024 || threads % kWarpSize != 0) {
    fail("block size not a multiple of 32 up to 1024 (not modelled)");
  }
  if (grid.x == 0 || grid.y == 0 || grid.y > 65535 || grid.z != 1) fail("grid shape outside CUDA's limits");
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  Pool::get().run(grid, threads, [&] {
    std::tuple<std::decay_t<Params>...> own = params;
    std::apply(kernel, own);
  });
}

}  // namespace cuda_emulation

// ---- The device API the kernels use.
#define __syncthreads() ::cuda_emulation::syncthreads(__FILE__, __LINE__)

template <typename T>
T __shfl_sync(unsigned int mask, T var, int src, int width = 32, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  return cuda_emulation::shuffle(cuda_emulation::kIdx, mask, var, src, width, file, line);
}
template <typename T>
T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = 32, const char* file = __builtin_FILE(),
                 int line = __builtin_LINE()) {
  return cuda_emulation::shuffle(cuda_emulation::kUp, mask, var, static_cast<int>(delta), width, file, line);
}
template <typename T>
T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = 32, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  return cuda_emulation::shuffle(cuda_emulation::kDown, mask, var, static_cast<int>(delta), width, file, line);
}
template <typename T>
T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  return cuda_emulation::shuffle(cuda_emulation::kXor, mask, var, lane_mask, width, file, line);
}

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}
inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_RELAXED); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

inline unsigned int __float_as_uint(float v) {
  unsigned int u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}
inline long long __double_as_longlong(double v) {
  long long u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, sizeof(d));
  return d;
}
inline float __expf(float v) { return std::exp(v); }
