// Device code of the blend family (lerp forward and its fused backward) and its launch plan. No
// ATen and no launch syntax: csrc/cuda/blend.cu launches these kernels on a stream, and the
// test-only CPU emulation (tests/emulation/) compiles this same text with g++.
//
// Blocks grid-stride over tiles of elements, in one of two tilings:
// - group tiles, when an alpha group (a sample, or the whole tensor for a single alpha) holds
//   more than kPackedMaxGroupNumel elements: a tile never straddles a group, so it applies one
//   alpha. Inside a group the elements before the first 16-byte boundary and after the last full
//   vector go one by one, the rest in 16-byte vectors.
// - packed tiles, for small per-sample groups: a tile holds whole groups (up to kPackedTileElems
//   elements, one coalesced element per thread and step), each group's alpha staged in shared
//   memory. One tile per group would leave [2**20, 16] with 4 busy threads per block.
// d_alpha is reduced without atomics, in an order fixed by the shapes alone, so it is the same
// from run to run: a block sum per group tile (and, for groups of several tiles, a second kernel
// adding the tiles' sums in tile order), or per group in shared memory for packed tiles.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "blend_math.h"

namespace esper_fast::blend {
// Internal linkage, as when these lived in blend.cu: each .cu (and each emulation program)
// includes its family's header once.
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // vectors each thread has in flight per group tile
constexpr int kTileVecs = kThreads * kUnroll;
constexpr int kVecBytes = 16;
// At least 2 resident blocks (<= 128 registers a thread): with kUnroll vectors per thread
// that keeps far more bytes in flight per SM than HBM latency needs.
constexpr int kMinBlocksPerSm = 2;

// Packed tiles: kPackedItems elements per thread, at most kPackedMaxGroups groups (their alphas
// in shared memory), and at least two groups per tile, else group tiles serve as well.
constexpr int kPackedItems = 8;
constexpr int kPackedTileElems = kThreads * kPackedItems;
constexpr int kPackedMaxGroups = 1024;
constexpr int64_t kPackedMaxGroupNumel = kPackedTileElems / 2;
// The per-element products of a packed tile in shared memory, one pad slot per 32 so that the
// threads summing neighbouring groups read different banks.
constexpr int kProductSlots = kPackedTileElems + kPackedTileElems / 32;

__device__ __forceinline__ int product_slot(int i) {
  return i + (i >> 5);
}

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

// Where group `group` lies: [begin, begin + head) one by one, then `vecs` full vectors from
// `vec_begin`, then [tail_begin, end) one by one.
struct GroupSpan {
  int64_t begin, head, vec_begin, vecs, tail_begin, end;
};

template <int kVec>
__device__ __forceinline__ GroupSpan group_span(int64_t group, int64_t group_numel) {
  GroupSpan span;
  span.begin = group * group_numel;
  span.end = span.begin + group_numel;
  const int64_t misaligned = span.begin % kVec;
  span.head = misaligned == 0 ? 0 : std::min<int64_t>(kVec - misaligned, group_numel);
  span.vec_begin = span.begin + span.head;
  span.vecs = (span.end - span.vec_begin) / kVec;
  span.tail_begin = span.vec_begin + span.vecs * kVec;
  return span;
}

// The packed tiling of `groups` groups of `group_numel` elements.
struct PackedTiles {
  int64_t groups;
  int64_t count;        // tiles
  int group_numel;      // <= kPackedMaxGroupNumel
  int groups_per_tile;  // in every tile but the last
  int team;             // threads summing one group's d_alpha: a power of two <= 32
};

struct PackedTile {
  int64_t first_group, begin;  // first group, and its first element
  int groups, length;          // groups and elements in this tile
};

__device__ __forceinline__ PackedTile packed_tile(const PackedTiles& tiles, int64_t tile) {
  PackedTile t;
  t.first_group = tile * tiles.groups_per_tile;
  t.groups = static_cast<int>(std::min<int64_t>(tiles.groups_per_tile, tiles.groups - t.first_group));
  t.begin = t.first_group * tiles.group_numel;
  t.length = t.groups * tiles.group_numel;
  return t;
}

// The group of element i of a packed tile (i < kPackedTileElems).
__device__ __forceinline__ int packed_group(int i, int group_numel) {
  return static_cast<int>(static_cast<unsigned>(i) / static_cast<unsigned>(group_numel));
}

// Sum over the block, valid in thread 0, in a fixed order. `shared` holds kWarps values and is
// free on return.
template <typename acc>
__device__ __forceinline__ acc block_sum(acc value, acc* shared) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  value = threadIdx.x < kWarps ? shared[threadIdx.x] : acc(0);
  if (warp == 0) {
    for (int offset = kWarps / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();
  return value;
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    blend_forward_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ host,
                         const scalar_t* __restrict__ seed, AlphaArg alpha, math_type<scalar_t> alpha_value,
                         int64_t group_numel, int64_t tiles_per_group, int64_t tiles) {
  using acc = math_type<scalar_t>;
  using P = Pack<scalar_t, kVec>;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t group = tile / tiles_per_group;
    const int64_t first_vec = (tile - group * tiles_per_group) * kTileVecs;
    const acc a = applied_alpha<scalar_t>(alpha, group, alpha_value);
    const GroupSpan span = group_span<kVec>(group, group_numel);

    const P* host_v = reinterpret_cast<const P*>(host + span.vec_begin);
    const P* seed_v = reinterpret_cast<const P*>(seed + span.vec_begin);
    P* out_v = reinterpret_cast<P*>(out + span.vec_begin);
    P h[kUnroll], s[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first_vec + threadIdx.x + u * kThreads;
      if (v < span.vecs) {
        h[u] = host_v[v];
        s[u] = seed_v[v];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first_vec + threadIdx.x + u * kThreads;
      if (v < span.vecs) {
        P y;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          y.v[j] = static_cast<scalar_t>(lerp_value(static_cast<acc>(h[u].v[j]), static_cast<acc>(s[u].v[j]), a));
        }
        out_v[v] = y;
      }
    }
    if (first_vec == 0 && threadIdx.x < kVec) {
      // Fewer than kVec elements each side of the vectors: one thread per element.
      const int64_t edge[2] = {span.begin + threadIdx.x, span.tail_begin + threadIdx.x};
      const bool live[2] = {edge[0] < span.vec_begin, edge[1] < span.end};
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t i = edge[e];
        if (live[e]) out[i] = static_cast<scalar_t>(lerp_value(static_cast<acc>(host[i]), static_cast<acc>(seed[i]), a));
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    blend_forward_packed_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ host,
                                const scalar_t* __restrict__ seed, AlphaArg alpha, PackedTiles tiles) {
  using acc = math_type<scalar_t>;
  __shared__ acc weight[kPackedMaxGroups];
  for (int64_t tile = blockIdx.x; tile < tiles.count; tile += gridDim.x) {
    const PackedTile t = packed_tile(tiles, tile);
    for (int j = threadIdx.x; j < t.groups; j += kThreads) {
      weight[j] = applied_alpha<scalar_t>(alpha, t.first_group + j, acc(0));
    }
    __syncthreads();
    scalar_t h[kPackedItems], s[kPackedItems];
#pragma unroll
    for (int u = 0; u < kPackedItems; ++u) {
      const int i = threadIdx.x + u * kThreads;
      if (i < t.length) {
        h[u] = host[t.begin + i];
        s[u] = seed[t.begin + i];
      }
    }
#pragma unroll
    for (int u = 0; u < kPackedItems; ++u) {
      const int i = threadIdx.x + u * kThreads;
      if (i < t.length) {
        const acc a = weight[packed_group(i, tiles.group_numel)];
        out[t.begin + i] = static_cast<scalar_t>(lerp_value(static_cast<acc>(h[u]), static_cast<acc>(s[u]), a));
      }
    }
    __syncthreads();  // `weight` is refilled for the next tile
  }
}

// d_seed = a * g, d_host = b * g (each only when its pointer is set) and, with kAlphaGrad,
// sum(g * (seed - host)) per tile: into alpha_grad (where the clamp passes gradient) when a group
// is one tile, else into tile_sums for blend_alpha_grad_kernel.
template <typename scalar_t, int kVec, bool kAlphaGrad>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    blend_backward_kernel(scalar_t* __restrict__ d_host, scalar_t* __restrict__ d_seed,
                          math_type<scalar_t>* __restrict__ alpha_grad, math_type<scalar_t>* __restrict__ tile_sums,
                          const scalar_t* __restrict__ grad, const scalar_t* __restrict__ host,
                          const scalar_t* __restrict__ seed, AlphaArg alpha, math_type<scalar_t> alpha_value,
                          math_type<scalar_t> alpha_complement, int64_t group_numel, int64_t tiles_per_group,
                          int64_t tiles) {
  using acc = math_type<scalar_t>;
  using P = Pack<scalar_t, kVec>;
  __shared__ acc shared[kWarps];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t group = tile / tiles_per_group;
    const int64_t first_vec = (tile - group * tiles_per_group) * kTileVecs;
    const GradScales<acc> scales = grad_scales<scalar_t>(alpha, group, alpha_value, alpha_complement);
    const acc a = scales.seed, b = scales.host;
    const GroupSpan span = group_span<kVec>(group, group_numel);
    acc partial = acc(0);

    const P* grad_v = reinterpret_cast<const P*>(grad + span.vec_begin);
    P g[kUnroll], h[kUnroll], s[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first_vec + threadIdx.x + u * kThreads;
      if (v < span.vecs) {
        g[u] = grad_v[v];
        if constexpr (kAlphaGrad) {
          h[u] = reinterpret_cast<const P*>(host + span.vec_begin)[v];
          s[u] = reinterpret_cast<const P*>(seed + span.vec_begin)[v];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first_vec + threadIdx.x + u * kThreads;
      if (v < span.vecs) {
        P ds, dh;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const acc gj = static_cast<acc>(g[u].v[j]);
          ds.v[j] = static_cast<scalar_t>(a * gj);
          dh.v[j] = static_cast<scalar_t>(b * gj);
          if constexpr (kAlphaGrad) partial += gj * (static_cast<acc>(s[u].v[j]) - static_cast<acc>(h[u].v[j]));
        }
        if (d_seed != nullptr) reinterpret_cast<P*>(d_seed + span.vec_begin)[v] = ds;
        if (d_host != nullptr) reinterpret_cast<P*>(d_host + span.vec_begin)[v] = dh;
      }
    }
    if (first_vec == 0 && threadIdx.x < kVec) {
      const int64_t edge[2] = {span.begin + threadIdx.x, span.tail_begin + threadIdx.x};
      const bool live[2] = {edge[0] < span.vec_begin, edge[1] < span.end};
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t i = edge[e];
        if (live[e]) {
          const acc gi = static_cast<acc>(grad[i]);
          if (d_seed != nullptr) d_seed[i] = static_cast<scalar_t>(a * gi);
          if (d_host != nullptr) d_host[i] = static_cast<scalar_t>(b * gi);
          if constexpr (kAlphaGrad) partial += gi * (static_cast<acc>(seed[i]) - static_cast<acc>(host[i]));
        }
      }
    }
    if constexpr (kAlphaGrad) {
      const acc total = block_sum(partial, shared);
      if (threadIdx.x == 0) {
        if (tiles_per_group == 1) {
          alpha_grad[group] = clamp_passes_grad(alpha[group]) ? total : acc(0);
        } else {
          tile_sums[tile] = total;
        }
      }
    }
  }
}

// The packed-tile backward. With kAlphaGrad each group's sum(g * (seed - host)) is taken in
// shared memory by a team of `tiles.team` threads (strided partial sums, then a shuffle tree) and
// written to alpha_grad where the clamp passes gradient.
template <typename scalar_t, bool kAlphaGrad>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    blend_backward_packed_kernel(scalar_t* __restrict__ d_host, scalar_t* __restrict__ d_seed,
                                 math_type<scalar_t>* __restrict__ alpha_grad, const scalar_t* __restrict__ grad,
                                 const scalar_t* __restrict__ host, const scalar_t* __restrict__ seed,
                                 AlphaArg alpha, PackedTiles tiles) {
  using acc = math_type<scalar_t>;
  __shared__ acc weight[kPackedMaxGroups];
  __shared__ acc product[kAlphaGrad ? kProductSlots : 1];
  const int group_numel = tiles.group_numel;
  for (int64_t tile = blockIdx.x; tile < tiles.count; tile += gridDim.x) {
    const PackedTile t = packed_tile(tiles, tile);
    for (int j = threadIdx.x; j < t.groups; j += kThreads) {
      weight[j] = applied_alpha<scalar_t>(alpha, t.first_group + j, acc(0));
    }
    __syncthreads();
    scalar_t g[kPackedItems], h[kPackedItems], s[kPackedItems];
#pragma unroll
    for (int u = 0; u < kPackedItems; ++u) {
      const int i = threadIdx.x + u * kThreads;
      if (i < t.length) {
        g[u] = grad[t.begin + i];
        if constexpr (kAlphaGrad) {
          h[u] = host[t.begin + i];
          s[u] = seed[t.begin + i];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kPackedItems; ++u) {
      const int i = threadIdx.x + u * kThreads;
      if (i < t.length) {
        // grad_scales' tensor-alpha factors: a, and 1 - a rounded to the data type.
        const acc a = weight[packed_group(i, group_numel)];
        const acc b = static_cast<acc>(static_cast<scalar_t>(acc(1) - a));
        const acc gi = static_cast<acc>(g[u]);
        if (d_seed != nullptr) d_seed[t.begin + i] = static_cast<scalar_t>(a * gi);
        if (d_host != nullptr) d_host[t.begin + i] = static_cast<scalar_t>(b * gi);
        if constexpr (kAlphaGrad) {
          product[product_slot(i)] = gi * (static_cast<acc>(s[u]) - static_cast<acc>(h[u]));
        }
      }
    }
    if constexpr (kAlphaGrad) {
      __syncthreads();
      const int team = tiles.team, teams = kThreads / team, lane = threadIdx.x % team;
      // The bound is the same for the whole block: every lane reaches the shuffles.
      for (int base = 0; base < t.groups; base += teams) {
        const int j = base + static_cast<int>(threadIdx.x) / team;
        acc sum = acc(0);
        if (j < t.groups) {
          for (int e = lane; e < group_numel; e += team) sum += product[product_slot(j * group_numel + e)];
        }
        for (int offset = team / 2; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset, team);
        if (j < t.groups && lane == 0) {
          const int64_t group = t.first_group + j;
          alpha_grad[group] = clamp_passes_grad(alpha[group]) ? sum : acc(0);
        }
      }
    }
    __syncthreads();  // `weight` and `product` are refilled for the next tile
  }
}

// d_alpha of groups of several group tiles: their tile sums added in tile order (a strided sum
// per thread, then block_sum), one block per group.
template <typename acc>
__global__ void __launch_bounds__(kThreads)
    blend_alpha_grad_kernel(acc* __restrict__ alpha_grad, const acc* __restrict__ tile_sums, AlphaArg alpha,
                            int64_t groups, int64_t tiles_per_group) {
  __shared__ acc shared[kWarps];
  for (int64_t group = blockIdx.x; group < groups; group += gridDim.x) {
    const acc* sums = tile_sums + group * tiles_per_group;
    acc partial = acc(0);
    for (int64_t t = threadIdx.x; t < tiles_per_group; t += kThreads) partial += sums[t];
    const acc total = block_sum(partial, shared);
    if (threadIdx.x == 0) alpha_grad[group] = clamp_passes_grad(alpha[group]) ? total : acc(0);
  }
}

// ---- Launch planning: pure host functions of the shapes, the pointers and the device's numbers.

// Blocks resident at once on a device of `sm_count` SMs with `max_threads_per_sm` threads each.
inline int64_t resident_blocks(int sm_count, int max_threads_per_sm) {
  return int64_t(sm_count) * (max_threads_per_sm / kThreads);
}

inline bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0;
}

// A grid-stride grid never needs more blocks than are resident at once.
inline unsigned int grid_for(int64_t tiles, int64_t resident) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(tiles, resident)));
}

