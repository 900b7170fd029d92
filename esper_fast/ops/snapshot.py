"""Snapshot copy: many tensors into one persistent flat buffer and back, in a few launches.

Two operators do the copying (schemas in ``csrc/esper_fast.cpp``):

- ``snapshot_pack(tensors, buffer, offsets)``: the bytes of ``tensors[i]`` (row-major, whatever
  its strides) go to ``buffer[offsets[i]:]``. ``buffer`` is a 1-D uint8 tensor on the host
  (pinned for CUDA tensors) or on the tensors' device. From CUDA into a host buffer, the
  bytes between the tensors under the staging threshold (padding) are overwritten too
  (``esper_fast._C.snapshot_staged_copy_bytes``): keep data from other calls out of the span
  from the first to the last of them.
- ``snapshot_unpack(tensors, buffer, offsets)``: the inverse, in place.

On CPU both are one parallel memcpy; on CUDA small tensors share one gather kernel and one
transfer, large ones are transferred directly, all on the current stream with no
synchronisation (the caller decides when to wait). :class:`HostSnapshot` manages the buffer,
its layout, double buffering and commit semantics on top of them.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, NamedTuple, Sequence

import torch

import esper_fast._C as _C

__all__ = ["HostSnapshot", "RestoreResult", "snapshot_pack", "snapshot_unpack"]

# Tensors smaller than this are staged together on CUDA (the extension's kStagedCopyBytes, in
# csrc/snapshot.h); the layout puts them first so their staging range is dense.
_STAGED_COPY_BYTES = _C.snapshot_staged_copy_bytes


def snapshot_pack(tensors: Sequence[torch.Tensor], buffer: torch.Tensor, offsets: Sequence[int]) -> None:
    """Copy each tensor's bytes into the uint8 ``buffer`` at ``offsets[i]`` (not synchronised on CUDA)."""
    torch.ops.esper_fast.snapshot_pack.default(list(tensors), buffer, list(offsets))


def snapshot_unpack(tensors: Sequence[torch.Tensor], buffer: torch.Tensor, offsets: Sequence[int]) -> None:
    """Copy the bytes at ``offsets[i]`` of ``buffer`` back into ``tensors[i]`` in place."""
    torch.ops.esper_fast.snapshot_unpack.default(list(tensors), buffer, list(offsets))


def _check_fake_args(tensors, buffer, offsets) -> None:
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError(f"esper_fast: snapshot buffer must be a 1-D uint8 tensor, got {buffer.dtype} {tuple(buffer.shape)}")
    if len(offsets) != len(tensors):
        raise ValueError(f"esper_fast: snapshot got {len(tensors)} tensors but {len(offsets)} offsets")


@torch.library.register_fake("esper_fast::snapshot_pack")
def _snapshot_pack_fake(tensors, buffer, offsets):
    _check_fake_args(tensors, buffer, offsets)


@torch.library.register_fake("esper_fast::snapshot_unpack")
def _snapshot_unpack_fake(tensors, buffer, offsets):
    _check_fake_args(tensors, buffer, offsets)


class RestoreResult(NamedTuple):
    """Keys of a mapping restore that did not line up (as ``load_state_dict(strict=False)``)."""

    missing_keys: list  # in the snapshot, absent from the targets: left untouched
    unexpected_keys: list  # in the targets, absent from the snapshot: left untouched


class _Slot:
    """One buffer and the layout of the snapshot it holds."""

    __slots__ = (
        "buffer", "signature", "placement", "keys", "offsets", "views", "extras", "index", "order", "cuda_devices",
    )

    def __init__(self):
        self.buffer = None  # flat uint8 tensor
        self.signature = None  # (keys, ((shape, dtype, device), ...)) of the tensors laid out
        self.placement = None  # ("host", pinned) or ("device", device) of `buffer`
        self.keys = None  # tensor keys in capture order (positions for a sequence)
        self.offsets = None  # byte offset per tensor, capture order
        self.views = None  # typed views into `buffer`, capture order
        self.extras = {}  # key -> deep-copied non-tensor value
        self.index = None  # key -> position in `views`
        self.order = None  # every key of a mapping with extras, in its order
        self.cuda_devices = []  # CUDA devices among the tensors: where capture records events


