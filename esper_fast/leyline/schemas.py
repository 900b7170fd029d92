"""Commands from a controller to a slot, quality-gate results, and blueprint descriptions."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum, IntEnum, auto
from typing import Any, Protocol, runtime_checkable
from uuid import uuid4

from esper_fast.leyline.stages import CommandType, RiskLevel, SeedStage

__all__ = [
    "SeedOperation",
    "OPERATION_TARGET_STAGE",
    "AdaptationCommand",
    "GateLevel",
    "GateResult",
    "BlueprintProtocol",
    "BlueprintSpec",
]


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _new_id() -> str:
    return str(uuid4())


class SeedOperation(Enum):
    """An operation on a seed; each lands the seed in one stage (``OPERATION_TARGET_STAGE``)."""

    GERMINATE = auto()
    START_TRAINING = auto()
    START_BLENDING = auto()
    START_SHADOWING = auto()
    START_PROBATION = auto()
    FOSSILIZE = auto()
    CULL = auto()
    EMBARGO = auto()
    RESET = auto()


OPERATION_TARGET_STAGE: dict[SeedOperation, SeedStage] = {
    SeedOperation.GERMINATE: SeedStage.GERMINATED,
    SeedOperation.START_TRAINING: SeedStage.TRAINING,
    SeedOperation.START_BLENDING: SeedStage.BLENDING,
    SeedOperation.START_SHADOWING: SeedStage.SHADOWING,
    SeedOperation.START_PROBATION: SeedStage.PROBATIONARY,
    SeedOperation.FOSSILIZE: SeedStage.FOSSILIZED,
    SeedOperation.CULL: SeedStage.CULLED,
    SeedOperation.EMBARGO: SeedStage.EMBARGOED,
    SeedOperation.RESET: SeedStage.RESETTING,
}


@dataclass(frozen=True)
class AdaptationCommand:
    """An immutable command from a controller to a slot."""

    command_id: str = field(default_factory=_new_id)
    timestamp: datetime = field(default_factory=_utc_now)

    command_type: CommandType = CommandType.GERMINATE
    target_seed_id: str | None = None
    target_slot_id: str | None = None

    blueprint_id: str | None = None
    target_stage: SeedStage | None = None
    alpha_value: float | None = None
    learning_rate: float | None = None

    reason: str = ""
    confidence: float = 1.0
    risk_level: RiskLevel = RiskLevel.GREEN

    annotations: dict[str, str] = field(default_factory=dict)


class GateLevel(IntEnum):
    """The quality gate guarding entry into each stage."""

    G0 = 0  # -> GERMINATED
    G1 = 1  # -> TRAINING
    G2 = 2  # -> BLENDING
    G3 = 3  # -> SHADOWING
    G4 = 4  # -> PROBATIONARY
    G5 = 5  # -> FOSSILIZED


@dataclass
class GateResult:
    """The outcome of one gate check; ``checks_failed`` names every reason it did not pass."""

    gate: GateLevel
    passed: bool
    score: float = 0.0
    checks_passed: list[str] = field(default_factory=list)
    checks_failed: list[str] = field(default_factory=list)
    message: str = ""
    timestamp: datetime = field(default_factory=_utc_now)


@runtime_checkable
class BlueprintProtocol(Protocol):
    """What a blueprint object offers."""

    @property
    def blueprint_id(self) -> str: ...

    @property
    def required_channels(self) -> int | None: ...

    def create_module(self, in_channels: int, **kwargs) -> Any: ...


@dataclass(frozen=True)
class BlueprintSpec:
    """A blueprint's catalogue entry (the contract type; the registry has its own spec)."""

    blueprint_id: str
    name: str
    description: str = ""
    min_channels: int = 1
    max_channels: int | None = None
    parameter_count_estimate: int = 0
    compute_cost: float = 1.0
    memory_cost: float = 1.0
    recommended_training_epochs: int = 5
    recommended_blending_epochs: int = 5
    tags: tuple[str, ...] = ()