// Group tiles: tiles per group and in all.
struct GroupTiles {
  int64_t tiles_per_group, tiles;
  unsigned int blocks;
};

inline GroupTiles plan_group_tiles(int64_t groups, int64_t group_numel, int vec, int64_t resident) {
  GroupTiles plan;
  const int64_t vecs_per_group = group_numel / vec;
  plan.tiles_per_group = std::max<int64_t>(1, (vecs_per_group + kTileVecs - 1) / kTileVecs);
  plan.tiles = groups * plan.tiles_per_group;
  plan.blocks = grid_for(plan.tiles, resident);
  return plan;
}

// Per-sample groups small enough for packed tiles (a single alpha is one large group).
inline bool packed(int64_t groups, int64_t group_numel) {
  return groups > 1 && group_numel <= kPackedMaxGroupNumel;
}

inline PackedTiles plan_packed_tiles(int64_t groups, int64_t group_numel) {
  PackedTiles plan;
  plan.groups = groups;
  plan.group_numel = static_cast<int>(group_numel);
  plan.groups_per_tile = static_cast<int>(std::min<int64_t>(kPackedMaxGroups, kPackedTileElems / group_numel));
  plan.team = 1;
  while (plan.team < 32 && 2 * plan.team * plan.groups_per_tile <= kThreads) plan.team *= 2;
  plan.count = (groups + plan.groups_per_tile - 1) / plan.groups_per_tile;
  return plan;
}

