"""Where a run trains: the epoch loop of ``esper-fast train``.

A host with one seed slot (or several, ``--slots``) is trained while each slot's seed is
germinated, incubated, blended, judged by counterfactual attribution and fossilized or
culled (the decisions are :mod:`esper_fast.train.controller`'s), under the governor. Each
epoch runs the trainer function for the slots' stages, feeds every step's loss to the
governor (a panic rolls the model back to the last healthy epoch's snapshot, culling every
live seed), validates, lets the controllers decide and snapshots. Everything the run writes
goes through its :class:`~esper_fast.train.run_dir.RunDir`: after each epoch the
checkpoint, then the epoch's log record.

Several slots. One training step is one forward, one loss and one backward through every
slot, each in its own stage: an empty slot passes the host's features on; a TRAINING seed
(alpha 0) learns through the straight-through estimator, its output not in the forward; a
BLENDING seed blends at its own alpha, which moves one step of its own ramp before every
batch; later stages blend at alpha 1. The host's optimizer and every seed's own optimizer
(one per slot, so that a cull drops only its seed's state) step after the backward.
Validation measures every subset of the live seeds in the forward in the same pass, and
each slot's controller reads its seed's Shapley value (see
:class:`~esper_fast.train.controller.SlotControllers`).

Checkpoints and resume. A checkpoint is written when the run starts (epoch 0), after every
epoch (a rolled-back epoch included: its model is the restored healthy one) and when a stop
is requested in the middle of an epoch; it holds the position (epochs done, steps done of
the next), the model, optimizers, controller, governor, every random generator and the log
so far. A run resumed from it continues exactly where it was: a mid-epoch checkpoint also
holds the steps' losses, the batch-order generator as the epoch began (the same batches are
drawn again and the done ones skipped), torch's generator as the stop came (set once the
skipped batches are drawn), and the governor's snapshot tensors (the model has moved on
from them). On CPU a resumed run ends with the same records, bit for bit, as one that was
never stopped. :class:`~esper_fast.train.checkpoint.Checkpoint` is that record; each epoch's
is a :class:`~esper_fast.train.report.EpochRecord`.

Several processes (``torchrun``, see :mod:`esper_fast.train.ranks`). Every rank runs this
loop on its shard of the data and trains through a DistributedDataParallel wrapper, built
again whenever the seeds' parameters or the slots' stages change. Every decision is taken on every rank
from the same numbers: the step losses the governor reads are averaged over the ranks once
per epoch (a NaN on one rank is a NaN on all), validation returns the metrics over every
rank's batches, and the controller then decides the same thing everywhere. A stop request is
agreed before each step (one all-reduce of one int on the CPU), so all ranks stop after the
same step. After each epoch the ranks compare a checksum of their model and random
generators; rank 0 logs them and alone writes the folder.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import os
import platform
import socket
import time
from typing import Callable

import torch
import torch.nn as nn

import esper_fast
from esper_fast.kasmina.host import MorphogeneticModel, init_gpt_weights
from esper_fast.leyline import SeedStage
from esper_fast.ops.mode import using_reference
from esper_fast.runtime import get_task_spec
from esper_fast.tolaria import (
    TolariaGovernor,
    create_model,
    train_epoch_blended,
    train_epoch_incubator_mode,
    train_epoch_normal,
    validate_epoch,
)
from esper_fast.train import checkpoint, data
from esper_fast.train.checkpoint import Checkpoint, EpochProgress
from esper_fast.train.config import RunConfig, run_slots, slot_blueprints
from esper_fast.train.console import epoch_lines, say
from esper_fast.train.controller import LifecycleSchedule, SeedRecord, SlotControllers
from esper_fast.train.plotting import plot_run, run_title
from esper_fast.train.ranks import Ranks, RanksDivergedError, norm_statistics, state_checksum
from esper_fast.train.report import EpochRecord, outcome, seed_interactions, seed_values, summary_lines
from esper_fast.train.run_dir import METRICS_FILE, PLOT_FILE, STOPPED_BY, RunDir, now_iso
from esper_fast.train.signals import StopSignals
from esper_fast.train.watch import Batches, KernelTally, LossWatch, Progress

def _make_optimizer(params, task_type: str, lr: float):
    params = [p for p in params if p.requires_grad]
    if task_type == "lm":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


class SeedOptimizers:
    """The seeds' optimizers (one per slot) stepped as one: what tolaria's trainer functions
    take as their ``seed_optimizer``."""

    def __init__(self, optimizers):
        self.optimizers = list(optimizers)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def build_model(spec, device: str, slots: tuple[str, ...]) -> nn.Module:
    """The task's model with a seed slot at each of ``slots`` (host order; the first is the
    main slot). The host is the task's own, drawn from the same random numbers whatever the
    slots: the task's model is built, and for other slots than its default one its host is
    given a new set of slots."""
    model = create_model(spec, device)
    if slots == (model.slot_id,):
        return model
    host = model.host
    host.unregister_slot(model.slot_id)
    return MorphogeneticModel(host, device=device, task_config=spec.task_config, slots=list(slots))


def _cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """Cosine decay over the run (epoch is 1-based), so the last epochs settle."""
    return base * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))


def load_data(config: RunConfig, spec, ranks: Ranks | None = None):
    """The task's loaders (see :mod:`esper_fast.train.data`), this rank's shards; ``config`` is resolved."""
    pin = config.device.startswith("cuda")
    shard = {} if ranks is None or not ranks.distributed else {"rank": ranks.rank, "world_size": ranks.world_size}
    if spec.task_type == "lm":
        if spec.block_size and config.seq_len > spec.block_size:
            raise data.DataError(f"--seq-len {config.seq_len} exceeds the model's block size {spec.block_size}")
        return data.tinystories_loaders(
            text_path=config.text_path,
            seq_len=config.seq_len,
            batch_size=config.batch_size,
            seed=config.seed,
            pin_memory=pin,
            vocab_size=spec.vocab_size or data.BYTE_VOCAB_SIZE,
            **shard,
        )
    return data.cifar10_loaders(data_root=config.data_root, batch_size=config.batch_size, seed=config.seed,
                                pin_memory=pin, **shard)


def versions() -> dict:
    """The versions a result depends on."""
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


class LifecycleRun:
    """One ``esper-fast train`` run: the model, its data, optimizers, governor and controller,
    the records so far, and the run folder they are written to. Begin it with :meth:`start`
    (a new run) or :meth:`resume_from` (a checkpoint), then :meth:`execute`.

    ``config`` must be resolved (:func:`esper_fast.train.config.resolve`). ``ranks``: this
    process's place in a run of several (default: a single process); ``run_dir`` is then a
    :class:`~esper_fast.train.run_dir.SilentRunDir` on every rank but 0.
    """

    def __init__(self, config: RunConfig, run_dir: RunDir, stop: StopSignals | None = None, echo=say,
                 ranks: Ranks | None = None):
        self.config, self.run_dir, self.echo = config, run_dir, echo
        self.stop = stop if stop is not None else StopSignals()
        self.ranks = ranks = ranks if ranks is not None else Ranks()
        if config.inject_nan_at is not None and not 0 <= config.inject_nan_rank < ranks.world_size:
            raise ValueError(f"inject_nan_rank {config.inject_nan_rank} is not a rank of a run of {ranks.world_size}")
        # Every rank computes on its own device (cuda:LOCAL_RANK); config.device is what was asked.
        self.device = device = ranks.device_for(config.device)
        ranks.use_device(device)
        self.spec = spec = get_task_spec(config.task)
        self.task_type = spec.task_type
        self.blueprints = slot_blueprints(config)   # slot id -> blueprint, host order
        self.num_classes = spec.num_classes or 10
        self.reference = using_reference()

        torch.manual_seed(config.seed)
        self.data = load_data(dataclasses.replace(config, device=device), spec, ranks)
        self.model = build_model(spec, device, run_slots(config))
        if self.task_type == "lm":
            # GPT-2 initialisation: the tied head starts near ln(vocab) instead of ~220 nats.
            init_gpt_weights(self.model.host)
        if config.compile:
            for slot in self.model.seed_slots.values():
                slot.compilable = True
            self.model.compile()
        self.criterion = nn.CrossEntropyLoss()
        self.watch = LossWatch(self.criterion, device)
        vocab = spec.vocab_size if self.task_type == "lm" and spec.vocab_size else self.num_classes
        # A rollback culls every live seed; the controllers then expect those slots empty.
        self.governor = TolariaGovernor(self.model, random_guess_loss=math.log(vocab), clear_live_seed_state=True)
        self.host_optimizer = _make_optimizer(self.model.get_host_parameters(), self.task_type, config.lr)
        self.seed_optimizers: dict[str, torch.optim.Optimizer] = {}   # slot id -> its seed's, host order
        # What the trainer steps: the model, or (several processes) its DDP wrapper, and the
        # parameters and slots' stages the wrapper was built for.
        self.trained: nn.Module = self.model
        self._wrapped_for: tuple | None = None

        self.train_batches = Batches(self.data.trainloader, config.max_batches)
        self.test_batches = Batches(self.data.testloader, config.max_batches)
        self.steps_per_epoch = len(self.train_batches)
        self.schedule = LifecycleSchedule.for_epochs(config.epochs)
        self.controllers = SlotControllers(self.model, self.blueprints, self.schedule, config.epochs,
                                           self.steps_per_epoch)
        self.several = self.controllers.several
        self.tally = KernelTally(enabled=not config.compile)
        self.records: list[EpochRecord] = []
        self.log_records: list[dict] = []   # everything in metrics.jsonl, in order, as written
        self.rollbacks = 0
        self.next_epoch = 1
        self.progress: EpochProgress | None = None  # a resumed epoch's state (see the module docstring)
        self._resume_rng: dict | None = None
        self.elapsed_before = 0.0           # training time of the earlier sessions of a resumed run
        self.checkpoint_path = None
        self._checkpoint_position: tuple[int, int] | None = None

    # ---------------------------------------------------------------- beginning
    def _config_record(self, command: str) -> dict:
        found = versions()
        return {
            "type": "config",
            "command": command,
            "started_at": now_iso(),
            "host": socket.gethostname(),
            **self.config.to_record(),
            "task_type": self.task_type,
            "chance_accuracy": None if self.task_type == "lm" else 100.0 / self.num_classes,
            "data_source": self.data.source,
            "data": self.data.description,
            "data_fingerprint": self.data.fingerprint,
            "steps_per_epoch": self.steps_per_epoch,
            "schedule": dataclasses.asdict(self.schedule),
            "world_size": self.ranks.world_size,
            "backend": self.ranks.backend,
            "device_name": device_description(self.device),
            "versions": found,
            "esper_fast": found["esper_fast"],
            "torch": found["torch"],
            "python": found["python"],
            "reference_mode": self.reference,
        }

    def _announce(self) -> None:
        config = self.config
        self.echo(f"data: {self.data.description}")
        if config.slots is None:
            seeds = f"blueprint {config.blueprint}"
        else:
            seeds = (f"slot{'s' if self.several else ''} "
                     + ", ".join(f"{slot_id} ({blueprint})" for slot_id, blueprint in self.blueprints.items()))
        self.echo(
            f"train: {config.task} ({self.spec.topology} host, {self.task_type}) on {config.device}, {config.epochs} epochs x "
            f"{self.steps_per_epoch} steps, {seeds}, seed {config.seed}"
            + (f", {self.ranks.world_size} processes (DDP over {self.ranks.backend}, "
               f"batch {config.batch_size} per process)" if self.ranks.distributed else "")
            + (", reference mode (original algorithms)" if self.reference else "")
        )

    def start(self, command: str) -> None:
        """A new run: the log's config record, ``run.json`` and the epoch-0 checkpoint."""
        self._announce()
        self.log_records = [self._config_record(command)]
        self.run_dir.start_log(self.log_records)
        self._write_running_status(command, epochs_done=0, steps_done=0, checkpoint=None)
        self._checkpoint(0)

    def _write_running_status(self, command: str, **position) -> None:
        """``run.json`` as this process takes the run on: the run itself (from the log's config
        record, the same for every session of the run) and where it stands."""
        self.run_dir.write_status(
            status="running", command=command, pid=os.getpid(), task=self.config.task, epochs=self.config.epochs,
            started_at=self.log_records[0]["started_at"], **position, stopped_by=None,
            world_size=self.ranks.world_size,
        )

    def resume_from(self, state: Checkpoint, path, command: str, previous_status: dict | None = None) -> None:
        """Puts the run back where ``state`` (the checkpoint read from ``path``) left it and
        rewrites the log to what the checkpoint had seen, followed by a ``resume`` record.
        ``previous_status``: what ``run.json`` said of the session that stopped."""
        state.check_resumable(world_size=self.ranks.world_size, steps_per_epoch=self.steps_per_epoch,
                              data_fingerprint=self.data.fingerprint, text_path=self.config.text_path)
        self.seed_optimizers = state.restore(
            model=self.model, governor=self.governor, controllers=self.controllers, host_optimizer=self.host_optimizer,
            make_seed_optimizer=lambda slot_id: _make_optimizer(self.controllers.by_slot[slot_id].seed_parameters(),
                                                                self.task_type, self.config.lr),
        )
        self.log_records = list(state.log)
        self.records = [EpochRecord.from_log(r) for r in self.log_records if r.get("type") == EpochRecord.TYPE]
        self.rollbacks = state.rollbacks
        self.tally.counts.update(state.kernels)
        self.elapsed_before = state.elapsed_s
        self.next_epoch = state.epochs_done + 1
        self.progress = state.progress
        self._resume_rng = state.rng
        # Rank 0's generators on every rank: the ranks draw the same numbers (the per-epoch
        # checksum covers the generators too), so they all had these.
        checkpoint.restore_rng(state.rng, self.device, self.data.shuffle_generator,
                               torch_generators=self.progress is None)
        self.checkpoint_path = path
        self._checkpoint_position = (state.epochs_done, state.steps_done)

        self._announce()
        previous = previous_status or {}
        resume = {
            "type": "resume",
            "time": now_iso(),
            "command": command,
            "checkpoint": path.name,
            "epochs_done": state.epochs_done,
            "steps_done": state.steps_done,
            "stopped_by": previous.get("stopped_by") or STOPPED_BY.get(previous.get("status")),
            "stopped_at": previous.get("updated_at"),
        }
        self.log_records.append(resume)
        self.run_dir.start_log(self.log_records)
        self._write_running_status(command, epochs_done=state.epochs_done, steps_done=state.steps_done,
                                   checkpoint=str(path))
        where = f"epoch {self.next_epoch}" + (f", step {state.steps_done + 1}" if state.steps_done else "")
        self.echo(f"resume: from {path} at {where} of {self.config.epochs} epochs")

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint(self, epochs_done: int, progress: EpochProgress | None = None) -> None:
        """Writes the run's state after ``epochs_done`` epochs (and ``progress`` of the next).
        Rank 0 alone; no collective here, so the ranks may take this call differently."""
        if not self.ranks.is_writer:
            return
        state = Checkpoint.capture(
            config=self.config, world_size=self.ranks.world_size, epochs_done=epochs_done, progress=progress,
            model=self.model, host_optimizer=self.host_optimizer, seed_optimizers=self.seed_optimizers,
            controllers=self.controllers, governor=self.governor, device=self.device,
            shuffle=self.data.shuffle_generator, log=self.log_records, rollbacks=self.rollbacks,
            kernels=dict(self.tally.counts), elapsed_s=self.elapsed_before + self._session_time(),
        )
        path = self.run_dir.save_checkpoint(state.to_payload(), state.epochs_done, state.steps_done)
        self.checkpoint_path = path
        self._checkpoint_position = (state.epochs_done, state.steps_done)
        self.run_dir.write_status(epochs_done=state.epochs_done, steps_done=state.steps_done, checkpoint=str(path))

    @property
    def stopped_at(self) -> tuple[int, int]:
        """(epochs done, steps done of the next) as the last checkpoint holds them: where a
        stopped run stands, and where a resume goes on from (on the writing rank)."""
        return self._checkpoint_position

    def _session_time(self) -> float:
        start = getattr(self, "_session_start", None)
        return 0.0 if start is None else time.perf_counter() - start

    # ---------------------------------------------------------------- the loop
    def execute(self) -> dict:
        """Runs the remaining epochs (or until a stop is requested); returns the summary,
        whose ``status`` is ``finished`` or ``interrupted``."""
        self._session_start = time.perf_counter()
        status = "finished"
        try:
            for epoch in range(self.next_epoch, self.config.epochs + 1):
                if self._stop_agreed(self.stop.requested):
                    status = "interrupted"
                    break
                record = self.run_epoch(epoch)
                if record is None:
                    status = "interrupted"
                    break
                self.records.append(record)
                self.log_records.append(record.to_log())
                self._check_ranks_agree(record)
                try:
                    self._checkpoint(epoch)
                    self.run_dir.append(self.log_records[-1])
                finally:
                    # Printed once the checkpoint holds the epoch, even if a write after it
                    # failed: a resume goes on after this epoch and would never print it.
                    if self._checkpoint_position == (epoch, 0):
                        for line in epoch_lines(record, self.config.epochs, self.task_type):
                            self.echo(line)
        finally:
            self.tally.stop()
        return self.finish(status)

    def run_epoch(self, epoch: int) -> EpochRecord | None:
        """One epoch: train, governor check, validate, decide, snapshot. Returns its record,
        or None when a stop request ended it early (after writing a mid-epoch checkpoint)."""
        start = time.perf_counter()
        plan = self._plan_epoch(epoch)
        begun, after_skip = self._begin_epoch(plan)
        self._train(plan, begun.steps_done, after_skip)
        train_time = begun.train_time_s + time.perf_counter() - start
        if self.watch.step < self.steps_per_epoch:
            self._stop_in_epoch(epoch, dataclasses.replace(
                begun, steps_done=self.watch.step, losses=self.watch.done_losses(), train_time_s=train_time))
            return None
        return self._end_epoch(plan, begun, start, train_time)

    def _plan_epoch(self, epoch: int) -> _EpochPlan:
        """What the epoch trains, fixed as it begins; sets the learning rate (making a seed's
        optimizer for each slot that holds a seed and has none)."""
        config, controllers = self.config, self.controllers
        stages = {slot_id: c.stage for slot_id, c in controllers.by_slot.items()}
        poisoned = self.steps_per_epoch // 2 if config.inject_nan_at == epoch else None
        return _EpochPlan(
            epoch=epoch,
            main_slot=controllers.main_slot,
            stages=stages,
            seeds={slot_id: c.seeds[-1] if stages[slot_id] is not None else None
                   for slot_id, c in controllers.by_slot.items()},
            lr=self._set_learning_rate(epoch),
            poisoned_step=poisoned,
            poison=poisoned if self.ranks.rank == config.inject_nan_rank else None,
        )

    def _begin_epoch(self, plan: _EpochPlan) -> tuple[EpochProgress, Callable[[], None] | None]:
        """The epoch as it begins: from its first step, or, resumed, from where the mid-epoch
        checkpoint left it. Returns its progress so far and what to run once the done batches
        are skipped (a resumed epoch sets torch's generators then)."""
        progress, self.progress = self.progress, None
        resumed = progress is not None
        self.data.set_epoch(plan.epoch)
        shuffle = self.data.shuffle_generator
        after_skip = None
        if not resumed:
            progress = EpochProgress(
                steps_done=0,
                losses=None,
                shuffle_at_epoch_start=shuffle.get_state() if shuffle is not None else None,
                alpha_start=float(self.model.seed_slot.alpha),
                train_time_s=0.0,
                started_at=now_iso(),
                alpha_starts=self._alphas() if self.several else None,
            )
            self.watch.begin_epoch(self.steps_per_epoch, plan.poison)
        else:
            if shuffle is not None:
                shuffle.set_state(progress.shuffle_at_epoch_start)
            rank = self.ranks.rank if self.ranks.distributed else None
            self.watch.resume_epoch(self.steps_per_epoch, plan.poison, progress.losses_of(rank))
            after_skip = functools.partial(checkpoint.restore_torch_rng, self._resume_rng, self.config.device)
        self._wrap(plan)
        if resumed and self.ranks.distributed:
            # Mid-epoch each rank's BatchNorm statistics are its own (averaged at the epoch's
            # end); set after the wrapper, whose constructor broadcasts rank 0's buffers.
            for tensor, saved in zip(norm_statistics(self.model), progress.norm_statistics_by_rank[self.ranks.rank]):
                tensor.copy_(saved)
        return progress, after_skip

    def _end_epoch(self, plan: _EpochPlan, begun: EpochProgress, start: float, train_time: float) -> EpochRecord:
        """After the epoch's last step: the governor reads every step's loss (and rolls back on
        a panic), validation with the counterfactuals, the controllers' decisions and the
        snapshot. Returns the epoch's record."""
        controllers = self.controllers
        alphas = self._alphas()
        self.ranks.average_norm_statistics(self.model)
        losses = self._epoch_losses()

        where = f" on rank {self.config.inject_nan_rank}" if self.ranks.distributed else ""
        events = [f"NaN injected at step {plan.poisoned_step + 1}{where}"] if plan.poisoned_step is not None else []
        rollback = self._governor_check(plan.epoch, losses, events)
        # A counterfactual only means something once the seed is in the forward (alpha > 0).
        in_forward = [slot_id for slot_id, c in controllers.by_slot.items()
                      if c.stage is not None and c.slot.alpha > 0]
        measured = self._validate(attribution=bool(in_forward))
        attribution = measured.attribution if controllers.main_slot in in_forward else None
        contribution = None if attribution is None else float(attribution.seed_contribution)
        values = seed_values(measured.slot_attribution, in_forward) if self.several else {}
        if not rollback:
            if self.several:
                judged = {slot_id: (v["shapley"], v.get("shapley_error")) for slot_id, v in values.items()}
            else:
                judged = {controllers.main_slot: (contribution, None)}
            events += controllers.end_epoch(plan.epoch, measured.val_accuracy, judged)
            for slot_id, controller in controllers.by_slot.items():
                if controller.stage is None:
                    self.seed_optimizers.pop(slot_id, None)
            with self.tally.tracing():
                self.governor.snapshot()
        epoch_time = begun.train_time_s + time.perf_counter() - start

        record = EpochRecord(
            epoch=plan.epoch,
            stage=plan.stage_name,
            stage_after=_stage_name(controllers.main.stage),
            seed_id=plan.seed.seed_id if plan.seed is not None else None,
            blueprint=plan.seed.blueprint if plan.seed is not None else None,
            alpha_start=begun.alpha_start,
            alpha=alphas[controllers.main_slot],
            lr=plan.lr,
            train_loss=(sum(losses) / len(losses)) if losses else None,
            train_accuracy=measured.train_accuracy,
            train_eval_loss=measured.train_loss,
            val_loss=measured.val_loss,
            val_accuracy=measured.val_accuracy,
            perplexity=measured.perplexity,
            per_class_accuracy=measured.per_class_acc,
            seed_contribution=contribution,
            real_accuracy=None if attribution is None else float(attribution.real_accuracy),
            baseline_accuracy=None if attribution is None else float(attribution.baseline_accuracy),
            rollback=rollback,
            events=events,
            steps=len(losses),
            started_at=begun.started_at,
            ended_at=now_iso(),
            train_time_s=train_time,
            eval_time_s=epoch_time - train_time,
            epoch_time_s=epoch_time,
            samples_per_s=_samples_per_second(self.train_batches, len(losses) - begun.steps_done,
                                              train_time - begun.train_time_s, self.ranks.world_size),
        )
        if self.several:
            record.slots = self._slot_records(plan, begun, alphas, values)
            record.interactions = seed_interactions(measured.slot_attribution, in_forward)
        if self.ranks.distributed:
            mine = {"rank": self.ranks.rank, "checksum": state_checksum(self.model, self.device),
                    "stage": record.stage_after, "alpha": float(self.model.seed_slot.alpha)}
            if self.several:
                mine["slots"] = {slot_id: {"stage": _stage_name(c.stage), "alpha": float(c.slot.alpha)}
                                 for slot_id, c in controllers.by_slot.items()}
            record.ranks = self.ranks.gather(mine)
        return record

    def _alphas(self) -> dict[str, float]:
        """Every slot's alpha now, host order."""
        return {slot_id: float(c.slot.alpha) for slot_id, c in self.controllers.by_slot.items()}

    def _slot_records(self, plan: _EpochPlan, begun: EpochProgress, alphas: dict, values: dict) -> dict[str, dict]:
        """The record's ``slots``: each slot's stage, seed, alphas and attribution."""
        found = {}
        for slot_id, controller in self.controllers.by_slot.items():
            seed = plan.seeds[slot_id]
            found[slot_id] = {
                "stage": _stage_name(plan.stages[slot_id]),
                "stage_after": _stage_name(controller.stage),
                "seed_id": seed.seed_id if seed is not None else None,
                "blueprint": seed.blueprint if seed is not None else None,
                "alpha_start": begun.alpha_starts[slot_id],
                "alpha": alphas[slot_id],
                **values.get(slot_id, {"shapley": None}),
            }
        return found

    def _stop_agreed(self, requested: bool) -> bool:
        """Whether to stop now. Over several processes the ranks agree (the largest signal
        number asked of any rank; one all-reduce), so that they all stop at the same step."""
        if not self.ranks.distributed:
            return requested
        signum = self.ranks.max(self.stop.signum or 0)
        if signum:
            self.stop.adopt(signum)
        return bool(signum)

    def _epoch_losses(self) -> list[float]:
        """Every step's loss of the epoch, read from the device once; over several processes
        the mean over the ranks (one all-reduce), so that every rank's governor sees the same."""
        if not self.ranks.distributed:
            return self.watch.epoch_losses()
        return self.ranks.mean(self.watch.losses[: self.watch.step]).tolist()

    def _check_ranks_agree(self, record: EpochRecord) -> None:
        """Raises :class:`RanksDivergedError` (on every rank: they all see the same list) when
        the ranks' checksums differ after the epoch; rank 0 logs the record first."""
        ranks = record.ranks
        if ranks is None or len({r["checksum"] for r in ranks}) == 1:
            return
        self.run_dir.append(record.to_log())
        raise RanksDivergedError(f"the ranks differ after epoch {record.epoch}: "
                                 + ", ".join(f"rank {r['rank']} {r['checksum']} {r['stage']}" for r in ranks))

    def _wrap(self, plan: _EpochPlan) -> None:
        """Builds the DDP wrapper again when the trained parameters or a slot's stage (or
        gradient isolation) changed since it was built (see :meth:`Ranks.wrap`); a single
        process trains the model itself."""
        if not self.ranks.distributed:
            return
        slots = tuple((slot_id, plan.stages[slot_id], c.slot.isolate_gradients)
                      for slot_id, c in self.controllers.by_slot.items())
        wanted = (tuple(id(p) for p in self.model.parameters() if p.requires_grad), slots)
        if wanted == self._wrapped_for:
            return
        # The old wrapper's gradient hooks go with it: drop it before the new one registers its own.
        self.trained = self.model
        gc.collect()
        self.trained = self.ranks.wrap(self.model)
        self._wrapped_for = wanted

    def _stop_in_epoch(self, epoch: int, progress: EpochProgress) -> None:
        """A stop came before the epoch's last step: checkpoint where it stands. With no step
        done the epoch has not changed anything, and the checkpoint of the epoch before is it.
        Several processes stop at the same step; what each rank holds of its own (its losses
        and BatchNorm statistics so far) goes into the checkpoint."""
        if self.ranks.distributed:
            progress.losses_by_rank = self.ranks.gather(progress.losses)
            progress.norm_statistics_by_rank = self.ranks.gather(
                [t.detach().cpu().clone() for t in norm_statistics(self.model)])
        if progress.steps_done == 0 and self._checkpoint_position == (epoch - 1, 0):
            return
        self._checkpoint(epoch - 1, progress)

    def _set_learning_rate(self, epoch: int) -> float:
        lr = _cosine_lr(self.config.lr, epoch, self.config.epochs)
        kept, self.seed_optimizers = self.seed_optimizers, {}
        for slot_id, controller in self.controllers.by_slot.items():  # in the host's order
            if controller.stage is not None:
                self.seed_optimizers[slot_id] = kept[slot_id] if slot_id in kept else _make_optimizer(
                    controller.seed_parameters(), self.task_type, lr)
        for optimizer in (self.host_optimizer, *self.seed_optimizers.values()):
            for group in optimizer.param_groups:
                group["lr"] = lr
        return lr

    def _train(self, plan: _EpochPlan, skip: int = 0, after_skip=None) -> None:
        """One epoch with the trainer function for the slots' stages (that of the most
        advanced seed: every seed is in the forward as its own stage has it, and every
        seed's optimizer steps), from batch ``skip`` on, ending early (after the current
        step) if a stop is requested."""
        epoch = plan.epoch
        present = [stage for stage in plan.stages.values() if stage is not None]
        stage = max(present) if present else None
        blending = [c for slot_id, c in self.controllers.by_slot.items() if plan.stages[slot_id] == SeedStage.BLENDING]

        def before_batch(i: int) -> None:
            self.tally.first_batch_only(i)
            for controller in blending:
                controller.before_blend_batch(i)

        batches = Progress(
            Batches(self.train_batches, before_batch=before_batch, skip=skip, after_skip=after_skip,
                    should_stop=lambda i: self._stop_agreed(self.stop.at_step(epoch, i))),
            self.watch,
            desc=f"epoch {epoch}/{self.config.epochs} {plan.stage_name.lower()}",
            enabled=self.config.progress and self.ranks.is_writer,
            initial=skip,
        )
        common = (self.device, self.task_type)
        trained = self.trained
        seeds = SeedOptimizers(self.seed_optimizers.values())
        with self.tally.tracing(start=False):
            if stage is None:
                train_epoch_normal(trained, batches, self.watch, self.host_optimizer, *common)
            elif stage == SeedStage.TRAINING:
                train_epoch_incubator_mode(trained, batches, self.watch, self.host_optimizer, seeds, *common)
            else:
                train_epoch_blended(trained, batches, self.watch, self.host_optimizer, seeds, *common)

    def _governor_check(self, epoch: int, losses: list[float], events: list[str]) -> bool:
        """Feeds every step's loss to the governor in order; on a panic rolls back. True if it did."""
        panic_loss = next((loss for loss in losses if self.governor.check_vital_signs(loss)), None)
        if panic_loss is None:
            return False
        self.rollbacks += 1
        # The optimizers' momentum is reset with the weights: diverged momentum on restored
        # weights would push them straight back into divergence.
        report = self.governor.execute_rollback(optimizer=self.host_optimizer)
        self.seed_optimizers = {}
        events.append(f"governor rollback ({report.reason}, loss {panic_loss:.4g}): restored the last healthy epoch")
        events += self.controllers.cull_live(epoch, "governor_rollback")
        return True

    def _validate(self, attribution: bool):
        with self.tally.tracing(start=False):
            return validate_epoch(
                self.model,
                self.train_batches,
                Batches(self.test_batches, before_batch=self.tally.first_batch_only),
                self.criterion,
                self.device,
                compute_per_class=self.task_type == "classification",
                num_classes=self.num_classes,
                task_type=self.task_type,
                attribution=attribution,
            )

    # ---------------------------------------------------------------- the end
    def finish(self, status: str) -> dict:
        """Appends the summary to the log, draws the plot, prints the closing report.
        ``status``: ``finished`` or ``interrupted`` (a stop was requested)."""
        records = self.records
        final = records[-1] if records else None
        seeds = self.controllers.seeds
        out = self.run_dir.path
        summary = {
            "type": "summary",
            "status": status,
            "time": now_iso(),
            "seeds": [s.to_log() for s in seeds],
            "seed_outcome": outcome(seeds, list(self.controllers.by_slot) if self.several else None),
            **({"slots": self.blueprints} if self.several else {}),
            "final_val_accuracy": final.val_accuracy if final is not None else None,
            "best_val_accuracy": max((r.val_accuracy for r in records), default=None),
            "chance_accuracy": None if self.task_type == "lm" else 100.0 / self.num_classes,
            "final_perplexity": final.perplexity if final is not None else None,
            "rollbacks": self.rollbacks,
            "world_size": self.ranks.world_size,
            "epochs": len(records),
            "epochs_planned": self.config.epochs,
            "mean_epoch_time_s": sum(r.epoch_time_s for r in records) / max(len(records), 1),
            "total_time_s": self.elapsed_before + self._session_time(),
            "kernels_ran": dict(self.tally.counts) if self.tally.enabled else None,
            "kernels_compiled": esper_fast.kernels_available(),
            "reference_mode": self.reference,
            "metrics": str(out / METRICS_FILE),
            "plot": str(out / PLOT_FILE),
        }
        if status == "interrupted":
            summary.update(stopped_by=self.stop.name, checkpoint=str(self.checkpoint_path),
                           resume_command=f"esper-fast train --resume {out}")
        self.log_records.append(summary)
        self.run_dir.append(summary)
        # The config record with the device this session ran on (--resume may change it).
        self.draw_plot(run_title({**self.log_records[0], "device": self.config.device}, records, summary,
                                 position=self.stopped_at))
        for line in summary_lines(summary, self.device, self.ranks.backend):
            self.echo(line)
        self.run_dir.write_status(status=status, epochs_done=len(records),
                                  stopped_by=self.stop.name if status == "interrupted" else None)
        return summary

    def draw_plot(self, title: str) -> None:
        self.run_dir.write_plot(lambda path: plot_run(
            self.records, path, title=title,
            chance=None if self.task_type == "lm" else 100.0 / self.num_classes, task_type=self.task_type,
        ))


