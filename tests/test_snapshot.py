"""Snapshot copy operators and HostSnapshot: bit-exact round trips, layout, atomicity, memory."""

import gc
import os
import subprocess
import sys

import pytest
import torch

import esper_fast.ops.snapshot as snapshot_module
from esper_fast import _C
from esper_fast.ops import HostSnapshot
from esper_fast.ops.snapshot import snapshot_pack, snapshot_unpack

CUDA = torch.cuda.is_available()
# Tensors under this many bytes share a staged transfer on CUDA; larger ones are copied directly.
STAGED = _C.snapshot_staged_copy_bytes
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_like_dtype(shape, dtype, device):
    if dtype == torch.bool:
        return torch.rand(shape, device=device) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(-(2**40), 2**40, shape, dtype=dtype, device=device)
    return torch.randn(shape, device=device).to(dtype)


def _mixed_tensors(device):
    """fp32/fp16/bf16/int64/bool, odd sizes, 0-d, 1 element, empty, non-contiguous, > staging size."""
    ts = [
        _random_like_dtype((7, 13), torch.float32, device),
        _random_like_dtype((5, 3, 3, 3), torch.float16, device),
        _random_like_dtype((1001,), torch.bfloat16, device),
        _random_like_dtype((17,), torch.int64, device),
        _random_like_dtype((9, 2), torch.bool, device),
        _random_like_dtype((), torch.float32, device),
        _random_like_dtype((1,), torch.float16, device),
        torch.empty(0, 4, device=device),
        _random_like_dtype((6, 10), torch.float32, device).t(),  # transposed
        _random_like_dtype((8, 9), torch.bfloat16, device)[::2, 1::3],  # strided slice
        _random_like_dtype((3, 8, 5, 5), torch.float32, device).to(memory_format=torch.channels_last),
        _random_like_dtype((STAGED // 4 + 1,), torch.float32, device),  # a direct copy on CUDA
        _random_like_dtype((1000, 700), torch.float16, device).t(),  # large and non-contiguous
        _random_like_dtype((3,), torch.float64, device),
    ]
    return ts


def _poison(tensors):
    with torch.no_grad():
        for t in tensors:
            if t.dtype == torch.bool:
                t.logical_not_()
            elif t.dtype.is_floating_point:
                t.fill_(float("nan"))
            else:
                t.fill_(-7)


def _assert_bit_exact(actual, expected):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, i
        assert torch.equal(a.cpu().contiguous().view(-1).view(torch.uint8) if a.numel() else a.cpu(),
                           e.cpu().contiguous().view(-1).view(torch.uint8) if e.numel() else e.cpu()), f"tensor {i}"


# ----------------------------------------------------------------------------- operators


def test_pack_unpack_round_trip_is_bit_exact(device):
    tensors = _mixed_tensors(device)
    expected = [t.clone() for t in tensors]
    offsets, cursor = [], 0
    for t in tensors:
        offsets.append(cursor)
        cursor += (t.numel() * t.element_size() + 63) // 64 * 64 + 64
    pin = device == "cuda"
    buffer = torch.zeros(cursor, dtype=torch.uint8, pin_memory=pin)
    snapshot_pack(tensors, buffer, offsets)
    if device == "cuda":
        torch.cuda.synchronize()
    for t, offset in zip(tensors, offsets):
        n = t.numel() * t.element_size()
        packed = buffer[offset : offset + n].view(t.dtype).view(t.shape)
        assert torch.equal(packed, t.cpu()), (t.dtype, t.shape)
    _poison(tensors)
    snapshot_unpack(tensors, buffer, offsets)
    if device == "cuda":
        torch.cuda.synchronize()
    _assert_bit_exact(tensors, expected)


def test_pack_unpack_offsets_aligned_only_to_the_element_size(device):
    """The first small tensor sits 2 bytes in: CUDA staging must keep the others element-aligned."""
    tensors = [
        torch.randn(1, device=device).half(),  # bytes [2, 4)
        torch.randn(4, 6, device=device).t(),  # [8, 104), non-contiguous: a typed copy into staging
        torch.randn(5, device=device),  # [104, 124)
        torch.randint(-9, 9, (3, 2), device=device).t(),  # [136, 184), int64, non-contiguous
    ]
    offsets = [2, 8, 104, 136]
    expected = [t.clone() for t in tensors]
    buffer = torch.zeros(192, dtype=torch.uint8, pin_memory=device == "cuda")
    snapshot_pack(tensors, buffer, offsets)
    if device == "cuda":
        torch.cuda.synchronize()
    for t, offset in zip(expected, offsets):
        n = t.numel() * t.element_size()
        assert torch.equal(buffer[offset : offset + n].view(t.dtype).view(t.shape), t.cpu())
    _poison(tensors)
    snapshot_unpack(tensors, buffer, offsets)
    if device == "cuda":
        torch.cuda.synchronize()
    _assert_bit_exact(tensors, expected)


def test_pack_rejects_bad_arguments():
    t = torch.randn(10)
    with pytest.raises(RuntimeError, match="does not fit"):
        snapshot_pack([t], torch.empty(16, dtype=torch.uint8), [0])
    with pytest.raises(RuntimeError, match="uint8"):
        snapshot_pack([t], torch.empty(64), [0])
    with pytest.raises(RuntimeError, match="offsets"):
        snapshot_pack([t], torch.empty(64, dtype=torch.uint8), [0, 8])
    with pytest.raises(RuntimeError, match="element size"):
        snapshot_pack([t], torch.empty(128, dtype=torch.uint8), [2])


_OFFSET_NEAR_INT64_MAX = """
import sys
import torch
import esper_fast  # noqa: F401
from esper_fast.ops.snapshot import snapshot_pack, snapshot_unpack

device = sys.argv[1]
t = torch.randn(4, device=device)
pin = device == "cuda"
for offset in (2**63 - 8, 2**63 - 16, 2**62):
    for op in (snapshot_pack, snapshot_unpack):
        try:
            op([t], torch.zeros(64, dtype=torch.uint8, pin_memory=pin), [offset])
        except RuntimeError as exc:
            assert "does not fit" in str(exc), exc
        else:
            raise SystemExit(f"{op.__name__} accepted offset {offset} for a 64-byte buffer")
print("rejected")
"""


def test_pack_rejects_an_offset_whose_end_overflows(device):
    """offset + nbytes past INT64_MAX must not wrap into range (the copy would write anywhere).
    In a child process: before the check was overflow-safe this crashed the interpreter."""
    done = subprocess.run([sys.executable, "-c", _OFFSET_NEAR_INT64_MAX, device], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert done.returncode == 0 and "rejected" in done.stdout, (done.returncode, done.stdout, done.stderr[-2000:])


def test_pack_rejects_a_buffer_starting_off_the_element_size(device):
    """A typed view at an odd address would fault on CUDA (misaligned address): refuse it up front."""
    tensors = [torch.randn(4, 6, device=device).t()]
    buffer = torch.zeros(129, dtype=torch.uint8, device=device)[1:]
    with pytest.raises(RuntimeError, match="start address"):
        snapshot_pack(tensors, buffer, [0])
    with pytest.raises(RuntimeError, match="start address"):
        snapshot_unpack(tensors, buffer, [0])


def test_opcheck(device):
    tensors = [torch.randn(5, device=device), torch.randn(4, 6, device=device).t(), torch.arange(3, device=device)]
    buffer = torch.zeros(256, dtype=torch.uint8, pin_memory=device == "cuda")
    offsets = [0, 64, 192]
    torch.library.opcheck(torch.ops.esper_fast.snapshot_pack.default, (tensors, buffer, offsets))
    torch.library.opcheck(torch.ops.esper_fast.snapshot_unpack.default, (tensors, buffer, offsets))


# ----------------------------------------------------------------------------- HostSnapshot


def test_capture_restore_list_bit_exact(device):
    tensors = _mixed_tensors(device)
    expected = [t.clone() for t in tensors]
    snap = HostSnapshot()
    views = snap.capture(tensors)
    _assert_bit_exact(views, expected)
    assert all(v.device.type == "cpu" and not v.requires_grad for v in views)
    if device == "cuda":
        assert views[0].is_pinned()
    _poison(tensors)
    snap.restore(tensors)
    _assert_bit_exact(tensors, expected)


def test_capture_views_are_aligned_and_independent():
    tensors = [torch.randn(3), torch.randn(5, 7), torch.arange(11)]
    snap = HostSnapshot(alignment=64)
    views = snap.capture(tensors)
    base = views[0].untyped_storage().data_ptr()
    for v, t in zip(views, tensors):
        assert (v.data_ptr() - base) % 64 == 0
        assert v.untyped_storage().data_ptr() == base  # one flat buffer
        assert v.data_ptr() != t.data_ptr()
    tensors[0].add_(1.0)
    assert not torch.equal(views[0], tensors[0])


def test_capture_mapping_keeps_keys_order_and_extras():
    state = {"w": torch.randn(4, 4), "meta": {"step": [1, 2]}, "b": torch.randn(4), "n": torch.tensor(3)}
    snap = HostSnapshot()
    views = snap.capture(state)
    assert list(views) == list(state)
    assert views["meta"] == {"step": [1, 2]} and views["meta"] is not state["meta"]
    state["meta"]["step"].append(3)
    assert snap.state["meta"] == {"step": [1, 2]}
    for key in ("w", "b", "n"):
        assert torch.equal(views[key], state[key])


def test_restore_mapping_reports_missing_and_unexpected():
    snap = HostSnapshot()
    a, b = torch.randn(3), torch.randn(2)
    snap.capture({"a": a, "b": b})
    a_expected = a.clone()
    a.zero_()
    result = snap.restore({"a": a, "c": torch.randn(5)})
    assert torch.equal(a, a_expected)
    assert result.missing_keys == ["b"] and result.unexpected_keys == ["c"]


def test_restore_rejects_shape_or_dtype_change():
    snap = HostSnapshot()
    snap.capture({"a": torch.randn(3)})
    with pytest.raises(ValueError, match="cannot restore 'a'"):
        snap.restore({"a": torch.randn(4)})
    with pytest.raises(ValueError, match="cannot restore 'a'"):
        snap.restore({"a": torch.randn(3).half()})
    with pytest.raises(ValueError, match="sequence"):
        snap.restore([torch.randn(3)])


def test_restore_before_capture_raises():
    with pytest.raises(RuntimeError, match="before any capture"):
        HostSnapshot().restore([torch.randn(2)])


def test_reallocates_only_when_layout_grows():
    snap = HostSnapshot()
    tensors = [torch.randn(100), torch.randn(10, 10).half()]
    for _ in range(6):
        snap.capture(tensors)
        for t in tensors:
            t.add_(1)
    assert snap.allocations == 2  # one per buffer of the double buffer
    snap.capture([torch.randn(50), torch.randn(10, 10).half()])  # smaller: fits, reused
    assert snap.allocations == 2
    bigger = [torch.randn(5000), torch.randn(10, 10).half()]
    snap.capture(bigger)
    snap.capture(bigger)
    assert snap.allocations == 4
    assert torch.equal(snap.state[0], bigger[0])


def test_double_buffer_keeps_previous_views_until_next_but_one():
    snap = HostSnapshot()
    t = torch.zeros(8)
    first = snap.capture([t])
    t.fill_(1)
    second = snap.capture([t])
    assert torch.equal(first[0], torch.zeros(8)) and torch.equal(second[0], torch.ones(8))


def test_exception_mid_capture_leaves_previous_snapshot_intact(monkeypatch):
    tensors = [torch.randn(64) for _ in range(6)]
    snap = HostSnapshot()
    snap.capture(tensors)
    good = [t.clone() for t in tensors]
    for t in tensors:
        t.fill_(99.0)

    def failing_pack(values, buffer, offsets):
        half = len(values) // 2
        snapshot_pack(values[:half], buffer, offsets[:half])  # a partial write really happens
        raise KeyboardInterrupt("interrupted mid-capture")

    monkeypatch.setattr(snapshot_module, "snapshot_pack", failing_pack)
    for _ in range(2):  # both buffers get a torn write attempt
        with pytest.raises(KeyboardInterrupt):
            snap.capture(tensors)
    _assert_bit_exact(snap.state, good)
    snap.restore(tensors)
    _assert_bit_exact(tensors, good)


def test_single_buffer_mode_forgets_snapshot_on_failed_capture(monkeypatch):
    snap = HostSnapshot(double_buffer=False)
    snap.capture([torch.randn(4)])

    def failing_pack(values, buffer, offsets):
        raise RuntimeError("boom")

    monkeypatch.setattr(snapshot_module, "snapshot_pack", failing_pack)
    with pytest.raises(RuntimeError, match="boom"):
        snap.capture([torch.randn(4)])
    assert snap.state is None  # never a torn snapshot


def test_capture_and_restore_parameters_keep_identity():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7))
    snap = HostSnapshot()
    params = list(model.parameters())
    state = snap.capture(model.state_dict(keep_vars=True))
    assert all(not v.requires_grad for v in state.values())
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model(torch.randn(16, 5)).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    snap.restore(model.state_dict(keep_vars=True))
    assert all(a is b for a, b in zip(params, model.parameters()))
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def _rss_bytes():
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_thousand_cycles_do_not_grow_memory(device):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 16, 3), torch.nn.Linear(4, 4)
    ).to(device)
    snap = HostSnapshot()

    def cycle():
        snap.capture(model.state_dict(keep_vars=True))
        snap.restore(model.state_dict(keep_vars=True))

    for _ in range(50):
        cycle()
    gc.collect()
    rss_before = _rss_bytes()
    cuda_before = torch.cuda.memory_allocated() if device == "cuda" else 0
    for _ in range(1000):
        cycle()
    gc.collect()
    assert snap.allocations == 2
    assert _rss_bytes() - rss_before < 4 * 1024 * 1024
    if device == "cuda":
        assert torch.cuda.memory_allocated() == cuda_before