// ---- The launches of one op: `launch(kernel, grid, threads, args...)` runs a kernel (on a stream
// in blend.cu, emulated in the tests). numel > 0; groups divides numel.

template <typename scalar_t, typename Launch>
void launch_forward(Launch&& launch, scalar_t* out, const scalar_t* host, const scalar_t* seed, AlphaArg alpha,
                    math_type<scalar_t> alpha_value, int64_t numel, int64_t groups, int64_t resident) {
  constexpr int kVec = kVecBytes / sizeof(scalar_t);
  const int64_t group_numel = numel / groups;
  if (packed(groups, group_numel)) {
    const PackedTiles plan = plan_packed_tiles(groups, group_numel);
    launch(blend_forward_packed_kernel<scalar_t>, dim3(grid_for(plan.count, resident)), kThreads, out, host, seed,
           alpha, plan);
  } else if (aligned(host) && aligned(seed) && aligned(out)) {
    const GroupTiles l = plan_group_tiles(groups, group_numel, kVec, resident);
    launch(blend_forward_kernel<scalar_t, kVec>, dim3(l.blocks), kThreads, out, host, seed, alpha, alpha_value,
           group_numel, l.tiles_per_group, l.tiles);
  } else {
    const GroupTiles l = plan_group_tiles(groups, group_numel, 1, resident);
    launch(blend_forward_kernel<scalar_t, 1>, dim3(l.blocks), kThreads, out, host, seed, alpha, alpha_value,
           group_numel, l.tiles_per_group, l.tiles);
  }
}

