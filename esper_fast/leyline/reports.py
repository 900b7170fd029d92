"""Reports: a seed's metrics and state as a controller sees them, and its life summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from uuid import uuid4

from esper_fast.leyline.signals import TrainingSignals
from esper_fast.leyline.stages import SeedStage

__all__ = ["SeedMetrics", "SeedStateReport", "FieldReport"]


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(slots=True)
class SeedMetrics:
    """A seed's metrics as a plain record (``kasmina.SeedMetrics.to_leyline`` produces it)."""

    epochs_total: int = 0
    epochs_in_current_stage: int = 0
    initial_val_accuracy: float = 0.0
    current_val_accuracy: float = 0.0
    best_val_accuracy: float = 0.0
    accuracy_at_stage_start: float = 0.0
    total_improvement: float = 0.0
    improvement_since_stage_start: float = 0.0
    isolation_violations: int = 0
    gradient_norm_avg: float = 0.0
    current_alpha: float = 0.0
    alpha_ramp_step: int = 0


@dataclass
class SeedStateReport:
    """A seed's state at one moment, as a slot reports it."""

    seed_id: str = ""
    slot_id: str = ""
    blueprint_id: str = ""
    stage: SeedStage = SeedStage.UNKNOWN
    previous_stage: SeedStage = SeedStage.UNKNOWN
    previous_epochs_in_stage: int = 0
    stage_entered_at: datetime = field(default_factory=_utc_now)
    metrics: SeedMetrics = field(default_factory=SeedMetrics)
    is_healthy: bool = True
    is_improving: bool = False
    needs_attention: bool = False
    annotations: dict[str, Any] = field(default_factory=dict)
    reported_at: datetime = field(default_factory=_utc_now)


@dataclass
class FieldReport:
    """A seed's whole life, collected when it fossilizes or is culled."""

    report_id: str = field(default_factory=lambda: str(uuid4()))
    seed_id: str = ""
    blueprint_id: str = ""
    slot_id: str = ""
    final_stage: SeedStage = SeedStage.UNKNOWN
    success: bool = False
    germinated_at: datetime = field(default_factory=_utc_now)
    completed_at: datetime = field(default_factory=_utc_now)
    total_epochs: int = 0
    epochs_per_stage: dict[str, int] = field(default_factory=dict)
    accuracy_at_germination: float = 0.0
    accuracy_at_completion: float = 0.0
    total_improvement: float = 0.0
    best_accuracy_achieved: float = 0.0
    signals_at_germination: TrainingSignals | None = None
    commands_received: list[str] = field(default_factory=list)
    failure_reason: str = ""
    failure_stage: SeedStage = SeedStage.UNKNOWN
