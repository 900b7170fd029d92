"""Where a run decides: the built-in seed controller and its schedule.

The controller is deliberately simple and deterministic (no policy): germinate when
validation accuracy stops improving (or after a warm-up), hold each stage for a fixed number
of epochs, then keep the seed only if the model is more accurate with it than with alpha
forced to 0. It decides once per epoch, after validation (:meth:`SeedController.end_epoch`),
and moves the alpha ramp one step before every blending batch.
"""

from __future__ import annotations

import dataclasses
import math

import torch.nn as nn

from esper_fast.leyline import SeedStage


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


@dataclasses.dataclass
class SeedRecord:
    seed_id: str
    blueprint: str
    germinated_epoch: int
    outcome: str = "live"            # live | fossilized | culled
    reason: str = ""
    decided_epoch: int | None = None
    contribution: float | None = None


class SeedController:
    """Decides, once per epoch, what the seed slot does next. See the module docstring."""

    def __init__(self, model: nn.Module, blueprint: str, schedule: LifecycleSchedule, epochs: int, steps_per_epoch: int):
        from esper_fast.kasmina import QualityGates

        self.model = model
        self.slot = model.seed_slot
        # The gates' dwell times follow this controller's schedule; the quality checks keep
        # their defaults (G2's accuracy gain, G3's alpha, G5's positive contribution).
        # G2's seed-gradient check needs a ratio this controller does not measure.
        self.slot.gates = QualityGates(
            min_blending_epochs=schedule.blending_epochs,
            min_seed_gradient_ratio=0.0,
            min_training_epochs=schedule.incubation_epochs,
        )
        self.blueprint = blueprint
        self.schedule = schedule
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.seeds: list[SeedRecord] = []
        self.epochs_in_stage = 0
        self.gate_holds = 0
        self.host_epochs = 0
        self.best_accuracy = -math.inf
        self.blend_step = 0

    # -- checkpoints (the slot's own state travels with the model's state dict)
    def state_dict(self) -> dict:
        """The controller's counters and seed records, as plain data."""
        return {
            "seeds": [dataclasses.asdict(s) for s in self.seeds],
            "epochs_in_stage": self.epochs_in_stage,
            "gate_holds": self.gate_holds,
            "host_epochs": self.host_epochs,
            "best_accuracy": self.best_accuracy,
            "blend_step": self.blend_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.seeds = [SeedRecord(**s) for s in state["seeds"]]
        self.epochs_in_stage = state["epochs_in_stage"]
        self.gate_holds = state["gate_holds"]
        self.host_epochs = state["host_epochs"]
        self.best_accuracy = state["best_accuracy"]
        self.blend_step = state["blend_step"]

    # -- what the slot is doing
    @property
    def stage(self) -> SeedStage | None:
        state = self.slot.state
        return None if state is None else SeedStage(int(state.stage))

    @property
    def live(self) -> SeedRecord | None:
        return self.seeds[-1] if self.seeds and self.seeds[-1].outcome == "live" else None

    def seed_parameters(self) -> list[nn.Parameter]:
        return list(self.model.get_seed_parameters()) if self.stage is not None else []

    def before_blend_batch(self, i: int) -> None:
        """Per-step alpha: the sigmoid ramp moves one step before every BLENDING batch."""
        self.blend_step += 1
        self.slot.update_alpha_for_step(self.blend_step)

    # -- decisions
    def end_epoch(self, epoch: int, val_accuracy: float, contribution: float | None) -> list[str]:
        """Applies the controller's rules after epoch ``epoch``; returns what happened."""
        events: list[str] = []
        stage = self.stage
        state = self.slot.state
        if state is not None:
            state.metrics.record_accuracy(val_accuracy)
            if contribution is not None:
                state.metrics.counterfactual_contribution = contribution
        if self.live is not None and contribution is not None:
            self.live.contribution = contribution

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
            if contribution is not None and contribution > 0:
                events += self._advance(epoch, SeedStage.FOSSILIZED)
                if self.stage == SeedStage.FOSSILIZED:
                    self._decide(epoch, "fossilized", f"contribution {contribution:+.2f} points")
                    events.append(f"{self.seeds[-1].seed_id} fossilized (contribution {contribution:+.2f} points)")
            else:
                shown = "n/a" if contribution is None else f"{contribution:+.2f}"
                events += self.cull(epoch, "negative_counterfactual", f"contribution {shown} points")
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
        seed_id = f"seed-{len(self.seeds) + 1}"
        self.model.germinate_seed(self.blueprint, seed_id)
        # The accuracy at germination is the baseline the G2 gate measures improvement from.
        self.slot.state.metrics.record_accuracy(val_accuracy)
        self.seeds.append(SeedRecord(seed_id, self.blueprint, germinated_epoch=epoch))
        self.epochs_in_stage = 0
        self.gate_holds = 0
        why = "validation accuracy plateaued" if plateau else "warm-up over"
        events = [f"germinated {seed_id} ({self.blueprint}): {why}"]
        return events + self._advance(epoch, SeedStage.TRAINING)

    def _advance(self, epoch: int, target: SeedStage) -> list[str]:
        before = self.stage
        result = self.slot.advance_stage(target)
        if self.stage == target:
            self.epochs_in_stage = 0
            self.gate_holds = 0
            return [f"{before.name} -> {target.name}"]
        self.gate_holds += 1
        failed = getattr(result, "checks_failed", None) or getattr(result, "message", None) or result
        events = [f"gate held {before.name} -> {target.name} ({failed})"]
        if self.gate_holds > self.schedule.gate_patience:
            events += self.cull(epoch, "gate_timeout", f"held {self.gate_holds} epochs before {target.name}")
        return events

    def cull(self, epoch: int, reason: str, detail: str = "") -> list[str]:
        """Culls the live seed (if any) and records why."""
        record = self.live
        if record is None:
            return []
        if self.stage is not None:
            self.slot.cull(reason)
        self._decide(epoch, "culled", reason)
        self.epochs_in_stage = 0
        return [f"{record.seed_id} culled: {reason}" + (f" ({detail})" if detail else "")]

    def _decide(self, epoch: int, outcome: str, reason: str) -> None:
        record = self.seeds[-1]
        record.outcome, record.reason, record.decided_epoch = outcome, reason, epoch
