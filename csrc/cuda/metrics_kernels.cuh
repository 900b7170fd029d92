// Device code of metrics_update and metrics_update_stacked: the two row kernels, their helpers
// and the launch plan. No ATen and no launch syntax: csrc/cuda/metrics.cu launches these kernels
// on a stream, and the test-only CPU emulation (tests/emulation/) compiles this same text with g++.
//
// One read of the logits, online max / sum-exp and torch.argmax order. The grid's y dimension is
// the stacked configuration (one for metrics_update); each configuration's blocks run exactly as
// a metrics_update of its rows alone. Short rows (C <= 1024): a group of TPR lanes per row. Long
// rows: a block per row, each thread with several 16-byte loads in flight. Both grid-stride over
// rows with a grid of the blocks that are resident at once; each block writes its partial sums to
// a workspace and the last block to finish adds them in a fixed order and turns the batch's CE
// sum into the batch mean (no host sync, and the same numbers from run to run).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "host_device.h"
#include "metrics.h"

namespace esper_fast {
namespace metrics {
// Internal linkage, as when these lived in metrics.cu: each .cu (and each emulation program)
// includes its family's header once, and nvcc inlines flush_block as it did then (same SASS).
namespace {

using ull = unsigned long long;

// Bit tests: unaffected by fast-math flags.
__device__ __forceinline__ bool is_nan(float v) {
  return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u;
}
__device__ __forceinline__ bool is_nan(double v) {
  return (static_cast<ull>(__double_as_longlong(v)) & 0x7fffffffffffffffull) > 0x7ff0000000000000ull;
}
__device__ __forceinline__ float exp_of(float v) {
  return __expf(v);
}
__device__ __forceinline__ double exp_of(double v) {
  return exp(v);
}

// A thread's view of part of one row: max / sum of exp(x - max) for the log-sum-exp (a NaN
// lands in `sum`), and the torch.argmax candidate (first NaN, else first maximum).
template <typename math_t>
struct RowState {
  math_t max;
  math_t sum;
  math_t best;
  int best_index;  // -1: nothing seen yet; an index within the row (C <= kMaxClasses)

  __device__ __forceinline__ void init() {
    max = -std::numeric_limits<math_t>::infinity();
    sum = 0;
    best = max;
    best_index = -1;
  }

  // K consecutive elements starting at index `first`; a thread's packs must arrive in
  // increasing index order. The argmax and the rescale of `sum` happen once per pack.
  template <int K>
  __device__ __forceinline__ void push(const math_t (&v)[K], int first) {
    constexpr math_t kNegInf = -std::numeric_limits<math_t>::infinity();
    math_t pack_max = kNegInf;
    bool has_nan = false;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      has_nan |= is_nan(v[k]);
      pack_max = v[k] > pack_max ? v[k] : pack_max;
    }
    if (has_nan) {
      // Rare: element by element, the first NaN wins the argmax; the loss becomes NaN.
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (best_index < 0 || (!is_nan(best) && (v[k] > best || is_nan(v[k])))) {
          best = v[k];
          best_index = first + k;
        }
      }
      sum = std::numeric_limits<math_t>::quiet_NaN();
      return;
    }
    if (best_index < 0 || (!is_nan(best) && pack_max > best)) {
      int k = 0;
      while (k < K - 1 && !(v[k] == pack_max)) ++k;
      best = pack_max;
      best_index = first + k;
    }
    if (pack_max > max) {
      sum = sum * exp_of(max - pack_max);  // sum is 0 while max is -inf
      max = pack_max;
    }
    if (max == kNegInf) return;  // only -inf so far: nothing to add
    math_t pack_sum = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) pack_sum += exp_of(v[k] - max);
    sum += pack_sum;
  }

  __device__ __forceinline__ void push_one(math_t v, int index) {
    const math_t one[1] = {v};
    push<1>(one, index);
  }

