"""Telemetry contracts: the events subsystems emit, performance budgets, a seed's snapshot.

Only the shapes live here; emitting and consuming them is the subsystems' business. The
event type names and the keys of ``TelemetryEvent.data`` are part of the contract:
analytics count events by them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum, auto
from typing import Any
from uuid import uuid4

__all__ = ["TelemetryEventType", "TelemetryEvent", "PerformanceBudgets", "DEFAULT_BUDGETS", "SeedTelemetry"]


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class TelemetryEventType(Enum):
    """Kinds of telemetry event (the member order fixes their values)."""

    # seed lifecycle
    SEED_GERMINATED = auto()
    SEED_STAGE_CHANGED = auto()
    SEED_FOSSILIZED = auto()
    SEED_CULLED = auto()
    # training progress
    EPOCH_COMPLETED = auto()
    PLATEAU_DETECTED = auto()
    DEGRADATION_DETECTED = auto()
    IMPROVEMENT_DETECTED = auto()
    TAMIYO_INITIATED = auto()
    # health
    ISOLATION_VIOLATION = auto()
    GRADIENT_ANOMALY = auto()
    PERFORMANCE_DEGRADATION = auto()
    # commands
    COMMAND_ISSUED = auto()
    COMMAND_EXECUTED = auto()
    COMMAND_FAILED = auto()
    # policy training
    PPO_UPDATE_COMPLETED = auto()
    MEMORY_WARNING = auto()
    REWARD_HACKING_SUSPECTED = auto()
    REWARD_COMPUTED = auto()
    # anomaly-triggered debugging
    RATIO_EXPLOSION_DETECTED = auto()
    RATIO_COLLAPSE_DETECTED = auto()
    VALUE_COLLAPSE_DETECTED = auto()
    GRADIENT_PATHOLOGY_DETECTED = auto()
    NUMERICAL_INSTABILITY_DETECTED = auto()


@dataclass
class TelemetryEvent:
    """One observable event."""

    event_id: str = field(default_factory=lambda: str(uuid4()))
    event_type: TelemetryEventType = TelemetryEventType.EPOCH_COMPLETED
    timestamp: datetime = field(default_factory=_utc_now)
    seed_id: str | None = None
    slot_id: str | None = None
    epoch: int | None = None
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    severity: str = "info"  # debug, info, warning, error, critical


@dataclass(frozen=True)
class PerformanceBudgets:
    """Time, memory and message-size budgets."""

    epoch_budget_ms: float = 18.0
    blending_budget_ms: float = 5.0
    gate_check_budget_ms: float = 2.0
    seed_memory_budget_gb: float = 2.0
    total_memory_budget_gb: float = 12.0
    max_message_size_bytes: int = 280
    serialization_budget_us: float = 80.0


DEFAULT_BUDGETS = PerformanceBudgets()

FEATURE_DIM = 10


@dataclass(slots=True)
class SeedTelemetry:
    """A seed's own health and progress, as a decision-maker reads it."""

    seed_id: str
    blueprint_id: str = ""
    layer_id: str = ""
    gradient_norm: float = 0.0
    gradient_health: float = 1.0  # 0-1, higher is healthier
    has_vanishing: bool = False
    has_exploding: bool = False
    accuracy: float = 0.0  # percent
    accuracy_delta: float = 0.0
    epochs_in_stage: int = 0
    stage: int = 1  # a SeedStage value
    alpha: float = 0.0
    epoch: int = 0
    max_epochs: int = 25
    captured_at: datetime = field(default_factory=_utc_now)

    def to_features(self) -> list[float]:
        """Ten features, each roughly in [0, 1] (accuracy delta in [-1, 1])."""
        return [
            min(self.gradient_norm, 10.0) / 10.0,
            self.gradient_health,
            float(self.has_vanishing),
            float(self.has_exploding),
            min(self.epochs_in_stage, 50) / 50.0,
            self.accuracy / 100.0,
            max(-1.0, min(1.0, self.accuracy_delta / 10.0)),
            min((self.stage - 1) / 6.0, 1.0),
            self.alpha,
            self.epoch / max(self.max_epochs, 1),
        ]

    @classmethod
    def feature_dim(cls) -> int:
        """Length of :meth:`to_features`."""
        return FEATURE_DIM
