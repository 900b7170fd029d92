"""Fused validation metrics: cross-entropy, argmax accuracy and per-class counts in one pass.

:class:`MetricsAccumulator` keeps every running sum in one device-resident int64 tensor
(``state``, layout in ``csrc/metrics.h``). :meth:`MetricsAccumulator.update` launches the
``esper_fast::metrics_update`` kernel and never synchronises; :meth:`MetricsAccumulator.compute`
is the single device-to-host read, and the place where an out-of-range target is reported.
:class:`StackedMetricsAccumulator` does the same for K configurations whose outputs are
stacked along the batch (``esper_fast::metrics_update_stacked``: one launch per batch for all K).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

import esper_fast._C as _C

# The state layout as the extension exports it; csrc/metrics.h defines it, with the order the
# reductions below rely on (checked there at compile time).
_LOSS_SUM = _C.metrics_slot_loss_sum
_BATCHES = _C.metrics_slot_batches
_CORRECT = _C.metrics_slot_correct
_TOTAL = _C.metrics_slot_total
_ERRORS = _C.metrics_slot_errors
_BAD_VALUE = _C.metrics_slot_bad_value
_BLOCKS_DONE = _C.metrics_slot_blocks_done
_HEADER = _C.metrics_header

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def metrics_update(
    logits: torch.Tensor,
    targets: torch.Tensor,
    batch_loss: torch.Tensor | None,
    state: torch.Tensor,
    ignore_index: int,
) -> None:
    """Add one batch into ``state`` in place (see csrc/metrics.h). No host synchronisation.

    On CUDA the kernel runs on the current stream and its last block updates ``state`` with
    plain read-modify-writes: updates of one ``state`` must be ordered (one stream, or streams
    ordered by events); different ``state`` tensors may be updated from different streams at once.
    """
    torch.ops.esper_fast.metrics_update.default(logits, targets, batch_loss, state, ignore_index)


@torch.library.register_fake("esper_fast::metrics_update")
def _metrics_update_fake(logits, targets, batch_loss, state, ignore_index):
    torch._check(logits.dim() == 2, lambda: f"logits must be [N, C], got {tuple(logits.shape)}")
    torch._check(targets.dim() == 1 and targets.shape[0] == logits.shape[0], lambda: "targets must be [N]")
    torch._check(targets.dtype == torch.int64, lambda: f"targets must be int64, got {targets.dtype}")
    torch._check(state.dtype == torch.int64 and state.dim() == 1, lambda: "state must be a 1-d int64 tensor")
    return None


def metrics_update_stacked(logits: torch.Tensor, targets: torch.Tensor, state: torch.Tensor, ignore_index: int) -> None:
    """Add one batch of K stacked configurations into ``state`` [K, slots] in place: logits
    ``[K * N, C]`` (configuration k's rows are ``k * N .. (k + 1) * N - 1``), targets ``[N]``
    shared by all K. Row k of ``state`` gets what :func:`metrics_update` of configuration k's
    rows alone (with the kernel's cross-entropy) would add, bit for bit. No host synchronisation;
    the ordering rule of :func:`metrics_update` holds for ``state``.
    """
    torch.ops.esper_fast.metrics_update_stacked.default(logits, targets, state, ignore_index)


@torch.library.register_fake("esper_fast::metrics_update_stacked")
def _metrics_update_stacked_fake(logits, targets, state, ignore_index):
    torch._check(logits.dim() == 2, lambda: f"logits must be [K * N, C], got {tuple(logits.shape)}")
    torch._check(state.dtype == torch.int64 and state.dim() == 2, lambda: "state must be a 2-d [K, slots] int64 tensor")
    torch._check(targets.dim() == 1, lambda: f"targets must be [N], got {tuple(targets.shape)}")
    torch._check(targets.dtype == torch.int64, lambda: f"targets must be int64, got {targets.dtype}")
    torch._check(
        logits.shape[0] == state.shape[0] * targets.shape[0],
        lambda: f"logits must have K * N = {state.shape[0]} * {targets.shape[0]} rows, got {logits.shape[0]}",
    )
    return None


def _checked_batch(owner: str, logits, targets, num_classes: int, device, configs: int | None = None):
    """``logits`` and ``targets`` as the kernels take them (detached, contiguous), or ValueError.
    ``configs``: logits hold that many stacked configurations of targets' rows."""
    stacked = configs is not None
    rows = "K * N" if stacked else "N"
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"{owner}: logits must be [{rows}, {num_classes}], got {tuple(logits.shape)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"{owner}: logits must be a float tensor, got {logits.dtype}")
    if stacked:
        if targets.dim() != 1 or targets.shape[0] * configs != logits.shape[0]:
            raise ValueError(
                f"{owner}: targets must be [N] with K * N = {logits.shape[0]} logits rows for K = {configs}, "
                f"got {tuple(targets.shape)}"
            )
    elif targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"{owner}: targets must be [{logits.shape[0]}] to match logits, got {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"{owner}: targets must be int64, got {targets.dtype}")
    if logits.device != device or targets.device != device:
        raise ValueError(
            f"{owner}: logits ({logits.device}) and targets ({targets.device}) must be on the accumulator's "
            f"device {device}"
        )
    if not logits.is_contiguous():
        logits = logits.contiguous()
    if not targets.is_contiguous():
        targets = targets.contiguous()
    return logits.detach(), targets


@dataclasses.dataclass
class MetricsResult:
    """What a pass measured, as Python numbers.

    ``loss_sum`` is the sum over batches of each batch's mean loss; ``total`` counts every row
    (ignore_index rows included, as the original's ``labels.numel()``); per-class lists are
    ``None`` unless the accumulator counts per class.
    """

    loss_sum: float
    batches: int
    correct: int
    total: int
    class_total: list[int] | None = None
    class_correct: list[int] | None = None

    @property
    def loss(self) -> float:
        """Mean over batches of the batch-mean loss; NaN when no batch was seen."""
        return self.loss_sum / self.batches if self.batches else math.nan

    @property
    def accuracy(self) -> float:
        """Percent of rows whose argmax equals the target; 0.0 when no row was seen."""
        return 100.0 * self.correct / self.total if self.total else 0.0


class MetricsAccumulator:
    """Device-resident running sums of validation metrics over many batches.

    Args:
        num_classes: C, the width of the logits.
        device: where the logits live and the sums are kept.
        per_class: also count per-class totals and argmax hits.
        ignore_index: target value whose rows are left out of the loss, as
            ``nn.CrossEntropyLoss(ignore_index=...)``. For the counts they behave as in the
            original ``argmax == labels``: always in ``total``, and in ``correct`` / per-class
            only when ignore_index is itself a class in ``[0, num_classes)``.

    ``update`` is asynchronous (one kernel launch, no sync); ``compute`` reads the sums back
    once and raises ``ValueError`` if any target was outside ``[0, num_classes)``. One
    accumulator's updates must be stream-ordered; two accumulators may be updated from two
    CUDA streams at once.
    """

    def __init__(self, num_classes: int, device, per_class: bool = False, ignore_index: int = -100):
        if int(num_classes) < 1:
            raise ValueError(f"MetricsAccumulator: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.per_class = bool(per_class)
        self.ignore_index = int(ignore_index)
        size = _HEADER + (2 * self.num_classes if self.per_class else 0)
        self.state = torch.zeros(size, dtype=torch.int64, device=device)
        self.device = self.state.device  # "cuda" resolved to "cuda:<current>"

    @classmethod
    def _over(cls, state: torch.Tensor, num_classes: int, per_class: bool, ignore_index: int) -> "MetricsAccumulator":
        """An accumulator whose sums live in ``state``, a row of another accumulator's tensor."""
        acc = cls.__new__(cls)
        acc.num_classes, acc.per_class, acc.ignore_index = num_classes, per_class, ignore_index
        acc.state, acc.device = state, state.device
        return acc

    def reset(self) -> None:
        """Zero every sum (asynchronous)."""
        self.state.zero_()

    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor | None = None) -> None:
        """Add a batch: logits ``[N, C]`` (float), targets ``[N]`` (int64).

        With ``loss`` None the kernel's cross-entropy (mean over the batch's non-ignored rows) is
        accumulated; otherwise ``loss`` (a one-element tensor from another criterion) is added on
        device and the kernel only counts. Never synchronises.
        """
        logits, targets = _checked_batch("MetricsAccumulator.update", logits, targets, self.num_classes, self.device)
        if loss is not None:
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
                raise ValueError("MetricsAccumulator.update: loss must be a one-element float tensor or None")
            if loss.device != self.device:
                raise ValueError(f"MetricsAccumulator.update: loss is on {loss.device}, expected {self.device}")
            loss = loss.detach()
        metrics_update(logits, targets, loss, self.state, self.ignore_index)

    def all_reduce(self, group=None) -> None:
        """Sum the sums over a torch.distributed group (default: the world), in place; a
        no-op when torch.distributed is not initialised. The reduction of
        :func:`reduce_metrics`: one collective; a bad target on any rank is then counted on
        every rank, named by the first such rank's value."""
        _all_reduce_in_place([self], group)

    # packed() carries the state's slots before the CUDA ticket, at their state offsets, then the
    # class totals and hits; these name the slots a reduction over ranks reads.
    PACKED_HEADER = _BLOCKS_DONE
    PACKED_BATCHES, PACKED_ERRORS, PACKED_BAD_VALUE = _BATCHES, _ERRORS, _BAD_VALUE

    def packed(self, width: int = 0) -> torch.Tensor:
        """The sums as one float64 vector on the device, for a reduction over ranks: the state's
        slots before the CUDA ticket at their state offsets (the loss as its float64 value), then
        ``class_total[:width], class_correct[:width]`` (classes beyond ``num_classes`` count 0).
        Asynchronous; counts are exact below 2**53. The offending target
        (:attr:`PACKED_BAD_VALUE`) is not a sum: reduce it separately."""
        out = torch.zeros(self.PACKED_HEADER + 2 * width, dtype=torch.float64, device=self.device)
        out[: self.PACKED_HEADER] = self.state[: self.PACKED_HEADER]
        out[_LOSS_SUM] = self.state[_LOSS_SUM : _LOSS_SUM + 1].view(torch.float64)[0]
        if width and self.per_class:
            n = min(width, self.num_classes)
            counts = self.state[_HEADER:].view(2, self.num_classes)
            out[self.PACKED_HEADER : self.PACKED_HEADER + n] = counts[0, :n]
            out[self.PACKED_HEADER + width : self.PACKED_HEADER + width + n] = counts[1, :n]
        return out

    @classmethod
    def result_from_packed(cls, row: torch.Tensor, width: int, num_classes: int | None = None) -> MetricsResult:
        """The :class:`MetricsResult` of a (reduced) :meth:`packed` vector read to the host;
        ValueError when it counts targets outside ``[0, num_classes)``."""
        values = row.tolist()
        errors = int(values[_ERRORS])
        if errors:
            raise ValueError(
                f"MetricsAccumulator: {errors} target(s) outside [0, {num_classes if num_classes else 'C'}), "
                f"e.g. {int(values[_BAD_VALUE])}"
            )
        head = cls.PACKED_HEADER
        return MetricsResult(
            loss_sum=values[_LOSS_SUM],
            batches=int(values[_BATCHES]),
            correct=int(values[_CORRECT]),
            total=int(values[_TOTAL]),
            class_total=[int(v) for v in values[head : head + width]] if width else None,
            class_correct=[int(v) for v in values[head + width : head + 2 * width]] if width else None,
        )

    def compute(self) -> MetricsResult:
        """The one device-to-host read. Raises ValueError if a target was outside [0, C)."""
        return self._result(self.state.cpu())

    @staticmethod
    def compute_all(accumulators: "list[MetricsAccumulator]") -> list[MetricsResult]:
        """``compute`` for several accumulators on one device with a single device-to-host read."""
        if not accumulators:
            return []
        host = torch.cat([acc.state for acc in accumulators]).cpu()
        results, offset = [], 0
        for acc in accumulators:
            results.append(acc._result(host[offset : offset + acc.state.numel()]))
            offset += acc.state.numel()
        return results

    def _result(self, host: torch.Tensor) -> MetricsResult:
        errors = int(host[_ERRORS])
        if errors:
            bad = int(host[_BAD_VALUE])
            raise ValueError(
                f"MetricsAccumulator: {errors} target(s) outside [0, {self.num_classes}) "
                f"(and not ignore_index={self.ignore_index}), e.g. {bad}"
            )
        loss_sum = float(host[_LOSS_SUM : _LOSS_SUM + 1].view(torch.float64)[0])
        class_total = class_correct = None
        if self.per_class:
            counts = host[_HEADER:].view(2, self.num_classes)
            class_total = counts[0].tolist()
            class_correct = counts[1].tolist()
        return MetricsResult(
            loss_sum=loss_sum,
            batches=int(host[_BATCHES]),
            correct=int(host[_CORRECT]),
            total=int(host[_TOTAL]),
            class_total=class_total,
            class_correct=class_correct,
        )


class StackedMetricsAccumulator:
    """:class:`MetricsAccumulator` for K configurations of a model evaluated in one forward, their
    outputs stacked along the batch.

    Args:
        num_configs: K, the configurations stacked in every batch.
        num_classes, device, per_class, ignore_index: as :class:`MetricsAccumulator`'s, for each
            configuration.

    ``update(logits, targets)`` takes logits ``[K * N, C]`` (configuration k's rows are
    ``k * N .. (k + 1) * N - 1``) and the targets ``[N]`` they share, and adds each
    configuration's batch-mean cross-entropy, correct, total and per-class counts with one
    kernel launch and no sync. ``compute`` reads all K back at once. Configuration k's numbers
    are those of a :class:`MetricsAccumulator` fed configuration k's rows, bit for bit.
    """

    def __init__(self, num_configs: int, num_classes: int, device, per_class: bool = False, ignore_index: int = -100):
        if int(num_configs) < 1:
            raise ValueError(f"StackedMetricsAccumulator: num_configs must be >= 1, got {num_configs}")
        if int(num_classes) < 1:
            raise ValueError(f"StackedMetricsAccumulator: num_classes must be >= 1, got {num_classes}")
        self.num_configs = int(num_configs)
        self.num_classes = int(num_classes)
        self.per_class = bool(per_class)
        self.ignore_index = int(ignore_index)
        width = _HEADER + (2 * self.num_classes if self.per_class else 0)
        self.state = torch.zeros(self.num_configs, width, dtype=torch.int64, device=device)
        self.device = self.state.device
        # One MetricsAccumulator per configuration over its row of the state: what
        # MetricsAccumulator.compute_all and the reduction over ranks take.
        self.accumulators = [
            MetricsAccumulator._over(row, self.num_classes, self.per_class, self.ignore_index) for row in self.state
        ]

    def reset(self) -> None:
        """Zero every sum of every configuration (asynchronous)."""
        self.state.zero_()

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch of every configuration: logits ``[K * N, C]`` (float), targets ``[N]``
        (int64). Never synchronises."""
        logits, targets = _checked_batch(
            "StackedMetricsAccumulator.update", logits, targets, self.num_classes, self.device, self.num_configs
        )
        metrics_update_stacked(logits, targets, self.state, self.ignore_index)

    def all_reduce(self, group=None) -> None:
        """:meth:`MetricsAccumulator.all_reduce` for every configuration at once (one collective)."""
        _all_reduce_in_place(self.accumulators, group)

    def compute(self) -> list[MetricsResult]:
        """Every configuration's :class:`MetricsResult`, in order, from one device-to-host read.
        Raises ValueError if a target was outside [0, C)."""
        return MetricsAccumulator.compute_all(self.accumulators)


# ---------------------------------------------------------------- the reduction over ranks


def _collective_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_packed(accumulators: "list[MetricsAccumulator | None]", widths: list[int], group) -> list[torch.Tensor]:
    """Every accumulator's :meth:`MetricsAccumulator.packed` sums (``widths[i]`` per-class
    counts) summed over the ranks of ``group`` with one all-reduce, as rows on the
    collective's device. An accumulator that is None on this rank adds zeros. The offending
    target is not summed: each rank contributes its own (flag, value) pair, and a row's
    :attr:`MetricsAccumulator.PACKED_BAD_VALUE` is the first flagged rank's value."""
    device = _collective_device(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    head = MetricsAccumulator.PACKED_HEADER
    rows = []
    for acc, width in zip(accumulators, widths):
        row = torch.zeros(head + 2 * width + 2 * world, dtype=torch.float64, device=device)
        if acc is not None:
            packed = acc.packed(width).to(device)
            row[: head + 2 * width] = packed
            row[head + 2 * width + 2 * rank] = packed[_ERRORS].clamp(max=1.0)
            row[head + 2 * width + 2 * rank + 1] = packed[_BAD_VALUE]
        rows.append(row)
    buffer = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.float64, device=device)
    dist.all_reduce(buffer, group=group)
    reduced, offset = [], 0
    for width in widths:
        size = head + 2 * width + 2 * world
        row = buffer[offset : offset + size]
        offset += size
        per_rank = row[head + 2 * width :].view(world, 2)
        flagged = per_rank[:, 0] > 0
        first = torch.argmax(flagged.to(torch.int32))  # the first flagged rank (0 when none)
        packed = row[: head + 2 * width].clone()
        packed[_BAD_VALUE] = torch.where(flagged.any(), per_rank[first, 1], packed[_BAD_VALUE])
        reduced.append(packed)
    return reduced


def reduce_metrics(
    accumulators: "list[MetricsAccumulator | None]", widths: list[int], group
) -> "list[MetricsResult | None]":
    """Sum each pass's accumulator over the ranks of ``group`` (one all-reduce) and read the
    sums once. ``widths[i]`` is how many per-class counts pass ``i`` reports (0: none); a
    pass that saw no batch on this rank (None) adds zeros. Returns None for a pass that saw
    no batch on any rank. A bad target on any rank raises ValueError on every rank (naming
    the first rank's offending value), after the collective, so no rank is left waiting."""
    reduced = _all_reduce_packed(accumulators, widths, group)
    host = torch.cat(reduced).cpu() if reduced else torch.zeros(0, dtype=torch.float64)  # the one read
    results, offset = [], 0
    for acc, width in zip(accumulators, widths):
        size = MetricsAccumulator.PACKED_HEADER + 2 * width
        packed = host[offset : offset + size]
        offset += size
        results.append(
            None if packed[_BATCHES] == 0
            else MetricsAccumulator.result_from_packed(packed, width, acc.num_classes if acc is not None else None)
        )
    return results


def _all_reduce_in_place(accumulators: "list[MetricsAccumulator]", group) -> None:
    """The accumulators' states replaced by their sums over ``group`` (default: the world)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    group = group if group is not None else dist.group.WORLD
    widths = [acc.num_classes if acc.per_class else 0 for acc in accumulators]
    for acc, width, packed in zip(accumulators, widths, _all_reduce_packed(accumulators, widths, group)):
        packed = packed.to(acc.device)
        head = MetricsAccumulator.PACKED_HEADER
        with torch.no_grad():
            acc.state[:head] = packed[:head].to(torch.int64)
            acc.state[_LOSS_SUM : _LOSS_SUM + 1] = packed[_LOSS_SUM : _LOSS_SUM + 1].view(torch.int64)
            if width:
                counts = acc.state[_HEADER:].view(2, acc.num_classes)
                counts[0] = packed[head : head + width].to(torch.int64)
                counts[1] = packed[head + width : head + 2 * width].to(torch.int64)
