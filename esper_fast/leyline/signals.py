"""Observations of a training run: a fixed-layout vector for policies and richer records.

``FastTrainingSignals`` (a NamedTuple, no allocation beyond the tuple) is what a policy
network reads; ``TrainingSignals`` carries the full picture and converts with ``to_fast``.
``TensorSchema`` names each index of the observation vector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import IntEnum
from typing import NamedTuple

__all__ = ["TensorSchema", "TENSOR_SCHEMA_SIZE", "FastTrainingSignals", "TrainingMetrics", "TrainingSignals"]

HISTORY_LENGTH = 5  # loss and accuracy history slots in the observation


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class TensorSchema(IntEnum):
    """Index of each feature in the 35-wide observation vector."""

    EPOCH = 0
    GLOBAL_STEP = 1
    TRAIN_LOSS = 2
    VAL_LOSS = 3
    LOSS_DELTA = 4
    TRAIN_ACCURACY = 5
    VAL_ACCURACY = 6
    ACCURACY_DELTA = 7
    PLATEAU_EPOCHS = 8
    BEST_VAL_ACCURACY = 9
    BEST_VAL_LOSS = 10
    LOSS_HIST_0 = 11
    LOSS_HIST_1 = 12
    LOSS_HIST_2 = 13
    LOSS_HIST_3 = 14
    LOSS_HIST_4 = 15
    ACC_HIST_0 = 16
    ACC_HIST_1 = 17
    ACC_HIST_2 = 18
    ACC_HIST_3 = 19
    ACC_HIST_4 = 20
    HAS_ACTIVE_SEED = 21
    SEED_STAGE = 22
    SEED_EPOCHS_IN_STAGE = 23
    SEED_ALPHA = 24
    SEED_IMPROVEMENT = 25
    AVAILABLE_SLOTS = 26
    SEED_COUNTERFACTUAL = 27
    HOST_GRAD_NORM = 28
    HOST_LEARNING_PHASE = 29
    BLUEPRINT_0 = 30
    BLUEPRINT_1 = 31
    BLUEPRINT_2 = 32
    BLUEPRINT_3 = 33
    BLUEPRINT_4 = 34


TENSOR_SCHEMA_SIZE = 35


class FastTrainingSignals(NamedTuple):
    """The numeric observation of one epoch (no strings, no datetimes, fixed-size history)."""

    epoch: int
    global_step: int
    train_loss: float
    val_loss: float
    loss_delta: float
    train_accuracy: float
    val_accuracy: float
    accuracy_delta: float
    plateau_epochs: int
    best_val_accuracy: float
    best_val_loss: float
    loss_history_5: tuple[float, float, float, float, float]
    accuracy_history_5: tuple[float, float, float, float, float]
    has_active_seed: int
    seed_stage: int
    seed_epochs_in_stage: int
    seed_alpha: float
    seed_improvement: float
    available_slots: int
    seed_counterfactual: float
    host_grad_norm: float
    host_learning_phase: float

    def to_vector(self) -> list[float]:
        """The first 30 observation features (``TensorSchema`` order; the blueprint one-hot is
        appended by the caller). The counterfactual is scaled by 1/10 and the host gradient
        norm clamped to 10 and scaled to [0, 1]."""
        head = [
            float(self.epoch),
            float(self.global_step),
            self.train_loss,
            self.val_loss,
            self.loss_delta,
            self.train_accuracy,
            self.val_accuracy,
            self.accuracy_delta,
            float(self.plateau_epochs),
            self.best_val_accuracy,
            self.best_val_loss,
        ]
        seed = [
            float(self.has_active_seed),
            float(self.seed_stage),
            float(self.seed_epochs_in_stage),
            self.seed_alpha,
            self.seed_improvement,
            float(self.available_slots),
            self.seed_counterfactual / 10.0,
            min(self.host_grad_norm, 10.0) / 10.0,
            self.host_learning_phase,
        ]
        return head + list(self.loss_history_5) + list(self.accuracy_history_5) + seed

    @staticmethod
    def empty() -> "FastTrainingSignals":
        """Signals before any epoch: zeros, best loss inf, one free slot."""
        zeros = (0.0,) * HISTORY_LENGTH
        return FastTrainingSignals(
            epoch=0,
            global_step=0,
            train_loss=0.0,
            val_loss=0.0,
            loss_delta=0.0,
            train_accuracy=0.0,
            val_accuracy=0.0,
            accuracy_delta=0.0,
            plateau_epochs=0,
            best_val_accuracy=0.0,
            best_val_loss=float("inf"),
            loss_history_5=zeros,
            accuracy_history_5=zeros,
            has_active_seed=0,
            seed_stage=0,
            seed_epochs_in_stage=0,
            seed_alpha=0.0,
            seed_improvement=0.0,
            available_slots=1,
            seed_counterfactual=0.0,
            host_grad_norm=0.0,
            host_learning_phase=0.0,
        )


@dataclass(slots=True)
class TrainingMetrics:
    """One epoch's training-loop statistics."""

    epoch: int = 0
    global_step: int = 0
    train_loss: float = 0.0
    val_loss: float = 0.0
    loss_delta: float = 0.0  # previous minus current: positive is an improvement
    train_accuracy: float = 0.0
    val_accuracy: float = 0.0
    accuracy_delta: float = 0.0
    plateau_epochs: int = 0
    host_stabilized: int = 0  # 1 once the host's fast-growth phase is over (latched)
    best_val_accuracy: float = 0.0
    best_val_loss: float = float("inf")
    grad_norm_host: float = 0.0
    grad_norm_seed: float = 0.0