  __device__ __forceinline__ void merge(math_t o_max, math_t o_sum, math_t o_best, int o_index) {
    // log-sum-exp: scale the smaller-max side; an empty side (sum 0) adds nothing.
    math_t hi_max = max, hi_sum = sum, lo_max = o_max, lo_sum = o_sum;
    if (o_max > max) {
      hi_max = o_max, hi_sum = o_sum, lo_max = max, lo_sum = sum;
    }
    max = hi_max;
    sum = hi_sum + (lo_sum == math_t(0) ? math_t(0) : lo_sum * exp_of(lo_max - hi_max));
    // argmax in torch order.
    bool take = false;
    if (o_index < 0) {
      take = false;
    } else if (best_index < 0) {
      take = true;
    } else if (is_nan(best)) {
      take = is_nan(o_best) && o_index < best_index;
    } else if (is_nan(o_best)) {
      take = true;
    } else {
      take = o_best > best || (o_best == best && o_index < best_index);
    }
    if (take) {
      best = o_best;
      best_index = o_index;
    }
  }

  // Reduce over `width` consecutive lanes (a power of two <= 32); all 32 lanes must call.
  __device__ __forceinline__ void reduce_lanes(int width) {
    for (int offset = width / 2; offset > 0; offset /= 2) {
      const math_t o_max = __shfl_xor_sync(0xffffffffu, max, offset);
      const math_t o_sum = __shfl_xor_sync(0xffffffffu, sum, offset);
      const math_t o_best = __shfl_xor_sync(0xffffffffu, best, offset);
      const int o_index = __shfl_xor_sync(0xffffffffu, best_index, offset);
      merge(o_max, o_sum, o_best, o_index);
    }
  }

  // lse - x[target] in float64; NaN for rows with a NaN, a +inf or only -inf.
  __device__ __forceinline__ double loss(math_t target_logit) const {
    if (max == std::numeric_limits<math_t>::infinity() || max == -std::numeric_limits<math_t>::infinity()) {
      return std::numeric_limits<double>::quiet_NaN();
    }
    return (static_cast<double>(max) - static_cast<double>(target_logit)) + log(static_cast<double>(sum));
  }
};

// Partial sums of the batch: a thread's, a block's, or the whole batch's. `first_bad_row` is the
// lowest row whose target is out of range (kNoRow if none), so that the value reported is the
// first bad target, as the CPU kernel reports it.
constexpr long long kNoRow = std::numeric_limits<long long>::max();

// No default member initializers: the type also lives in __shared__ memory, which takes no
// constructors. Start sums from none().
struct BatchPartial {
  double loss;
  long long valid, correct, errors, first_bad_row;

  __device__ __forceinline__ static BatchPartial none() {
    return {0.0, 0, 0, 0, kNoRow};
  }

  __device__ __forceinline__ void add(const BatchPartial& other) {
    loss += other.loss;
    valid += other.valid;
    correct += other.correct;
    errors += other.errors;
    first_bad_row = other.first_bad_row < first_bad_row ? other.first_bad_row : first_bad_row;
  }
};

// A block's partial in the launch's workspace: int64 slots, the loss as its float64 bit pattern.
constexpr int kPartialSlots = 5;

// Row epilogue, run by the one thread that holds the row's reduced state.
template <typename scalar_t, typename math_t>
__device__ __forceinline__ void finish_row(const RowState<math_t>& st, const scalar_t* row_ptr, int64_t row,
                                           int64_t target, int64_t classes, int64_t ignore_index, bool want_loss,
                                           bool per_class, int64_t* state, BatchPartial& part) {
  const bool ignored = target == ignore_index;
  if (target < 0 || target >= classes) {
    if (!ignored) {
      part.errors += 1;
      part.first_bad_row = row < part.first_bad_row ? row : part.first_bad_row;
    }
    return;
  }
  // An in-range ignore_index still counts for accuracy, as argmax == labels does.
  const bool hit = st.best_index == target;
  part.correct += hit;
  if (!ignored) {
    part.valid += 1;
    if (want_loss) part.loss += st.loss(static_cast<math_t>(row_ptr[target]));
  }
  if (per_class) {
    // Integer atomics: the counts come out the same whatever the order.
    atomicAdd(reinterpret_cast<ull*>(state + kHeader + target), 1ull);
    if (hit) atomicAdd(reinterpret_cast<ull*>(state + kHeader + classes + target), 1ull);
  }
}

