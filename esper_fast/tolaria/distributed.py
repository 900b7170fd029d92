"""Validation across the ranks of a torch.distributed job.

In an initialised process group of more than one rank each rank validates its shard and
the validation functions return the metrics over every rank's batches: the passes'
accumulators are packed into one float64 buffer and summed with ONE all-reduce per call
(counts stay exact below 2**53), then read to the host once. A group of one behaves as no
group. The collective runs on the group's device: the current CUDA device for NCCL, the CPU
for gloo. The reduction itself is the metrics family's (:func:`esper_fast.ops.metrics.reduce_metrics`,
also behind ``MetricsAccumulator.all_reduce``); this module chooses the group.
"""

from __future__ import annotations

import torch.distributed as dist

from esper_fast.ops.metrics import reduce_metrics

__all__ = ["process_group", "reduce_results"]

# The name the validation passes (and their tests) use for the one reduction.
reduce_results = reduce_metrics


def process_group():
    """The default process group when one is initialised with more than one rank, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None