def _last_padded(values: list[float]) -> tuple[float, ...]:
    """The last HISTORY_LENGTH values, left-padded with zeros."""
    tail = list(values[-HISTORY_LENGTH:]) if values else []
    return tuple([0.0] * (HISTORY_LENGTH - len(tail)) + tail)


@dataclass
class TrainingSignals:
    """Everything a controller observes after an epoch."""

    metrics: TrainingMetrics = field(default_factory=TrainingMetrics)
    active_seeds: list[str] = field(default_factory=list)
    available_slots: int = 0
    seed_stage: int = 0
    seed_epochs_in_stage: int = 0
    seed_alpha: float = 0.0
    seed_improvement: float = 0.0
    seed_counterfactual: float = 0.0
    gpu_memory_used: float = 0.0  # GB
    gpu_utilization: float = 0.0  # 0-1
    loss_history: list[float] = field(default_factory=list)
    accuracy_history: list[float] = field(default_factory=list)
    epoch_duration_ms: float = 0.0
    timestamp: datetime = field(default_factory=_utc_now)

    def to_fast(
        self,
        seed_stage: int | None = None,
        seed_epochs_in_stage: int | None = None,
        seed_alpha: float | None = None,
        seed_improvement: float | None = None,
        seed_counterfactual: float | None = None,
        max_epochs: int = 200,
    ) -> FastTrainingSignals:
        """The fixed-layout signals; each ``seed_*`` argument overrides this record's value,
        ``best_val_loss`` is capped at 10 and the learning phase is ``epoch / max_epochs``."""
        m = self.metrics

        def pick(override, own):
            return own if override is None else override

        return FastTrainingSignals(
            epoch=m.epoch,
            global_step=m.global_step,
            train_loss=m.train_loss,
            val_loss=m.val_loss,
            loss_delta=m.loss_delta,
            train_accuracy=m.train_accuracy,
            val_accuracy=m.val_accuracy,
            accuracy_delta=m.accuracy_delta,
            plateau_epochs=m.plateau_epochs,
            best_val_accuracy=m.best_val_accuracy,
            best_val_loss=min(m.best_val_loss, 10.0),
            loss_history_5=_last_padded(self.loss_history),
            accuracy_history_5=_last_padded(self.accuracy_history),
            has_active_seed=1 if self.active_seeds else 0,
            seed_stage=pick(seed_stage, self.seed_stage),
            seed_epochs_in_stage=pick(seed_epochs_in_stage, self.seed_epochs_in_stage),
            seed_alpha=pick(seed_alpha, self.seed_alpha),
            seed_improvement=pick(seed_improvement, self.seed_improvement),
            available_slots=self.available_slots,
            seed_counterfactual=pick(seed_counterfactual, self.seed_counterfactual),
            host_grad_norm=m.grad_norm_host,
            host_learning_phase=m.epoch / max(1, max_epochs),
        )