// The backward's pointers: d_host, d_seed (either may be null), alpha_grad with host and seed
// (null unless d_alpha is wanted), grad.
template <typename scalar_t>
struct BackwardArgs {
  scalar_t* d_host;
  scalar_t* d_seed;
  math_type<scalar_t>* alpha_grad;
  const scalar_t* grad;
  const scalar_t* host;
  const scalar_t* seed;
};

// How the backward runs: packed tiles, or group tiles of `vec`-element vectors; a groups of
// several tiles needs `tile_sums` scratch values (the caller's) for the second, ordered pass.
struct BackwardPlan {
  bool packed;
  int vec;
  int64_t tile_sums;
};

template <typename scalar_t>
BackwardPlan plan_backward(const BackwardArgs<scalar_t>& p, int64_t numel, int64_t groups) {
  constexpr int kVec = kVecBytes / sizeof(scalar_t);
  const int64_t group_numel = numel / groups;
  BackwardPlan plan{packed(groups, group_numel), 1, 0};
  if (plan.packed) return plan;
  const bool vectorise = aligned(p.grad) && (p.host == nullptr || aligned(p.host)) &&
                         (p.seed == nullptr || aligned(p.seed)) && (p.d_host == nullptr || aligned(p.d_host)) &&
                         (p.d_seed == nullptr || aligned(p.d_seed));
  plan.vec = vectorise ? kVec : 1;
  const GroupTiles l = plan_group_tiles(groups, group_numel, plan.vec, 1);
  if (p.alpha_grad != nullptr && l.tiles_per_group > 1) plan.tile_sums = l.tiles;
  return plan;
}