# ----------------------------------------------------------------------------- CUDA only


@pytest.mark.cuda
def test_cuda_non_blocking_capture_commits_only_when_complete():
    big = torch.randn(8 << 20, device="cuda")  # 32 MiB: the transfer takes a while
    small = torch.randn(7, device="cuda")
    snap = HostSnapshot()
    snap.capture([big, small])
    first = [big.clone(), small.clone()]
    big.add_(1)
    small.add_(1)
    torch.cuda._sleep(50_000_000)  # keep the stream busy so the copy is still queued
    assert snap.capture([big, small], non_blocking=True) is None
    assert snap.pending
    _assert_bit_exact(snap.state, first)  # the previous snapshot, never a torn one
    snap.wait()
    assert not snap.pending
    _assert_bit_exact(snap.state, [big, small])


@pytest.mark.cuda
def test_cuda_restore_during_non_blocking_capture_uses_committed_snapshot():
    t = torch.randn(1000, device="cuda")
    snap = HostSnapshot()
    snap.capture([t])
    good = t.clone()
    t.zero_()
    torch.cuda._sleep(50_000_000)
    snap.capture([t], non_blocking=True)
    snap.restore([t])  # the zeros capture is still queued: the committed one is restored
    assert torch.equal(t, good)
    snap.wait()
    assert torch.equal(snap.state[0], torch.zeros(1000))


