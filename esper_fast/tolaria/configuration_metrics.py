"""Validation metrics of K configurations of one model, from logits stacked along the batch."""

from __future__ import annotations

import torch

from esper_fast.ops.metrics import MetricsAccumulator, MetricsResult

__all__ = ["ConfigurationMetrics"]


class ConfigurationMetrics:
    """Device-resident metrics of ``num_configs`` configurations that share their targets.

    ``update(logits, targets)`` takes the configurations' logits stacked along the batch
    (``[K * N, C]``: rows ``k * N .. (k + 1) * N`` are configuration k's) and the targets they
    share (``[N]``), never synchronises, and adds the default cross-entropy, the argmax hits
    and (with ``per_class``) the per-class counts of each configuration.
    ``compute()`` reads every sum with one device-to-host read and returns one
    :class:`MetricsResult` per configuration; ValueError for a target outside ``[0, C)``
    (and not ``ignore_index``).

    One :class:`MetricsAccumulator` per configuration over its row slice.
    """

    def __init__(self, num_configs: int, num_classes: int, device, per_class: bool = False, ignore_index: int = -100):
        if int(num_configs) < 1:
            raise ValueError(f"ConfigurationMetrics: num_configs must be >= 1, got {num_configs}")
        self.num_configs = int(num_configs)
        self._accumulators = [
            MetricsAccumulator(num_classes, device, per_class=per_class, ignore_index=ignore_index)
            for _ in range(self.num_configs)
        ]

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch of every configuration (asynchronous)."""
        rows = targets.shape[0] if targets.dim() == 1 else -1
        if logits.dim() != 2 or rows < 0 or logits.shape[0] != self.num_configs * rows:
            raise ValueError(
                f"ConfigurationMetrics.update: logits must be [{self.num_configs} * N, C] for targets [N], "
                f"got logits {tuple(logits.shape)} and targets {tuple(targets.shape)}"
            )
        for k, accumulator in enumerate(self._accumulators):
            accumulator.update(logits[k * rows : (k + 1) * rows], targets)

    def compute(self) -> list[MetricsResult]:
        """Every configuration's results, in order, from one device-to-host read."""
        return MetricsAccumulator.compute_all(self._accumulators)