// The block's sum of `part`, valid in thread 0, in a fixed order: a shuffle tree in each warp,
// then the warps in order. Every thread of the block must call; `shared` (32 slots) is free again
// on return.
__device__ BatchPartial block_partial(BatchPartial part, BatchPartial* shared) {
  for (int offset = 16; offset > 0; offset /= 2) {
    BatchPartial other;
    other.loss = __shfl_down_sync(0xffffffffu, part.loss, offset);
    other.valid = __shfl_down_sync(0xffffffffu, part.valid, offset);
    other.correct = __shfl_down_sync(0xffffffffu, part.correct, offset);
    other.errors = __shfl_down_sync(0xffffffffu, part.errors, offset);
    other.first_bad_row = __shfl_down_sync(0xffffffffu, part.first_bad_row, offset);
    part.add(other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) shared[warp] = part;
  __syncthreads();
  BatchPartial total = BatchPartial::none();
  if (threadIdx.x == 0) {
    // Not unrolled: under a launch bound the compiler would load every warp's partial at once.
#pragma unroll 1
    for (int w = 0; w < warps; ++w) total.add(shared[w]);
  }
  __syncthreads();
  return total;
}

// Every block writes its partial to `workspace` (no floating-point atomics: the batch's loss
// would depend on the order the blocks finish in); the last block to finish adds them in a fixed
// order and updates `state`: the batch mean, counts, and the first bad target. Every thread of
// the block must call.
__device__ void flush_block(BatchPartial part, int64_t* state, long long* workspace, const int64_t* targets,
                            const double* batch_loss, int64_t rows) {
  __shared__ BatchPartial shared[32];
  __shared__ bool last_block;
  const BatchPartial block = block_partial(part, shared);
  if (threadIdx.x == 0) {
    long long* slot = workspace + static_cast<int64_t>(blockIdx.x) * kPartialSlots;
    slot[0] = __double_as_longlong(block.loss);
    slot[1] = block.valid;
    slot[2] = block.correct;
    slot[3] = block.errors;
    slot[4] = block.first_bad_row;
    __threadfence();  // the partial is visible before the ticket is
    const ull ticket = atomicAdd(reinterpret_cast<ull*>(state + kBlocksDone), 1ull);
    last_block = ticket == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  // The last block: every other block's partial is written. Read them past L1 (__ldcg).
  __threadfence();
  BatchPartial sum = BatchPartial::none();
  for (int64_t b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
    const long long* slot = workspace + b * kPartialSlots;
    BatchPartial p;
    p.loss = __longlong_as_double(__ldcg(slot));
    p.valid = __ldcg(slot + 1);
    p.correct = __ldcg(slot + 2);
    p.errors = __ldcg(slot + 3);
    p.first_bad_row = __ldcg(slot + 4);
    sum.add(p);
  }
  const BatchPartial total = block_partial(sum, shared);
  if (threadIdx.x != 0) return;
  const double batch_mean = batch_loss != nullptr ? *batch_loss : total.loss / static_cast<double>(total.valid);
  state[kLossSum] = __double_as_longlong(__longlong_as_double(state[kLossSum]) + batch_mean);
  state[kBatches] += 1;
  state[kTotal] += rows;
  state[kCorrect] += total.correct;
  if (total.errors > 0 && state[kErrors] == 0) state[kBadValue] = targets[total.first_bad_row];
  state[kErrors] += total.errors;
  state[kBlocksDone] = 0;
}

template <typename scalar_t, int TPR>
__global__ void metrics_short_rows_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets,
                                          const double* __restrict__ batch_loss, int64_t* __restrict__ state,
                                          long long* __restrict__ workspace, int64_t rows, int64_t classes,
                                          int64_t state_width, int64_t ignore_index, bool per_class) {
  using math_t = math_type<scalar_t>;
  // Configuration blockIdx.y: its rows, its state row, its blocks' partials.
  logits += blockIdx.y * rows * classes;
  state += blockIdx.y * state_width;
  workspace += static_cast<int64_t>(blockIdx.y) * gridDim.x * kPartialSlots;
  const int64_t rows_per_block = blockDim.x / TPR;
  const int64_t group = threadIdx.x / TPR;
  const int lane = threadIdx.x % TPR;
  const bool want_loss = batch_loss == nullptr;
  BatchPartial part = BatchPartial::none();
  // The loop bound is uniform over the block so every lane reaches the shuffles.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rows_per_block; base < rows;
       base += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = base + group;
    const scalar_t* row_ptr = logits + row * classes;
    RowState<math_t> st;
    st.init();
    if (row < rows) {
      for (int i = lane; i < classes; i += TPR) st.push_one(static_cast<math_t>(row_ptr[i]), i);
    }
    st.reduce_lanes(TPR);
    if (row < rows && lane == 0) {
      finish_row(st, row_ptr, row, targets[row], classes, ignore_index, want_loss, per_class, state, part);
    }
  }
  flush_block(part, state, workspace, targets, batch_loss, rows);
}

