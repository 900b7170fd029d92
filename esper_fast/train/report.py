"""What a run reports: the records of its log and the closing report (an epoch's console lines:
:func:`esper_fast.train.console.epoch_lines`).

Each record of ``metrics.jsonl`` has one owner here, a dataclass whose fields are the
record's keys in order (``to_log``): :class:`ConfigRecord` (the first line),
:class:`EpochRecord` (one per epoch, with a :class:`SlotRecord` per slot in a run of
several), :class:`ResumeRecord` (each resumed session) and :class:`SummaryRecord` (the
last line of a session).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import socket
from typing import ClassVar, Mapping

import torch

from esper_fast.train.controller import SeedRecord
from esper_fast.train.run_dir import now_iso
from esper_fast.train.settings import RunConfig, as_record, optional


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
    # The value the main slot's seed is judged by: accuracy with the seed minus with alpha
    # forced to 0 (for lm: the validation loss the seed removes, nats); with several slots
    # the seed's Shapley value in the same measure.
    seed_contribution: float | None
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
    # Candidates incubated together (--candidates): slot id -> the candidates incubating there
    # as the epoch trained ({"seed_id", "blueprint"}, the slot's seed first), and slot id ->
    # the judgement that ended their incubation at this epoch's end (Judgement.to_log()).
    candidates: dict[str, list[dict]] | None = optional()
    judgements: dict[str, dict] | None = optional()

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


@dataclasses.dataclass
class SlotRecord:
    """One slot's part of an epoch of a run of several slots (``EpochRecord.slots[slot_id]``):
    its stage as the epoch trained and after the decision, its seed, its alpha as the epoch
    began and ended, and its seed's accuracy attribution in points (:func:`seed_values`):
    ``shapley`` None when not measured (no seed, or not in the forward), the others then
    left out; ``shapley_error`` only when the value was sampled."""

    stage: str
    stage_after: str
    seed_id: str | None
    blueprint: str | None
    alpha_start: float
    alpha: float
    shapley: float | None
    shapley_error: float | None = optional()
    leave_one_out: float | None = optional()
    alone_on: float | None = optional()
    # A language model's seeds only: the Shapley value of the validation loss the seed
    # removes (nats, positive helps), the value they are judged by, and its 95% bound.
    loss_shapley: float | None = optional()
    loss_shapley_error: float | None = optional()

    def to_log(self) -> dict:
        return as_record(self)


def versions() -> dict:
    """The versions a result depends on."""
    import esper_fast

    found = {
        "esper_fast": esper_fast.__version__,
        "torch": str(torch.__version__),  # a str subclass that weights_only loading refuses
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for name in ("torchvision", "numpy"):
        try:
            found[name] = str(__import__(name).__version__)
        except ImportError:
            found[name] = None
    return found


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{device}: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads of {os.cpu_count()} cores"


@dataclasses.dataclass
class ConfigRecord:
    """The log's first record (``"type": "config"``): the command, the settings
    (:meth:`RunConfig.to_record`, flattened in), and what the run found as it started: the
    task, its data, the schedule, the processes, the device and the versions."""

    command: str
    started_at: str
    host: str
    settings: RunConfig
    task_type: str
    chance_accuracy: float | None
    data_source: str
    data: str
    data_fingerprint: str | None
    steps_per_epoch: int
    schedule: dict
    world_size: int
    backend: str | None
    device_name: str
    versions: dict
    reference_mode: bool

    TYPE: ClassVar[str] = "config"

    @classmethod
    def now(cls, **fields) -> "ConfigRecord":
        """The record of a run starting now, on this host, with these versions."""
        return cls(started_at=now_iso(), host=socket.gethostname(), versions=versions(), **fields)

    def to_log(self) -> dict:
        return {
            "type": self.TYPE, "command": self.command, "started_at": self.started_at, "host": self.host,
            **self.settings.to_record(),
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("command", "started_at", "host", "settings", "versions", "reference_mode")},
            "versions": self.versions,
            "esper_fast": self.versions["esper_fast"],
            "torch": self.versions["torch"],
            "python": self.versions["python"],
            "reference_mode": self.reference_mode,
        }

    def identity(self) -> dict:
        """What tells this run from every other: when it started, its settings (but the folder,
        which may move) and its data's fingerprint."""
        settings = self.settings.to_record()
        settings.pop("out")
        return {"started_at": self.started_at, "settings": settings, "data_fingerprint": self.data_fingerprint}

    @classmethod
    def from_log(cls, record: Mapping) -> "ConfigRecord":
        """The config record of a log; a key it lacks (an older log) is None."""
        settings = {f.name: record[f.name] for f in dataclasses.fields(RunConfig) if f.name in record}
        return cls(settings=RunConfig(**settings), **{f.name: record.get(f.name) for f in dataclasses.fields(cls)
                                                       if f.name != "settings"})