@pytest.mark.cuda
def test_cuda_device_resident_snapshot():
    tensors = _mixed_tensors("cuda")
    expected = [t.clone() for t in tensors]
    snap = HostSnapshot(device_resident=True)
    views = snap.capture(tensors)
    assert all(v.is_cuda for v in views)
    _assert_bit_exact(views, expected)
    _poison(tensors)
    snap.restore(tensors)
    _assert_bit_exact(tensors, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("device_resident", [False, True])
def test_cuda_mixed_cpu_and_cuda_tensors(device_resident):
    # CPU tensors between CUDA ones, as an optimizer's step counts sit between its moments.
    tensors = [torch.randn(5, device="cuda"), torch.randn(3), torch.arange(4, device="cuda"), torch.tensor(2.0)]
    expected = [t.clone() for t in tensors]
    snap = HostSnapshot(device_resident=device_resident)
    torch.full((1 << 12,), 255, dtype=torch.uint8, device="cuda")  # freed at once: NaN bytes for the next scratch
    torch.cuda._sleep(50_000_000)  # the CUDA transfer lands after the CPU tensors' bytes are written
    views = snap.capture(tensors)
    _assert_bit_exact(views, expected)
    _poison(tensors)
    snap.restore(tensors)
    _assert_bit_exact(tensors, expected)


def test_layout_keeps_each_devices_small_tensors_in_one_run():
    """A CUDA staging range spans its device's small tensors; no other device's may lie inside."""
    devices = ["cpu", "meta", "cpu", "meta", "meta", "cpu"]
    values = [torch.empty(n, device=d) for n, d in zip([3, 5, 1, STAGED // 4 + 1, 7, 2], devices)]
    snap = HostSnapshot()
    slot = snap._slots[0]
    snap._ensure_layout(slot, None, values)
    small = [i for i, t in enumerate(values) if t.numel() * 4 < STAGED]
    for device in ("cpu", "meta"):
        mine = [i for i in small if devices[i] == device]
        lo = min(slot.offsets[i] for i in mine)
        hi = max(slot.offsets[i] + values[i].numel() * 4 for i in mine)
        others = [i for i in range(len(values)) if devices[i] != device]
        assert all(slot.offsets[i] + values[i].numel() * 4 <= lo or slot.offsets[i] >= hi for i in others), device


@pytest.mark.cuda
def test_cuda_many_tensors_span_several_launches():
    tensors = [torch.randn(i % 37 + 1, device="cuda").half() for i in range(300)]
    expected = [t.clone() for t in tensors]
    snap = HostSnapshot()
    snap.capture(tensors)
    _poison(tensors)
    snap.restore(tensors)
    _assert_bit_exact(tensors, expected)


@pytest.mark.cuda
def test_cuda_small_tensors_beyond_one_staging_range():
    # 80 tensors just under the direct-copy size: 80 MB of staged bytes, more than one 64 MiB range.
    tensors = [torch.randn(STAGED // 4 - 12_144, device="cuda") for _ in range(80)]
    tensors.insert(40, torch.randn(2 * STAGED, device="cuda"))  # a direct copy between them
    expected = [t.clone() for t in tensors]
    snap = HostSnapshot()
    views = snap.capture(tensors)
    _assert_bit_exact(views, expected)
    _poison(tensors)
    snap.restore(tensors)
    _assert_bit_exact(tensors, expected)


@pytest.mark.cuda
def test_cuda_dropped_snapshot_keeps_its_pinned_block_until_queued_copies_finish():
    """Freeing the buffer with a transfer still queued must not hand its pinned block out again."""
    t = torch.randn(STAGED // 16, device="cuda")  # a quarter of the threshold: one staged transfer
    good = t.clone()
    snap = HostSnapshot(double_buffer=False)
    snap.capture([t])
    nbytes = snap.nbytes
    t.zero_()
    torch.cuda._sleep(50_000_000)  # the restore below stays queued behind this
    snap.restore([t], non_blocking=True)
    del snap  # no reference cycle: the buffer is freed here, with the restore still queued
    reused = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    reused.fill_(0xFF)  # in the snapshot's block, the queued restore would read NaNs
    torch.cuda.synchronize()
    assert torch.equal(t, good)

    snap = HostSnapshot(double_buffer=False)
    torch.cuda._sleep(50_000_000)
    snap.capture([t], non_blocking=True)
    del snap
    reused = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    reused.fill_(7)  # in the snapshot's block, the queued capture would overwrite it
    torch.cuda.synchronize()
    assert bool((reused == 7).all())


@pytest.mark.cuda
def test_cuda_capture_on_a_side_stream_records_its_event_there():
    """Copies go on the current stream, and a non-blocking capture's event is recorded on it: with
    that stream asleep, the capture is still pending, and it commits the values written behind
    the sleep."""
    tensors = [torch.randn(1000, device="cuda"), torch.randn(3 << 20, device="cuda"), torch.randn(7, device="cuda")]
    snap = HostSnapshot()
    for _ in range(2):  # both buffers allocated up front: no pinned allocation while the stream sleeps
        snap.capture(tensors)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        for t in tensors:
            t.add_(1.0)
        assert snap.capture(tensors, non_blocking=True) is None
    assert not snap.poll(), "committed before the side stream got to the copies"
    snap.wait()
    side.synchronize()
    _assert_bit_exact(snap.state, tensors)
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        for t in tensors:
            t.zero_()
        snap.restore(tensors)
    side.synchronize()
    expected = snap.state
    _assert_bit_exact(tensors, expected)


@pytest.mark.cuda
def test_cuda_device_resident_snapshot_of_a_tensor_at_an_odd_storage_offset():
    # randn(101)[1:]: the data starts 4 bytes into its allocation, off the 16-byte vector grid.
    tensors = [torch.randn(101, device="cuda")[1:], torch.randn(33, device="cuda", dtype=torch.float16)[3:]]
    expected = [t.clone() for t in tensors]
    for device_resident in (True, False):
        snap = HostSnapshot(device_resident=device_resident)
        views = snap.capture(tensors)
        torch.cuda.synchronize()
        _assert_bit_exact(views, expected)
        _poison(tensors)
        snap.restore(tensors)
        torch.cuda.synchronize()
        _assert_bit_exact(tensors, expected)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_snapshot_on_the_second_device_while_the_first_is_current():
    torch.cuda.set_device(0)
    tensors = _mixed_tensors("cuda:1")
    expected = [t.clone() for t in tensors]
    for device_resident in (False, True):
        snap = HostSnapshot(device_resident=device_resident)
        snap.capture(tensors)
        _poison(tensors)
        snap.restore(tensors)
        torch.cuda.synchronize(1)
        _assert_bit_exact(tensors, expected)
    assert torch.cuda.current_device() == 0
