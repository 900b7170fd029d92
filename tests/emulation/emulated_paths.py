"""What the CPU emulation (tests/test_emulation.py) verifies on every CI run, and what it leaves to
a GPU. The GPU check's report (benchmarks/gpu_finalize.py) carries both lists, so a device run
spends its minutes on the second. tests/test_emulation.py checks that every __global__ kernel of
csrc/cuda/*_kernels.cuh is listed. Plain data: read without importing torch.
"""

# kernel: the paths launched and compared with the CPU kernels (plain build), the ones also run
# under ThreadSanitizer and AddressSanitizer+UBSan marked "(sanitized)".
VERIFIED = {
    "metrics_short_rows_kernel": [
        "every threads-per-row (2, 4, 8, 16, 32 lanes; C = 1 to 1024), 4 dtypes (sanitized: 2, 8, 32 lanes)",
        "grids of 1 block, of a few, of an H100's resident blocks; grid-stride over rows",
        "ties, NaN/+inf/-inf rows, ignore_index (outside and inside the classes), bad targets, one row",
        "given batch loss, per-class counts on and off, stacked K = 3 (sanitized: K = 2)",
        "two updates into one state: the last-block ticket and its reset (sanitized)",
    ],
    "metrics_long_rows_kernel": [
        "256 and 512 threads (C = 1025 to 50257), 4 dtypes, packs ending at several unroll tails (sanitized)",
        "rows at odd storage offsets 1, 3, 5 (scalar heads), ties, NaN/inf rows (sanitized)",
        "several rows per block (1-block grid) and one row per block; the ticket path (sanitized)",
    ],
    "blend_forward_kernel": [
        "16-byte vectors and the scalar path (misaligned pointers), heads and tails, 4 dtypes (sanitized)",
        "single tensor alpha, per-sample alpha with NaN and values outside [0, 1], float alpha 0 to 1.7",
        "1 group tile per group and several; 1-block grid striding over tiles (sanitized)",
    ],
    "blend_forward_packed_kernel": ["packed tiles of 1 to 1024 elements per group, many tiles (sanitized)"],
    "blend_backward_kernel": [
        "d_host, d_seed bit-exact, d_alpha per tile and into tile sums; every subset of wanted gradients (sanitized)",
    ],
    "blend_backward_packed_kernel": ["d_alpha per packed group by teams of lanes (shuffle width < 32) (sanitized)"],
    "blend_alpha_grad_kernel": ["groups of several tiles: tile sums added in order (sanitized)"],
    "multi_tensor_copy_kernel": [
        "70 pairs (two launches), vector and byte paths, misaligned pairs, pack and unpack, byte-exact (sanitized)",
    ],
}

# What only a GPU shows: the device run's business.
DEVICE_ONLY = [
    "memory ordering between blocks running at once (__threadfence before the ticket; blocks run one at a "
    "time in the emulation)",
    "nvcc's arithmetic: __expf's approximation, its FMA contraction, denormals (ptxas/SASS checks aside)",
    "warps in lockstep, shuffles and barriers on the hardware, occupancy and the resident-block count",
    "the .cu launchers: device guard, streams, workspace allocation, launch errors",
    "snapshot staging: pinned memory, cudaMemcpyAsync, events, the caching host allocator",
    "speed",
]