// Packs a long-row thread loads before it processes any of them: with one load in flight per
// thread the SM waits out DRAM latency between packs. Two for double, whose software exp leaves
// no registers for four under the launch bound (and whose math, not its loads, sets the pace).
template <typename scalar_t>
constexpr int kLongRowUnroll = sizeof(scalar_t) == 8 ? 2 : 4;
// Long-row blocks have at most kLongRowMaxThreads threads, and at least kLongRowMinThreadsPerSm
// threads stay resident per SM (<= 64 registers a thread): with four 16-byte loads each, that is
// 64 KiB in flight per SM, and other blocks load while one reduces a finished row.
constexpr int kLongRowMaxThreads = 512;
constexpr int kLongRowMinThreadsPerSm = 1024;

template <typename scalar_t>
__global__ void __launch_bounds__(kLongRowMaxThreads, kLongRowMinThreadsPerSm / kLongRowMaxThreads)
    metrics_long_rows_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets,
                             const double* __restrict__ batch_loss, int64_t* __restrict__ state,
                             long long* __restrict__ workspace, int64_t rows, int64_t classes,
                             int64_t state_width, int64_t ignore_index, bool per_class) {
  using math_t = math_type<scalar_t>;
  // Configuration blockIdx.y: its rows, its state row, its blocks' partials.
  logits += blockIdx.y * rows * classes;
  state += blockIdx.y * state_width;
  workspace += static_cast<int64_t>(blockIdx.y) * gridDim.x * kPartialSlots;
  constexpr int kVec = 16 / sizeof(scalar_t);
  struct alignas(16) Pack {
    scalar_t v[kVec];
  };
  __shared__ math_t shared_max[32], shared_sum[32], shared_best[32];
  __shared__ int shared_index[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  // The block's sums over its rows: only thread 0 finishes rows, so they live in shared memory,
  // not in every thread's registers.
  __shared__ BatchPartial block_rows;
  if (threadIdx.x == 0) block_rows = BatchPartial::none();
  const bool want_loss = batch_loss == nullptr;
  const int width = static_cast<int>(classes);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const scalar_t* row_ptr = logits + row * classes;
    // Rows of odd width start anywhere: a scalar head up to the first 16-byte boundary.
    // Indices within a row are int: C <= kMaxClasses.
    const int misaligned = static_cast<int>((reinterpret_cast<uintptr_t>(row_ptr) % 16) / sizeof(scalar_t));
    const int head = misaligned == 0 ? 0 : std::min<int>(kVec - misaligned, width);
    const int packs = (width - head) / kVec;
    const int tail = head + packs * kVec;
    RowState<math_t> st;
    st.init();
    if (threadIdx.x < head) st.push_one(static_cast<math_t>(row_ptr[threadIdx.x]), threadIdx.x);
    const Pack* pack_ptr = reinterpret_cast<const Pack*>(row_ptr + head);
    // A thread's packs are first + u * blockDim.x: all loaded, then pushed in increasing index
    // order, as RowState::push requires. Packs past the row's end are neither loaded nor pushed.
    for (int first = threadIdx.x; first < packs; first += kLongRowUnroll<scalar_t> * blockDim.x) {
      Pack loaded[kLongRowUnroll<scalar_t>];
#pragma unroll
      for (int u = 0; u < kLongRowUnroll<scalar_t>; ++u) {
        const int p = first + u * blockDim.x;
        if (p < packs) loaded[u] = pack_ptr[p];
      }
#pragma unroll
      for (int u = 0; u < kLongRowUnroll<scalar_t>; ++u) {
        const int p = first + u * blockDim.x;
        if (p < packs) {
          math_t values[kVec];
#pragma unroll
          for (int k = 0; k < kVec; ++k) values[k] = static_cast<math_t>(loaded[u].v[k]);
          st.template push<kVec>(values, head + p * kVec);
        }
      }
    }
    const int i = tail + threadIdx.x;
    if (i < width) st.push_one(static_cast<math_t>(row_ptr[i]), i);
    st.reduce_lanes(32);
    if (lane == 0) {
      shared_max[warp] = st.max;
      shared_sum[warp] = st.sum;
      shared_best[warp] = st.best;
      shared_index[warp] = st.best_index;
    }
    __syncthreads();
    if (warp == 0) {
      st.init();
      if (lane < warps) {
        st.max = shared_max[lane];
        st.sum = shared_sum[lane];
        st.best = shared_best[lane];
        st.best_index = shared_index[lane];
      }
      st.reduce_lanes(32);
      if (lane == 0) {
        finish_row(st, row_ptr, row, targets[row], classes, ignore_index, want_loss, per_class, state, block_rows);
      }
    }
    __syncthreads();  // the shared slots are reused by the next row
  }
  flush_block(threadIdx.x == 0 ? block_rows : BatchPartial::none(), state, workspace, targets, batch_loss, rows);
}

