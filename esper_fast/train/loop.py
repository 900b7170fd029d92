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

Checkpoints and resume: :mod:`esper_fast.train.session` (how a run begins, is saved, resumed
and ends). On CPU a resumed run ends with the same records, bit for bit, as one that was
never stopped.

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
import time
from typing import Callable

import torch
import torch.nn as nn

from esper_fast.kasmina.host import init_gpt_weights
from esper_fast.leyline import SeedStage
from esper_fast.ops.mode import using_reference
from esper_fast.runtime import get_task_spec
from esper_fast.tolaria import (
    TolariaGovernor,
    judge_candidates,
    train_epoch_blended,
    train_epoch_incubator_mode,
    train_epoch_normal,
    validate_epoch,
)
from esper_fast.train import checkpoint
from esper_fast.train.checkpoint import EpochProgress
from esper_fast.train.console import epoch_lines, say
from esper_fast.train.controller import LifecycleSchedule, SeedRecord, SlotControllers
from esper_fast.train.datasets import task_data
from esper_fast.train.interrupts import StopSignals
from esper_fast.train.optimizers import RunOptimizers
from esper_fast.train.ranks import Ranks, RanksDivergedError, norm_statistics, state_checksum
from esper_fast.train.report import EpochRecord, SlotRecord, seed_interactions, seed_values
from esper_fast.train.run_dir import RunDir, now_iso
from esper_fast.train.session import RunSession
from esper_fast.train.settings import RunConfig, slot_blueprints, slot_candidates
from esper_fast.train.watch import Batches, KernelTally, LossWatch, Progress