template <typename scalar_t, typename Launch>
void launch_backward(Launch&& launch, const BackwardPlan& plan, const BackwardArgs<scalar_t>& p,
                     math_type<scalar_t>* tile_sums, AlphaArg alpha, math_type<scalar_t> alpha_value,
                     math_type<scalar_t> alpha_complement, int64_t numel, int64_t groups, int64_t resident) {
  using acc = math_type<scalar_t>;
  constexpr int kVec = kVecBytes / sizeof(scalar_t);
  const int64_t group_numel = numel / groups;
  const bool alpha_grad = p.alpha_grad != nullptr;
  if (plan.packed) {
    const PackedTiles tiles = plan_packed_tiles(groups, group_numel);
    const dim3 grid(grid_for(tiles.count, resident));
    if (alpha_grad) {
      launch(blend_backward_packed_kernel<scalar_t, true>, grid, kThreads, p.d_host, p.d_seed, p.alpha_grad, p.grad,
             p.host, p.seed, alpha, tiles);
    } else {
      launch(blend_backward_packed_kernel<scalar_t, false>, grid, kThreads, p.d_host, p.d_seed, p.alpha_grad,
             p.grad, p.host, p.seed, alpha, tiles);
    }
    return;
  }
  auto group_tiles = [&](auto vec_tag, auto alpha_grad_tag) {
    constexpr int kV = decltype(vec_tag)::value;
    constexpr bool kA = decltype(alpha_grad_tag)::value;
    const GroupTiles l = plan_group_tiles(groups, group_numel, kV, resident);
    acc* sums = kA && l.tiles_per_group > 1 ? tile_sums : nullptr;
    launch(blend_backward_kernel<scalar_t, kV, kA>, dim3(l.blocks), kThreads, p.d_host, p.d_seed, p.alpha_grad, sums,
           p.grad, p.host, p.seed, alpha, alpha_value, alpha_complement, group_numel, l.tiles_per_group, l.tiles);
    // Groups of several tiles sum their tiles' partials in a second, ordered pass.
    if (sums != nullptr) {
      launch(blend_alpha_grad_kernel<acc>, dim3(grid_for(groups, resident)), kThreads, p.alpha_grad,
             static_cast<const acc*>(sums), alpha, groups, l.tiles_per_group);
    }
  };
  using Vec = std::integral_constant<int, kVec>;
  using Scalar = std::integral_constant<int, 1>;
  using WithAlphaGrad = std::true_type;
  using NoAlphaGrad = std::false_type;
  if (plan.vec == kVec) {
    alpha_grad ? group_tiles(Vec{}, WithAlphaGrad{}) : group_tiles(Vec{}, NoAlphaGrad{});
  } else {
    alpha_grad ? group_tiles(Scalar{}, WithAlphaGrad{}) : group_tiles(Scalar{}, NoAlphaGrad{});
  }
}

}  // namespace
}  // namespace esper_fast::blend
