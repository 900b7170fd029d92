"""What a host network must offer to grow seeds: named injection points, slot registration,
and a forward pass that runs whatever slots are attached."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch.nn as nn
from torch import Tensor

__all__ = ["HostProtocol"]


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
