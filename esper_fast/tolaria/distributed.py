"""Validation across the ranks of a torch.distributed job.

In an initialised process group of more than one rank each rank validates its shard and
the validation functions return the metrics over every rank's batches: the passes'
accumulators are packed into one float64 buffer and summed with ONE all-reduce per call
(counts stay exact below 2**53), then read to the host once. A group of one behaves as no
group. The collective runs on the group's device: the current CUDA device for NCCL, the CPU
for gloo.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from esper_fast.ops.metrics import MetricsAccumulator, MetricsResult

__all__ = ["process_group", "reduce_results"]


def process_group():
    """The default process group when one is initialised with more than one rank, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _collective_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_results(
    accumulators: list[MetricsAccumulator | None], widths: list[int], group
) -> list[MetricsResult | None]:
    """Sum each pass's accumulator over the ranks of ``group`` (one all-reduce) and read the
    sums once. ``widths[i]`` is how many per-class counts pass ``i`` reports (0: none); a
    pass that saw no batch on this rank (None) adds zeros. Returns None for a pass that saw
    no batch on any rank. A bad target on any rank raises ValueError on every rank (naming
    the first rank's offending value), after the collective, so no rank is left waiting."""
    device = _collective_device(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    head = MetricsAccumulator.PACKED_HEADER
    batches, errors, bad_value = (
        MetricsAccumulator.PACKED_BATCHES, MetricsAccumulator.PACKED_ERRORS, MetricsAccumulator.PACKED_BAD_VALUE
    )
    rows = []
    for acc, width in zip(accumulators, widths):
        row = torch.zeros(head + 2 * width + 2 * world, dtype=torch.float64, device=device)
        if acc is not None:
            packed = acc.packed(width).to(device)
            row[: head + 2 * width] = packed
            # Offending values are not summed: each rank writes its own (flag, value) pair.
            row[head + 2 * width + 2 * rank] = packed[errors].clamp(max=1.0)
            row[head + 2 * width + 2 * rank + 1] = packed[bad_value]
        rows.append(row)
    buffer = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.float64, device=device)
    dist.all_reduce(buffer, group=group)
    host = buffer.cpu()  # the one device-to-host read
    results, offset = [], 0
    for acc, width in zip(accumulators, widths):
        size = head + 2 * width + 2 * world
        row = host[offset : offset + size]
        offset += size
        per_rank = row[head + 2 * width :].view(world, 2)
        flagged = per_rank[:, 0].nonzero()
        packed = row[: head + 2 * width].clone()
        if len(flagged):
            packed[bad_value] = per_rank[int(flagged[0]), 1]
        results.append(
            None if packed[batches] == 0
            else MetricsAccumulator.result_from_packed(packed, width, acc.num_classes if acc is not None else None)
        )
    return results
