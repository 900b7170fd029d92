"""What a run reports: the epoch record and the closing report (an epoch's console lines:
:func:`esper_fast.train.console.epoch_lines`)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Mapping

from esper_fast.train.config import as_record, optional
from esper_fast.train.controller import SeedRecord


@dataclasses.dataclass
class EpochRecord:
    """One epoch of a run, as ``metrics.jsonl`` holds it (``"type": "epoch"``, then these
    fields in this order). A value the epoch did not measure is None (``null`` in the log);
    a field made with :func:`optional` is left out instead, so that the records of runs
    without it read as before (``slots`` and ``interactions``: only a run of several slots
    has them; ``ranks``: only a run of several processes).

    In a run of several slots the fields from ``stage`` to ``baseline_accuracy`` speak of
    the main slot (the first of the slots in the host's order), as in a run of one slot;
    ``slots`` holds every slot's.
    """

    epoch: int
    stage: str                       # the slot's stage as the epoch trained ("NONE": no seed)
    stage_after: str                 # after the controller's decision
    seed_id: str | None
    blueprint: str | None
    alpha_start: float
    alpha: float                     # at the end of training (alpha moves while blending)
    lr: float
    train_loss: float | None         # the mean of the steps' losses (NaN: a poisoned step)
    train_accuracy: float | None     # on the first training batches, after the epoch
    train_eval_loss: float | None
    val_loss: float | None
    val_accuracy: float | None
    perplexity: float | None
    per_class_accuracy: dict | None
    seed_contribution: float | None  # accuracy with the seed minus with alpha forced to 0
    real_accuracy: float | None
    baseline_accuracy: float | None
    rollback: bool
    events: list[str]
    steps: int
    started_at: str                  # wall clock, ISO 8601 UTC
    ended_at: str
    train_time_s: float
    eval_time_s: float
    epoch_time_s: float
    samples_per_s: float | None      # over every rank
    # Several slots: slot id -> {"stage", "stage_after", "seed_id", "blueprint", "alpha_start",
    # "alpha", "shapley"} and, when "shapley" was measured (the seed live and in the forward),
    # "leave_one_out" and "alone_on"; "shapley_error" (the 95% bound) when it was sampled.
    # Accuracy attribution in percentage points; host order.
    slots: dict[str, dict] | None = optional()
    # Several slots: "a+b" -> the accuracy interaction of the seeds in slots a and b (both
    # live and in the forward): f({a, b}) - f({a}) - f({b}) + f({}), in points.
    interactions: dict[str, float] | None = optional()
    # Several processes: each rank's {"rank", "checksum", "stage", "alpha"} after the epoch
    # (and, with several slots, "slots": slot id -> {"stage", "alpha"}).
    ranks: list[dict] | None = optional()

    TYPE: ClassVar[str] = "epoch"

    def to_log(self) -> dict:
        """The record as ``metrics.jsonl`` and a checkpoint's log hold it."""
        return {"type": self.TYPE, **as_record(self)}

    @classmethod
    def from_log(cls, record: Mapping) -> "EpochRecord":
        """An epoch record of a log (the dict :meth:`to_log` gives, or one read back from
        ``metrics.jsonl``); a key the record lacks is None, a key it has that this class does
        not know is ignored."""
        return cls(**{field.name: record.get(field.name) for field in dataclasses.fields(cls)})


def seed_values(attribution, in_forward) -> dict[str, dict]:
    """Slot id -> the accuracy attribution of its seed, for ``EpochRecord.slots``: the Shapley
    value, its 95% bound when sampled, the leave-one-out and alone-on contributions (points),
    for every live seed of ``attribution`` (a ``SlotAttribution``, or None) in ``in_forward``
    (the slots whose seed is in the forward: a TRAINING seed, at alpha 0, is not measured)."""
    if attribution is None:
        return {}
    accuracy = attribution.accuracy
    values = {}
    for slot_id in attribution.slots:
        if slot_id in in_forward:
            value = {"shapley": accuracy.shapley[slot_id]}
            if not attribution.exact:
                value["shapley_error"] = accuracy.shapley_error[slot_id]
            values[slot_id] = {**value, "leave_one_out": accuracy.leave_one_out[slot_id],
                               "alone_on": accuracy.alone_on[slot_id]}
    return values


def seed_interactions(attribution, in_forward) -> dict[str, float] | None:
    """``EpochRecord.interactions``: ``"a+b"`` -> the accuracy interaction of the seeds in
    slots a and b, for every pair of live seeds in ``in_forward`` (None: no such pair)."""
    if attribution is None:
        return None
    found = {f"{a}+{b}": value for (a, b), value in attribution.accuracy.interactions.items()
             if a in in_forward and b in in_forward}
    return found or None


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def outcome(seeds: list[SeedRecord], slots: list[str] | None = None) -> str:
    """The seeds' fates in one phrase; with ``slots`` (a run of several), slot by slot,
    each slot named, those that never germinated included."""
    def fate(s: SeedRecord) -> str:
        if s.outcome == "live":
            return f"{s.seed_id} ({s.blueprint}) still live"
        return f"{s.seed_id} ({s.blueprint}) {s.outcome} at epoch {s.decided_epoch}: {s.reason}"

    if slots is not None:
        return "; ".join(f"{slot_id}: " + (", ".join(fate(s) for s in seeds if s.slot == slot_id)
                                            or "no seed germinated") for slot_id in slots)
    if not seeds:
        return "no seed germinated"
    return "; ".join(fate(s) for s in seeds)


def summary_lines(summary: dict, device: str, backend: str | None = None) -> list[str]:
    """The run's closing report, one fact per line (the world size when there are several
    processes; ``backend`` is theirs)."""
    lines = [f"seed outcome{'s' if summary.get('slots') else ''}: {summary['seed_outcome']}"]
    world = summary.get("world_size", 1)
    if world > 1:
        lines.append(f"world size: {world} processes (torch.distributed {backend}, DistributedDataParallel); "
                     "every rank checked the same model after each epoch")
    if summary["chance_accuracy"] is not None:
        lines.append(
            f"accuracy: final {_fmt(summary['final_val_accuracy'], '.1f')}%, best {_fmt(summary['best_val_accuracy'], '.1f')}% "
            f"(chance {summary['chance_accuracy']:.0f}%)"
        )
    else:
        lines.append(f"perplexity: final {_fmt(summary['final_perplexity'], '.2f')}")
    lines.append(f"governor rollbacks: {summary['rollbacks']}")
    lines.append(
        f"time: {summary['mean_epoch_time_s']:.2f}s per epoch, {summary['total_time_s']:.1f}s total"
    )
    backend = "cuda" if device.startswith("cuda") else "cpu"
    compiled = summary["kernels_compiled"].get(backend, [])
    if summary["reference_mode"]:
        lines.append("kernels: reference mode, the original pure-PyTorch algorithms ran")
    elif summary["kernels_ran"] is None:
        lines.append(f"kernels compiled for {backend}: {', '.join(compiled) or 'none'} (not traced under --compile)")
    else:
        ran = ", ".join(f"{name} x{count}" for name, count in sorted(summary["kernels_ran"].items())) or "none"
        lines.append(f"kernels ran (traced per epoch: one training step, one validation batch, the snapshot): {ran}")
    lines.append(f"log: {summary['metrics']}  plot: {summary['plot']}")
    return lines
