"""The segment contract of :mod:`esper_fast.kasmina.protocol`, implemented once for the hosts,
and the test of whether a host keeps it."""

from __future__ import annotations

import torch
import torch.nn as nn

from esper_fast.kasmina.protocol import SegmentedHost, SplitHost

__all__ = ["SlotSegments", "splits_at_slots", "check_injection_point"]


def check_injection_point(slots: nn.ModuleDict, slot_id: str) -> None:
    """ValueError unless ``slot_id`` is one of the host's injection points."""
    if slot_id not in slots:
        raise ValueError(f"Unknown injection point: {slot_id}")


class SlotSegments:
    """The slot side of a host, written once: ``register_slot``/``unregister_slot`` on an
    ``nn.ModuleDict`` ``self.slots`` (slot id -> module, an ``nn.Identity`` when empty, in
    the forward's order), and the segments of :class:`~esper_fast.kasmina.protocol.SegmentedHost`
    from the host's one :meth:`forward_between`. ``forward`` is the whole walk,
    ``forward_between(x, None, None)``, so the segments are the forward's own operations.

    A host mixes it in before ``nn.Module`` and defines ``slots`` and ``forward_between``.
    """

    slots: nn.ModuleDict

    def register_slot(self, slot_id: str, slot: nn.Module) -> None:
        """Attach ``slot`` at ``slot_id`` (moved to the device of the host's parameters)."""
        check_injection_point(self.slots, slot_id)
        self.slots[slot_id] = slot.to(next(self.parameters()).device)

    def unregister_slot(self, slot_id: str) -> None:
        check_injection_point(self.slots, slot_id)
        self.slots[slot_id] = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_between(x, None, None)

    def forward_between(self, features: torch.Tensor, from_slot: str | None, to_slot: str | None) -> torch.Tensor:
        raise NotImplementedError

    def forward_to_slot(self, x: torch.Tensor, slot_id: str) -> torch.Tensor:
        """The features that enter slot ``slot_id`` (slots before it applied)."""
        check_injection_point(self.slots, slot_id)
        return self.forward_between(x, None, slot_id)

    def forward_from_slot(self, features: torch.Tensor, slot_id: str) -> torch.Tensor:
        """The rest of the forward from the output of slot ``slot_id``: the output."""
        check_injection_point(self.slots, slot_id)
        return self.forward_between(features, slot_id, None)

    def _check_segment(self, from_slot: str | None, to_slot: str | None) -> None:
        """ValueError unless ``to_slot`` comes after ``from_slot`` (None: the input, the output)."""
        order = list(self.slots)
        for slot_id in (from_slot, to_slot):
            if slot_id is not None:
                check_injection_point(self.slots, slot_id)
        start = -1 if from_slot is None else order.index(from_slot)
        stop = len(order) if to_slot is None else order.index(to_slot)
        if start >= stop:
            raise ValueError(f"forward_between: slot {to_slot!r} does not come after slot {from_slot!r}")


def _defining_class(cls: type, name: str) -> type | None:
    return next((klass for klass in cls.__mro__ if name in klass.__dict__), None)


def splits_at_slots(host: nn.Module, *, between: bool = False) -> bool:
    """True when ``host`` keeps the segment contract (:class:`~esper_fast.kasmina.protocol.SplitHost`;
    with ``between=True`` :class:`~esper_fast.kasmina.protocol.SegmentedHost`, which walking
    several slots needs), so that its segments run exactly its forward.

    A host keeps it when its forward is made of its segments: it inherits
    :class:`SlotSegments`' forward and halves, or it defines the segment methods beside its
    own ``forward`` (a subclass that overrides ``forward`` alone breaks it). No hook may be
    skipped by calling the segments directly: none on the host, no global forward hook,
    no compiled wrapper.
    """
    if not isinstance(host, SegmentedHost if between else SplitHost):
        return False
    cls = type(host)
    owner = _defining_class(cls, "forward")
    if owner is None or owner is nn.Module:
        return False
    halves = ("forward_to_slot", "forward_from_slot")
    if owner is SlotSegments:  # the forward is forward_between(x, None, None): the host's own
        keeps = all(_defining_class(cls, name) is SlotSegments for name in halves)
    else:
        needed = halves + (("forward_between",) if between else ())
        keeps = all(_defining_class(cls, name) is owner for name in needed)
    if not keeps:
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    return not (host._forward_hooks or host._forward_pre_hooks or getattr(host, "_compiled_call_impl", None))