class LifecycleRun(RunSession):
    """One ``esper-fast train`` run: the model, its data, optimizers, governor and controllers,
    the records so far, and the run folder they are written to. Begin it with :meth:`start`
    (a new run) or :meth:`resume_from` (a checkpoint), then :meth:`execute`.

    ``config`` must be resolved (:func:`esper_fast.train.settings.resolve`). ``ranks``: this
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
        self.chance = None if self.task_type == "lm" else 100.0 / self.num_classes
        self.reference = using_reference()

        torch.manual_seed(config.seed)
        self.data = task_data(dataclasses.replace(config, device=device), spec, ranks.rank, ranks.world_size)
        self.model = spec.create_model(device, slots=config.slots)
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
        # What the trainer steps: the model, or (several processes) its DDP wrapper, and the
        # parameters and slots' stages the wrapper was built for.
        self.trained: nn.Module = self.model
        self._wrapped_for: tuple | None = None

        self.train_batches = Batches(self.data.trainloader, config.max_batches)
        self.test_batches = Batches(self.data.testloader, config.max_batches)
        self.steps_per_epoch = len(self.train_batches)
        self.schedule = LifecycleSchedule.for_epochs(config.epochs)
        self.candidates = {slot_id: names for slot_id, names in slot_candidates(config).items() if len(names) > 1}
        self.controllers = SlotControllers(self.model, self.blueprints, self.schedule, config.epochs,
                                           self.steps_per_epoch, self.task_type, self.candidates)
        self.several = self.controllers.several
        self.optimizers = RunOptimizers(self.model.get_host_parameters(), self.controllers, self.task_type, config.lr)
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

    # ---------------------------------------------------------------- the loop
    def execute(self) -> dict:
        """Runs the remaining epochs (or until a stop is requested); returns the summary,
        whose ``status`` is ``finished`` or ``interrupted``."""
        self._session_start = time.perf_counter()
        status = "finished"
        try:
            for epoch in range(self.next_epoch, self.config.epochs + 1):
                if self.ranks.agree_to_stop(self.stop, self.stop.requested):
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
            seeds={slot_id: c.current for slot_id, c in controllers.by_slot.items()},
            candidates={slot_id: [{"seed_id": c.seed_id, "blueprint": c.blueprint_id}
                                  for c in controller.slot.candidates]
                        for slot_id, controller in controllers.by_slot.items() if controller.slot.has_rivals},
            lr=self.optimizers.set_learning_rate(epoch, config.epochs),
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
        losses = self.ranks.epoch_losses(self.watch)

        where = f" on rank {self.config.inject_nan_rank}" if self.ranks.distributed else ""
        events = [f"NaN injected at step {plan.poisoned_step + 1}{where}"] if plan.poisoned_step is not None else []
        rollback = self._governor_check(plan.epoch, losses, events)
        # A counterfactual only means something once the seed is in the forward (alpha > 0).
        in_forward = [slot_id for slot_id, c in controllers.by_slot.items()
                      if c.stage is not None and c.slot.alpha > 0]
        measured = self._validate(attribution=bool(in_forward))
        attribution = measured.attribution if controllers.main_slot in in_forward else None
        contribution = None if attribution is None else _contribution(attribution, self.task_type)
        values = seed_values(measured.slot_attribution, in_forward, self.task_type)
        judged = controllers.judged(contribution, values)
        # The main slot's seed as the decision reads it (with several slots, its Shapley value).
        contribution = judged.get(controllers.main_slot, (None,))[0]
        judgements = {}
        if not rollback:
            judgements = {slot_id: self._judge(slot_id) for slot_id in controllers.judging()}
            events += controllers.end_epoch(plan.epoch, measured.val_accuracy, judged, judgements,
                                            val_loss=measured.val_loss)
            self.optimizers.drop_empty()
            with self.tally.tracing():
                self.governor.snapshot()
        epoch_time = begun.train_time_s + time.perf_counter() - start

        # Every slot's part; a run of one slot records its slot's in the epoch's own fields.
        alpha_starts = begun.alpha_starts or {controllers.main_slot: begun.alpha_start}
        slots = {slot_id: SlotRecord(
            stage=_stage_name(plan.stages[slot_id]), stage_after=_stage_name(c.stage),
            seed_id=None if plan.seeds[slot_id] is None else plan.seeds[slot_id].seed_id,
            blueprint=None if plan.seeds[slot_id] is None else plan.seeds[slot_id].blueprint,
            alpha_start=alpha_starts[slot_id], alpha=alphas[slot_id], **values.get(slot_id, {"shapley": None}),
        ) for slot_id, c in controllers.by_slot.items()}
        main = slots[controllers.main_slot]
        record = EpochRecord(
            epoch=plan.epoch,
            stage=main.stage,
            stage_after=main.stage_after,
            seed_id=main.seed_id,
            blueprint=main.blueprint,
            alpha_start=main.alpha_start,
            alpha=main.alpha,
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
            slots={slot_id: slot.to_log() for slot_id, slot in slots.items()} if self.several else None,
            interactions=seed_interactions(measured.slot_attribution, in_forward),
            candidates=plan.candidates or None,
            judgements={slot_id: {**j.to_log(), "gates": controllers.by_slot[slot_id].judged_gates}
                        for slot_id, j in judgements.items()} or None,
        )
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
                    should_stop=lambda i: self.ranks.agree_to_stop(self.stop, self.stop.at_step(epoch, i))),
            self.watch,
            desc=f"epoch {epoch}/{self.config.epochs} {plan.stage_name.lower()}",
            enabled=self.config.progress and self.ranks.is_writer,
            initial=skip,
        )
        common = (self.device, self.task_type)
        trained = self.trained
        host, seeds = self.optimizers.host, self.optimizers.stepped()
        with self.tally.tracing(start=False):
            if stage is None:
                train_epoch_normal(trained, batches, self.watch, host, *common)
            elif stage == SeedStage.TRAINING:
                train_epoch_incubator_mode(trained, batches, self.watch, host, seeds, *common)
            else:
                train_epoch_blended(trained, batches, self.watch, host, seeds, *common)

    def _governor_check(self, epoch: int, losses: list[float], events: list[str]) -> bool:
        """Feeds every step's loss to the governor in order; on a panic rolls back. True if it did."""
        panic_loss = next((loss for loss in losses if self.governor.check_vital_signs(loss)), None)
        if panic_loss is None:
            return False
        self.rollbacks += 1
        # The optimizers' momentum is reset with the weights: diverged momentum on restored
        # weights would push them straight back into divergence.
        report = self.governor.execute_rollback(optimizer=self.optimizers.host)
        self.optimizers.forget_seeds()
        events.append(f"governor rollback ({report.reason}, loss {panic_loss:.4g}): restored the last healthy epoch")
        events += self.controllers.cull_live(epoch, "governor_rollback")
        return True

    def _judge(self, slot_id: str):
        """The judgement of the candidates in ``slot_id`` over the test batches. It draws no
        random number: the generators stay where the run's own epochs leave them."""
        devices = [self.device] if str(self.device).startswith("cuda") else []
        with torch.random.fork_rng(devices=devices), self.tally.tracing(start=False):
            return judge_candidates(self.model, slot_id, Batches(self.test_batches), self.criterion, self.device,
                                    self.task_type)

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
    # slot id -> its incubating candidates ({"seed_id", "blueprint"}), for slots with several
    candidates: dict[str, list[dict]] = dataclasses.field(default_factory=dict)

    @property
    def stage_name(self) -> str:
        """The main slot's stage, by name."""
        return _stage_name(self.stages[self.main_slot])


def _contribution(attribution, task_type: str) -> float:
    """The main slot's counterfactual in the task's measure: accuracy points, or for ``lm``
    the validation loss its seed removes (positive helps)."""
    if task_type == "lm":
        return float(attribution.baseline_loss - attribution.real_loss)
    return float(attribution.seed_contribution)


def _stage_name(stage: SeedStage | None) -> str:
    return stage.name if stage is not None else "NONE"


def _samples_per_second(train_batches: Batches, steps: int, seconds: float, world_size: int = 1) -> float | None:
    """Training samples per second over every rank (each rank takes a batch per step)."""
    sampler = getattr(train_batches.source, "batch_sampler", None) or getattr(train_batches.source, "sampler", None)
    batch_size = getattr(sampler, "batch_size", None)
    if not batch_size or seconds <= 0:
        return None
    return world_size * steps * batch_size / seconds
