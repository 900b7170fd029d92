"""The seed lifecycle: stages, the legal moves between them, and command/risk vocabularies.

    DORMANT -> GERMINATED -> TRAINING -> BLENDING -> SHADOWING -> PROBATIONARY -> FOSSILIZED
    every stage from GERMINATED to PROBATIONARY may instead go to CULLED;
    CULLED -> EMBARGOED -> RESETTING -> DORMANT recycles the slot.

FOSSILIZED is terminal. A seed takes part in the forward pass from TRAINING to FOSSILIZED.
"""

from __future__ import annotations

from enum import Enum, IntEnum, auto

__all__ = [
    "SeedStage",
    "VALID_TRANSITIONS",
    "is_valid_transition",
    "is_terminal_stage",
    "is_active_stage",
    "is_failure_stage",
    "CommandType",
    "RiskLevel",
]


class SeedStage(IntEnum):
    """Where a seed is in its lifecycle (the integer values are part of the contract)."""

    UNKNOWN = 0
    DORMANT = 1  # empty slot
    GERMINATED = 2  # seed built and shape-checked
    TRAINING = 3  # incubating: learns through the straight-through estimator
    BLENDING = 4  # alpha ramps the seed into the host
    SHADOWING = 5  # fully blended, under observation
    PROBATIONARY = 6  # last chance to cull before it becomes permanent
    FOSSILIZED = 7  # permanent (terminal success)
    CULLED = 8  # removed (failure)
    EMBARGOED = 9  # cool-down after a cull
    RESETTING = 10  # cleanup before the slot is reused


_S = SeedStage
VALID_TRANSITIONS: dict[SeedStage, tuple[SeedStage, ...]] = {
    _S.UNKNOWN: (_S.DORMANT,),
    _S.DORMANT: (_S.GERMINATED,),
    _S.GERMINATED: (_S.TRAINING, _S.CULLED),
    _S.TRAINING: (_S.BLENDING, _S.CULLED),
    _S.BLENDING: (_S.SHADOWING, _S.CULLED),
    _S.SHADOWING: (_S.PROBATIONARY, _S.CULLED),
    _S.PROBATIONARY: (_S.FOSSILIZED, _S.CULLED),
    _S.FOSSILIZED: (),
    _S.CULLED: (_S.EMBARGOED,),
    _S.EMBARGOED: (_S.RESETTING,),
    _S.RESETTING: (_S.DORMANT,),
}
del _S

_ACTIVE = frozenset(
    {SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.SHADOWING, SeedStage.PROBATIONARY, SeedStage.FOSSILIZED}
)
_FAILURE = frozenset({SeedStage.CULLED, SeedStage.EMBARGOED, SeedStage.RESETTING})


def is_valid_transition(from_stage: SeedStage, to_stage: SeedStage) -> bool:
    """True when the lifecycle allows ``from_stage -> to_stage``."""
    return to_stage in VALID_TRANSITIONS.get(from_stage, ())


def is_terminal_stage(stage: SeedStage) -> bool:
    """True for FOSSILIZED, the one stage with no way out."""
    return stage == SeedStage.FOSSILIZED


def is_active_stage(stage: SeedStage) -> bool:
    """True for the stages whose seed takes part in the forward pass (TRAINING..FOSSILIZED)."""
    return stage in _ACTIVE


def is_failure_stage(stage: SeedStage) -> bool:
    """True for CULLED, EMBARGOED and RESETTING."""
    return stage in _FAILURE


class CommandType(Enum):
    """What a controller can ask of a slot."""

    GERMINATE = auto()
    ADVANCE_STAGE = auto()
    CULL = auto()
    SET_ALPHA = auto()
    SET_LEARNING_RATE = auto()
    PAUSE_SEED = auto()
    RESUME_SEED = auto()
    REQUEST_STATE = auto()


class RiskLevel(IntEnum):
    """How risky a command is judged to be."""

    GREEN = 1
    YELLOW = 2
    ORANGE = 3
    RED = 4
    CRITICAL = 5
