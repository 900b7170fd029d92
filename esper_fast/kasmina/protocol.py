"""What a host network must offer to grow seeds (:class:`HostProtocol`), and what it offers
to be walked in segments between its slots (:class:`SplitHost`, :class:`SegmentedHost`).

:mod:`esper_fast.kasmina.segments` implements the segment side once (``SlotSegments``, which
CNNHost and TransformerHost share); a custom host may implement it on its own."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch.nn as nn
from torch import Tensor

__all__ = ["HostProtocol", "SplitHost", "SegmentedHost"]


@runtime_checkable
class HostProtocol(Protocol):
    """Structural type of a graftable host."""

    @property
    def injection_points(self) -> dict[str, int]:
        """slot_id -> channels (cnn) or embedding width (transformer) at that point."""
        ...

    def register_slot(self, slot_id: str, slot: nn.Module) -> None:
        """Attach ``slot`` at ``slot_id``."""
        ...

    def unregister_slot(self, slot_id: str) -> None:
        """Put the identity back at ``slot_id``."""
        ...

    def forward(self, x: Tensor) -> Tensor:
        """The whole forward pass, attached slots included."""
        ...


@runtime_checkable
class SplitHost(Protocol):
    """A host whose forward splits at one slot: the stem up to the slot, then the rest.

    The contract (what the configuration walk of :mod:`esper_fast.kasmina.configurations`
    relies on): ``forward_from_slot(slot(forward_to_slot(x, s)), s)`` runs exactly the
    operations of ``forward(x)``, in its order, with whatever ``slot`` is registered at
    ``s``; and in eval mode the rows of the batch are independent, so configurations stacked
    along the batch give each configuration's own result. A host keeps it by defining these
    methods beside its ``forward`` (or by inheriting ``SlotSegments``, whose forward is made
    of the segments); see :func:`esper_fast.kasmina.segments.splits_at_slots`.
    """

    def forward_to_slot(self, x: Tensor, slot_id: str) -> Tensor:
        """The stem: the features that enter slot ``slot_id`` (the slots before it applied)."""
        ...

    def forward_from_slot(self, features: Tensor, slot_id: str) -> Tensor:
        """The head: the rest of the forward from the output of slot ``slot_id``."""
        ...

    def forward(self, x: Tensor) -> Tensor:
        """The whole forward: the stem, the slot, the head."""
        ...


@runtime_checkable
class SegmentedHost(SplitHost, Protocol):
    """A :class:`SplitHost` whose forward also splits between any two slots (what walking
    several slots needs), under the same contract."""

    def forward_between(self, features: Tensor, from_slot: str | None, to_slot: str | None) -> Tensor:
        """The body between two slots: from the output of slot ``from_slot`` (None: the
        host's input) to the features entering slot ``to_slot`` (None: the output). The slots
        in between apply as registered."""
        ...
