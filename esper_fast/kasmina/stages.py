"""The lifecycle stages (leyline's, re-exported) and the error a strict slot raises for an
illegal move."""

from esper_fast.leyline.stages import (
    VALID_TRANSITIONS,
    SeedStage,
    is_active_stage,
    is_failure_stage,
    is_terminal_stage,
    is_valid_transition,
)

__all__ = [
    "SeedStage",
    "VALID_TRANSITIONS",
    "is_valid_transition",
    "is_active_stage",
    "is_failure_stage",
    "is_terminal_stage",
    "InvalidTransitionError",
]


class InvalidTransitionError(ValueError):
    """A lifecycle move that VALID_TRANSITIONS does not allow (raised only by a slot built with
    ``strict_transitions=True``; by default an illegal move returns a failed result)."""

    def __init__(self, current: SeedStage, target: SeedStage):
        allowed = ", ".join(stage.name for stage in VALID_TRANSITIONS[current]) or "none"
        super().__init__(
            f"illegal seed lifecycle transition {current.name} -> {target.name}; "
            f"allowed from {current.name}: {allowed}"
        )
        self.current = current
        self.target = target
