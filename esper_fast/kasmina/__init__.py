"""Kasmina: seed slots, their lifecycle, the hosts they grow in, and the seed blueprints."""

from esper_fast.kasmina.blueprints import BlueprintRegistry, BlueprintSpec
from esper_fast.kasmina.gates import GateLevel, GateResult, QualityGates
from esper_fast.kasmina.host import CNNHost, MorphogeneticModel, TransformerHost
from esper_fast.kasmina.isolation import AlphaSchedule, blend_with_isolation, ste_forward
from esper_fast.kasmina.slot import SeedMetrics, SeedSlot, SeedState, TelemetryEvent
from esper_fast.kasmina.stages import VALID_TRANSITIONS, InvalidTransitionError, SeedStage, is_valid_transition

__all__ = [
    "MorphogeneticModel",
    "CNNHost",
    "TransformerHost",
    "SeedSlot",
    "SeedState",
    "SeedMetrics",
    "SeedStage",
    "QualityGates",
    "BlueprintRegistry",
    "AlphaSchedule",
    "blend_with_isolation",
    "ste_forward",
    "BlueprintSpec",
    "GateLevel",
    "GateResult",
    "TelemetryEvent",
    "InvalidTransitionError",
    "VALID_TRANSITIONS",
    "is_valid_transition",
]