@dataclasses.dataclass
class ResumeRecord:
    """The record a resumed session begins with (``"type": "resume"``): the checkpoint it
    continues from, where that stood, and what had stopped the session before."""

    time: str
    command: str
    checkpoint: str              # its file name
    epochs_done: int
    steps_done: int
    stopped_by: str | None       # a signal's name, "a crash" or "an error"
    stopped_at: str | None       # when the session before last updated run.json

    TYPE: ClassVar[str] = "resume"

    def to_log(self) -> dict:
        return {"type": self.TYPE, **as_record(self)}


@dataclasses.dataclass(kw_only=True)
class SummaryRecord:
    """The last record of a session (``"type": "summary"``): how it ended, the seeds'
    fates, accuracy or perplexity, time and kernels, and where the log and plot are; a run
    of several slots also has ``slots`` (slot id -> blueprint), an interrupted one
    ``stopped_by``, ``checkpoint`` and ``resume_command``."""

    status: str                  # finished | interrupted
    time: str
    seeds: list[dict]            # SeedRecord.to_log() of every seed, in the order they germinated
    seed_outcome: str
    slots: dict[str, str] | None = optional()
    final_val_accuracy: float | None
    best_val_accuracy: float | None
    chance_accuracy: float | None
    final_perplexity: float | None
    rollbacks: int
    world_size: int
    epochs: int                  # epochs done
    epochs_planned: int
    mean_epoch_time_s: float
    total_time_s: float
    kernels_ran: dict | None     # None under --compile (not traced)
    kernels_compiled: dict
    reference_mode: bool
    metrics: str
    plot: str
    stopped_by: str | None = optional()
    checkpoint: str | None = optional()
    resume_command: str | None = optional()

    TYPE: ClassVar[str] = "summary"

    def to_log(self) -> dict:
        return {"type": self.TYPE, **as_record(self)}


def seed_values(attribution, in_forward, task_type: str = "classification") -> dict[str, dict]:
    """Slot id -> the accuracy attribution of its seed, for ``EpochRecord.slots``: the Shapley
    value, its 95% bound when sampled, the leave-one-out and alone-on contributions (points),
    for every live seed of ``attribution`` (a ``SlotAttribution``, or None) in ``in_forward``
    (the slots whose seed is in the forward: a TRAINING seed, at alpha 0, is not measured).
    For ``lm`` also the Shapley value of the loss the seed removes (``loss_shapley``, nats,
    positive helps) and its bound when sampled: what a language model's seed is judged by."""
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
            if task_type == "lm":
                values[slot_id]["loss_shapley"] = -attribution.loss.shapley[slot_id]
                if not attribution.exact:
                    values[slot_id]["loss_shapley_error"] = attribution.loss.shapley_error[slot_id]
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
    if len(lines[0]) > 100:  # many seeds (slots, candidates): one seed's fate per line
        head, _, fates = lines[0].partition(": ")
        lines = [head + ":"] + ["  " + fate for fate in fates.split("; ")]
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
