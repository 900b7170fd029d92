"""Where a run decides: the built-in seed controller and its schedule.

The controller is deliberately simple and deterministic (no policy): germinate when
validation accuracy stops improving (or after a warm-up), hold each stage for a fixed number
of epochs, then keep the seed only if the model is more accurate with it than with alpha
forced to 0. It decides once per epoch, after validation (:meth:`SeedController.end_epoch`),
and moves the alpha ramp one step before every blending batch.

A run of several slots (:class:`SlotControllers`) gives each slot a :class:`SeedController`
of its own, with these rules unchanged, and judges each live seed by its Shapley value (the
model's validation accuracy over every subset of the live seeds, see
:mod:`esper_fast.tolaria.attribution`) instead of the single counterfactual. Every slot
sees the same validation accuracy, so every empty slot germinates at the same epoch-end.

A language model's run (``task_type="lm"``) judges a seed by the validation loss throughout:
its contribution is the loss it removes (:data:`JUDGED_BY`), and gate G2 (TRAINING ->
BLENDING) asks the validation loss to have fallen by ``min_training_improvement`` percent
(relative) while the seed trained, instead of the accuracy to have risen by as many points
(:class:`LossImprovementGates`): the share of next tokens a language model gets right may not
move at all while its loss falls.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import torch.nn as nn

from esper_fast.kasmina.gates import QualityGates
from esper_fast.leyline import SeedStage
from esper_fast.train.settings import as_record, optional


# What a seed's value measures, per task type: its name in words, its unit and its format.
# A classifier's seed is judged by accuracy points; a language model's by the validation
# loss it removes (nats per token; positive helps): its accuracy, the share of tokens whose
# most likely next token is right, may not move at all while the model learns.
JUDGED_BY = {
    "classification": ("", "points", "+.2f"),
    "lm": ("loss ", "nats", "+.4f"),
}


@dataclasses.dataclass
class LifecycleSchedule:
    """How long the controller holds each stage, in epochs."""

    min_warmup_epochs: int = 2      # host-only epochs before a plateau may trigger germination
    max_warmup_epochs: int = 3      # germinate after this many host-only epochs even without a plateau
    plateau_delta: float = 1.0      # accuracy gain (points) below which the host counts as stalled
    incubation_epochs: int = 1      # TRAINING: alpha 0, the seed learns through the STE
    blending_epochs: int = 2        # BLENDING: alpha ramps 0 -> 1 step by step, then holds at 1
    shadowing_epochs: int = 1
    probation_epochs: int = 1       # PROBATIONARY: the last epoch before the keep/cull decision
    gate_patience: int = 2          # epochs a quality gate may hold the seed before it is culled

    @property
    def ramp_epochs(self) -> int:
        """Epochs of the alpha ramp. With more than one blending epoch the last one holds
        alpha at 1, so the host's BatchNorm running statistics (which lag a moving blend)
        settle before the seed is judged in eval mode."""
        return max(1, self.blending_epochs - 1)

    @property
    def lifecycle_epochs(self) -> int:
        return self.incubation_epochs + self.blending_epochs + self.shadowing_epochs + self.probation_epochs

    @classmethod
    def for_epochs(cls, epochs: int) -> "LifecycleSchedule":
        """The default schedule, with warm-up (and if need be blending) shortened so that a run
        of ``epochs`` still reaches the keep/cull decision, when it can, by its last epoch."""
        schedule = cls()
        if epochs - schedule.lifecycle_epochs - 1 < 1:
            schedule = cls(blending_epochs=1)
        warmup = max(1, min(schedule.max_warmup_epochs, epochs - schedule.lifecycle_epochs - 1))
        return dataclasses.replace(
            schedule, min_warmup_epochs=min(schedule.min_warmup_epochs, warmup), max_warmup_epochs=warmup
        )


class LossImprovementGates(QualityGates):
    """The quality gates of a language model's seed: G2's training improvement is the relative
    fall of the validation loss since the stage began, in percent (checks
    ``loss_improvement_1.23%`` / ``loss_improvement_insufficient_0.10%``); every other check is
    :class:`~esper_fast.kasmina.gates.QualityGates`'. Its controller feeds it the losses:
    :meth:`record_loss` after each validation, :meth:`start_stage` at each stage change."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_at_stage_start: float | None = None  # None: no loss measured yet
        self.current_loss: float | None = None

    def record_loss(self, loss: float | None) -> None:
        """The epoch's validation loss (None: not measured, the last one stands)."""
        if loss is not None:
            self.current_loss = float(loss)
            if self.loss_at_stage_start is None:  # none yet: the first loss, or an older checkpoint
                self.loss_at_stage_start = self.current_loss

    def start_stage(self) -> None:
        """The loss now is the new stage's baseline."""
        self.loss_at_stage_start = self.current_loss

    def loss_fall(self) -> float:
        """How much the validation loss fell since the stage began, in percent of where it
        began (negative: it rose); 0 when either loss is missing or the start is not positive."""
        start, now = self.loss_at_stage_start, self.current_loss
        if start is None or now is None or not start > 0:
            return 0.0
        return 100.0 * (start - now) / start

    def training_improvement(self, state) -> tuple[float, str]:
        return self.loss_fall(), "loss_improvement"


