"""Kasmina: seed slots, their lifecycle, the hosts they grow in, and the seed blueprints.

The same names as ``esper.kasmina`` (plus ``ste_forward``, ``SeedStage`` and the
lifecycle helpers), with the slot's blend and straight-through estimator on fused kernels.
"""

from esper_fast.leyline import (
    VALID_TRANSITIONS,
    GateLevel,
    GateResult,
    SeedStage,
    is_active_stage,
    is_failure_stage,
    is_terminal_stage,
    is_valid_transition,
)
from esper_fast.kasmina.slot import Candidate, QualityGates, SeedMetrics, SeedSlot, SeedState
from esper_fast.kasmina.blueprints import BlueprintRegistry, BlueprintSpec, ConvBlock
from esper_fast.kasmina.isolation import AlphaSchedule, GradientIsolationMonitor, blend_with_isolation, ste_forward
from esper_fast.kasmina.protocol import HostProtocol
from esper_fast.kasmina.host import CNNHost, MorphogeneticModel, TransformerBlock, TransformerHost
from esper_fast.kasmina.stages import InvalidTransitionError

__all__ = [
    "SeedStage",
    "VALID_TRANSITIONS",
    "is_valid_transition",
    "is_terminal_stage",
    "is_active_stage",
    "is_failure_stage",
    "GateLevel",
    "GateResult",
    "SeedMetrics",
    "SeedState",
    "QualityGates",
    "SeedSlot",
    "Candidate",
    "BlueprintRegistry",
    "BlueprintSpec",
    "ConvBlock",
    "AlphaSchedule",
    "blend_with_isolation",
    "ste_forward",
    "GradientIsolationMonitor",
    "HostProtocol",
    "CNNHost",
    "TransformerHost",
    "TransformerBlock",
    "MorphogeneticModel",
    "InvalidTransitionError",
]
