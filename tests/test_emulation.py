"""Every CUDA kernel, executed on the CPU: the text of csrc/cuda/<family>_kernels.cuh compiled
with g++ against a CPU runtime for CUDA (tests/emulation/cuda_emulation.h: real threads per
block, barriers and warp shuffles that abort on divergence, poisoned shared memory) and launched
with the launch plan the .cu launchers use, then compared with the CPU kernels
(torch.ops.esper_fast.* on CPU): exact for counts, flags, blend forward, d_host/d_seed and copies;
the loss and d_alpha within the tolerances stated below (their sums run in another order).

The `plain` build runs every case. The ThreadSanitizer and AddressSanitizer(+UBSan) builds run a
subset that still launches every kernel on every tiling plan, both reduction paths (short rows by
lane groups, long rows by blocks; d_alpha per tile, per packed group, and over tiles by the second
kernel) and the ticket path (two updates), on grids of one block and of several. They leave out
the other dtypes, the 50257-wide rows and the repeats over offsets.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import esper_fast  # noqa: F401  (registers torch.ops.esper_fast)

sys.path.insert(0, str(Path(__file__).resolve().parent / "emulation"))
import harness  # noqa: E402

pytestmark = [pytest.mark.emulated, pytest.mark.skipif(harness.available() is not None,
                                                      reason=str(harness.available()))]
OPS = torch.ops.esper_fast
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
SANITIZED = ["tsan", "asan"]
# Device shapes, resident blocks being an input here: a grid of one block (1 SM holding 1 block),
# a few, and an H100's (132 SMs).
ONE_BLOCK, FEW, H100 = (1, 1), (3, 2), (132, 8)
BLEND_ONE_BLOCK, BLEND_FEW, BLEND_H100 = (1, 256), (3, 512), (132, 2048)


@pytest.fixture(scope="module")
def programs():
    return harness.build_all((f, v) for f in harness.FAMILIES for v in ["plain", *SANITIZED])


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _from_bytes(data: bytes, dtype, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def _assert_equal(actual, expected, what):
    bad = ~((actual == expected) | (actual.isnan() & expected.isnan()) if actual.is_floating_point()
            else actual == expected)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        first = ", ".join(f"{i}: {actual[tuple(i)].item()} vs {expected[tuple(i)].item()}" for i in idx)
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} differ; first: {first}")


# ---- metrics: both row kernels, every threads-per-row, stacked, the ticket path.

def _logits(rows, classes, dtype, kind, seed, offset=0, configs=1):
    """[configs * rows, classes] at `offset` elements into its storage; `kind`: random, ties
    (values in a few levels, the row's maximum at its first and last column), or nonfinite
    (rows with NaN, +inf, all -inf among random ones)."""
    g = torch.Generator().manual_seed(seed)
    n = configs * rows * classes
    if kind == "ties":
        storage = (torch.randint(-3, 4, (n + offset,), generator=g) * 0.5).to(dtype)
    else:
        storage = (torch.randn(n + offset, generator=g) * 3).to(dtype)
    x = storage[offset:].view(configs * rows, classes)
    if kind == "ties":
        x[::3, 0] = 9.0
        x[1::3, classes - 1] = 9.0
        x[2::5, :] = 2.0
    if kind == "nonfinite":
        x[0::4, classes // 2] = float("nan")
        x[1::4, classes - 1] = float("inf")
        x[2::8, :] = float("-inf")
    return storage, x


def _targets(rows, classes, seed, ignore_index=-100, bad=True):
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, classes, (rows,), generator=g)
    t[::5] = ignore_index
    if bad and rows > 2:
        t[rows // 2] = classes + 3  # the first bad target
        t[-1] = -7
    return t


def _run_metrics(program, dtype, classes, rows, *, configs=1, per_class=True, batch_loss=None, ignore_index=-100,
                 kind="random", offset=0, device=FEW, bad=True, seed=0):
    torch_dtype = DTYPES[dtype]
    storage, logits = _logits(rows, classes, torch_dtype, kind, seed + classes, offset, configs)
    targets = _targets(rows, classes, seed + classes, ignore_index, bad)
    width = esper_fast._C.metrics_header + (2 * classes if per_class else 0)
    state = torch.zeros(configs, width, dtype=torch.long)
    state[:, esper_fast._C.metrics_slot_correct] = 5  # a state that already holds a batch
    expected = state.clone()
    for _ in range(2):  # two updates: the second finds the ticket reset by the first
        if configs == 1:
            loss = None if batch_loss is None else torch.tensor(batch_loss, dtype=torch.float64)
            OPS.metrics_update(logits, targets, loss, expected[0], ignore_index)
        else:
            OPS.metrics_update_stacked(logits, targets, expected, ignore_index)
    args = [dtype, rows, classes, configs, width, ignore_index, int(batch_loss is not None), 2, *device, offset]
    loss_bytes = b"" if batch_loss is None else torch.tensor([batch_loss], dtype=torch.float64).numpy().tobytes()
    out = harness.run(program, args, _bytes(logits) + _bytes(targets) + _bytes(state) + loss_bytes)
    actual = _from_bytes(out, torch.long, state.shape)
    slot = esper_fast._C.metrics_slot_loss_sum
    _assert_equal(actual[:, slot + 1:], expected[:, slot + 1:], "counts, flags, ticket and per-class counts")
    # The loss sums exp in another order (and with expf, not the CPU kernel's polynomial): float
    # math agrees to a few float32 ulps of the row's sum, float64 to a few of its own.
    got, want = actual[:, slot].view(torch.float64), expected[:, slot].view(torch.float64)
    rtol = 1e-12 if dtype == "float64" else 2e-6
    assert torch.allclose(got, want, rtol=rtol, atol=rtol, equal_nan=True), (got.tolist(), want.tolist())


# Classes giving every threads-per-row (1 and 2: 2 lanes; 3, 4: 4; 5..8: 8; 9..16: 16; up to 1024:
# 32) and both long-row block sizes (256 threads below 16384 classes, 512 from there), with packs
# ending at several points of a thread's unrolled loads.
SHORT_CLASSES = [1, 2, 3, 4, 5, 8, 9, 16, 17, 100, 1000, 1024]
LONG_CLASSES = [1025, 1031, 4099, 16411, 50257]


@pytest.mark.parametrize("classes", SHORT_CLASSES + LONG_CLASSES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_metrics_every_row_kernel(programs, dtype, classes):
    rows = 3 if classes == 50257 else (37 if classes > 1024 else 257)
    _run_metrics(programs["metrics", "plain"], dtype, classes, rows, kind="ties" if classes % 2 else "random")


@pytest.mark.parametrize("classes", [10, 1031, 16411])
@pytest.mark.parametrize("device", [ONE_BLOCK, FEW, H100], ids=["one_block", "few_blocks", "h100"])
@pytest.mark.parametrize("kind", ["random", "ties", "nonfinite"])
def test_metrics_grids_and_values(programs, classes, device, kind):
    rows = 300 if classes == 10 else 9
    _run_metrics(programs["metrics", "plain"], "float32", classes, rows, kind=kind, device=device)


@pytest.mark.parametrize("offset", [1, 3, 5])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_metrics_long_rows_at_odd_storage_offsets(programs, dtype, offset):
    _run_metrics(programs["metrics", "plain"], dtype, 2051, 7, offset=offset, kind="ties")


@pytest.mark.parametrize("classes", [1, 7, 1025])
def test_metrics_one_row_given_loss_no_per_class(programs, classes):
    program = programs["metrics", "plain"]
    _run_metrics(program, "float32", classes, 1, per_class=False, batch_loss=0.625, bad=False)
    _run_metrics(program, "bfloat16", classes, 1, batch_loss=1.5, ignore_index=0, bad=False)


@pytest.mark.parametrize("classes", [6, 1500])
def test_metrics_stacked_configurations(programs, classes):
    _run_metrics(programs["metrics", "plain"], "float32", classes, 40, configs=3, device=ONE_BLOCK)
    _run_metrics(programs["metrics", "plain"], "float16", classes, 40, configs=3, kind="nonfinite")


@pytest.mark.parametrize("variant", SANITIZED)
@pytest.mark.parametrize("classes", [2, 6, 1000, 1031, 16411])
def test_metrics_sanitized(programs, variant, classes):
    """Short rows (2, 8 and 32 lanes) and long rows (256 and 512 threads), one block and several,
    stacked, two updates each, odd storage offsets for the long rows."""
    program = programs["metrics", variant]
    offset = 1 if classes > 1024 else 0
    rows = 40 if classes < 1024 else 5
    _run_metrics(program, "float32", classes, rows, device=ONE_BLOCK, offset=offset, kind="ties")
    _run_metrics(program, "float32", classes, rows, device=FEW, configs=2, kind="nonfinite")


# ---- blend: both forward kernels, the three backward kernels, every tiling plan.

def _alpha(kind, groups, seed):
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "single":
        return torch.tensor(0.3)
    a = torch.rand(groups, generator=g, dtype=torch.float64) * 1.4 - 0.2  # some outside [0, 1]
    if groups > 1:
        a[::7] = float("nan")
    if groups > 3:
        a[1], a[2], a[3] = 0.0, 1.0, 1 + 2**-30  # 1 + 2**-30: outside in float64, 1 in float32
    return a if kind == "per_sample64" else a.float()


def _blend_inputs(dtype, groups, per_group, offsets, seed):
    g = torch.Generator().manual_seed(seed)
    numel = groups * per_group
    views = []
    for off in offsets:
        storage = torch.randn(numel + off, generator=g).to(DTYPES[dtype])
        views.append(storage[off:].view(groups, per_group))
    return views


def _run_blend(program, dtype, groups, per_group, alpha_kind, *, alpha_value=0.3, device=BLEND_FEW, offsets=(0, 0, 0),
               needs=(True, True, True), seed=0):
    torch_dtype = DTYPES[dtype]
    numel = groups * per_group
    alpha = _alpha(alpha_kind, groups, seed)
    alpha_arg = "none" if alpha is None else ("float64" if alpha.dtype == torch.float64 else "float32")
    alpha_bytes = b"" if alpha is None else _bytes(alpha.reshape(-1))
    host, seed_t, grad = _blend_inputs(dtype, groups, per_group, (offsets[0], offsets[1], offsets[0]), seed)
    common = [dtype, numel, groups if alpha is not None and alpha.numel() > 1 else 1, alpha_arg, repr(alpha_value), *device]
    # forward: bit-exact
    expected = OPS.blend_forward(host, seed_t, alpha, alpha_value)
    out = harness.run(program, ["forward", *common, offsets[0], offsets[1], offsets[2]],
                      _bytes(host) + _bytes(seed_t) + alpha_bytes)
    _assert_equal(_from_bytes(out, torch_dtype, expected.shape), expected, "blend forward")
    # backward: d_host, d_seed bit-exact; d_alpha to float rounding of the sum of |g * (seed - host)|
    need_host, need_seed, need_alpha = needs
    need_alpha = need_alpha and alpha is not None
    d_host, d_seed, d_alpha = OPS.blend_backward(grad, host, seed_t, alpha, alpha_value, need_host, need_seed, need_alpha)
    stdin = _bytes(grad) + (_bytes(host) + _bytes(seed_t) if need_alpha else b"") + alpha_bytes
    out = harness.run(program, ["backward", *common, int(need_host), int(need_seed), int(need_alpha), offsets[0],
                                offsets[0], offsets[1], offsets[2], offsets[1]], stdin)
    size = numel * host.element_size()
    if need_host:
        _assert_equal(_from_bytes(out[:size], torch_dtype, d_host.shape), d_host, "d_host")
        out = out[size:]
    if need_seed:
        _assert_equal(_from_bytes(out[:size], torch_dtype, d_seed.shape), d_seed, "d_seed")
        out = out[size:]
    if need_alpha:
        acc = torch.float64 if dtype == "float64" else torch.float32
        sums = _from_bytes(out, acc, (-1,)).to(alpha.dtype).reshape(alpha.shape)
        terms = (grad.double() * (seed_t.double() - host.double())).abs().reshape(sums.numel(), -1).sum(1)
        eps = torch.finfo(acc).eps
        tol = (16 * eps * terms + 1e-30).reshape(sums.shape)
        diff = (sums.double() - d_alpha.double()).abs()
        ok = (diff <= tol) | (sums.isnan() & d_alpha.isnan())
        assert ok.all(), f"d_alpha: {int((~ok).sum())} differ: {sums[~ok][:3].tolist()} vs {d_alpha[~ok][:3].tolist()}"
    else:
        assert out == b""


# (groups, elements per group): packed tiles (small per-sample groups, one element to 1024), one
# group tile per group, several tiles per group (the second d_alpha kernel), a single alpha over
# a large tensor, and tails of every length around the 16-byte vectors.
PLANS = {
    "packed_1": (300, 1), "packed_9": (37, 9), "packed_1024": (3, 1024), "packed_many_tiles": (2100, 3),
    "group_tile": (4, 1500), "group_tiles_several": (3, 10007), "single_large": (1, 20011), "single_tiny": (1, 5),
}


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_blend_every_plan(programs, dtype, plan):
    groups, per_group = PLANS[plan]
    kind = "per_sample" if groups > 1 else "single"
    _run_blend(programs["blend", "plain"], dtype, groups, per_group, kind)


@pytest.mark.parametrize("plan", ["packed_9", "group_tile", "group_tiles_several", "single_large"])
@pytest.mark.parametrize("offsets", [(1, 0, 0), (0, 3, 1), (1, 1, 1)], ids=str)
def test_blend_misaligned_takes_the_scalar_path(programs, plan, offsets):
    groups, per_group = PLANS[plan]
    _run_blend(programs["blend", "plain"], "float16", groups, per_group, "per_sample64" if groups > 1 else "single",
               offsets=offsets)


@pytest.mark.parametrize("alpha_value", [0.0, 0.3, 0.5, 0.7, 1.0, 1.7])
def test_blend_float_alpha(programs, alpha_value):
    _run_blend(programs["blend", "plain"], "float32", 1, 9001, "none", alpha_value=alpha_value)
    _run_blend(programs["blend", "plain"], "bfloat16", 16, 33, "none", alpha_value=alpha_value, device=BLEND_ONE_BLOCK)


@pytest.mark.parametrize("device", [BLEND_ONE_BLOCK, BLEND_FEW, BLEND_H100], ids=["one_block", "few_blocks", "h100"])
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True)], ids=str)
def test_blend_grids_and_wanted_gradients(programs, device, needs):
    for plan in ("packed_many_tiles", "group_tiles_several"):
        groups, per_group = PLANS[plan]
        _run_blend(programs["blend", "plain"], "float32", groups, per_group, "per_sample", device=device, needs=needs)


@pytest.mark.parametrize("variant", SANITIZED)
@pytest.mark.parametrize("plan", ["packed_9", "packed_many_tiles", "group_tile", "group_tiles_several", "single_tiny"])
def test_blend_sanitized(programs, variant, plan):
    """Every blend kernel on one block (tiles strided over it) and on several, vector and scalar."""
    groups, per_group = PLANS[plan]
    kind = "per_sample" if groups > 1 else "single"
    program = programs["blend", variant]
    _run_blend(program, "float32", groups, per_group, kind, device=BLEND_ONE_BLOCK)
    _run_blend(program, "float16", groups, per_group, kind, device=BLEND_FEW, offsets=(1, 0, 0))


# ---- the snapshot copy: many pairs (two launches), aligned and misaligned, pack and unpack.

def _copy_case(sizes, misalign):
    """Buffer offsets: each tensor's 16-byte aligned (misalign None), else `m` bytes past the last."""
    offsets, position = [], 0
    for i, n in enumerate(sizes):
        position += (-position) % 16 if misalign is None else misalign[i]
        offsets.append(position)
        position += n
    return offsets, position + 7


def _run_copy(program, sizes, misalign, tensor_misalign):
    offsets, total = _copy_case(sizes, misalign)
    g = torch.Generator().manual_seed(len(sizes))
    tensors = [torch.randint(0, 256, (n + m,), generator=g, dtype=torch.uint8)[m:] for n, m in zip(sizes, tensor_misalign)]
    args = [total, len(sizes)] + [v for n, o, m in zip(sizes, offsets, tensor_misalign) for v in (n, o, m)]
    buffer = torch.full((total,), 0xFF, dtype=torch.uint8)
    OPS.snapshot_pack(tensors, buffer, offsets)
    out = harness.run(program, ["pack", *args], b"".join(_bytes(t) for t in tensors))
    _assert_equal(torch.frombuffer(bytearray(out), dtype=torch.uint8), buffer, "packed buffer")
    source = torch.randint(0, 256, (total,), generator=g, dtype=torch.uint8)
    expected = [torch.empty_like(t) for t in tensors]
    OPS.snapshot_unpack(expected, source, offsets)
    out = harness.run(program, ["unpack", *args], _bytes(source))
    start = 0
    for e in expected:
        _assert_equal(torch.frombuffer(bytearray(out[start:start + e.numel()]), dtype=torch.uint8), e, "unpacked tensor")
        start += e.numel()


@pytest.mark.parametrize("variant", ["plain", *SANITIZED])
def test_snapshot_copy(programs, variant):
    program = programs["snapshot", variant]
    # 70 pairs: two launches; sizes around the 16-byte vectors, one of 70000 bytes (18 x blocks).
    sizes = [1, 15, 16, 17, 31, 32, 33, 100, 4096, 4101] * 6 + [70000] + [3] * 9
    aligned = [0] * len(sizes)
    _run_copy(program, sizes, None, aligned)
    _run_copy(program, sizes, [i % 3 for i in range(len(sizes))], [i % 5 for i in range(len(sizes))])
    if variant == "plain":
        _run_copy(program, [3_000_000, 5], None, [0, 0])  # 733 x blocks of the 1024 at most


# ---- the runtime's own rules.

def test_runtime_shuffles_follow_cuda_lane_rules():
    """Every lane's source for __shfl_sync, _up, _down, _xor at every width, against the rules of
    the CUDA programming guide (a source outside the lane's segment gives the lane its own value)."""
    out = harness.run(harness.build("runtime"), ["shuffles"], b"")
    got = _from_bytes(out, torch.int32, (6, 11, 4, 32)).tolist()
    for wi, width in enumerate([1, 2, 4, 8, 16, 32]):
        for bi, b in enumerate(range(0, 33, 3)):
            for lane in range(32):
                base = lane // width * width
                expected = [base + b % width,
                            lane - b if lane - b >= base else lane,
                            lane + b if lane + b < base + width else lane,
                            lane ^ (b % 32) if (lane ^ (b % 32)) < base + width else lane]
                assert [got[wi][bi][k][lane] for k in range(4)] == expected, (width, b, lane)


@pytest.mark.parametrize("mode,message", [
    ("exit_before_barrier", "exited while others wait at __syncthreads|after a thread of the block exited"),
    ("partial_mask", "partial mask"),
    ("divergent_shuffle", "divergent warp"),
])
def test_runtime_aborts_on_broken_rules(mode, message):
    with pytest.raises(harness.EmulationFailed, match=message):
        harness.run(harness.build("runtime"), [mode], b"")


# ---- what the GPU check's report says the emulation covers.

def test_coverage_names_every_kernel_and_reaches_the_gpu_report():
    import importlib.util
    import re

    import emulated_paths

    kernels = set()
    for header in harness.CSRC.glob("cuda/*_kernels.cuh"):
        kernels |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", header.read_text()))
    assert kernels and kernels == set(emulated_paths.VERIFIED)
    spec = importlib.util.spec_from_file_location("gpu_finalize", harness.ROOT / "benchmarks" / "gpu_finalize.py")
    gpu_finalize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_finalize)
    assert gpu_finalize.emulation_coverage() == {"verified_by_emulation": emulated_paths.VERIFIED,
                                                 "device_only": emulated_paths.DEVICE_ONLY}