@dataclasses.dataclass
class _EpochPlan:
    """What an epoch trains, fixed as it begins."""

    epoch: int
    main_slot: str
    stages: dict[str, SeedStage | None]   # slot id -> its stage (None: no seed), host order
    seeds: dict[str, SeedRecord | None]   # slot id -> the seed in it
    lr: float
    poisoned_step: int | None    # --inject-nan-at: the step whose loss is NaN (on one rank)
    poison: int | None           # that step, on the rank that poisons it

    @property
    def stage(self) -> SeedStage | None:
        """The main slot's stage."""
        return self.stages[self.main_slot]

    @property
    def seed(self) -> SeedRecord | None:
        """The seed in the main slot."""
        return self.seeds[self.main_slot]

    @property
    def stage_name(self) -> str:
        return _stage_name(self.stage)


def _stage_name(stage: SeedStage | None) -> str:
    return stage.name if stage is not None else "NONE"


def _samples_per_second(train_batches: Batches, steps: int, seconds: float, world_size: int = 1) -> float | None:
    """Training samples per second over every rank (each rank takes a batch per step)."""
    sampler = getattr(train_batches.source, "batch_sampler", None) or getattr(train_batches.source, "sampler", None)
    batch_size = getattr(sampler, "batch_size", None)
    if not batch_size or seconds <= 0:
        return None
    return world_size * steps * batch_size / seconds
