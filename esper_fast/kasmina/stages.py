"""The seed lifecycle stages and their legal transitions."""

from enum import IntEnum


class SeedStage(IntEnum):
    UNKNOWN = 0
    DORMANT = 1
    GERMINATED = 2
    TRAINING = 3
    BLENDING = 4
    SHADOWING = 5
    PROBATIONARY = 6
    FOSSILIZED = 7
    CULLED = 8
    EMBARGOED = 9
    RESETTING = 10


VALID_TRANSITIONS = {
    SeedStage.UNKNOWN: (),
    SeedStage.DORMANT: (SeedStage.GERMINATED,),
    SeedStage.GERMINATED: (SeedStage.TRAINING, SeedStage.CULLED),
    SeedStage.TRAINING: (SeedStage.BLENDING, SeedStage.CULLED),
    SeedStage.BLENDING: (SeedStage.SHADOWING, SeedStage.CULLED),
    SeedStage.SHADOWING: (SeedStage.PROBATIONARY, SeedStage.CULLED),
    SeedStage.PROBATIONARY: (SeedStage.FOSSILIZED, SeedStage.CULLED),
    SeedStage.FOSSILIZED: (),
    SeedStage.CULLED: (SeedStage.EMBARGOED,),
    SeedStage.EMBARGOED: (SeedStage.RESETTING,),
    SeedStage.RESETTING: (SeedStage.DORMANT,),
}

# Stages whose seed takes part in the forward pass.
ACTIVE_STAGES = frozenset(
    {SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.SHADOWING, SeedStage.PROBATIONARY, SeedStage.FOSSILIZED}
)


def is_valid_transition(current: SeedStage, target: SeedStage) -> bool:
    return target in VALID_TRANSITIONS[current]


# Stages a seed leaves the lifecycle through; a slot holding one may germinate again.
FAILURE_STAGES = frozenset({SeedStage.CULLED, SeedStage.EMBARGOED, SeedStage.RESETTING})


class InvalidTransitionError(ValueError):
    """A lifecycle move that VALID_TRANSITIONS does not allow."""

    def __init__(self, current: SeedStage, target: SeedStage):
        allowed = ", ".join(stage.name for stage in VALID_TRANSITIONS[current]) or "none"
        super().__init__(
            f"illegal seed lifecycle transition {current.name} -> {target.name}; "
            f"allowed from {current.name}: {allowed}"
        )
        self.current = current
        self.target = target


def is_active_stage(stage: SeedStage) -> bool:
    """True for the stages whose seed takes part in the forward pass."""
    return stage in ACTIVE_STAGES


def is_failure_stage(stage: SeedStage) -> bool:
    return stage in FAILURE_STAGES


def is_terminal_stage(stage: SeedStage) -> bool:
    return stage == SeedStage.FOSSILIZED