// ---- Launch planning: pure host functions of the shapes and the device's numbers.

constexpr int kShortRowThreads = 256;

// The kernel for rows of a width: `TPR` lanes per row for short rows, a block of `Threads`
// threads per row for long rows (TPR == 0).
template <typename scalar_t, int TPR, int Threads>
struct RowKernel {
  static constexpr int kThreadsPerRow = TPR;
  static constexpr int kThreads = Threads;
  static constexpr int64_t kRowsPerBlock = TPR == 0 ? 1 : Threads / TPR;
  using Kernel = void (*)(const scalar_t*, const int64_t*, const double*, int64_t*, long long*, int64_t, int64_t,
                          int64_t, int64_t, bool);
  static Kernel kernel() {
    if constexpr (TPR == 0) {
      return metrics_long_rows_kernel<scalar_t>;
    } else {
      return metrics_short_rows_kernel<scalar_t, TPR>;
    }
  }
};

// Calls f(RowKernel<scalar_t, ...>{}) for the row machinery of rows `classes` wide.
template <typename scalar_t, typename F>
void visit_row_kernel(int64_t classes, F&& f) {
  if (classes <= 2) {
    f(RowKernel<scalar_t, 2, kShortRowThreads>{});
  } else if (classes <= 4) {
    f(RowKernel<scalar_t, 4, kShortRowThreads>{});
  } else if (classes <= 8) {
    f(RowKernel<scalar_t, 8, kShortRowThreads>{});
  } else if (classes <= 16) {
    f(RowKernel<scalar_t, 16, kShortRowThreads>{});
  } else if (classes <= 1024) {
    f(RowKernel<scalar_t, 32, kShortRowThreads>{});
  } else if (classes < 16384) {
    f(RowKernel<scalar_t, 0, 256>{});
  } else {
    f(RowKernel<scalar_t, 0, kLongRowMaxThreads>{});
  }
}

// Blocks resident at once on a device of `sm_count` SMs that holds `blocks_per_sm` of the
// kernel's blocks each (the occupancy calculator's answer, at least 1).
inline int64_t resident_blocks(int blocks_per_sm, int sm_count) {
  return static_cast<int64_t>(std::max(blocks_per_sm, 1)) * sm_count;
}

// The grid of one update: per configuration as many blocks as a metrics_update of its rows alone
// would have (so each configuration's sums are the same, bit for bit) and no more than are
// resident at once; the configurations along y.
inline dim3 update_grid(int64_t rows, int64_t rows_per_block, int64_t resident, int64_t configs) {
  const int64_t blocks = std::max<int64_t>(1, std::min((rows + rows_per_block - 1) / rows_per_block, resident));
  return dim3(static_cast<unsigned int>(blocks), static_cast<unsigned int>(configs));
}

// int64 slots of the workspace of a launch on `grid`: every block's partial of every
// configuration; each block writes its own, so the workspace needs no clearing.
inline int64_t workspace_slots(dim3 grid) {
  return static_cast<int64_t>(grid.x) * grid.y * kPartialSlots;
}

}  // namespace
}  // namespace metrics
}  // namespace esper_fast
