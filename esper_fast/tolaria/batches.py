"""What the training loops and the validation passes share: batches and the loss on one."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["Batch", "BatchIterable", "to_device", "compute_loss"]

Batch = tuple[torch.Tensor, torch.Tensor]
# Anything that yields (inputs, labels) tensor pairs: a DataLoader, a list of batches, a generator.
BatchIterable = Iterable[Batch]


def to_device(batch: Batch, device) -> Batch:
    """``(inputs, labels)`` moved with ``.to(device, non_blocking=True)``."""
    inputs, labels = batch
    return inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def compute_loss(outputs: torch.Tensor, labels: torch.Tensor, criterion: nn.Module, task_type: str) -> torch.Tensor:
    """The criterion on a batch; lm outputs ``[B, T, V]`` and labels ``[B, T]`` are flattened first."""
    if task_type == "lm":
        return criterion(outputs.reshape(-1, outputs.size(-1)), labels.reshape(-1))
    return criterion(outputs, labels)