@dataclasses.dataclass
class SeedRecord:
    """One seed's life: where and when it grew, and how it ended."""

    seed_id: str
    blueprint: str
    germinated_epoch: int
    outcome: str = "live"            # live | fossilized | culled
    reason: str = ""
    decided_epoch: int | None = None
    contribution: float | None = None  # the last measured: the counterfactual, or the Shapley value
    # Runs of several slots only (left out of the log when None):
    slot: str | None = optional()                # the slot the seed grew in
    contribution_error: float | None = optional()  # the 95% bound of a sampled Shapley value
    # Candidates incubated together only: the value the judgement measured (left out otherwise).
    judged_value: float | None = optional()

    def to_log(self) -> dict:
        """The record as the log's summary and a checkpoint hold it; ``SeedRecord(**d)`` reads it back."""
        return as_record(self)


class SeedController:
    """Decides, once per epoch, what one seed slot does next. See the module docstring.

    ``slot_id``: the slot it drives (None: the model's main slot, and the seed records name
    no slot). ``name_seed()`` names each new seed (default ``seed-N``, N counting this
    controller's seeds). ``shapley``: the contribution it is given is the seed's Shapley
    value (a run of several slots), which the events and reasons say. ``task_type``: what the
    contribution measures (:data:`JUDGED_BY`): accuracy points, or for ``lm`` the validation
    loss the seed removes, and then G2 reads the validation loss's fall too
    (:class:`LossImprovementGates`, fed by :meth:`end_epoch`'s ``val_loss``). A contribution
    of exactly 0 is culled as ``no_measurable_effect``.
    """

    def __init__(self, model: nn.Module, blueprint: str, schedule: LifecycleSchedule, epochs: int, steps_per_epoch: int,
                 *, slot_id: str | None = None, name_seed: Callable[[], str] | None = None, shapley: bool = False,
                 task_type: str = "classification", candidates: Sequence[str] | None = None):
        self.model = model
        self.slot_id = slot_id
        self.slot = model.slot(slot_id)
        self.name_seed = name_seed
        self.shapley = shapley
        self.judged_by = JUDGED_BY[task_type]
        # The gates' dwell times follow this controller's schedule; the quality checks keep
        # their defaults (G2's accuracy gain, G3's alpha, G5's positive contribution), but a
        # language model's G2 reads the loss's fall instead of the accuracy's gain.
        # G2's seed-gradient check needs a ratio this controller does not measure.
        self.gates = (LossImprovementGates if task_type == "lm" else QualityGates)(
            min_blending_epochs=schedule.blending_epochs,
            min_seed_gradient_ratio=0.0,
            min_training_epochs=schedule.incubation_epochs,
        )
        self.slot.gates = self.gates
        self.blueprint = blueprint
        # Blueprints germinated together and judged at the end of the incubation (the first
        # is the blueprint); one: the seed alone, as always.
        self.candidates = tuple(candidates) if candidates else (blueprint,)
        self.schedule = schedule
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.seeds: list[SeedRecord] = []
        self.judged_gates: dict[str, dict] = {}   # the last judgement's G2 verdict per candidate
        self.epochs_in_stage = 0
        self.gate_holds = 0
        self.host_epochs = 0
        self.best_accuracy = -math.inf
        self.blend_step = 0

    # -- checkpoints (the slot's own state travels with the model's state dict)
    def state_dict(self) -> dict:
        """The controller's counters and seed records, as plain data."""
        return {
            "seeds": [s.to_log() for s in self.seeds],
            "epochs_in_stage": self.epochs_in_stage,
            "gate_holds": self.gate_holds,
            "host_epochs": self.host_epochs,
            "best_accuracy": self.best_accuracy,
            "blend_step": self.blend_step,
            # A language model's G2 baseline (a classifier's lives in the seed's metrics).
            **({"loss_at_stage_start": self.gates.loss_at_stage_start,
                "current_loss": self.gates.current_loss} if self._judges_loss else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        self.seeds = [SeedRecord(**s) for s in state["seeds"]]
        self.epochs_in_stage = state["epochs_in_stage"]
        self.gate_holds = state["gate_holds"]
        self.host_epochs = state["host_epochs"]
        self.best_accuracy = state["best_accuracy"]
        self.blend_step = state["blend_step"]
        if self._judges_loss:
            # A checkpoint from before G2 read the loss has none: the next loss is the baseline.
            self.gates.loss_at_stage_start = state.get("loss_at_stage_start")
            self.gates.current_loss = state.get("current_loss")

    @property
    def _judges_loss(self) -> bool:
        return isinstance(self.gates, LossImprovementGates)

    # -- what the slot is doing
    @property
    def stage(self) -> SeedStage | None:
        state = self.slot.state
        return None if state is None else SeedStage(int(state.stage))

    @property
    def live(self) -> SeedRecord | None:
        """The record of the live seed: the slot's seed (its lead while candidates incubate)."""
        records = self.live_records
        if not records:
            return None
        state = self.slot.state
        return next((r for r in records if state is not None and r.seed_id == state.seed_id), records[0])

    @property
    def live_records(self) -> list[SeedRecord]:
        """The records of every live seed (several while candidates incubate), in germination order."""
        return [record for record in self.seeds if record.outcome == "live"]

    @property
    def current(self) -> SeedRecord | None:
        """The record of the seed in the slot, whatever its stage (None for an empty slot)."""
        state = self.slot.state
        if state is None:
            return None
        return next((r for r in reversed(self.seeds) if r.seed_id == state.seed_id), None)

    def seed_parameters(self) -> list[nn.Parameter]:
        return list(self.model.get_seed_parameters(slot=self.slot_id)) if self.stage is not None else []

    def rival_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Seed id -> the parameters of each rival candidate incubating beside the slot's seed."""
        return {c.seed_id: list(c.seed.parameters()) for c in self.slot.candidates[1:]}

    @property
    def judges_now(self) -> bool:
        """Whether this epoch's end ends an incubation of several candidates, so that the
        loop must measure them (:func:`~esper_fast.tolaria.judgement.judge_candidates`)."""
        return (self.slot.has_rivals and self.stage == SeedStage.TRAINING
                and self.epochs_in_stage + 1 >= self.schedule.incubation_epochs)

    def before_blend_batch(self, i: int) -> None:
        """Per-step alpha: the sigmoid ramp moves one step before every BLENDING batch."""
        self.blend_step += 1
        self.slot.update_alpha_for_step(self.blend_step)

    # -- decisions
    def end_epoch(self, epoch: int, val_accuracy: float, contribution: float | None,
                  error: float | None = None, judgement=None, *, val_loss: float | None = None) -> list[str]:
        """Applies the controller's rules after epoch ``epoch``; returns what happened.
        ``contribution``: the seed's measured contribution (None: not measured, the seed is
        not in the forward); ``error``: its 95% bound when sampled. A PROBATIONARY seed is
        fossilized when ``contribution - error > 0``, culled otherwise. ``judgement``: the
        :class:`~esper_fast.tolaria.judgement.Judgement` of the slot's candidates, needed when
        :attr:`judges_now`: its winner goes on as the slot's seed, the others are culled.
        ``val_loss``: the epoch's validation loss, read by a language model's G2 (a
        classifier's ignores it)."""
        events: list[str] = []
        stage = self.stage
        state = self.slot.state
        if self._judges_loss:
            self.gates.record_loss(val_loss)
        if state is not None:
            for candidate in self.slot.candidates:  # every candidate sees what its own run would
                candidate.state.metrics.record_accuracy(val_accuracy)
            if contribution is not None:
                state.metrics.counterfactual_contribution = contribution
        if self.live is not None and contribution is not None:
            self.live.contribution = contribution
            self.live.contribution_error = error

        if stage is None or stage == SeedStage.FOSSILIZED:
            self.host_epochs += stage is None
            improved = val_accuracy - self.best_accuracy
            self.best_accuracy = max(self.best_accuracy, val_accuracy)
            if stage is None and self._should_germinate(epoch, improved):
                events += self._germinate(epoch, improved < self.schedule.plateau_delta, val_accuracy)
            return events

        self.epochs_in_stage += 1
        s = self.schedule
        if stage == SeedStage.TRAINING and self.epochs_in_stage >= s.incubation_epochs:
            if self.slot.has_rivals:
                if judgement is None:
                    raise ValueError(f"slot {self.slot.slot_id}: the candidates' incubation ends at epoch {epoch}; "
                                     "give end_epoch their judgement")
                events += self._judge(epoch, judgement)
            events += self._advance(epoch, SeedStage.BLENDING)
            if self.stage == SeedStage.BLENDING:
                self.blend_step = 0
                self.slot.start_blending(total_steps=max(1, s.ramp_epochs * self.steps_per_epoch))
        elif stage == SeedStage.BLENDING and self.epochs_in_stage >= s.blending_epochs:
            self.slot.set_alpha(1.0)
            events += self._advance(epoch, SeedStage.SHADOWING)
        elif stage == SeedStage.SHADOWING and self.epochs_in_stage >= s.shadowing_epochs:
            events += self._advance(epoch, SeedStage.PROBATIONARY)
        elif stage == SeedStage.PROBATIONARY and self.epochs_in_stage >= s.probation_epochs:
            measured = self._measured(contribution, error)
            if contribution is not None and contribution - (error or 0.0) > 0:
                events += self._advance(epoch, SeedStage.FOSSILIZED)
                if self.stage == SeedStage.FOSSILIZED:
                    record = self.live
                    self._decide(epoch, "fossilized", measured, record)
                    events.append(f"{record.seed_id} fossilized ({measured})")
            else:
                events += self.cull(epoch, self._cull_reason(contribution), measured)
        return events

    def _measured(self, contribution: float | None, error: float | None) -> str:
        """The contribution the decision read, in words."""
        metric, unit, spec = self.judged_by
        shown = "n/a" if contribution is None else format(contribution, spec)
        if error:
            shown += f" +/- {format(error, spec.lstrip('+'))}"
        what = "Shapley value" if self.shapley else ("drop" if metric else "contribution")
        return f"{metric}{what} {shown} {unit}"

    def _cull_reason(self, contribution: float | None) -> str:
        if contribution == 0:
            return "no_measurable_effect"
        if not self.shapley:
            return "negative_counterfactual"
        # A positive sampled value whose 95% bound reaches 0 is not shown to help.
        return "uncertain_shapley" if contribution is not None and contribution > 0 else "negative_shapley"

    def _judge(self, epoch: int, judgement) -> list[str]:
        """The end of the candidates' incubation: the judgement's winner stays, the others are
        culled as ``lost_judgement`` with their value (see :mod:`esper_fast.tolaria.judgement`)."""
        metric, unit, spec = self.judged_by
        winner = judgement.winner
        by_id = {record.seed_id: record for record in self.live_records}
        # Each candidate's own G2 verdict, as its own run would have met it now (recorded).
        self.judged_gates = {}
        for candidate in self.slot.candidates:
            gate = self.slot.gates.check_gate(candidate.state, SeedStage.BLENDING)
            self.judged_gates[candidate.seed_id] = {"passed": gate.passed, "checks_passed": list(gate.checks_passed),
                                                    "checks_failed": list(gate.checks_failed)}
        details = {}
        for measured in judgement.candidates:
            by_id[measured.seed_id].judged_value = measured.value
            details[measured.seed_id] = {"value": measured.value, "accuracy": measured.accuracy, "loss": measured.loss,
                                         "winner": winner.seed_id}
        def shown(value: float) -> str:
            return f"{metric}{format(value, spec)} {unit}"

        events = [f"{winner.seed_id} ({winner.blueprint}) wins the judgement: {shown(winner.value)} at alpha 1"]
        for state in self.slot.keep_candidate(winner.seed_id, "lost_judgement", details):
            self._decide(epoch, "culled", "lost_judgement", by_id[state.seed_id])
            events.append(f"{state.seed_id} ({state.blueprint_id}) culled: lost_judgement "
                          f"({shown(judgement.value_of(state.seed_id).value)})")
        return events

    def _should_germinate(self, epoch: int, improved: float) -> bool:
        s = self.schedule
        if epoch >= self.epochs:
            return False  # no epoch left for the seed to train
        if self.seeds:
            # After a cull: try again only when a whole lifecycle still fits.
            return self.epochs - epoch >= s.lifecycle_epochs
        plateau = self.host_epochs >= s.min_warmup_epochs and improved < s.plateau_delta
        return plateau or self.host_epochs >= s.max_warmup_epochs

    def _germinate(self, epoch: int, plateau: bool, val_accuracy: float) -> list[str]:
        why = "validation accuracy plateaued" if plateau else "warm-up over"
        if len(self.candidates) > 1:
            return self._germinate_candidates(epoch, why, val_accuracy)
        seed_id = self._new_seed_id()
        self.model.germinate_seed(self.blueprint, seed_id, slot=self.slot_id)
        # The accuracy at germination is the baseline the G2 gate measures improvement from.
        self.slot.state.metrics.record_accuracy(val_accuracy)
        self.seeds.append(SeedRecord(seed_id, self.blueprint, germinated_epoch=epoch, slot=self.slot_id))
        self.epochs_in_stage = 0
        self.gate_holds = 0
        events = [f"germinated {seed_id} ({self.blueprint}): {why}"]
        return events + self._advance(epoch, SeedStage.TRAINING)

    def _new_seed_id(self) -> str:
        return self.name_seed() if self.name_seed is not None else f"seed-{len(self.seeds) + 1}"

    def _germinate_candidates(self, epoch: int, why: str, val_accuracy: float) -> list[str]:
        seed_ids = []
        for blueprint in self.candidates:  # named one by one: each name counts the seeds so far
            seed_ids.append(self._new_seed_id())
            self.seeds.append(SeedRecord(seed_ids[-1], blueprint, germinated_epoch=epoch, slot=self.slot_id))
        self.model.germinate_candidates(self.candidates, seed_ids, slot=self.slot_id)
        for candidate in self.slot.candidates:
            candidate.state.metrics.record_accuracy(val_accuracy)
        self.epochs_in_stage = 0
        self.gate_holds = 0
        named = ", ".join(f"{seed_id} ({blueprint})" for seed_id, blueprint in zip(seed_ids, self.candidates))
        events = [f"germinated {len(seed_ids)} candidates: {named}: {why}"]
        return events + self._advance(epoch, SeedStage.TRAINING)

    def _advance(self, epoch: int, target: SeedStage) -> list[str]:
        before = self.stage
        result = self.slot.advance_stage(target)
        if self.stage == target:
            self.epochs_in_stage = 0
            self.gate_holds = 0
            if self._judges_loss:
                self.gates.start_stage()
            return [f"{before.name} -> {target.name}"]
        self.gate_holds += 1
        failed = getattr(result, "checks_failed", None) or getattr(result, "message", None) or result
        if isinstance(failed, (list, tuple)):
            failed = ", ".join(map(str, failed))
        events = [f"gate held {before.name} -> {target.name} ({failed})"]
        if self.gate_holds > self.schedule.gate_patience:
            events += self.cull(epoch, "gate_timeout", f"held {self.gate_holds} epochs before {target.name}")
        return events

    def cull(self, epoch: int, reason: str, detail: str = "") -> list[str]:
        """Culls the live seed (if any; every candidate while several incubate) and records why."""
        records = self.live_records
        if not records:
            return []
        if self.stage is not None:
            self.slot.cull(reason)
        for record in records:
            self._decide(epoch, "culled", reason, record)
        self.epochs_in_stage = 0
        return [f"{record.seed_id} culled: {reason}" + (f" ({detail})" if detail else "") for record in records]

    def _decide(self, epoch: int, outcome: str, reason: str, record: SeedRecord | None = None) -> None:
        record = record or self.live or self.seeds[-1]
        record.outcome, record.reason, record.decided_epoch = outcome, reason, epoch


class SlotControllers:
    """The run's controllers: a :class:`SeedController` per slot, in the host's order.

    ``blueprints``: slot id -> the blueprint it germinates; the first slot is the model's
    main slot. With one slot this is that slot's controller, as a run of one slot always had
    it. With several, the seeds are named ``seed-N`` in the order they germinate (in the host's
    order within an epoch), each slot's events are prefixed with its id, and each seed is
    judged by its Shapley value (:meth:`end_epoch`). ``task_type``: what the values measure
    (:data:`JUDGED_BY`).
    """

    def __init__(self, model: nn.Module, blueprints: Mapping[str, str], schedule: LifecycleSchedule, epochs: int,
                 steps_per_epoch: int, task_type: str = "classification",
                 candidates: Mapping[str, Sequence[str]] | None = None):
        self.several = len(blueprints) > 1
        self.task_type = task_type
        candidates = candidates or {}
        self.by_slot: dict[str, SeedController] = {
            slot_id: SeedController(
                model, blueprint, schedule, epochs, steps_per_epoch,
                slot_id=slot_id if self.several else None,
                name_seed=self._next_seed_id if self.several else None,
                shapley=self.several, task_type=task_type, candidates=candidates.get(slot_id),
            )
            for slot_id, blueprint in blueprints.items()
        }
        self.main_slot = next(iter(self.by_slot))

    @property
    def main(self) -> SeedController:
        """The main slot's controller (the only one in a run of one slot)."""
        return self.by_slot[self.main_slot]

    @property
    def seeds(self) -> list[SeedRecord]:
        """Every seed of the run, in the order they germinated."""
        order = list(self.by_slot)
        records = [(record.germinated_epoch, order.index(slot_id), record)
                   for slot_id, controller in self.by_slot.items() for record in controller.seeds]
        return [record for *_, record in sorted(records, key=lambda entry: entry[:2])]

    @property
    def live(self) -> bool:
        """Whether any slot holds a live seed."""
        return any(controller.live is not None for controller in self.by_slot.values())

    def _next_seed_id(self) -> str:
        return f"seed-{sum(len(c.seeds) for c in self.by_slot.values()) + 1}"

    def _events(self, slot_id: str, events: list[str]) -> list[str]:
        return [f"{slot_id}: {event}" for event in events] if self.several else events

    def judged(self, contribution: float | None, values: Mapping[str, Mapping]) -> dict[str, tuple]:
        """What each slot's seed is judged by, for :meth:`end_epoch`: with several slots its
        Shapley value and bound (``values``: :func:`~esper_fast.train.report.seed_values`; for
        ``lm`` those of the loss it removes), with one the main slot's counterfactual
        ``contribution`` (in the task's measure too)."""
        if self.several:
            key = "loss_shapley" if self.task_type == "lm" else "shapley"
            return {slot_id: (value[key], value.get(f"{key}_error")) for slot_id, value in values.items()}
        return {self.main_slot: (contribution, None)}

    def judging(self) -> list[str]:
        """The slots whose candidates are judged at this epoch's end (:attr:`SeedController.judges_now`)."""
        return [slot_id for slot_id, controller in self.by_slot.items() if controller.judges_now]

    def end_epoch(self, epoch: int, val_accuracy: float,
                  contributions: Mapping[str, tuple[float | None, float | None]],
                  judgements: Mapping | None = None, val_loss: float | None = None) -> list[str]:
        """Every slot's :meth:`SeedController.end_epoch`, in the host's order.
        ``contributions``: slot id -> (contribution, its 95% bound or None) of each slot
        whose seed was measured; ``judgements``: slot id -> the judgement of its candidates,
        for the slots of :meth:`judging`; ``val_loss``: the epoch's validation loss (a
        language model's G2 reads it)."""
        events: list[str] = []
        judgements = judgements or {}
        for slot_id, controller in self.by_slot.items():
            contribution, error = contributions.get(slot_id, (None, None))
            events += self._events(slot_id, controller.end_epoch(epoch, val_accuracy, contribution, error,
                                                                 judgements.get(slot_id), val_loss=val_loss))
        return events

    def cull_live(self, epoch: int, reason: str) -> list[str]:
        """Records the end of every live seed (culled, by ``reason``), in the host's order."""
        events: list[str] = []
        for slot_id, controller in self.by_slot.items():
            events += self._events(slot_id, controller.cull(epoch, reason))
        return events