class HostSnapshot:
    """A persistent flat buffer holding copies of a list or dict of tensors.

    ``capture(tensors)`` copies every tensor into one buffer at 64-byte aligned offsets and
    returns views into it with the same structure: a list for a sequence, a dict for a
    mapping (whose non-tensor values are deep-copied and returned as they are). The views
    never require grad and stay valid until the next-but-one capture (two buffers
    alternate); ``state`` always returns the latest committed snapshot.
    ``restore(tensors)`` copies the committed snapshot back into ``tensors`` in place
    (same structure; a mapping restores the keys both share, like
    ``load_state_dict(strict=False)``), so ``nn.Parameter`` objects and optimizer references
    stay valid.

    Placement: by default the buffer is host memory, page-locked when any captured tensor
    is on CUDA (so transfers are true DMA) and plain otherwise. With
    ``device_resident=True`` it lives on the tensors' GPU instead (the first one; tensors on
    other devices, such as an optimizer's CPU step counts, are copied one by one): one
    device copy, no transfer, instant rollback, at the price of device memory.

    Commit and atomicity: a capture writes into the buffer that does not hold the current
    snapshot (with ``double_buffer=True``, the default) and becomes current only once it
    is complete, so an exception or ``KeyboardInterrupt`` mid-capture leaves the previous
    snapshot intact. ``capture(..., non_blocking=True)`` enqueues the copy on the current
    CUDA stream and returns ``None`` at once; it commits when its CUDA event has completed,
    observed by ``poll()``, ``wait()``, ``state``, ``restore()`` or the next capture (which
    waits for it). Until then ``state`` and ``restore()`` use the previous snapshot, never a
    half-written one; the captured tensors may be changed by later work on the same stream
    (it runs after the copy), not from another stream before the commit. A blocking capture of CUDA tensors synchronises once at the end for a
    host buffer and not at all for a device-resident one (its views are stream-ordered).

    Memory: the buffers are reallocated only when the set of keys, shapes or dtypes grows
    beyond their capacity; ``allocations`` counts buffer allocations.
    """

    def __init__(self, *, device_resident: bool = False, double_buffer: bool = True, alignment: int = 64):
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"esper_fast: HostSnapshot alignment must be a power of two, got {alignment}")
        self.device_resident = device_resident
        self.alignment = alignment
        self._slots = [_Slot() for _ in range(2 if double_buffer else 1)]
        self._active = None  # index of the committed slot
        self._pending = None  # (slot index, [cuda events]) of a capture in flight
        self.allocations = 0

    # ------------------------------------------------------------------ state
    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (all slots)."""
        return sum(slot.buffer.numel() for slot in self._slots if slot.buffer is not None)

    @property
    def pending(self) -> bool:
        """True while a non-blocking capture is in flight and not yet committed."""
        self.poll()
        return self._pending is not None

    @property
    def state(self):
        """The committed snapshot's views (a fresh list/dict each call), or None before any capture."""
        self.poll()
        return None if self._active is None else self._structure(self._slots[self._active])

    def poll(self) -> bool:
        """Commit a finished non-blocking capture; True when no capture is in flight."""
        if self._pending is not None:
            index, events = self._pending
            if all(event.query() for event in events):
                self._commit(index)
        return self._pending is None

    def wait(self) -> None:
        """Block until a non-blocking capture in flight has completed, and commit it."""
        if self._pending is not None:
            index, events = self._pending
            for event in events:
                event.synchronize()
            self._commit(index)

    def clear(self) -> None:
        """Drop every buffer and the committed snapshot."""
        self.wait()
        if any(slot.placement == ("host", True) for slot in self._slots):
            torch.cuda.synchronize()  # no transfer may still read a buffer being released
        self._slots = [_Slot() for _ in self._slots]
        self._active = None

    # ---------------------------------------------------------------- capture
    def capture(self, tensors: Mapping[Any, Any] | Sequence[torch.Tensor], *, non_blocking: bool = False):
        """Copy ``tensors`` into the buffer and return views of the new snapshot.

        ``tensors``: a sequence of tensors or a mapping whose tensor values are copied and
        whose other values are deep-copied. Returns the same structure of views, or
        ``None`` with ``non_blocking=True`` (read ``state`` after ``poll()``/``wait()``).
        """
        keys, values, extras = self._split(tensors)
        self.wait()  # one capture in flight at a time
        index = self._free_slot()
        slot = self._slots[index]
        if index == self._active:
            self._active = None  # single buffer: the old snapshot is gone once writing starts
        self._ensure_layout(slot, keys, values)
        slot.extras = {k: copy.deepcopy(v) for k, v in extras.items()}
        slot.order = list(tensors.keys()) if extras else None
        with torch.no_grad():
            self._transfer(slot, values, range(len(values)), to_buffer=True)
        if not slot.cuda_devices:
            self._commit(index)
        else:
            events = []
            for device in slot.cuda_devices:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                events.append(event)
            if non_blocking:
                self._pending = (index, events)
                return None
            if not slot.buffer.is_cuda:
                for event in events:
                    event.synchronize()
            self._commit(index)
        return self._structure(slot)

    # ---------------------------------------------------------------- restore
    def restore(self, tensors: Mapping[Any, Any] | Sequence[torch.Tensor], *, non_blocking: bool = False) -> RestoreResult:
        """Copy the committed snapshot back into ``tensors`` in place.

        A sequence must match the captured one tensor for tensor; a mapping restores the keys
        it shares with the snapshot (its non-tensor values are left alone: the caller applies
        the deep-copied extras from ``state``). Shapes and dtypes must match. With CUDA
        targets the copies are stream-ordered; unless ``non_blocking`` the current stream is
        synchronised before returning. Raises ``RuntimeError`` before any capture committed.
        """
        self.poll()
        if self._active is None:
            raise RuntimeError("esper_fast: HostSnapshot.restore called before any capture committed")
        slot = self._slots[self._active]
        targets, positions, missing, unexpected = [], [], [], []
        if isinstance(tensors, Mapping):
            if not isinstance(slot.keys, tuple) or slot.index is None:
                raise ValueError("esper_fast: the snapshot was captured from a sequence; restore a sequence")
            seen = set()
            for key, value in tensors.items():
                if not isinstance(value, torch.Tensor):
                    continue
                position = slot.index.get(key)
                if position is None:
                    unexpected.append(key)
                    continue
                seen.add(key)
                targets.append(self._checked_target(key, value, slot.views[position]))
                positions.append(position)
            missing = [key for key in slot.keys if key not in seen]
        else:
            tensors = list(tensors)
            if slot.index is not None:
                raise ValueError("esper_fast: the snapshot was captured from a mapping; restore a mapping, not a sequence")
            if len(tensors) != len(slot.views):
                raise ValueError(f"esper_fast: restore got {len(tensors)} tensors for a snapshot of {len(slot.views)}")
            targets = [self._checked_target(i, t, view) for i, (t, view) in enumerate(zip(tensors, slot.views))]
            positions = range(len(targets))
        with torch.no_grad():
            self._transfer(slot, targets, positions, to_buffer=False)
        if not non_blocking:
            for device in {t.device for t in targets if t.is_cuda}:
                torch.cuda.current_stream(device).synchronize()
        return RestoreResult(missing, unexpected)

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _split(tensors):
        """(keys or None, tensor values, non-tensor extras) of a mapping or a sequence."""
        if isinstance(tensors, Mapping):
            values = list(tensors.values())
            if all(isinstance(v, torch.Tensor) for v in values):
                return tuple(tensors.keys()), values, {}
            keys, values, extras = [], [], {}
            for key, value in tensors.items():
                if isinstance(value, torch.Tensor):
                    keys.append(key)
                    values.append(value)
                else:
                    extras[key] = value
            return tuple(keys), values, extras
        values = list(tensors)
        if not all(isinstance(t, torch.Tensor) for t in values):
            raise TypeError("esper_fast: HostSnapshot.capture takes tensors or a mapping")
        return None, values, {}

    @staticmethod
    def _checked_target(name, target, view):
        if target.shape != view.shape or target.dtype != view.dtype:
            raise ValueError(
                f"esper_fast: cannot restore {name!r}: snapshot has {view.dtype} {tuple(view.shape)}, "
                f"target is {target.dtype} {tuple(target.shape)}"
            )
        return target

    @staticmethod
    def _transfer(slot, tensors, positions, to_buffer: bool) -> None:
        """Copy ``tensors[j]`` to/from snapshot entry ``positions[j]``: one operator call per device."""
        groups = {}
        for t, position in zip(tensors, positions):
            group = groups.setdefault(t.device, ([], []))
            group[0].append(t)
            group[1].append(position)
        buffer = slot.buffer
        for device, (group_tensors, group_positions) in groups.items():
            if buffer.device.type == "cpu" or buffer.device == device:
                copy = snapshot_pack if to_buffer else snapshot_unpack
                copy(group_tensors, buffer, [slot.offsets[p] for p in group_positions])
                continue
            # A device-resident buffer and a tensor elsewhere (an optimizer's CPU step count).
            for t, position in zip(group_tensors, group_positions):
                if to_buffer:
                    slot.views[position].copy_(t)
                else:
                    t.copy_(slot.views[position])

    def _free_slot(self) -> int:
        if len(self._slots) == 1 or self._active is None:
            return 0
        return 1 - self._active

    def _commit(self, index: int) -> None:
        self._pending = None
        self._active = index

    def _ensure_layout(self, slot, keys, values) -> None:
        signature = (keys, tuple((t.shape, t.dtype, t.device) for t in values))
        if slot.signature == signature:
            return
        slot.signature = None  # until the new layout is complete
        devices = list(dict.fromkeys(t.device for t in values))
        cuda_devices = [d for d in devices if d.type == "cuda"]
        if self.device_resident:
            # On the (first) GPU; tensors elsewhere are copied to it one by one.
            placement = ("device", (cuda_devices or devices or [torch.device("cpu")])[0])
        else:
            placement = ("host", bool(cuda_devices))
        slot.cuda_devices = cuda_devices
        nbytes = [t.numel() * t.element_size() for t in values]
        # Small tensors first, each device's in one run: on CUDA they share a dense staging
        # range, which also writes the padding between them, so no other device's tensor may
        # lie inside it.
        rank = {device: r for r, device in enumerate(devices)}
        order = sorted(range(len(values)), key=lambda i: (nbytes[i] >= _STAGED_COPY_BYTES, rank[values[i].device], i))
        offsets = [0] * len(values)
        cursor = 0
        for i in order:
            offsets[i] = cursor
            cursor += -(-max(nbytes[i], 1) // self.alignment) * self.alignment
        total = max(cursor, self.alignment)
        buffer = slot.buffer
        if buffer is None or buffer.numel() < total or slot.placement != placement:
            if slot.placement == ("host", True):
                # A non-blocking restore may still be reading it; the host allocator cannot know.
                torch.cuda.synchronize()
            slot.buffer = None  # release the old buffer before allocating its successor
            kind, where = placement
            if kind == "device":
                buffer = torch.empty(total, dtype=torch.uint8, device=where)
            else:
                buffer = torch.empty(total, dtype=torch.uint8, pin_memory=where)
            self.allocations += 1
        slot.buffer = buffer
        slot.offsets = offsets
        slot.views = [
            buffer[offset : offset + n].view(t.dtype).view(t.shape) for t, offset, n in zip(values, offsets, nbytes)
        ]
        slot.keys = keys
        slot.index = None if keys is None else {key: i for i, key in enumerate(keys)}
        slot.signature = signature
        slot.placement = placement

    @staticmethod
    def _structure(slot: _Slot):
        if slot.keys is None:
            return list(slot.views)
        views = dict(zip(slot.keys, slot.views))
        if slot.extras:
            views.update(slot.extras)
            return {key: views[key] for key in slot.order}
        return views
